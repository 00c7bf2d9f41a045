"""A generator of CLIP-like two-modality multi-label features, registered as ``synthetic``:
for tests, examples and benchmarks without data files.

The C classes are cut into T tasks of consecutive classes (C // T each, the
remainder going to the last tasks: 81 classes -> 16/16/16/16/17 as NUS-WIDE). A
sample of task t carries 1..``max_labels`` labels drawn from task t's classes and,
with probability ``cross_task_prob``, one more label of an earlier task (so samples
of different tasks can be relevant to each other, as in COCO). Its pair latent is
the normalised mean of its classes' prototypes plus a shared jitter; each modality
maps the latent through its own random linear map, adds its own noise, is
L2-normalised, is shifted by half the ``modality_gap`` along an offset direction
(+ for image, - for text; the same direction when the dimensions agree) and is
normalised again: two cones apart, as CLIP's modalities are.

Everything is drawn from local generators keyed by (seed, purpose, task, split), so
a stream is a function of its arguments only.
"""
from __future__ import annotations

from typing import Dict, List, Literal, Optional

import numpy as np
import torch

from common.register import DATASETS
from dataset.feature_set import FeatureSet, Task, TaskStream
from dataset.splits import carve_val, check_positive, resolve_val, rng_for

# Split sizes of the CASH / PBEH continual protocol (protocols.md).
PRESETS: Dict[str, Dict[str, object]] = {
    "coco_balanced": dict(
        num_classes=80, query=[600] * 5,
        train=[2402, 2250, 2313, 2620, 2558], database=[6605, 6224, 6382, 7150, 6996],
    ),
    "coco_imbalanced": dict(
        num_classes=80, query=[2124, 956, 116, 484, 437],
        train=[7647, 3444, 418, 1743, 1574], database=[19118, 8611, 1046, 4357, 3934],
    ),
    "nus_balanced": dict(
        num_classes=81, query=[1500] * 5,
        train=[5430, 6024, 6194, 6061, 6091], database=[15430, 16559, 16986, 16652, 16727],
    ),
    "nus_imbalanced": dict(
        num_classes=81, query=[1796, 1489, 1252, 2261, 1602],
        train=[6469, 5363, 4508, 8140, 5768], database=[16172, 13407, 11269, 20349, 14419],
    ),
}
DEFAULTS = dict(num_classes=40, num_tasks=5, query_size=100, train_size=400, database_size=1000)
SPLITS = ("query", "train", "database")


def class_partition(num_classes: int, num_tasks: int) -> List[List[int]]:
    """Consecutive class blocks, C // T each, the remainder added to the last tasks."""
    base, extra = divmod(num_classes, num_tasks)
    counts = [base + (1 if t >= num_tasks - extra else 0) for t in range(num_tasks)]
    starts = np.cumsum([0] + counts)
    return [list(range(int(starts[t]), int(starts[t + 1]))) for t in range(num_tasks)]


def imbalanced_sizes(base: int, num_tasks: int, imbalance: float) -> List[int]:
    """``base`` for task 1 decaying geometrically to ``base / imbalance`` for the last task."""
    if num_tasks == 1:
        return [base]
    return [max(1, int(round(base * imbalance ** (-t / (num_tasks - 1))))) for t in range(num_tasks)]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@DATASETS.register("synthetic")
