"""Feature sets and task streams: the one in-memory shape every loader produces.

A ``FeatureSet`` is N paired samples: image features, text features and multi-hot
labels over the dataset's full label space (so samples of different tasks can be
relevant to each other). A ``TaskStream`` is T tasks, each with its own train / val /
query / database splits; a single-task benchmark is a stream with T = 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from utils.errors import DataError


@dataclass(frozen=True)
class FeatureSet:
    """N paired samples: ``image`` (N, Dv), ``text`` (N, Dt), ``labels`` (N, C) in {0, 1}.

    ``ids`` names each sample (an image path or a running index) so codes can be mapped
    back to items. ``image_layers`` / ``text_layers`` optionally carry per-layer features
    (N, L, D) from early to late stages of the encoder (used by SCAHN).
    """

    image: torch.Tensor
    text: torch.Tensor
    labels: torch.Tensor
    ids: Tuple[str, ...] = ()
    image_layers: Optional[torch.Tensor] = None
    text_layers: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        n = self.image.shape[0]
        if self.image.dim() != 2 or self.text.dim() != 2 or self.labels.dim() != 2:
            raise ValueError(
                "FeatureSet: image, text and labels must be 2-D (N, D); got shapes "
                f"{tuple(self.image.shape)}, {tuple(self.text.shape)}, {tuple(self.labels.shape)}"
            )
        if self.text.shape[0] != n or self.labels.shape[0] != n:
            raise ValueError(
                f"FeatureSet: sample counts differ: image {n}, text {self.text.shape[0]}, "
                f"labels {self.labels.shape[0]}"
            )
        if self.ids and len(self.ids) != n:
            raise ValueError(f"FeatureSet: {len(self.ids)} ids for {n} samples")
        for name in ("image_layers", "text_layers"):
            layers = getattr(self, name)
            if layers is not None and (layers.dim() != 3 or layers.shape[0] != n):
                raise ValueError(f"FeatureSet: {name} must be (N={n}, L, D), got {tuple(layers.shape)}")

    def __len__(self) -> int:
        return int(self.image.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.labels.shape[1])

    def subset(self, index: torch.Tensor | Sequence[int]) -> "FeatureSet":
        """The samples at ``index`` (a 1-D index tensor or sequence), in that order."""
        idx = torch.as_tensor(index, dtype=torch.long)
        ids = tuple(self.ids[i] for i in idx.tolist()) if self.ids else ()
        return FeatureSet(
            image=self.image[idx],
            text=self.text[idx],
            labels=self.labels[idx],
            ids=ids,
            image_layers=None if self.image_layers is None else self.image_layers[idx],
            text_layers=None if self.text_layers is None else self.text_layers[idx],
        )

    def to(self, device: torch.device | str) -> "FeatureSet":
        """The same samples with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            image=move(self.image),
            text=move(self.text),
            labels=move(self.labels),
            image_layers=move(self.image_layers),
            text_layers=move(self.text_layers),
        )

    @staticmethod
    def concat(parts: Sequence["FeatureSet"]) -> "FeatureSet":
        """All samples of ``parts``, in order (used by joint training)."""
        if not parts:
            raise ValueError("FeatureSet.concat needs at least one part")
        cat = lambda name: (  # noqa: E731
            None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])
        )
        ids: Tuple[str, ...] = ()
        if all(p.ids for p in parts):
            ids = tuple(i for p in parts for i in p.ids)
        return FeatureSet(
            image=cat("image"), text=cat("text"), labels=cat("labels"), ids=ids,
            image_layers=cat("image_layers"), text_layers=cat("text_layers"),
        )


@dataclass(frozen=True)
class Task:
    """One task of a stream: its splits and the label columns it introduces."""

    index: int
    name: str
    train: FeatureSet
    val: FeatureSet
    query: FeatureSet
    database: FeatureSet
    classes: Tuple[int, ...] = ()

    def to(self, device: torch.device | str) -> "Task":
        return replace(
            self,
            train=self.train.to(device),
            val=self.val.to(device),
            query=self.query.to(device),
            database=self.database.to(device),
        )

    def sizes(self) -> Dict[str, int]:
        return {s: len(getattr(self, s)) for s in ("query", "train", "val", "database")}


@dataclass(frozen=True)
class TaskStream:
    """T tasks over one label space; ``label_names`` has one entry per label column."""

    name: str
    tasks: Tuple[Task, ...]
    label_names: Tuple[str, ...] = ()
    meta: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError(f"task stream '{self.name}' has no tasks")
        first = self.tasks[0].train
        for task in self.tasks:
            for split in ("train", "query", "database"):  # val may be empty: no epoch selection then
                if len(getattr(task, split)) == 0:
                    raise DataError(f"task stream '{self.name}': task {task.index + 1} ({task.name}): the {split} "
                                    "split is empty (0 samples); every task needs train, query and database samples")
            for split in ("train", "val", "query", "database"):
                fs: FeatureSet = getattr(task, split)
                if (fs.image.shape[1], fs.text.shape[1], fs.labels.shape[1]) != (
                    first.image.shape[1], first.text.shape[1], first.labels.shape[1]
                ):
                    raise ValueError(
                        f"task stream '{self.name}': task {task.index} {split} has dims "
                        f"(image {fs.image.shape[1]}, text {fs.text.shape[1]}, labels {fs.labels.shape[1]}), "
                        f"task 0 train has ({first.image.shape[1]}, {first.text.shape[1]}, {first.labels.shape[1]})"
                    )
                if len(fs) == 0 and split != "val":
                    raise ValueError(f"task stream '{self.name}': task {task.index} has an empty {split} split")
        if self.label_names and len(self.label_names) != first.labels.shape[1]:
            raise ValueError(
                f"task stream '{self.name}': {len(self.label_names)} label names for "
                f"{first.labels.shape[1]} label columns"
            )

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def image_dim(self) -> int:
        return int(self.tasks[0].train.image.shape[1])

    @property
    def text_dim(self) -> int:
        return int(self.tasks[0].train.text.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.tasks[0].train.labels.shape[1])

    def describe(self) -> List[str]:
        """One line per task with its split sizes, for logs."""
        return [
            f"task {t.index + 1} ({t.name}): " + ", ".join(f"{k} {v}" for k, v in t.sizes().items())
            for t in self.tasks
        ]
