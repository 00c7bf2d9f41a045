"""The results of one run as a typed object: what results.json holds, with the views
that the log, the CSV, ``compare`` and ``evaluate`` read (rows, averages, the final
row, the task-agnostic column, summary figures).

R[t][j] (``map[direction][t][j]``) is the mAP on task j after training through task t,
None above the diagonal. ``task_inference[modality][t]`` (models that infer the task
themselves: CASH, PBEH) is the share of the queries of tasks 0..t whose task the
model's task-agnostic encoding picks correctly, after task t. Everything is 0-based
here; user-facing text numbers tasks from 1.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

DIRECTIONS = ("i2t", "t2i")
Matrix = List[List[Optional[float]]]


def _after_task(column: Optional[List[float]], t: Optional[int]) -> Optional[float]:
    """Entry t of a per-task column (default: the last one), or None when absent."""
    column = column or []
    t = len(column) - 1 if t is None else t
    return float(column[t]) if 0 <= t < len(column) else None


def empty_matrix(n: int) -> Matrix:
    return [[None] * n for _ in range(n)]


def _per_direction(value: Any) -> Dict[str, Any]:
    return {d: copy.deepcopy(value) for d in DIRECTIONS}


@dataclass
class RunResults:
    """One run's measured figures and the facts needed to read them (see the module
    docstring). ``to_dict`` gives the results.json object; ``from_dict`` reads one back,
    missing keys taking their defaults."""

    method: Optional[str] = None
    dataset: Optional[str] = None
    metric: str = "mAP@all"
    mode: str = "continual"
    tasks: int = 0
    status: str = "running"
    task_names: List[str] = field(default_factory=list)
    task_sizes: List[Dict[str, int]] = field(default_factory=list)
    completed_tasks: int = 0
    bits: List[int] = field(default_factory=list)
    map: Dict[str, Matrix] = field(default_factory=dict)
    task_agnostic: Dict[str, List[float]] = field(default_factory=lambda: _per_direction([]))
    map_next: Dict[str, List[Optional[float]]] = field(default_factory=dict)
    untrained: Optional[Dict[str, List[float]]] = None
    summary: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    val: List[Dict[str, Any]] = field(default_factory=list)
    timing: Dict[str, Any] = field(default_factory=lambda: {"train_seconds": 0.0, "eval_seconds": 0.0, "per_task": []})
    seed: Optional[int] = None
    dims: Dict[str, int] = field(default_factory=dict)
    label_names: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    config: Optional[Dict[str, Any]] = None
    environment: Optional[Dict[str, Any]] = None
    task_inference: Optional[Dict[str, List[float]]] = None
    bit_order: Optional[List[int]] = None
    bit_scalable: Optional[Dict[str, Dict[str, float]]] = None
    curves: Optional[Dict[str, Dict[str, Any]]] = None

    @classmethod
    def start(cls, tasks: int, **facts: Any) -> "RunResults":
        """Empty results of a ``tasks``-task run (matrices of None)."""
        return cls(tasks=tasks, map=_per_direction(empty_matrix(tasks)),
                   map_next=_per_direction([None] * tasks), **facts)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> Dict[str, Any]:
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        for key in ("bit_order", "bit_scalable", "task_inference", "curves"):  # only for models / runs that have them
            if out[key] is None:
                del out[key]
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "RunResults":
        names = {f.name for f in dataclasses.fields(cls)}
        out = cls(**{k: v for k, v in data.items() if k in names})
        if not out.map:
            out.map = _per_direction(empty_matrix(out.tasks))
        return out

    # ------------------------------------------------------------------ views
    @property
    def finished(self) -> bool:
        return self.status == "finished" and self.completed_tasks == self.tasks

    def row(self, direction: str, t: int) -> List[Optional[float]]:
        """Row t of R (after training task t), all T columns."""
        return list(self.map[direction][t])

    def row_average(self, direction: str, t: int) -> Optional[float]:
        """A_t: the mean of R[t][0..t] (as the continual summary's ``per_step_average``)."""
        steps = (self.summary.get(direction) or {}).get("per_step_average") or []
        if t < len(steps):
            return steps[t]
        seen = [v for v in self.map[direction][t][: t + 1] if v is not None]
        return math.fsum(seen) / len(seen) if seen else None

    def final_row(self, direction: str) -> List[Optional[float]]:
        """R[T'-1][0..T'-1] for the T' tasks finished so far."""
        done = self.completed_tasks
        return list(self.map[direction][done - 1][:done]) if done else []

    def agnostic(self, direction: str, t: Optional[int] = None) -> Optional[float]:
        """Task-agnostic mAP after task t (default: the last finished one)."""
        return _after_task(self.task_agnostic.get(direction), t)

    def inferred(self, modality: str, t: Optional[int] = None) -> Optional[float]:
        """Task-inference accuracy of ``modality`` queries after task t (default: the
        last finished one), or None for a model that does not infer tasks."""
        return _after_task((self.task_inference or {}).get(modality), t)

    def figure(self, direction: str, key: str) -> Optional[float]:
        """A continual summary figure (acc, bwt, forgetting, fwt, avg_incremental) or None."""
        value = (self.summary.get(direction) or {}).get(key)
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