class SyntheticDataset:
    """Seeded CLIP-like features (see the module doc).

    Sizes per task: ``query_size`` / ``train_size`` / ``database_size`` (one number,
    shaped across tasks by ``imbalance`` = largest / smallest task, task 1 largest) or
    ``query_sizes`` / ``train_sizes`` / ``database_sizes`` (one number per task).
    Train is the first ``train_size`` samples of the task's database (so train is
    inside the database, as in the CASH / PBEH files); val is carved from train.
    ``preset`` (``coco_balanced`` ...) fixes classes, tasks and all sizes to the CASH /
    PBEH tables; ``scale`` multiplies every size (e.g. 0.1 for a quick benchmark).
    ``noise`` sets both the pair's shared latent jitter and each modality's own noise,
    relative to the unit-length signal. With the defaults (40 classes, 8 per task,
    noise 1.0) a least-squares image -> text map fitted on train reaches mAP about
    0.89 on task queries against chance about 0.44; noise 1.5 gives about 0.67.
    The two maps are independent, so raw image-text cosine is at chance: a model
    must learn the cross-modal alignment (unlike real CLIP features, which come
    pre-aligned).
    """

    def __init__(
        self,
        preset: Optional[Literal["coco_balanced", "coco_imbalanced", "nus_balanced", "nus_imbalanced"]] = None,
        num_classes: Optional[int] = None,
        num_tasks: Optional[int] = None,
        image_dim: int = 512,
        text_dim: int = 512,
        query_size: Optional[int] = None,
        train_size: Optional[int] = None,
        database_size: Optional[int] = None,
        query_sizes: Optional[List[int]] = None,
        train_sizes: Optional[List[int]] = None,
        database_sizes: Optional[List[int]] = None,
        imbalance: float = 1.0,
        scale: float = 1.0,
        max_labels: int = 3,
        cross_task_prob: float = 0.1,
        latent_dim: int = 64,
        modality_gap: float = 0.5,
        noise: float = 1.0,
        seed: int = 0,
        val_fraction: Optional[float] = None,
        val_size: Optional[int] = None,
    ) -> None:
        scalars = {"query": query_size, "train": train_size, "database": database_size}
        lists = {"query": query_sizes, "train": train_sizes, "database": database_sizes}
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
            clash = [k for k, v in (("num_classes", num_classes), ("num_tasks", num_tasks)) if v is not None]
            clash += [f"{s}_size" for s, v in scalars.items() if v is not None]
            clash += [f"{s}_sizes" for s, v in lists.items() if v is not None]
            if clash or imbalance != 1.0:
                raise ValueError(f"preset '{preset}' fixes the classes, tasks and sizes; remove {', '.join(clash) or 'imbalance'}")
            spec = PRESETS[preset]
            num_classes = int(spec["num_classes"])  # type: ignore[arg-type]
            lists = {s: list(spec[s]) for s in SPLITS}  # type: ignore[call-overload]
            num_tasks = len(lists["query"])
        num_classes = DEFAULTS["num_classes"] if num_classes is None else num_classes
        if num_tasks is None:
            given = [v for v in lists.values() if v is not None]
            num_tasks = len(given[0]) if given else DEFAULTS["num_tasks"]
        for key, value in (("num_classes", num_classes), ("num_tasks", num_tasks), ("image_dim", image_dim),
                           ("text_dim", text_dim), ("max_labels", max_labels), ("latent_dim", latent_dim)):
            check_positive(key, value, allow_none=False)
        if num_tasks > num_classes:
            raise ValueError(f"num_tasks ({num_tasks}) exceeds num_classes ({num_classes}): every task needs a class")
        if imbalance < 1.0:
            raise ValueError(f"imbalance: the largest / smallest task size ratio, must be >= 1, got {imbalance}")
        if scale <= 0:
            raise ValueError(f"scale: must be > 0, got {scale}")
        if not 0.0 <= cross_task_prob <= 1.0:
            raise ValueError(f"cross_task_prob: must be in [0, 1], got {cross_task_prob}")
        if modality_gap < 0 or noise < 0:
            raise ValueError(f"modality_gap and noise must be >= 0, got {modality_gap} and {noise}")

        sizes: Dict[str, List[int]] = {}
        for split in SPLITS:
            scalar, per_task = scalars[split], lists[split]
            if scalar is not None and per_task is not None:
                raise ValueError(f"{split}_size and {split}_sizes are both set; set one of them")
            if per_task is not None:
                if len(per_task) != num_tasks:
                    raise ValueError(f"{split}_sizes: expected {num_tasks} numbers (one per task), got {len(per_task)}")
                if imbalance != 1.0:
                    raise ValueError(f"imbalance shapes {split}_size across tasks; it cannot apply to {split}_sizes")
                values = list(per_task)
            else:
                base = DEFAULTS[f"{split}_size"] if scalar is None else scalar
                check_positive(f"{split}_size", base, allow_none=False)
                values = imbalanced_sizes(base, num_tasks, imbalance)
            for v in values:
                check_positive(f"{split}_sizes", v, allow_none=False)
            sizes[split] = [max(1, int(round(v * scale))) for v in values]
        for t, (tr, db) in enumerate(zip(sizes["train"], sizes["database"])):
            if tr > db:
                raise ValueError(f"task {t + 1}: train size {tr} exceeds database size {db} (train is part of the database)")

        self.preset = preset
        self.num_classes, self.num_tasks = int(num_classes), int(num_tasks)
        self.image_dim, self.text_dim, self.latent_dim = image_dim, text_dim, latent_dim
        self.sizes = sizes
        self.imbalance, self.scale = float(imbalance), float(scale)
        self.max_labels = max_labels
        self.cross_task_prob = float(cross_task_prob)
        self.modality_gap, self.noise = float(modality_gap), float(noise)
        self.seed = int(seed)
        self.val_fraction, self.val_size = resolve_val(val_fraction, val_size)

    # ------------------------------------------------------------------ generation
    def _structure(self) -> Dict[str, np.ndarray]:
        """Class prototypes, the two linear maps and the two offset directions."""
        rng = rng_for(self.seed, "synthetic-structure")
        f32 = np.float32
        s = {
            "prototypes": _unit_rows(rng.standard_normal((self.num_classes, self.latent_dim), dtype=f32)),
            "map_image": rng.standard_normal((self.latent_dim, self.image_dim), dtype=f32) / np.sqrt(self.latent_dim),
            "map_text": rng.standard_normal((self.latent_dim, self.text_dim), dtype=f32) / np.sqrt(self.latent_dim),
            "offset_image": _unit_rows(rng.standard_normal((1, self.image_dim), dtype=f32))[0],
        }
        s["offset_text"] = (
            s["offset_image"] if self.text_dim == self.image_dim
            else _unit_rows(rng.standard_normal((1, self.text_dim), dtype=f32))[0]
        )
        return s

    def _labels(self, rng: np.random.Generator, n: int, own: List[int], earlier: List[int]) -> np.ndarray:
        labels = np.zeros((n, self.num_classes), dtype=np.float32)
        k = rng.integers(1, min(self.max_labels, len(own)) + 1, size=n)
        order = np.argsort(rng.random((n, len(own))), axis=1)  # a random permutation per row
        chosen = np.asarray(own)[order]
        keep = np.arange(len(own))[None, :] < k[:, None]
        rows = np.repeat(np.arange(n)[:, None], len(own), axis=1)
        labels[rows[keep], chosen[keep]] = 1.0
        extra = rng.random(n) < self.cross_task_prob
        pick = np.asarray(earlier)[rng.integers(0, len(earlier), size=n)] if earlier else None
        if earlier:
            labels[np.flatnonzero(extra), pick[extra]] = 1.0
        return labels

    def _modality(self, rng: np.random.Generator, latent: np.ndarray, lin: np.ndarray, offset: np.ndarray,
                  sign: float) -> np.ndarray:
        x = _unit_rows(latent @ lin)
        x = _unit_rows(x + self.noise * rng.standard_normal(x.shape, dtype=np.float32) / np.sqrt(x.shape[1]))
        return _unit_rows(x + sign * 0.5 * self.modality_gap * offset[None, :])

    def _split(self, s: Dict[str, np.ndarray], t: int, split: str, n: int, own: List[int],
               earlier: List[int]) -> FeatureSet:
        rng = rng_for(self.seed, "synthetic", t, split)
        labels = self._labels(rng, n, own, earlier)
        latent = _unit_rows(labels @ s["prototypes"])
        jitter = rng.standard_normal(latent.shape, dtype=np.float32) / np.sqrt(self.latent_dim)
        latent = _unit_rows(latent + self.noise * jitter)  # shared by the pair: instance-level content
        image = self._modality(rng, latent, s["map_image"], s["offset_image"], +1.0)
        text = self._modality(rng, latent, s["map_text"], s["offset_text"], -1.0)
        return FeatureSet(
            image=torch.from_numpy(image.astype(np.float32)),
            text=torch.from_numpy(text.astype(np.float32)),
            labels=torch.from_numpy(labels),
            ids=tuple(f"syn:t{t}:{split}:{i}" for i in range(n)),
        )

    def load(self) -> TaskStream:
        s = self._structure()
        parts = class_partition(self.num_classes, self.num_tasks)
        tasks = []
        for t in range(self.num_tasks):
            earlier = [c for p in parts[:t] for c in p]
            query = self._split(s, t, "query", self.sizes["query"][t], parts[t], earlier)
            database = self._split(s, t, "database", self.sizes["database"][t], parts[t], earlier)
            train, val = carve_val(
                database.subset(list(range(self.sizes["train"][t]))), self.seed, t, self.val_fraction, self.val_size
            )
            tasks.append(Task(index=t, name=f"classes {parts[t][0]}-{parts[t][-1]}", train=train, val=val,
                              query=query, database=database, classes=tuple(parts[t])))
        return TaskStream(
            name=f"synthetic-{self.preset}" if self.preset else "synthetic",
            tasks=tuple(tasks),
            label_names=tuple(f"class_{c}" for c in range(self.num_classes)),
            meta={
                "loader": "synthetic", "preset": self.preset, "seed": self.seed, "sizes": self.sizes,
                "imbalance": self.imbalance, "scale": self.scale, "modality_gap": self.modality_gap,
                "noise": self.noise, "cross_task_prob": self.cross_task_prob, "max_labels": self.max_labels,
            },
        )


def synthetic_like(preset: str, **kwargs: object) -> SyntheticDataset:
    """A synthetic dataset with the split sizes of ``preset`` (e.g. ``coco_balanced``:
    5 tasks, 80 classes, query 600 per task, ...); ``kwargs`` add e.g. ``scale``, ``seed``."""
    return SyntheticDataset(preset=preset, **kwargs)  # type: ignore[arg-type]
