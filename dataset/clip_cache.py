"""The ``clip_cache`` dataset: a CLIP feature cache (``main.py extract``) -> TaskStream.

Two protocols, chosen by ``tasks``:

- single task (``tasks`` unset; DCMHT / DSPH / CAGMH): a seeded permutation of all
  samples; query = the first ``query_size``, train = the next ``train_size``, database
  (retrieval) = every sample except the query (train is inside it), validation carved
  from train and removed from it. T = 1. The permutation is NumPy's legacy
  ``RandomState(seed).permutation(N)``, which is what ``np.random.seed(1814)`` followed by
  ``np.random.permutation(N)`` in the public code draws.
- continual (``tasks``: a preset such as ``coco_balanced`` or lists of category names /
  column indices; CASH / PBEH style): each sample joins exactly ONE task by this rule:

      a sample goes to the task that holds the most of its positive labels; a tie goes
      to the earliest of the tied tasks; a sample with no label in any task is dropped.

  (So a COCO image of a person, a dog and a car joins the task holding two of those
  three categories.) Each task's samples are permuted with a seed of (seed, task);
  query = the first ``task_query``, database = the rest (optionally capped by
  ``task_database``), train = the first ``task_train`` of the database (train is inside
  the database, as in the CASH / PBEH files), validation carved from train. Sizes are
  counts (int) or fractions (float) of what is available, one value or one per task.

Labels keep every column, so samples of different tasks can be relevant to each other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from common.register import DATASETS
from dataset.feature_cache import CacheContent, read_cache
from dataset.feature_set import FeatureSet, Task, TaskStream
from dataset.label_names import TASK_PRESETS, category_task_name, resolve_tasks
from dataset.splits import carve_val, check_positive, resolve_val, rng_for
from utils.errors import ConfigError, DataError

Size = Union[int, float]
ASSIGNMENT_RULE = "most_labels (ties: earliest task; no label in any task: dropped)"


def assign_tasks(labels: np.ndarray, task_columns: Sequence[Sequence[int]]) -> np.ndarray:
    """The task of every sample (-1 = dropped) by the most-labels rule (module docstring)."""
    counts = np.stack([labels[:, list(cols)].sum(axis=1) for cols in task_columns], axis=1)  # (N, T)
    owner = counts.argmax(axis=1)  # argmax takes the first maximum: ties go to the earliest task
    owner[counts.max(axis=1) == 0] = -1
    return owner


def size_for(spec: Union[Size, Sequence[Size], None], task: int, available: int, what: str) -> int:
    """A count from an int (count), a float in (0, 1] (fraction of ``available``) or a per-task list."""
    if spec is None:
        return available
    if isinstance(spec, (list, tuple)):
        spec = spec[task]
    if isinstance(spec, bool):
        raise ValueError(f"{what}: expected a count or a fraction, got {spec!r}")
    if isinstance(spec, int):
        if spec > available:
            raise DataError(f"dataset.{what}: task {task + 1} asks for {spec} samples but only {available} are available")
        return spec
    return max(1, int(round(float(spec) * available)))


def _check_size(name: str, spec, num_tasks: Optional[int]) -> None:
    values = spec if isinstance(spec, (list, tuple)) else [spec]
    if isinstance(spec, (list, tuple)) and num_tasks is not None and len(spec) != num_tasks:
        raise ValueError(f"{name}: {len(spec)} values for {num_tasks} tasks")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{name}: expected a count (int) or a fraction (float in (0, 1]), got {v!r}")
        if isinstance(v, int) and v < 1:
            raise ValueError(f"{name}: a count must be >= 1, got {v}")
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            raise ValueError(f"{name}: a fraction must be in (0, 1], got {v}")


@DATASETS.register("clip_cache")
class ClipCacheDataset:
    """A feature cache written by ``main.py extract`` as a single task or a category stream.

    ``path``: the ``.h5`` cache. ``tasks``: unset for the single-task protocol, else a
    preset (``coco_balanced``, ``coco_imbalanced``, ``nus_balanced``, ``nus_imbalanced``)
    or a list of category lists (names as in the cache's label names, or column
    indices). ``query_size`` / ``train_size``: single-task split sizes (5000 / 10000;
    MIRFlickr configs use query_size 2000). ``task_query`` / ``task_train`` /
    ``task_database``: continual split sizes per task (count, fraction, or one per task;
    defaults 0.1 of the task's samples, 0.4 of its database, all the rest).
    ``val_fraction`` / ``val_size``: validation carved from train (default 10 %).
    ``seed``: all permutations (default 1814). ``layers``: also load the per-layer
    features (the cache must have them; SCAHN).
    """

    def __init__(
        self,
        path: str,
        tasks: Optional[Union[str, List[List[Union[str, int]]]]] = None,
        query_size: int = 5000,
        train_size: int = 10000,
        task_query: Union[int, float, List[Union[int, float]]] = 0.1,
        task_train: Union[int, float, List[Union[int, float]]] = 0.4,
        task_database: Optional[Union[int, float, List[Union[int, float]]]] = None,
        val_fraction: Optional[float] = None,
        val_size: Optional[int] = None,
        seed: int = 1814,
        layers: bool = False,
        name: Optional[str] = None,
    ) -> None:
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"path: expected the .h5 feature cache written by 'main.py extract', got {path!r}")
        if isinstance(tasks, str) and tasks not in TASK_PRESETS:
            raise ValueError(f"tasks: unknown preset {tasks!r}; known: {', '.join(TASK_PRESETS)} (or a list of category lists)")
        if isinstance(tasks, list) and not tasks:
            raise ValueError("tasks: an empty list; leave tasks unset for the single-task protocol")
        check_positive("query_size", query_size, allow_none=False)
        check_positive("train_size", train_size, allow_none=False)
        num_tasks = None if tasks is None else (len(TASK_PRESETS[tasks]) if isinstance(tasks, str) else len(tasks))
        _check_size("task_query", task_query, num_tasks)
        _check_size("task_train", task_train, num_tasks)
        if task_database is not None:
            _check_size("task_database", task_database, num_tasks)
        self.path = path
        self.tasks = tasks
        self.query_size, self.train_size = int(query_size), int(train_size)
        self.task_query, self.task_train, self.task_database = task_query, task_train, task_database
        self.val_fraction, self.val_size = resolve_val(val_fraction, val_size)
        self.seed = int(seed)
        self.layers = bool(layers)
        self.name = name

    # ------------------------------------------------------------------ building
    def _features(self, cache: CacheContent) -> FeatureSet:
        lay = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
        return FeatureSet(
            image=torch.from_numpy(cache.image), text=torch.from_numpy(cache.text),
            labels=torch.from_numpy(cache.labels.astype(np.float32)), ids=cache.ids,
            image_layers=lay(cache.image_layers), text_layers=lay(cache.text_layers),
        )

    def _single(self, cache: CacheContent, fs: FeatureSet) -> Tuple[List[Task], Dict[str, object]]:
        n = len(fs)
        if self.query_size + self.train_size > n:
            raise DataError(
                f"{cache.path}: {n} samples, fewer than query_size {self.query_size} + train_size {self.train_size}"
            )
        perm = np.random.RandomState(self.seed).permutation(n)
        query = perm[: self.query_size]
        train = perm[self.query_size: self.query_size + self.train_size]
        database = perm[self.query_size:]
        tr, val = carve_val(fs.subset(train), self.seed, 0, self.val_fraction, self.val_size)
        task = Task(
            index=0, name="all", train=tr, val=val, query=fs.subset(query), database=fs.subset(database),
            classes=tuple(range(fs.num_classes)),
        )
        return [task], {"protocol": "single", "query_size": self.query_size, "train_size": self.train_size}

    def _continual(self, cache: CacheContent, fs: FeatureSet) -> Tuple[List[Task], Dict[str, object]]:
        try:
            columns = resolve_tasks(self.tasks, cache.label_names)
        except ValueError as exc:
            raise ConfigError(f"dataset.{exc} (cache {cache.path})") from None
        owner = assign_tasks(cache.labels, columns)
        tasks: List[Task] = []
        for t, cols in enumerate(columns):
            pool = np.flatnonzero(owner == t)
            if len(pool) < 3:
                raise DataError(
                    f"{cache.path}: task {t + 1} gets {len(pool)} samples by the {ASSIGNMENT_RULE} rule; "
                    "it needs at least 3 (query, train, database)"
                )
            pool = pool[rng_for(self.seed, "pool", t).permutation(len(pool))]
            q = size_for(self.task_query, t, len(pool) - 1, "task_query")
            rest = pool[q:]
            d = size_for(self.task_database, t, len(rest), "task_database")
            database = rest[:d]
            k = size_for(self.task_train, t, len(database), "task_train")
            tr, val = carve_val(fs.subset(database[:k]), self.seed, t, self.val_fraction, self.val_size)
            tasks.append(Task(
                index=t, name=category_task_name(cols, cache.label_names), train=tr, val=val, query=fs.subset(pool[:q]),
                database=fs.subset(database), classes=tuple(cols),
            ))
        meta = {
            "protocol": "continual", "tasks": self.tasks if isinstance(self.tasks, str) else "custom",
            "assignment": ASSIGNMENT_RULE, "dropped": int((owner < 0).sum()),
            "task_query": self.task_query, "task_train": self.task_train, "task_database": self.task_database,
        }
        return tasks, meta

    def load(self) -> TaskStream:
        """Read the cache and build the splits; DataError / ConfigError on bad input."""
        cache = read_cache(self.path, layers=self.layers)
        fs = self._features(cache)
        tasks, meta = self._single(cache, fs) if self.tasks is None else self._continual(cache, fs)
        return TaskStream(
            name=self.name or Path(self.path).stem,
            tasks=tuple(tasks),
            label_names=tuple(cache.label_names),
            meta={
                "loader": "clip_cache", "path": str(cache.path), "seed": self.seed,
                "val_fraction": self.val_fraction, "val_size": self.val_size,
                "model": cache.meta.get("model"), "checkpoint": cache.meta.get("checkpoint"),
                "caption_policy": cache.meta.get("caption_policy"), **meta,
            },
        )
