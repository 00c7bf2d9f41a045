"""Task prompts for continual hashing: per-task prompt banks, cross-attention of a
sample over its prompt tokens, and per-sample prompt selection.

Every sample is its own length-1 query sequence ``(B, 1, D)``; keys and values are that
sample's prompt tokens ``(B, L, D)``. The attention therefore never mixes samples of a
batch (the PBEH public code fed a 2-D ``(B, D)`` tensor, which attends across the batch).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class PromptBank(nn.Module):
    """One learnable ``(tokens, dim)`` prompt per task, added task by task.

    ``add`` draws the new prompt from N(0, std^2) with the global generator (the runner
    seeds it per task); ``std`` None means ``1 / sqrt(dim)``, rows of expected norm 1
    like L2-normalised features. ``freeze_old`` stops gradients of every prompt but the
    newest, so old tasks' prompts never change once their task is over.
    """

    def __init__(self, dim: int, std: Optional[float] = None) -> None:
        super().__init__()
        self.dim = int(dim)
        self.std = 1.0 / math.sqrt(self.dim) if std is None else float(std)
        self.prompts = nn.ParameterList()

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, task: int) -> nn.Parameter:
        return self.prompts[task]

    def sizes(self) -> List[int]:
        """Number of tokens of each task's prompt."""
        return [int(p.shape[0]) for p in self.prompts]

    def add(self, tokens: int, device: torch.device, random_init: bool = True) -> nn.Parameter:
        """Append a prompt of ``tokens`` rows on ``device``; ``random_init`` False makes a
        zero placeholder (for rebuilding shapes before ``load_state_dict``)."""
        if tokens < 1:
            raise ValueError(f"a prompt needs at least one token, got {tokens}")
        data = torch.randn(tokens, self.dim) * self.std if random_init else torch.zeros(tokens, self.dim)
        prompt = nn.Parameter(data.to(device))
        self.prompts.append(prompt)
        return prompt

    def freeze_old(self, keep_last: bool = True) -> None:
        """``requires_grad`` False for every prompt except (optionally) the newest."""
        n = len(self.prompts)
        for i, p in enumerate(self.prompts):
            p.requires_grad_(keep_last and i == n - 1)

    def stacked(self, upto: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """All tokens of tasks ``0..upto`` (default: all) as one ``(N, dim)`` matrix and
        the owning task of each row ``(N,)``."""
        last = len(self.prompts) - 1 if upto is None else int(upto)
        parts = [self.prompts[t] for t in range(last + 1)]
        owner = torch.cat([torch.full((p.shape[0],), t, dtype=torch.long) for t, p in enumerate(parts)])
        return torch.cat(parts), owner.to(parts[0].device)


class PromptCrossAttention(nn.Module):
    """``a = MHA(x, P, P)`` with each sample as its own length-1 query.

    ``tokens`` is either one prompt ``(L, D)`` shared by the batch or a per-sample stack
    ``(B, L, D)``; the result is ``(B, D)``. With one token per sample (PBEH) the softmax
    has a single entry and ``a`` is the value/out projection of that token.
    """

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        query = x.unsqueeze(1)
        if tokens.dim() == 2:
            tokens = tokens.unsqueeze(0).expand(x.shape[0], -1, -1)
        if tokens.shape[0] != x.shape[0]:
            raise ValueError(f"{tokens.shape[0]} prompt stacks for {x.shape[0]} samples")
        out, _ = self.attn(query, tokens, tokens, need_weights=False)
        return out.squeeze(1)


def select_prompts(x: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Index of the pool row closest to each sample by cosine similarity, ``(B,)``.

    Cosine (both sides L2-normalised) so the choice depends on direction only; ties go
    to the lowest index. Each row's choice depends on that row alone."""
    sim = F.normalize(x, dim=1) @ F.normalize(pool, dim=1).t()
    return sim.argmax(dim=1)


def gather_tokens(pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``pool[index]`` as per-sample single-token stacks ``(B, 1, D)``."""
    return pool[index].unsqueeze(1)


def stack_task_prompts(prompts: Sequence[torch.Tensor], task_per_sample: torch.Tensor) -> torch.Tensor:
    """Per-sample prompt stacks ``(B, L, D)`` from equally long task prompts ``(L, D)``
    and the task chosen for each sample."""
    return torch.stack(list(prompts))[task_per_sample]


def common_width(image_dim: int, text_dim: int, width: Optional[int], heads: int) -> int:
    """The shared width of prompts and attention: ``width`` if given, else the feature
    dim when both modalities agree, else the larger dim rounded up to a multiple of
    ``heads``."""
    if width is not None:
        return int(width)
    if image_dim == text_dim:
        return int(image_dim)
    big = max(image_dim, text_dim)
    return int(-(-big // heads) * heads)


def input_projection(in_dim: int, width: int) -> nn.Module:
    """Identity when the features already have the shared width, else ``Linear(in, width)``.

    A deviation from the public code (which assumes 512-d CLIP features for both
    modalities): features of other widths are mapped to the shared width. The models
    train this map on the first task only and freeze it afterwards, like the encoder it
    extends, so old tasks' inputs (and the keys used for task / prompt choice) stay put.
    """
    return nn.Identity() if in_dim == width else nn.Linear(in_dim, width)


def zero_biases(module: nn.Module) -> None:
    """Set the bias of every ``nn.Linear`` inside ``module`` to zero (weights untouched)."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Linear) and layer.bias is not None:
                layer.bias.zero_()
