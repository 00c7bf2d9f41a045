"""Experience replay around any registered model: a small memory of earlier tasks'
train samples is mixed into every training batch of later tasks.

The memory holds at most ``memory`` samples (features of both modalities and labels),
shared equally between the tasks seen so far: after each task, every earlier task
keeps the first ``memory // tasks_seen`` of its stored samples (they were stored in a
random order) and the new task adds a random draw of its train split. Each training
batch of ``B`` samples is extended by ``replay_batch`` (default ``B``) memory samples
drawn at random, and the base model's own loss is computed on the union, so its
pairwise terms also see pairs across tasks. The standard experience-replay baseline
of continual learning; it keeps raw features, which the continual hashing methods
avoid, so it marks what a small memory buys.
"""
from __future__ import annotations

from typing import Annotated, Any, Dict, Optional

import torch

from common.register import MODELS
from models.base import Batch
from models.strategy import BASE_BLOCK, StrategyWrapper


@MODELS.register("replay")
class Replay(StrategyWrapper):
    """Experience replay around the model of the ``base`` block (see the module doc)."""

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        num_classes: int,
        base: Annotated[Dict[str, Any], BASE_BLOCK],
        memory: int = 200,
        replay_batch: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        super().__init__(image_dim, text_dim, num_classes, base)
        if memory < 1:
            raise ValueError(f"model.memory: the number of remembered samples must be >= 1, got {memory}")
        if replay_batch is not None and replay_batch < 1:
            raise ValueError(f"model.replay_batch: must be >= 1 or null (the batch size), got {replay_batch}")
        self.memory = int(memory)
        self.replay_batch = replay_batch
        self.seed = int(seed)
        self._set_memory(0)

    def _set_memory(self, n: int) -> None:
        self.register_buffer("memory_image", torch.zeros(n, self.image_dim))
        self.register_buffer("memory_text", torch.zeros(n, self.text_dim))
        self.register_buffer("memory_labels", torch.zeros(n, self.num_classes))
        self.register_buffer("memory_task", torch.zeros(n, dtype=torch.long))

    def begin_task(self, task, task_index: int) -> None:
        super().begin_task(task, task_index)
        if self.base.train_buffers():
            raise ValueError(f"model.base: replay cannot wrap {type(self.base).__name__}: it keeps a buffer row "
                             "per train sample, which remembered samples do not have")

    def loss(self, batch: Batch, task_index: int) -> Dict[str, torch.Tensor]:
        n = int(self.memory_task.shape[0])
        if n == 0:
            return self.base.loss(batch, task_index)
        if batch.image_layers is not None or batch.text_layers is not None:
            raise ValueError("replay keeps pooled features only; it cannot replay per-layer features")
        k = min(n, self.replay_batch or len(batch))
        pick = torch.randperm(n)[:k].to(self.memory_task.device)
        mixed = Batch(
            image=torch.cat([batch.image, self.memory_image[pick]]),
            text=torch.cat([batch.text, self.memory_text[pick]]),
            labels=torch.cat([batch.labels, self.memory_labels[pick]]),
            index=torch.cat([batch.index, torch.full((k,), -1, dtype=batch.index.dtype, device=batch.index.device)]),
        )
        return self.base.loss(mixed, task_index)

    def end_task(self, task, task_index: int, store) -> None:
        super().end_task(task, task_index, store)
        earlier = sorted(set(self.memory_task.tolist()) - {task_index})
        quota = self.memory // (len(earlier) + 1)
        keep = torch.cat([(self.memory_task == t).nonzero().flatten()[:quota] for t in earlier]
                         + [torch.zeros(0, dtype=torch.long, device=self.memory_task.device)])
        train = task.train
        gen = torch.Generator().manual_seed(self.seed * 100_003 + task_index)
        fresh = torch.randperm(len(train), generator=gen)[: self.memory - len(keep)].to(train.image.device)
        image = torch.cat([self.memory_image[keep], train.image[fresh].to(self.memory_image)])
        text = torch.cat([self.memory_text[keep], train.text[fresh].to(self.memory_text)])
        labels = torch.cat([self.memory_labels[keep], train.labels[fresh].to(self.memory_labels)])
        tasks = torch.cat([self.memory_task[keep], torch.full((len(fresh),), task_index, device=keep.device)])
        self.memory_image, self.memory_text, self.memory_labels, self.memory_task = image, text, labels, tasks

    def structure(self) -> Dict[str, Any]:
        return {**super().structure(), "memory_size": int(self.memory_task.shape[0])}

    def build_structure(self, structure: Dict[str, Any]) -> None:
        super().build_structure(structure)
        self._set_memory(int(structure.get("memory_size", 0)))
