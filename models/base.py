"""The contract between a hashing model and the one continual runner.

A model is an ``nn.Module`` that owns its layers *and* its losses. The runner never
looks inside: it calls the task hooks, asks for the loss of a batch, and encodes
samples one modality at a time. Every method (CASH, PBEH, CAGMH, SCAHN, DCMHT, DSPH
and user methods) implements this class and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from common.code_store import CodeStore
    from dataset.feature_set import FeatureSet, Task


@dataclass
class Batch:
    """A training batch: row slices of a task's train split.

    ``index`` holds the rows' positions in that train split, so a model can keep
    train-set-sized buffers (e.g. continuous codes of every train sample). ``source`` is
    the feature set the rows were read from when the batch is exactly its rows ``index``
    (``Batch.rows``), None for a batch assembled otherwise (e.g. mixed with replayed rows).
    """

    image: torch.Tensor
    text: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    image_layers: Optional[torch.Tensor] = None
    text_layers: Optional[torch.Tensor] = None
    source: Optional["FeatureSet"] = None

    def __len__(self) -> int:
        return int(self.image.shape[0])

    @classmethod
    def rows(cls, fs: "FeatureSet", index: torch.Tensor) -> "Batch":
        """The rows ``index`` of ``fs`` (``index_select``: the same rows as ``fs.image[index]``,
        several times cheaper per step on CPU), with ``source`` set to ``fs``."""
        def pick(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if x is None else x.index_select(0, index)

        return cls(image=pick(fs.image), text=pick(fs.text), labels=pick(fs.labels), index=index,
                   image_layers=pick(fs.image_layers), text_layers=pick(fs.text_layers), source=fs)


class HashModel(nn.Module):
    """Base class of every registered hashing model.

    Subclasses build their layers in ``__init__`` (no data access, no training there)
    and override ``loss`` and ``encode_image`` / ``encode_text``; continual methods also
    override the task hooks; a closed-form model overrides ``fit`` and keeps no
    trainable parameter. A generic strategy (replay, distillation) is a HashModel that
    holds a base model (``models/strategy.py``). ``bits`` is the code length currently in force; a model
    that grows its code (PBEH) updates it in ``begin_task``.
    """

    #: True when ``encode_image`` / ``encode_text`` never read ``task_index`` (the
    #: sequential baselines): the runner then scores the task-agnostic queries with the
    #: codes of the per-task scores instead of encoding the queries again. Leave it False
    #: when the task changes a code in any way.
    codes_ignore_task: bool = False

    def __init__(self, image_dim: int, text_dim: int, num_classes: int, bits: int) -> None:
        super().__init__()
        if bits < 1:
            raise ValueError(f"model.bits: must be a positive integer, got {bits}")
        self.image_dim = int(image_dim)
        self.text_dim = int(text_dim)
        self.num_classes = int(num_classes)
        self.bits = int(bits)

    # ------------------------------------------------------------------ task hooks
    def begin_task(self, task: "Task", task_index: int) -> None:
        """Called before training on ``task``: add prompts, heads, bits, buffers."""

    def fit(self, task: "Task", task_index: int) -> None:
        """Called once per task, after ``begin_task`` and before the training epochs: a
        closed-form model computes its solution here from ``task.train`` (and whatever
        statistics it kept). Gradient-trained models leave it empty. A model with no
        trainable parameters gets no optimiser and no epochs."""

    def begin_epoch(self, task: "Task", task_index: int, epoch: int) -> None:
        """Called at the start of every training epoch (e.g. to refresh code buffers)."""

    def end_task(self, task: "Task", task_index: int, store: "CodeStore") -> None:
        """Called after the task's database codes were stored and evaluated.

        ``store`` holds every stored database code so far; a model may inspect it
        (PBEH's extension test) but must not rewrite it.
        """

    # ------------------------------------------------------------------ training
    def loss(self, batch: Batch, task_index: int) -> Dict[str, torch.Tensor]:
        """The training losses of one batch; key ``"loss"`` is the total to minimise."""
        raise NotImplementedError

    def forward(self, batch: Batch, task_index: int) -> Dict[str, torch.Tensor]:
        """Training forward pass = ``loss``; the runner calls the module itself so that a
        DistributedDataParallel wrapper sees the call. Override ``loss``, not this."""
        return self.loss(batch, task_index)

    def param_groups(self, task_index: int) -> List[Dict[str, Any]]:
        """Parameter groups for the optimiser of ``task_index``.

        Each dict has ``params`` and may add ``lr_scale`` (multiplies the configured
        lr), ``weight_decay``, or ``optimizer`` (a ``{name: ..., **kwargs}`` block that
        gives this group an optimiser of its own, e.g. DSPH's SGD on its proxies).
        Default: every parameter that requires a gradient, one group.
        """
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    # ------------------------------------------------------------------ encoding
    def encode_image(
        self, image: torch.Tensor, task_index: Optional[int] = None,
        layers: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Continuous codes (B, bits) for image features; ``sign`` gives the binary code.

        ``task_index`` None means task-agnostic: a model that uses the task identity
        infers it itself. A sample's code never depends on its batch-mates or on the
        other modality.
        """
        raise NotImplementedError

    def encode_text(
        self, text: torch.Tensor, task_index: Optional[int] = None,
        layers: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Continuous codes (B, bits) for text features; see ``encode_image``."""
        raise NotImplementedError

    def infer_tasks(self, features: torch.Tensor, modality: str) -> Optional[torch.Tensor]:
        """The task index (B,) each sample is encoded with when ``task_index`` is None,
        for models that infer the task themselves (CASH's heads, PBEH's prompts); None
        for models whose codes ignore the task. Called in eval mode under no_grad by
        the runner (to report task-inference accuracy); must not change any state."""
        return None

    def train_buffers(self) -> List[torch.Tensor]:
        """Tensors whose first axis indexes the current task's train split and whose
        rows ``loss`` overwrites for the batch (e.g. continuous codes of every train
        sample). Under data-parallel training each process writes only its share of
        the batch; the runner copies every share to every process after each step."""
        return []

    def bit_significance(self) -> Optional[torch.Tensor]:
        """Per-bit significance (bits,), larger = more important, or None.

        Models with bit-scalable codes (SCAHN) return it; the runner then reports
        mAP of the most significant prefixes without retraining.
        """
        return None

    # ------------------------------------------------------------------ checkpoints
    def structure(self) -> Dict[str, Any]:
        """A JSON-able description of whatever the task hooks added (prompt counts,
        grown bits, buffer sizes), so a checkpoint can rebuild the shapes before
        ``load_state_dict``. Models whose shapes never change return ``{}``."""
        return {"bits": self.bits}

    def build_structure(self, structure: Dict[str, Any]) -> None:
        """Recreate the shapes described by ``structure`` (inverse of ``structure``)."""
        self.bits = int(structure.get("bits", self.bits))


def sign_codes(continuous: torch.Tensor) -> torch.Tensor:
    """Binary codes in {-1, +1} (int8); zero maps to +1 so every bit is decided."""
    return torch.where(continuous >= 0, 1, -1).to(torch.int8)
