"""Label names of MS-COCO, NUS-WIDE and MIRFlickr, and the continual task presets.

With these, a task list in a config can be written by name (``[[bicycle, car], ...]``)
or by preset (``coco_balanced``), as the CASH / PBEH protocol states it. Column order
of each list is the order of the label matrices the public feature files and the DCMHT / DSPH ``.mat`` files use:

- ``coco``: the 80 detection categories in COCO's canonical order (category id order).
- ``nuswide81``: the 81 NUS-WIDE concepts, alphabetical (the ground-truth file order).
- ``nuswide21``: the 21 most frequent concepts of the DCMHT / DSPH NUS-WIDE files: the
  81-column order restricted to those 21 columns, so it is alphabetical as well.
- ``mirflickr``: the 24 MIRFlickr-25K potential labels, alphabetical (the order of the
  annotation files). Some CLIP-hashing repositories list them in another order
  (``mirflickr_alt``); the label.mat itself carries no names, so check the order
  against a few images if names matter for your experiment.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

COCO: Tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)

NUSWIDE81: Tuple[str, ...] = (
    "airport", "animal", "beach", "bear", "birds", "boats", "book", "bridge", "buildings",
    "cars", "castle", "cat", "cityscape", "clouds", "computer", "coral", "cow", "dancing",
    "dog", "earthquake", "elk", "fire", "fish", "flags", "flowers", "food", "fox", "frost",
    "garden", "glacier", "grass", "harbor", "horses", "house", "lake", "leaf", "map",
    "military", "moon", "mountain", "nighttime", "ocean", "person", "plane", "plants",
    "police", "protest", "railroad", "rainbow", "reflection", "road", "rocks", "running",
    "sand", "sign", "sky", "snow", "soccer", "sports", "statue", "street", "sun", "sunset",
    "surf", "swimmers", "tattoo", "temple", "tiger", "tower", "town", "toy", "train", "tree",
    "valley", "vehicle", "water", "waterfall", "wedding", "whales", "window", "zebra",
)

NUSWIDE21: Tuple[str, ...] = (
    "animal", "beach", "buildings", "clouds", "flowers", "grass", "lake", "mountain", "ocean",
    "person", "plants", "reflection", "road", "rocks", "sky", "snow", "sunset", "tree",
    "vehicle", "water", "window",
)

MIRFLICKR: Tuple[str, ...] = (
    "animals", "baby", "bird", "car", "clouds", "dog", "female", "flower", "food", "indoor",
    "lake", "male", "night", "people", "plant_life", "portrait", "river", "sea", "sky",
    "structures", "sunset", "transport", "tree", "water",
)

MIRFLICKR_ALT: Tuple[str, ...] = (
    "river", "dog", "food", "transport", "plant_life", "bird", "people", "sunset", "male",
    "baby", "flower", "lake", "animals", "night", "clouds", "sky", "car", "tree", "water",
    "indoor", "structures", "sea", "female", "portrait",
)

LABEL_SETS: Dict[str, Tuple[str, ...]] = {
    "coco": COCO,
    "nuswide81": NUSWIDE81,
    "nuswide21": NUSWIDE21,
    "mirflickr": MIRFLICKR,
    "mirflickr_alt": MIRFLICKR_ALT,
}

# Which label set a column count most likely means (used only when none is named).
GUESS_BY_COUNT: Dict[int, str] = {80: "coco", 81: "nuswide81", 21: "nuswide21", 24: "mirflickr"}


def _chunks(names: Sequence[str], sizes: Sequence[int]) -> Tuple[Tuple[str, ...], ...]:
    out, start = [], 0
    for size in sizes:
        out.append(tuple(names[start:start + size]))
        start += size
    return tuple(out)


# The CASH / PBEH continual task splits (protocols.md), by category name.
TASK_PRESETS: Dict[str, Tuple[Tuple[str, ...], ...]] = {
    "coco_balanced": (
        ("bicycle", "car", "bus", "train", "fire hydrant", "stop sign", "bench", "cat", "sheep",
         "tennis racket", "bottle", "knife", "orange", "carrot", "tv", "keyboard"),
        ("person", "dog", "suitcase", "snowboard", "baseball bat", "baseball glove", "wine glass",
         "spoon", "apple", "donut", "bed", "laptop", "remote", "microwave", "toaster", "book"),
        ("truck", "boat", "traffic light", "horse", "elephant", "handbag", "frisbee", "sports ball",
         "cup", "pizza", "cake", "potted plant", "clock", "vase", "scissors", "hair drier"),
        ("airplane", "bird", "tie", "skis", "kite", "surfboard", "fork", "bowl", "hot dog", "couch",
         "toilet", "oven", "sink", "refrigerator", "teddy bear", "toothbrush"),
        ("motorcycle", "parking meter", "cow", "bear", "zebra", "giraffe", "backpack", "umbrella",
         "skateboard", "banana", "sandwich", "broccoli", "chair", "mouse", "dining table",
         "cell phone"),
    ),
    "coco_imbalanced": _chunks(COCO, (16, 16, 16, 16, 16)),
    "nus_balanced": (
        ("book", "elk", "fire", "flags", "flowers", "fox", "frost", "nighttime", "ocean", "person",
         "reflection", "sign", "snow", "soccer", "toy", "train"),
        ("beach", "bear", "bridge", "clouds", "cow", "dancing", "earthquake", "fish", "house",
         "military", "plants", "sports", "sun", "temple", "whales", "window"),
        ("airport", "boats", "cat", "computer", "glacier", "map", "mountain", "railroad", "rainbow",
         "road", "rocks", "sky", "statue", "sunset", "tree", "valley"),
        ("castle", "dog", "food", "garden", "harbor", "leaf", "moon", "plane", "police", "sand",
         "swimmers", "tower", "town", "water", "waterfall", "wedding"),
        ("animal", "birds", "buildings", "cars", "cityscape", "coral", "grass", "horses", "lake",
         "protest", "running", "street", "surf", "tattoo", "tiger", "vehicle", "zebra"),
    ),
    "nus_imbalanced": _chunks(NUSWIDE81, (16, 16, 16, 16, 17)),
}


def label_set(name: str) -> Tuple[str, ...]:
    """The label names of a named set; ``ValueError`` naming the known sets otherwise."""
    try:
        return LABEL_SETS[name]
    except KeyError:
        raise ValueError(f"unknown label set {name!r}; known: {', '.join(LABEL_SETS)}") from None


def task_preset(name: str) -> Tuple[Tuple[str, ...], ...]:
    """The category lists of a named task preset (``coco_balanced`` ...)."""
    try:
        return TASK_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown task preset {name!r}; known: {', '.join(TASK_PRESETS)}") from None


def read_label_file(path: Union[str, Path]) -> Tuple[str, ...]:
    """One label name per non-empty line of a text file."""
    from utils.errors import DataError

    path = Path(path)
    try:
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read label names ({exc}); expected a UTF-8 text file, one name a line") from None
    if not names:
        raise DataError(f"{path}: no label names found; expected one name a line")
    return names


def resolve_label_names(spec: Optional[str], num_classes: int, source: str) -> Tuple[Tuple[str, ...], str]:
    """(names, how they were chosen) for a label matrix of ``num_classes`` columns.

    ``spec``: a label-set name, a text file (one name a line), ``auto`` / None (guess a
    known set from the column count, else ``class_0 ...``). A count mismatch is a
    DataError naming ``source`` (the label file).
    """
    from utils.errors import DataError

    if spec in (None, "", "auto"):
        guess = GUESS_BY_COUNT.get(num_classes)
        if guess is None:
            return tuple(f"class_{i}" for i in range(num_classes)), "generic (class_<i>)"
        return LABEL_SETS[guess], f"preset {guess} (guessed from {num_classes} columns)"
    if spec in LABEL_SETS:
        names, how = LABEL_SETS[spec], f"preset {spec}"
    elif Path(spec).is_file():
        names, how = read_label_file(spec), f"file {Path(spec).name}"
    else:
        raise DataError(
            f"label names {spec!r}: neither a known set ({', '.join(LABEL_SETS)}) nor an existing file "
            "(one name a line)"
        )
    if len(names) != num_classes:
        raise DataError(f"{source}: has {num_classes} label columns but label names {spec!r} give {len(names)}")
    return tuple(names), how


def resolve_tasks(
    tasks: Union[str, Sequence[Sequence[Union[str, int]]]], label_names: Sequence[str]
) -> List[Tuple[int, ...]]:
    """Column indices of each task from a preset name or lists of names / indices.

    Raises ``ValueError`` for an unknown preset, an unknown name (with the closest known
    one), an index out of range, an empty task, or a column listed in two tasks.
    """
    import difflib

    spec = task_preset(tasks) if isinstance(tasks, str) else tasks
    if not spec:
        raise ValueError("tasks: expected a preset name or a non-empty list of category lists")
    index = {name: i for i, name in enumerate(label_names)}
    owner: Dict[int, int] = {}
    out: List[Tuple[int, ...]] = []
    for t, cats in enumerate(spec):
        if isinstance(cats, (str, bytes)) or not cats:
            raise ValueError(f"tasks[{t}]: expected a non-empty list of category names or indices, got {cats!r}")
        cols: List[int] = []
        for cat in cats:
            if isinstance(cat, bool) or not isinstance(cat, (int, str)):
                raise ValueError(f"tasks[{t}]: {cat!r} is neither a category name nor a column index")
            if isinstance(cat, int):
                if not 0 <= cat < len(label_names):
                    raise ValueError(f"tasks[{t}]: column {cat} out of range (0..{len(label_names) - 1})")
                col = cat
            elif cat in index:
                col = index[cat]
            else:
                close = difflib.get_close_matches(cat, list(index), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(
                    f"tasks[{t}]: unknown category {cat!r}{hint}; the cache's {len(label_names)} label names "
                    f"start {', '.join(list(label_names)[:5])}"
                )
            if col in owner:
                raise ValueError(
                    f"tasks[{t}]: category {label_names[col]!r} is already in tasks[{owner[col]}]; "
                    "each category belongs to one task"
                )
            owner[col] = t
            cols.append(col)
        out.append(tuple(cols))
    return out


def category_task_name(columns: Sequence[int], label_names: Sequence[str], shown: int = 3) -> str:
    """A task's name from the categories that define it, for logs, results and plots:
    ``bicycle, car`` or ``person, bicycle, car +13`` (the first ``shown`` names and how
    many more); ``cats 0-4`` / ``cats 0,3,7`` by column when the labels have no names."""
    cols = [int(c) for c in columns]
    names = [str(label_names[c]) for c in cols if c < len(label_names) and str(label_names[c]).strip()]
    if len(names) == len(cols) and cols:
        more = len(names) - shown
        return ", ".join(names[:shown]) + (f" +{more}" if more > 0 else "")
    if len(cols) > 2 and cols == list(range(cols[0], cols[0] + len(cols))):
        return f"cats {cols[0]}-{cols[-1]}"
    return "cats " + ",".join(str(c) for c in cols)
