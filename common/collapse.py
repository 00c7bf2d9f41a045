"""Detecting hash codes collapsed to (almost) one code.

A model that maps most of a database to one bit pattern retrieves in arbitrary order
however high its training loss says it is; on multi-label data this failure is common
and silent (every query ties with most of the database). ``code_collapse`` checks one
task's stored codes, per modality, so the runner can warn right after storing them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np

from common.code_store import MODALITIES, StoredCodes


@dataclass(frozen=True)
class Collapse:
    """One modality of one task whose codes collapsed: ``share`` of its ``size`` codes
    are the same bit pattern; ``distinct`` patterns occur in all."""

    task: int
    modality: str
    share: float
    distinct: int
    size: int
    bits: int

    def message(self) -> str:
        what = "all codes are one code" if self.distinct == 1 else f"one code holds {self.share:.0%} of them"
        return (f"task {self.task + 1} {self.modality} database: {self.size} codes of {self.bits} bits, "
                f"{what} ({self.distinct} distinct): the codes have collapsed")


def _top_bucket(rows: np.ndarray) -> tuple[float, int, np.ndarray]:
    """Share of the most frequent row, the number of distinct rows, and a mask of the
    rows equal to the most frequent one."""
    _, inverse, counts = np.unique(rows, axis=0, return_inverse=True, return_counts=True)
    top = int(counts.argmax())
    return float(counts[top]) / rows.shape[0], int(counts.size), inverse.reshape(-1) == top


def code_collapse(entry: StoredCodes, max_share: float = 0.5, coherence: float = 0.9) -> List[Collapse]:
    """The modalities of ``entry`` whose codes collapsed, empty when none did.

    A modality has collapsed when all of its codes are equal (more than one sample,
    labels not all equal), or when its most frequent code holds more than ``max_share``
    of the entry's codes and that code's samples are not one class: no label is carried
    by at least ``coherence`` of them, and the code holds more than the largest group of
    samples with identical labels. So one code per class is not flagged, neither for a
    single-label task of two classes nor for a long-tailed multi-label task whose most
    common label (COCO's person, on over half of the images) gets a code of its own,
    while one code for samples of unrelated labels is. A pure function of the stored
    codes and labels.
    """
    if not 0.0 < max_share < 1.0:
        raise ValueError(f"max_share: must be in (0, 1), got {max_share}")
    if not 0.0 < coherence <= 1.0:
        raise ValueError(f"coherence: must be in (0, 1], got {coherence}")
    n = len(entry)
    if n < 2:
        return []
    labels = np.asarray(entry.labels) > 0
    label_share, label_sets, _ = _top_bucket(labels)
    found = []
    for modality in MODALITIES:
        share, distinct, bucket = _top_bucket(np.asarray(getattr(entry, modality)))
        one_class = labels.ndim == 2 and labels.shape[1] > 0 and labels[bucket].mean(axis=0).max() >= coherence
        if (distinct == 1 and label_sets > 1) or (share > max_share and share > label_share and not one_class):
            found.append(Collapse(entry.task, modality, share, distinct, n, entry.bits))
    return found
