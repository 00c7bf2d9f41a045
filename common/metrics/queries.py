"""What an engine computes for every query: a typed, validated description.

Every public metric reduces to one of three per-query results, and every engine
(numba, NumPy, torch) computes exactly these three; the public functions then average
or sum them. mAP@K asks for ``AveragePrecision(k)``; precision@N and the top-N curve
for ``RelevantInTop(ns)``; PR by radius and the tie-aware formulas for
``DistanceCounts()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

from .validation import check_k, check_ns


@dataclass(frozen=True)
class AveragePrecision:
    """AP of each query over its top ``k`` ranks (None: the whole ranking); result (Q,) float64."""

    k: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", check_k("k", self.k))

    def cutoff(self, num_items: int) -> Optional[int]:
        """The rank limit that changes the result, or None when the whole ranking counts."""
        return None if self.k is None or self.k >= num_items else self.k


@dataclass(frozen=True)
class RelevantInTop:
    """Relevant items among each query's top n ranks, for every n of ``ns`` (in that order);
    result (Q, len(ns)) float64 (integer counts; a top n past the database is all of it)."""

    ns: Tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ns", tuple(check_ns(self.ns)))


@dataclass(frozen=True)
class DistanceCounts:
    """Each query's items counted by Hamming distance, not relevant (row 0) and relevant
    (row 1); result (Q, 2, bits + 1) int64."""


Query = Union[AveragePrecision, RelevantInTop, DistanceCounts]
