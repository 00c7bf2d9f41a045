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

The realistic ``*_clip_like`` presets switch on five more properties of CLIP features
of COCO / NUS-WIDE (each parameter is documented in ``SyntheticDataset``): image and
text maps that share a part (``alignment``: a paired image-text cosine above the
unpaired one, as after CLIP's contrastive pre-training), a long tail of class
frequencies (``class_skew``), a label count per sample with a given mean
(``mean_labels``), labels that co-occur within semantic groups (``cooccurrence``) and
groups whose classes are spread over all tasks and share part of their prototype
(``shared_semantics``), so a later task's classes resemble earlier ones. With these
parameters at their defaults the generator draws exactly what it drew before.

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
# Realistic presets: split sizes plus generation parameters that imitate CLIP ViT-B
# features of the dataset (measured by tests/test_datasets.py::test_clip_like_preset_properties).
# Sizes: coco_clip_like = the MS-COCO balanced sizes rounded to uniform tasks;
# coco_clip_like_small = a quarter of them (train 600 -> 540 + val 60, query 150,
# database 1650 per task), a 5-task stream that six methods can be run on with 2 CPU
# cores; nus_clip_like = the NUS-WIDE balanced sizes rounded the same way.
# Measured on coco_clip_like_small, task 1 database: paired image-text cosine 0.19 vs
# unpaired -0.05; 2.0 labels per sample (below COCO's 2.9 on purpose: with 16 classes
# per task a higher count makes almost every pair relevant, chance mAP@1000 about 0.3
# here as it is); most frequent class 10x the median; the continual ridge baseline
# (models/ridge.py, 16 bits) scores mAP@1000 0.39-0.68 per task against 0.25-0.41 for
# codes that are all equal (chance).
_COCO_LIKE = dict(
    alignment=0.8, modality_gap=0.6, class_skew=0.7, mean_labels=1.8, max_labels=6, cooccurrence=0.5,
    num_groups=12, shared_semantics=0.5, cross_task_prob=0.3, noise=1.3, latent_dim=64,
)
CLIP_LIKE: Dict[str, Dict[str, object]] = {
    "coco_clip_like": dict(num_classes=80, query=[600] * 5, train=[2400] * 5, database=[6600] * 5, **_COCO_LIKE),
    "coco_clip_like_small": dict(num_classes=80, query=[150] * 5, train=[600] * 5, database=[1650] * 5, **_COCO_LIKE),
    "nus_clip_like": dict(
        num_classes=81, query=[1500] * 5, train=[6000] * 5, database=[16500] * 5,
        alignment=0.7, modality_gap=0.6, class_skew=0.9, mean_labels=1.6, max_labels=6, cooccurrence=0.4,
        num_groups=10, shared_semantics=0.5, cross_task_prob=0.3, noise=1.5, latent_dim=64,
    ),
}
# Generation parameters and their values when neither the config nor a preset sets them
# (the values of the original generator).
GENERATION_DEFAULTS: Dict[str, object] = dict(
    alignment=0.0, modality_gap=0.5, class_skew=0.0, mean_labels=None, max_labels=3, cooccurrence=0.0,
    num_groups=8, shared_semantics=0.0, cross_task_prob=0.1, noise=1.0, latent_dim=64,
)
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
    ``preset`` fixes classes, tasks and all sizes: ``coco_balanced`` ... to the CASH /
    PBEH tables; ``coco_clip_like``, ``coco_clip_like_small`` and ``nus_clip_like``
    also set the generation parameters below to values that imitate CLIP features of
    COCO / NUS-WIDE (a parameter set in the config overrides the preset's value).
    ``scale`` multiplies every size (e.g. 0.1 for a quick benchmark).

    Generation parameters (default in brackets; the real property each imitates):

    - ``noise`` [1.0]: the pair's shared latent jitter and each modality's own noise,
      relative to the unit-length signal: how much of a CLIP feature is not about the
      labels (background, style, caption wording). With the defaults (40 classes, 8
      per task) a least-squares image -> text map fitted on train reaches mAP about
      0.89 on task queries against chance about 0.44; noise 1.5 gives about 0.67.
    - ``modality_gap`` [0.5]: distance between the image and the text cone (CLIP's
      modality gap: image and text embeddings occupy two separate narrow cones).
    - ``alignment`` [0.0]: share of the image map in the text map, in [0, 1] (needs
      ``image_dim == text_dim`` when > 0). 0: independent maps, raw image-text cosine
      at chance, a model must learn the cross-modal alignment (unaligned modalities,
      e.g. BoW text). Near 1: CLIP-like pre-alignment, a paired image-text cosine well
      above the unpaired one.
    - ``class_skew`` [0.0]: Zipf exponent of class frequencies (class of random rank r
      drawn with weight r^-skew): COCO's and NUS-WIDE's long tail ("person" in about
      half of COCO images, "toaster" in 0.2%). 0: uniform, as before.
    - ``mean_labels`` [null]: mean number of own-task labels per sample, 1 + Poisson
      (clipped to ``max_labels``): COCO's label cardinality 2.9, NUS-WIDE's about 2.4.
      null: uniform on 1..``max_labels`` (the original generator).
    - ``max_labels`` [3]: the most own-task labels a sample carries.
    - ``cooccurrence`` [0.0]: probability that each further label of a sample comes from
      the semantic group of its first label: objects that appear together (fork, knife,
      dining table; sky, clouds).
    - ``num_groups`` [8]: number of semantic groups (COCO has 12 super-categories);
      class c is in group c mod ``num_groups``, so every group spans every task.
    - ``shared_semantics`` [0.0]: weight of the group prototype in a class prototype, in
      [0, 1]: classes of one super-category look alike across tasks (cat in task 1,
      dog in task 3), so a later task both reuses and overwrites what earlier ones
      taught.
    - ``cross_task_prob`` [0.1]: probability of one more label of an earlier task
      (COCO images of a later task still contain earlier objects).
    - ``latent_dim`` [64]: dimension of the shared pair latent (the semantic content
      both modalities describe).
    """

    def __init__(
        self,
        preset: Optional[Literal["coco_balanced", "coco_imbalanced", "nus_balanced", "nus_imbalanced",
                                 "coco_clip_like", "coco_clip_like_small", "nus_clip_like"]] = None,
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
        max_labels: Optional[int] = None,
        cross_task_prob: Optional[float] = None,
        latent_dim: Optional[int] = None,
        modality_gap: Optional[float] = None,
        noise: Optional[float] = None,
        alignment: Optional[float] = None,
        class_skew: Optional[float] = None,
        mean_labels: Optional[float] = None,
        cooccurrence: Optional[float] = None,
        num_groups: Optional[int] = None,
        shared_semantics: Optional[float] = None,
        seed: int = 0,
        val_fraction: Optional[float] = None,
        val_size: Optional[int] = None,
    ) -> None:
        scalars = {"query": query_size, "train": train_size, "database": database_size}
        lists = {"query": query_sizes, "train": train_sizes, "database": database_sizes}
        given = dict(max_labels=max_labels, cross_task_prob=cross_task_prob, latent_dim=latent_dim,
                     modality_gap=modality_gap, noise=noise, alignment=alignment, class_skew=class_skew,
                     mean_labels=mean_labels, cooccurrence=cooccurrence, num_groups=num_groups,
                     shared_semantics=shared_semantics)
        gen = dict(GENERATION_DEFAULTS)
        if preset is not None:
            if preset not in PRESETS and preset not in CLIP_LIKE:
                raise ValueError(f"preset: expected one of {', '.join([*PRESETS, *CLIP_LIKE])}, got {preset!r}")
            clash = [k for k, v in (("num_classes", num_classes), ("num_tasks", num_tasks)) if v is not None]
            clash += [f"{s}_size" for s, v in scalars.items() if v is not None]
            clash += [f"{s}_sizes" for s, v in lists.items() if v is not None]
            if clash or imbalance != 1.0:
                raise ValueError(f"preset '{preset}' fixes the classes, tasks and sizes; remove {', '.join(clash) or 'imbalance'}")
            spec = PRESETS.get(preset) or CLIP_LIKE[preset]
            num_classes = int(spec["num_classes"])  # type: ignore[arg-type]
            lists = {s: list(spec[s]) for s in SPLITS}  # type: ignore[call-overload]
            num_tasks = len(lists["query"])
            gen.update({k: v for k, v in spec.items() if k in GENERATION_DEFAULTS})
        gen.update({k: v for k, v in given.items() if v is not None})
        num_classes = DEFAULTS["num_classes"] if num_classes is None else num_classes
        if num_tasks is None:
            given_sizes = [v for v in lists.values() if v is not None]
            num_tasks = len(given_sizes[0]) if given_sizes else DEFAULTS["num_tasks"]
        for key, value in (("num_classes", num_classes), ("num_tasks", num_tasks), ("image_dim", image_dim),
                           ("text_dim", text_dim), ("max_labels", gen["max_labels"]),
                           ("latent_dim", gen["latent_dim"]), ("num_groups", gen["num_groups"])):
            check_positive(key, value, allow_none=False)
        if num_tasks > num_classes:
            raise ValueError(f"num_tasks ({num_tasks}) exceeds num_classes ({num_classes}): every task needs a class")
        if imbalance < 1.0:
            raise ValueError(f"imbalance: the largest / smallest task size ratio, must be >= 1, got {imbalance}")
        if scale <= 0:
            raise ValueError(f"scale: must be > 0, got {scale}")
        for key in ("cross_task_prob", "alignment", "cooccurrence", "shared_semantics"):
            if not 0.0 <= float(gen[key]) <= 1.0:  # type: ignore[arg-type]
                raise ValueError(f"{key}: must be in [0, 1], got {gen[key]}")
        if float(gen["modality_gap"]) < 0 or float(gen["noise"]) < 0 or float(gen["class_skew"]) < 0:  # type: ignore[arg-type]
            raise ValueError(f"modality_gap, noise and class_skew must be >= 0, got "
                             f"{gen['modality_gap']}, {gen['noise']} and {gen['class_skew']}")
        if gen["mean_labels"] is not None and not 1.0 <= float(gen["mean_labels"]) <= float(gen["max_labels"]):  # type: ignore[arg-type]
            raise ValueError(f"mean_labels: must be in [1, max_labels = {gen['max_labels']}], got {gen['mean_labels']}")
        if float(gen["alignment"]) > 0 and image_dim != text_dim:  # type: ignore[arg-type]
            raise ValueError(f"alignment > 0 shares the image map with the text map; it needs image_dim == text_dim, "
                             f"got {image_dim} and {text_dim}")

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
        self.image_dim, self.text_dim, self.latent_dim = image_dim, text_dim, int(gen["latent_dim"])  # type: ignore[arg-type]
        self.sizes = sizes
        self.imbalance, self.scale = float(imbalance), float(scale)
        self.max_labels = int(gen["max_labels"])  # type: ignore[arg-type]
        self.cross_task_prob = float(gen["cross_task_prob"])  # type: ignore[arg-type]
        self.modality_gap, self.noise = float(gen["modality_gap"]), float(gen["noise"])  # type: ignore[arg-type]
        self.alignment, self.class_skew = float(gen["alignment"]), float(gen["class_skew"])  # type: ignore[arg-type]
        self.mean_labels = None if gen["mean_labels"] is None else float(gen["mean_labels"])  # type: ignore[arg-type]
        self.cooccurrence = float(gen["cooccurrence"])  # type: ignore[arg-type]
        self.num_groups = int(gen["num_groups"])  # type: ignore[arg-type]
        self.shared_semantics = float(gen["shared_semantics"])  # type: ignore[arg-type]
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
        if self.alignment > 0:  # the text map shares the image map: paired features agree
            a = self.alignment
            s["map_text"] = (a * s["map_image"] + np.sqrt(1 - a * a) * s["map_text"]).astype(f32)
        # The realistic properties draw from generators of their own, so the draws above
        # (and every stream made before they existed) stay as they were.
        if self.shared_semantics > 0:  # a class prototype = its group's prototype + its own part
            groups = _unit_rows(rng_for(self.seed, "synthetic-groups").standard_normal(
                (self.num_groups, self.latent_dim), dtype=f32))
            w = self.shared_semantics
            own = groups[np.arange(self.num_classes) % self.num_groups]
            s["prototypes"] = _unit_rows(w * own + np.sqrt(1 - w * w) * s["prototypes"]).astype(f32)
        ranks = rng_for(self.seed, "synthetic-class-ranks").permutation(self.num_classes)
        s["class_weights"] = (ranks + 1.0) ** -self.class_skew  # Zipf: rank 1 is the most frequent class
        return s

    @property
    def _realistic_labels(self) -> bool:
        return self.class_skew > 0 or self.mean_labels is not None or self.cooccurrence > 0

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

    def _skewed_labels(self, rng: np.random.Generator, n: int, own: List[int], earlier: List[int],
                       weights: np.ndarray) -> np.ndarray:
        """Labels with a long tail, a mean count and group co-occurrence (``class_skew``,
        ``mean_labels``, ``cooccurrence``): the first label by class frequency, each
        further one from the first label's group with probability ``cooccurrence``
        (else again by frequency), never twice; then, with ``cross_task_prob``, one
        earlier-task label by frequency."""
        labels = np.zeros((n, self.num_classes), dtype=np.float32)
        own_a = np.asarray(own)
        most = min(self.max_labels, len(own))
        if self.mean_labels is None:
            counts = rng.integers(1, most + 1, size=n)
        else:
            counts = np.minimum(1 + rng.poisson(self.mean_labels - 1.0, size=n), most)
        group = own_a % self.num_groups
        for i in range(n):
            w = weights[own_a].copy()
            first = rng.choice(len(own), p=w / w.sum())
            picked = [first]
            w[first] = 0.0
            for _ in range(int(counts[i]) - 1):
                same = w * (group == group[first])
                pool = same if same.sum() > 0 and rng.random() < self.cooccurrence else w
                j = rng.choice(len(own), p=pool / pool.sum())
                picked.append(j)
                w[j] = 0.0
            labels[i, own_a[picked]] = 1.0
        if earlier:
            early = np.asarray(earlier)
            we = weights[early] / weights[early].sum()
            extra = np.flatnonzero(rng.random(n) < self.cross_task_prob)
            labels[extra, early[rng.choice(len(early), size=len(extra), p=we)]] = 1.0
        return labels

    def _modality(self, rng: np.random.Generator, latent: np.ndarray, lin: np.ndarray, offset: np.ndarray,
                  sign: float) -> np.ndarray:
        x = _unit_rows(latent @ lin)
        x = _unit_rows(x + self.noise * rng.standard_normal(x.shape, dtype=np.float32) / np.sqrt(x.shape[1]))
        return _unit_rows(x + sign * 0.5 * self.modality_gap * offset[None, :])

    def _split(self, s: Dict[str, np.ndarray], t: int, split: str, n: int, own: List[int],
               earlier: List[int]) -> FeatureSet:
        rng = rng_for(self.seed, "synthetic", t, split)
        labels = (self._skewed_labels(rng, n, own, earlier, s["class_weights"]) if self._realistic_labels
                  else self._labels(rng, n, own, earlier))
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
                "alignment": self.alignment, "class_skew": self.class_skew, "mean_labels": self.mean_labels,
                "cooccurrence": self.cooccurrence, "num_groups": self.num_groups,
                "shared_semantics": self.shared_semantics, "latent_dim": self.latent_dim,
            },
        )


def synthetic_like(preset: str, **kwargs: object) -> SyntheticDataset:
    """A synthetic dataset with the split sizes of ``preset`` (e.g. ``coco_balanced``:
    5 tasks, 80 classes, query 600 per task, ...); ``kwargs`` add e.g. ``scale``, ``seed``."""
    return SyntheticDataset(preset=preset, **kwargs)  # type: ignore[arg-type]
