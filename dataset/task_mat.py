"""The task-wise ``.mat`` feature files of CASH / PBEH (MS-COCO and NUS-WIDE), registered
as ``task_mat``.

One folder holds, for every task t = 0, 1, ..., nine files: {train, test, database}
x {image, text, label}; ``test`` is the query split. Two naming schemes exist:

- ``coco``:    ``{split}_{t}_{kind}.mat``, keys ``{split}_{t}_image`` / ``_text`` / ``_lab``
- ``nuswide``: ``{split}_task_{t}_{kind}.mat``, keys ``{split}_task_{t}_{kind}``

Files may be MATLAB v7.3 (HDF5, what the authors ship) or older; see ``dataset.mat_io``.
Labels are multi-hot over the full label space (COCO 80, NUS-WIDE 81 columns).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple

import numpy as np
import torch

from common.register import DATASETS
from dataset.feature_set import FeatureSet, Task, TaskStream
from dataset.mat_io import mat_format, read_mat_array, write_mat_array
from dataset.splits import check_positive, carve_val, resolve_val, subsample, task_classes_from_labels
from utils.errors import DataError

SPLITS = ("train", "test", "database")  # file split names; "test" is the query split
KINDS = ("image", "text", "label")
PATTERNS = {
    "coco": "{train,test,database}_{t}_{image,text,label}.mat",
    "nuswide": "{train,test,database}_task_{t}_{image,text,label}.mat",
}
SOURCE = (
    "these are the continual feature files the CASH / PBEH authors publish for MS-COCO and "
    "NUS-WIDE (download links in their READMEs)"
)


def split_stem(scheme: str, split: str, t: int) -> str:
    """``train_0`` (coco) or ``train_task_0`` (nuswide): file and key prefix of one split."""
    return f"{split}_{t}" if scheme == "coco" else f"{split}_task_{t}"


def file_name(scheme: str, split: str, t: int, kind: str) -> str:
    return f"{split_stem(scheme, split, t)}_{kind}.mat"


def key_name(scheme: str, split: str, t: int, kind: str) -> str:
    """The variable inside a file; the COCO files call the label variable ``..._lab``."""
    suffix = "lab" if (scheme == "coco" and kind == "label") else kind
    return f"{split_stem(scheme, split, t)}_{suffix}"


def task_files(scheme: str, t: int) -> List[str]:
    return [file_name(scheme, s, t, k) for s in SPLITS for k in KINDS]


def write_task_mat(stream: TaskStream, root: str | Path, scheme: Literal["coco", "nuswide"] = "coco") -> List[Path]:
    """Write ``stream`` as the nine v7.3 files per task that ``task_mat`` (and the CASH /
    PBEH authors' loaders) read; returns the paths written. A task's train and val rows
    go together into its train file, as in the published files (a reader carves its own
    val split); query goes to ``test``."""
    if scheme not in PATTERNS:
        raise ValueError(f"scheme: expected 'coco' or 'nuswide', got {scheme!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for t, task in enumerate(stream.tasks):
        parts = {"train": FeatureSet.concat([task.train, task.val]) if len(task.val) else task.train,
                 "test": task.query, "database": task.database}
        for split, fs in parts.items():
            for kind, values in (("image", fs.image), ("text", fs.text), ("label", fs.labels)):
                path = root / file_name(scheme, split, t, kind)
                write_mat_array(path, key_name(scheme, split, t, kind), values.cpu().numpy())
                written.append(path)
    return written


@DATASETS.register("task_mat")
class TaskMatDataset:
    """CASH / PBEH task-wise feature files -> TaskStream.

    ``root``: the folder with the ``.mat`` files. ``scheme``: file naming (``auto``
    detects it). ``num_tasks``: how many tasks to read (None: every task t = 0, 1, ...
    with files present). ``label_names``: one name per label column (optional).
    ``val_fraction`` / ``val_size``: validation split carved from each task's train
    split (default 10 %); ``seed``: the carving / subsampling seed. ``max_query`` /
    ``max_train`` / ``max_database``: optional seeded caps per task for quick runs.
    ``task_classes``: how ``Task.classes`` is derived (see
    ``dataset.splits.task_classes_from_labels``). ``normalize``: ``l2`` rescales each
    feature row to unit length; ``none`` keeps the files' values.
    """

    def __init__(
        self,
        root: str,
        scheme: Literal["auto", "coco", "nuswide"] = "auto",
        num_tasks: Optional[int] = None,
        label_names: Optional[List[str]] = None,
        val_fraction: Optional[float] = None,
        val_size: Optional[int] = None,
        seed: int = 0,
        max_query: Optional[int] = None,
        max_train: Optional[int] = None,
        max_database: Optional[int] = None,
        task_classes: Literal["dominant", "first_seen"] = "dominant",
        normalize: Literal["none", "l2"] = "none",
        name: Optional[str] = None,
    ) -> None:
        if not isinstance(root, str) or not root.strip():
            raise ValueError(f"root: expected the folder holding the .mat files, got {root!r}")
        if scheme not in ("auto", "coco", "nuswide"):
            raise ValueError(f"scheme: expected 'auto', 'coco' or 'nuswide', got {scheme!r}")
        if task_classes not in ("dominant", "first_seen"):
            raise ValueError(f"task_classes: expected 'dominant' or 'first_seen', got {task_classes!r}")
        if normalize not in ("none", "l2"):
            raise ValueError(f"normalize: expected 'none' or 'l2', got {normalize!r}")
        check_positive("num_tasks", num_tasks)
        for key, value in (("max_query", max_query), ("max_train", max_train), ("max_database", max_database)):
            check_positive(key, value)
        if label_names is not None and (not label_names or not all(isinstance(n, str) and n for n in label_names)):
            raise ValueError("label_names: expected a non-empty list of non-empty strings, or null")
        self.root = root
        self.scheme = scheme
        self.num_tasks = num_tasks
        self.label_names = None if label_names is None else list(label_names)
        self.val_fraction, self.val_size = resolve_val(val_fraction, val_size)
        self.seed = int(seed)
        self.max_query, self.max_train, self.max_database = max_query, max_train, max_database
        self.task_classes = task_classes
        self.normalize = normalize
        self.name = name

    # ------------------------------------------------------------------ discovery
    def _missing_dir_message(self, root: Path, what: str) -> str:
        patterns = " or ".join(PATTERNS[s] for s in (("coco", "nuswide") if self.scheme == "auto" else (self.scheme,)))
        return f"{root}: {what}; expected files named {patterns} (t = 0, 1, ...); {SOURCE}"

    def detect_scheme(self, root: Path) -> str:
        """The naming scheme of the files in ``root`` (the configured one unless ``auto``)."""
        if self.scheme != "auto":
            return self.scheme
        found = [s for s in ("coco", "nuswide") if any((root / f).is_file() for f in task_files(s, 0))]
        if len(found) == 2:
            raise DataError(
                f"{root}: holds files of both naming schemes ({PATTERNS['coco']} and {PATTERNS['nuswide']}); "
                "set dataset.scheme to 'coco' or 'nuswide'"
            )
        if not found:
            hint = ""
            for sub in sorted(p for p in root.iterdir() if p.is_dir()):
                if any((sub / file_name(s, "train", 0, "image")).is_file() for s in ("coco", "nuswide")):
                    hint = f" (the subfolder {sub} has them: set dataset.root to it)"
                    break
            raise DataError(self._missing_dir_message(root, "no task feature files found" + hint))
        return found[0]

    def detect_num_tasks(self, root: Path, scheme: str) -> int:
        """The configured task count, or the number of tasks t = 0, 1, ... with any file present."""
        if self.num_tasks is not None:
            return self.num_tasks
        t = 0
        while any((root / f).is_file() for f in task_files(scheme, t)):
            t += 1
        if t == 0:
            raise DataError(self._missing_dir_message(root, f"no files of task 0 ({PATTERNS[scheme]}) found"))
        return t

    # ------------------------------------------------------------------ reading
    def _read_split(self, root: Path, scheme: str, split: str, t: int) -> Tuple[FeatureSet, Dict[str, Path]]:
        arrays: Dict[str, np.ndarray] = {}
        paths: Dict[str, Path] = {}
        for kind in KINDS:
            path = root / file_name(scheme, split, t, kind)
            key = key_name(scheme, split, t, kind)
            arr = read_mat_array(path, key)
            if arr.ndim != 2:
                raise DataError(f"{path}: key '{key}' has shape {arr.shape}, expected a 2-D matrix (N x D)")
            if not np.isfinite(arr).all():
                raise DataError(f"{path}: key '{key}' holds NaN or infinite values")
            if kind == "label" and not np.isin(arr, (0, 1)).all():
                bad = arr[~np.isin(arr, (0, 1))].flat[0]
                raise DataError(f"{path}: key '{key}' holds the value {bad}, expected multi-hot labels in {{0, 1}}")
            arrays[kind], paths[kind] = arr, path
        n = arrays["image"].shape[0]
        for kind in ("text", "label"):
            if arrays[kind].shape[0] != n:
                note = " (v7.3 files are read transposed, as MATLAB writes them)" if mat_format(paths[kind]) == "v7.3" else ""
                raise DataError(
                    f"row counts differ: {paths['image']} has {n} samples, {paths[kind]} has "
                    f"{arrays[kind].shape[0]}{note}"
                )
        image = torch.from_numpy(np.ascontiguousarray(arrays["image"], dtype=np.float32))
        text = torch.from_numpy(np.ascontiguousarray(arrays["text"], dtype=np.float32))
        if self.normalize == "l2":
            image = torch.nn.functional.normalize(image, dim=1)
            text = torch.nn.functional.normalize(text, dim=1)
        stem = split_stem(scheme, split, t)
        fs = FeatureSet(
            image=image,
            text=text,
            labels=torch.from_numpy(np.ascontiguousarray(arrays["label"], dtype=np.float32)),
            ids=tuple(f"{stem}:{i}" for i in range(n)),
        )
        return fs, paths

    def load(self) -> TaskStream:
        """Read every task's nine files; raises DataError on a missing or bad file."""
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise DataError(self._missing_dir_message(root, "data directory not found"))
        scheme = self.detect_scheme(root)
        num_tasks = self.detect_num_tasks(root, scheme)
        missing = [f for t in range(num_tasks) for f in task_files(scheme, t) if not (root / f).is_file()]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise DataError(
                f"{root}: {len(missing)} of {9 * num_tasks} feature files for tasks 0..{num_tasks - 1} missing "
                f"({shown}); expected {PATTERNS[scheme]}; {SOURCE}"
            )

        raw: List[Dict[str, FeatureSet]] = []
        ref: Optional[Tuple[Tuple[int, int, int], Dict[str, Path]]] = None
        formats = set()
        for t in range(num_tasks):
            splits: Dict[str, FeatureSet] = {}
            for split in SPLITS:
                fs, paths = self._read_split(root, scheme, split, t)
                formats.update(mat_format(p) for p in paths.values())
                dims = (fs.image.shape[1], fs.text.shape[1], fs.labels.shape[1])
                if ref is None:
                    ref = (dims, paths)
                for i, kind in enumerate(KINDS):
                    if dims[i] != ref[0][i]:
                        what = "label columns" if kind == "label" else f"{kind} feature dimensions"
                        raise DataError(
                            f"{what} differ: {ref[1][kind]} has {ref[0][i]}, {paths[kind]} has {dims[i]}"
                        )
                splits[split] = fs
            raw.append(splits)

        num_classes = ref[0][2]
        if self.label_names is not None and len(self.label_names) != num_classes:
            raise DataError(
                f"dataset.label_names has {len(self.label_names)} names but {ref[1]['label']} has "
                f"{num_classes} label columns"
            )
        classes = task_classes_from_labels([r["train"].labels for r in raw], self.task_classes)

        tasks = []
        for t, splits in enumerate(raw):
            train = subsample(splits["train"], self.max_train, self.seed, "train", t)
            train, val = carve_val(train, self.seed, t, self.val_fraction, self.val_size)
            tasks.append(Task(
                index=t,
                name=f"task_{t + 1}",  # defined by files, not categories: its 1-based number
                train=train,
                val=val,
                query=subsample(splits["test"], self.max_query, self.seed, "query", t),
                database=subsample(splits["database"], self.max_database, self.seed, "database", t),
                classes=classes[t],
            ))
        return TaskStream(
            name=self.name or root.name,
            tasks=tuple(tasks),
            label_names=tuple(self.label_names or ()),
            meta={
                "loader": "task_mat", "root": str(root), "scheme": scheme, "formats": sorted(formats),
                "seed": self.seed, "val_fraction": self.val_fraction, "val_size": self.val_size,
                "task_classes": self.task_classes, "normalize": self.normalize,
            },
        )
