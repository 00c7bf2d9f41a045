"""A frozen teacher's outputs for every row of a task's train split, computed once.

LwF-style terms (PBEH's ``lwf``, the ``distill`` strategy) pull the student towards a
frozen copy's outputs on the current batch. Within a task those outputs are a fixed
function of each sample, yet a teacher forward per batch recomputes every one of them
in every epoch (99 times over in the authors' 100-epoch schedules). ``TeacherRows``
computes them in one no-grad pass over the train split on first use, in fixed chunks
in index order (so a resumed task gets the same values as an uninterrupted one), and
serves each batch's rows by index. The values equal the per-batch teacher's up to
float rounding (a matmul's rounding may depend on how many rows it multiplies).

A batch is served from the table only when the runner built it from that train split
(``Batch.source``, checked by identity: no host synchronisation); any other batch (a
replay-mixed one, a hand-built one in a test) gets the teacher computed on its rows.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Tuple

import torch

from models.base import Batch

if TYPE_CHECKING:  # pragma: no cover
    from dataset.feature_set import FeatureSet

Teacher = Callable[[Batch], Tuple[torch.Tensor, ...]]


class TeacherRows:
    """The teacher's outputs over one train split; ``reset`` at every task start."""

    chunk = 1024  # rows per teacher call while the table is built

    def __init__(self) -> None:
        self._rows: Optional["FeatureSet"] = None
        self._table: Optional[Tuple[torch.Tensor, ...]] = None

    def reset(self, rows: Optional["FeatureSet"]) -> None:
        """Forget the table; the next batches come from ``rows`` (None: compute per batch)."""
        self._rows, self._table = rows, None

    def __call__(self, batch: Batch, teacher: Teacher) -> Tuple[torch.Tensor, ...]:
        """``teacher(batch)`` (a tuple of (B, ...) tensors, computed under no_grad), read
        from the table when the batch's rows come from the current train split."""
        if self._rows is None or batch.source is not self._rows:
            with torch.no_grad():
                return tuple(teacher(batch))
        if self._table is None:
            self._table = self._build(teacher)
        return tuple(t.index_select(0, batch.index.to(t.device)) for t in self._table)

    def _build(self, teacher: Teacher) -> Tuple[torch.Tensor, ...]:
        rows = self._rows
        n = len(rows)
        parts = []
        with torch.no_grad():
            for start in range(0, n, self.chunk):
                index = torch.arange(start, min(n, start + self.chunk), device=rows.image.device)
                parts.append(tuple(teacher(Batch.rows(rows, index))))
        return tuple(torch.cat(columns) for columns in zip(*parts))
