"""Continual-learning figures (ACC, average incremental, BWT, forgetting, FWT) from the
task-by-task result matrix R."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

from .validation import MetricInputError

def _entry(R: Sequence[Sequence[Any]], t: int, j: int) -> Optional[float]:
    row = R[t]
    if j >= len(row) or row[j] is None:
        return None
    v = float(row[j])
    return None if math.isnan(v) else v


def continual_summary(R: Sequence[Sequence[Any]], untrained: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """ACC, average incremental mAP, BWT, forgetting and FWT from the result matrix R.

    R[t][j] = score on task j after training through task t (0-based here; j > t may be
    None). A_t = mean_{j<=t} R[t][j]; acc = A_T; avg_incremental = mean_t A_t;
    bwt = sum_{j<T} (R[T][j] - R[j][j]) / (T-1); forgetting = mean_{j<T} of
    max_{j<=l<T} R[l][j] - R[T][j] (over the T-1 old tasks; a score from before task j
    was learned is not knowledge to forget, so l starts at j); fwt = sum_{j>=2}
    (R[j-1][j] - b_j) / (T-1) with b_j = ``untrained[j]`` (needs R[j-1][j], the score
    on a task before training on it; ``untrained[0]`` is not used). For T == 1, bwt,
    forgetting and fwt are None. The denominators are returned in "denominators"
    (the reference GEM code divides BWT/FWT by T; this one by T-1).
    """
    try:
        T = len(R)
        rows = [list(row) for row in R]
    except TypeError:
        raise MetricInputError("R: expected a T x T list of lists of scores") from None
    if T == 0:
        raise MetricInputError("R: empty result matrix")
    for t in range(T):
        if not t + 1 <= len(rows[t]) <= T:
            raise MetricInputError(f"R[{t}]: {len(rows[t])} entries; row {t} needs {t + 1} to {T} (T = {T})")
        for j in range(t + 1):
            if _entry(rows, t, j) is None:
                raise MetricInputError(f"R[{t}][{j}]: missing; every entry with j <= t must be a number")
    per_step = [math.fsum(rows[t][j] for j in range(t + 1)) / (t + 1) for t in range(T)]
    last = T - 1
    out: Dict[str, Any] = {
        "acc": per_step[last],
        "avg_incremental": math.fsum(per_step) / T,
        "bwt": None,
        "forgetting": None,
        "fwt": None,
        "per_step_average": per_step,
        "num_tasks": T,
    }
    old = T - 1
    den: Dict[str, Any] = {
        "per_step_average": "t (tasks seen after task t)",
        "acc": T,
        "avg_incremental": T,
        "bwt": old or None,
        "forgetting": old or None,
        "fwt": None,
    }
    if T > 1:
        out["bwt"] = math.fsum(float(rows[last][j]) - float(rows[j][j]) for j in range(old)) / old
        forget = [max(float(rows[l][j]) for l in range(j, last)) - float(rows[last][j]) for j in range(old)]
        out["forgetting"] = math.fsum(forget) / old
        out["forgetting_per_task"] = forget
    if untrained is not None:
        b = list(untrained)
        if len(b) != T:
            raise MetricInputError(f"untrained: {len(b)} scores for {T} tasks (one b_j per task; b_1 is unused)")
        if T > 1:
            gains = []
            for j in range(1, T):
                v = _entry(rows, j - 1, j)
                if v is None:
                    raise MetricInputError(
                        f"R[{j - 1}][{j}]: missing; FWT needs the score on task {j} before training on it"
                    )
                gains.append(v - float(b[j]))
            out["fwt"] = math.fsum(gains) / old
            den["fwt"] = old
    out["denominators"] = den
    return out
