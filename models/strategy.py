"""What every generic continual strategy shares: a HashModel that wraps a base model.

A strategy (replay, code distillation) is configured as ``{name: replay, base: {name:
DSPH, ...}, ...}``. It builds the base from the nested block through the model
registry, forwards every hook, the encoders and the parameter groups to it, and adds
its own behaviour in ``loss`` and ``end_task``. The runner sees one HashModel and
knows nothing about strategies.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from common.register import MODELS, NestedBlock
from models.base import HashModel

# The nested ``base`` block: a model block whose dimensions the wrapper passes itself.
BASE_BLOCK = NestedBlock(MODELS, ("image_dim", "text_dim", "num_classes"))


class StrategyWrapper(HashModel):
    """A HashModel around ``self.base`` (built from the ``base`` block); subclasses add
    the strategy in ``loss`` / ``end_task`` and keep their own state in ``structure``."""

    def __init__(self, image_dim: int, text_dim: int, num_classes: int, base: Dict[str, Any]) -> None:
        if not isinstance(base, dict) or "name" not in base:
            raise ValueError(f"model.base: expected a model block with a 'name' key, got {base!r}")
        kwargs = {k: v for k, v in base.items() if k != "name"}
        inner = MODELS.get(base["name"])(image_dim=image_dim, text_dim=text_dim, num_classes=num_classes, **kwargs)
        super().__init__(image_dim, text_dim, num_classes, inner.bits)
        self.base = inner

    # ---------------------------------------------------------------- forwarded hooks
    def begin_task(self, task, task_index: int) -> None:
        self.base.begin_task(task, task_index)
        self.bits = self.base.bits  # a base that grows its code (PBEH) sets the length

    def fit(self, task, task_index: int) -> None:
        self.base.fit(task, task_index)

    def begin_epoch(self, task, task_index: int, epoch: int) -> None:
        self.base.begin_epoch(task, task_index, epoch)

    def end_task(self, task, task_index: int, store) -> None:
        self.base.end_task(task, task_index, store)

    def param_groups(self, task_index: int) -> List[Dict[str, Any]]:
        return self.base.param_groups(task_index)

    def encode_image(self, image, task_index: Optional[int] = None, layers=None) -> torch.Tensor:
        return self.base.encode_image(image, task_index, layers)

    def encode_text(self, text, task_index: Optional[int] = None, layers=None) -> torch.Tensor:
        return self.base.encode_text(text, task_index, layers)

    def infer_tasks(self, features: torch.Tensor, modality: str) -> Optional[torch.Tensor]:
        return self.base.infer_tasks(features, modality)

    @property
    def codes_ignore_task(self) -> bool:  # type: ignore[override]
        return self.base.codes_ignore_task

    def train_buffers(self) -> List[torch.Tensor]:
        return self.base.train_buffers()

    def bit_significance(self) -> Optional[torch.Tensor]:
        return self.base.bit_significance()

    def structure(self) -> Dict[str, Any]:
        return {"bits": self.bits, "base": self.base.structure()}

    def build_structure(self, structure: Dict[str, Any]) -> None:
        self.base.build_structure(structure.get("base", {}))
        self.bits = self.base.bits
