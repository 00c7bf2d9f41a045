"""Split helpers shared by every loader: seeded generators, validation carving,
subsampling and the rule that assigns label columns to tasks.

Randomness comes from a local ``numpy.random.Generator`` built from a
``SeedSequence`` of (seed, purpose, task, ...), never from global state, so a split
depends only on its own key: changing the query size of task 3 does not move a
single training sample of task 1.
"""
from __future__ import annotations

import zlib
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from dataset.feature_set import FeatureSet

DEFAULT_VAL_FRACTION = 0.1


def rng_for(seed: int, *keys: Union[int, str]) -> np.random.Generator:
    """A generator determined by ``seed`` and ``keys`` (ints or short strings) only."""
    words: List[int] = [int(seed) & 0xFFFFFFFF]
    for key in keys:
        words.append(zlib.crc32(key.encode("utf-8")) if isinstance(key, str) else int(key) & 0xFFFFFFFF)
    return np.random.default_rng(np.random.SeedSequence(words))


def resolve_val(val_fraction: Optional[float], val_size: Optional[int]) -> Tuple[Optional[float], Optional[int]]:
    """Check the two ways to ask for a validation split; at most one may be set.

    Neither set means ``DEFAULT_VAL_FRACTION`` of each task's train split. Raises
    ``ValueError`` (the config layer turns it into a one-line ConfigError).
    """
    if val_fraction is not None and val_size is not None:
        raise ValueError(
            f"val_fraction ({val_fraction}) and val_size ({val_size}) are both set; set one of them"
        )
    if val_size is not None:
        if val_size < 0:
            raise ValueError(f"val_size: must be >= 0, got {val_size}")
        return None, int(val_size)
    frac = DEFAULT_VAL_FRACTION if val_fraction is None else float(val_fraction)
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"val_fraction: must be in [0, 1), got {val_fraction}")
    return frac, None


def val_count(n_train: int, val_fraction: Optional[float], val_size: Optional[int]) -> int:
    """How many of ``n_train`` samples become validation samples.

    A fraction is rounded to the nearest count, at least 1 when the fraction is > 0;
    at least one sample always stays in train.
    """
    if n_train <= 1:
        return 0
    if val_size is not None:
        k = val_size
    else:
        frac = val_fraction or 0.0
        k = int(round(n_train * frac))
        if frac > 0 and k == 0:
            k = 1
    return int(min(max(k, 0), n_train - 1))


def carve(n: int, k: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (kept, carved) with ``k`` carved indices chosen by ``rng``.

    Both index arrays are sorted, so the kept samples keep their original order.
    """
    if not 0 <= k <= n:
        raise ValueError(f"cannot carve {k} of {n} samples")
    perm = rng.permutation(n)
    return np.sort(perm[k:]), np.sort(perm[:k])


def carve_val(
    train: FeatureSet, seed: int, task_index: int, val_fraction: Optional[float], val_size: Optional[int]
) -> Tuple[FeatureSet, FeatureSet]:
    """(train without val, val): val is a seeded random part of the task's train split.

    Validation samples are removed from train and never drawn from the query set.
    The database is left alone: where train is a part of the database (the CASH /
    PBEH protocol, the demo and synthetic data), val samples stay retrievable items.
    """
    k = val_count(len(train), val_fraction, val_size)
    kept, carved = carve(len(train), k, rng_for(seed, "val", task_index))
    return train.subset(kept), train.subset(carved)


def subsample(fs: FeatureSet, limit: Optional[int], seed: int, purpose: str, task_index: int) -> FeatureSet:
    """At most ``limit`` samples of ``fs`` (a seeded subset in original order); None keeps all."""
    if limit is None or len(fs) <= limit:
        return fs
    kept, _ = carve(len(fs), len(fs) - limit, rng_for(seed, purpose, task_index))
    return fs.subset(kept)


def check_positive(name: str, value: Optional[int], allow_none: bool = True) -> None:
    """``ValueError`` unless ``value`` is a positive int (or None where allowed)."""
    if value is None and allow_none:
        return
    if value is None or value < 1:
        raise ValueError(f"{name}: must be a positive integer{' or null' if allow_none else ''}, got {value}")


def task_classes_from_labels(train_labels: Sequence[torch.Tensor], rule: str = "dominant") -> List[Tuple[int, ...]]:
    """The label columns each task introduces, from the tasks' train label matrices.

    ``"dominant"``: a column belongs to the task whose train split has the largest
    *share* of samples carrying it (ties go to the earliest task); a column no train
    sample carries belongs to no task. Every column is in at most one task, and in
    splits where co-occurring labels of other tasks leak in (a COCO image of a task-1
    bicycle that also shows a person of task 2) the column still lands in its own task.
    The rule looks at all tasks at once: it describes the stream, it is not something
    a model could have computed while learning task 1.

    ``"first_seen"``: a column belongs to the first task whose train split carries it
    (causal: what a model has seen so far). With leaking co-occurrences this moves
    such columns to an earlier task.
    """
    if rule not in ("dominant", "first_seen"):
        raise ValueError(f"task_classes: expected 'dominant' or 'first_seen', got {rule!r}")
    if not train_labels:
        return []
    counts = torch.stack([(lab > 0).sum(0).to(torch.float64) for lab in train_labels])  # (T, C)
    sizes = torch.tensor([max(len(lab), 1) for lab in train_labels], dtype=torch.float64)[:, None]
    present = counts > 0
    owner = torch.full((counts.shape[1],), -1, dtype=torch.long)
    if rule == "dominant":
        share = counts / sizes
        best = share.argmax(0)  # argmax returns the first maximum: ties -> earliest task
        owner = torch.where(present.any(0), best, owner)
    else:
        for t in range(counts.shape[0] - 1, -1, -1):
            owner = torch.where(present[t], torch.tensor(t), owner)
    return [tuple(int(c) for c in torch.nonzero(owner == t).flatten().tolist()) for t in range(len(train_labels))]
