"""Code distillation (LwF-style) around any registered model: after each task a frozen
copy of the model is kept, and training on the next task pulls the new model's
continuous codes of the current samples towards the copy's.

The added term is ``weight`` times the mean squared difference between the student's
and the teacher's continuous codes, in both modalities, over the teacher's bits (a
model that grows its code keeps its old bits close), both encoded under the teacher's
task (LwF's old-head outputs on new data). No old sample is kept, only the
old model: the standard Learning-without-Forgetting baseline of continual learning,
applied to codes instead of class logits. The teacher's codes of the train rows are
computed once per task (``models/row_cache.py``), not in every step.
"""
from __future__ import annotations

import copy
from typing import Annotated, Any, Dict, Optional

import torch
import torch.nn.functional as F

from common.register import MODELS
from models.base import Batch
from models.row_cache import TeacherRows
from models.strategy import BASE_BLOCK, StrategyWrapper


@MODELS.register("distill")
class Distill(StrategyWrapper):
    """LwF-style code distillation around the model of the ``base`` block."""

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        num_classes: int,
        base: Annotated[Dict[str, Any], BASE_BLOCK],
        weight: float = 1.0,
    ) -> None:
        super().__init__(image_dim, text_dim, num_classes, base)
        if weight < 0:
            raise ValueError(f"model.weight: the distillation weight must be >= 0, got {weight}")
        self.weight = float(weight)
        self.teacher = None
        self.teacher_task: Optional[int] = None
        self._targets = TeacherRows()  # the teacher's codes per train row, once per task

    def _freeze_copy(self) -> None:
        self.teacher = copy.deepcopy(self.base)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True) -> "Distill":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher's codes are fixed targets (no dropout)
        return self

    def loss(self, batch: Batch, task_index: int) -> Dict[str, torch.Tensor]:
        parts = self.base.loss(batch, task_index)
        if self.teacher is None:
            return parts
        old_image, old_text = self._targets(batch, self._teacher_codes)
        # The student is read under the teacher's task too: for a task-conditioned base
        # (prompts, heads) that is the mapping the stored codes of the earlier tasks came
        # from, which is what the term protects; a task-agnostic base ignores the index.
        k = old_image.shape[1]
        new_image = self.base.encode_image(batch.image, self.teacher_task, batch.image_layers)[:, :k]
        new_text = self.base.encode_text(batch.text, self.teacher_task, batch.text_layers)[:, :k]
        parts["distill"] = self.weight * (F.mse_loss(new_image, old_image) + F.mse_loss(new_text, old_text))
        parts["loss"] = parts["loss"] + parts["distill"]
        return parts

    def _teacher_codes(self, batch: Batch):
        """The teacher's continuous codes of the batch, image and text, under its task."""
        return (self.teacher.encode_image(batch.image, self.teacher_task, batch.image_layers),
                self.teacher.encode_text(batch.text, self.teacher_task, batch.text_layers))

    def begin_task(self, task, task_index: int) -> None:
        super().begin_task(task, task_index)
        self._targets.reset(task.train if self.teacher is not None else None)

    def end_task(self, task, task_index: int, store) -> None:
        super().end_task(task, task_index, store)
        self._freeze_copy()
        self.teacher_task = task_index

    def structure(self) -> Dict[str, Any]:
        return {**super().structure(), "teacher_task": self.teacher_task}

    def build_structure(self, structure: Dict[str, Any]) -> None:
        super().build_structure(structure)
        self.teacher_task = structure.get("teacher_task")
        if self.teacher_task is not None:
            self._freeze_copy()
