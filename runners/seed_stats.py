"""Statistics over seeds for ``compare`` and ``train --seeds``: mean and sample standard
deviation of a figure over runs that differ only in ``runner.seed``, and the paired
difference of two configs over the seeds both ran, with a Student-t confidence interval.

A run stays one config and one seed; these functions read finished results only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (n - 1 in the denominator; None for one value)."""

    mean: Optional[float]
    std: Optional[float]
    n: int

    def text(self, digits: int = 4) -> str:
        if self.mean is None:
            return "-"
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass(frozen=True)
class PairedDifference:
    """mean(x_s - ref_s) over the shared seeds s, with a two-sided t interval."""

    mean: Optional[float]
    low: Optional[float]
    high: Optional[float]
    n: int
    level: float

    def text(self, digits: int = 4) -> str:
        if self.mean is None:
            return "-"
        if self.low is None:
            return f"{self.mean:+.{digits}f}"
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"

    @property
    def significant(self) -> bool:
        """The interval excludes zero."""
        return self.low is not None and (self.low > 0 or self.high < 0)


def spread(values: Sequence[Optional[float]]) -> Spread:
    """Mean and sample std of the values that are not None."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return Spread(None, None, 0)
    mean = math.fsum(xs) / len(xs)
    if len(xs) == 1:
        return Spread(mean, None, 1)
    var = math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return Spread(mean, math.sqrt(var), len(xs))


def paired_difference(values: Dict[int, Optional[float]], reference: Dict[int, Optional[float]],
                      level: float = 0.95) -> PairedDifference:
    """``values`` minus ``reference``, paired by seed (seeds missing from either are left
    out); the interval is mean +/- t_{(1+level)/2, n-1} * sd / sqrt(n)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    seeds = sorted(s for s in values if s in reference and values[s] is not None and reference[s] is not None)
    diffs = [float(values[s]) - float(reference[s]) for s in seeds]
    s = spread(diffs)
    if s.mean is None or s.std is None:
        return PairedDifference(s.mean, None, None, s.n, level)
    from scipy.stats import t as student_t

    half = float(student_t.ppf((1 + level) / 2, s.n - 1)) * s.std / math.sqrt(s.n)
    return PairedDifference(s.mean, s.mean - half, s.mean + half, s.n, level)
