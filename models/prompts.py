"""Task prompts for continual hashing: per-task prompt banks, cross-attention of a
sample over its prompt tokens, and per-sample prompt selection.

Every sample is its own length-1 query sequence ``(B, 1, D)``; keys and values are that
sample's prompt tokens ``(B, L, D)``. The attention therefore never mixes samples of a
batch (the PBEH public code fed a 2-D ``(B, D)`` tensor, which attends across the batch).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

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

    ``tokens`` is one prompt ``(L, D)`` shared by the batch, a per-sample stack
    ``(B, L, D)``, with ``index`` ``(B,)`` a set of stacks ``(N, L, D)`` of which
    sample i reads stack ``index[i]``, or with ``index`` ``(B, k)`` a pool of single
    tokens ``(N, D)`` of which sample i reads rows ``index[i]`` (PBEH: a sample's
    top-k prompts); the result is ``(B, D)``. A sample that reads one token only gets
    the value/out projection of that token whatever it is (a softmax over one key is 1).

    The parameters are those of ``nn.MultiheadAttention`` (same state-dict keys), but
    keys and values are projected once per distinct token and then broadcast to the
    samples that read them: ``nn.MultiheadAttention`` on an expanded ``(B, L, D)``
    prompt projects the same tokens B times (a third of CASH's step arithmetic). The
    per-sample result is the same function; float rounding of the gradients of the
    key / value weights differs (summed over samples before the projection, not after).
    """

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        attn = self.attn
        B, D = x.shape
        H = attn.num_heads
        if index is not None and index.dim() == 2:
            if tokens.dim() != 2 or index.shape[0] != B:
                raise ValueError(f"index {tuple(index.shape)} needs a token pool (N, D) and one row per sample ({B})")
        elif index is not None:
            if tokens.dim() != 3 or index.shape != (B,):
                raise ValueError(f"index {tuple(index.shape)} needs stacks (N, L, D) and one entry per sample ({B})")
        elif tokens.dim() == 3 and tokens.shape[0] != B:
            raise ValueError(f"{tokens.shape[0]} prompt stacks for {B} samples")
        w_q, w_kv = attn.in_proj_weight.split([D, 2 * D])
        b_q, b_kv = attn.in_proj_bias.split([D, 2 * D])
        q = F.linear(x, w_q, b_q).view(B, H, 1, D // H)
        k, v = F.linear(tokens, w_kv, b_kv).chunk(2, dim=-1)          # (..., L, D) each, once per token
        if index is not None:
            # (B, L, D): each sample's stack, or the pool rows it reads. index_select, not
            # k[index]: the backward of advanced indexing (an accumulating index_put) sums
            # in a thread-dependent order on CPU with more than one thread, so gradients,
            # and every number after them, changed from run to run; index_add sums in
            # index order (bit-identical to k[index] on one thread).
            rows = index.reshape(-1)
            k, v = k.index_select(0, rows).view(B, -1, D), v.index_select(0, rows).view(B, -1, D)
        elif tokens.dim() == 2:
            k, v = k.unsqueeze(0), v.unsqueeze(0)
        L = k.shape[-2]
        k = k.view(k.shape[0], L, H, D // H).transpose(1, 2).expand(B, -1, -1, -1)
        v = v.view(v.shape[0], L, H, D // H).transpose(1, 2).expand(B, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout if self.training else 0.0)
        return attn.out_proj(out.reshape(B, D))


def prompt_similarity(x: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every sample to every pool row, ``(B, N)``: the choice of a
    prompt depends on direction only, and each row on that sample alone."""
    return F.normalize(x, dim=1) @ F.normalize(pool, dim=1).t()


def select_prompts(x: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Index of the pool row closest to each sample by cosine similarity, ``(B,)``;
    ties go to the lowest index."""
    return prompt_similarity(x, pool).argmax(dim=1)


def top_prompts(x: torch.Tensor, pool: torch.Tensor, k: Optional[int]) -> torch.Tensor:
    """Indices of the ``k`` pool rows closest to each sample (cosine), ``(B, k)``,
    nearest first; ``k`` None (or larger than the pool) takes every row in pool order."""
    n = pool.shape[0]
    if k is None or k >= n:
        return torch.arange(n, device=x.device).expand(x.shape[0], n)
    return prompt_similarity(x, pool).topk(k, dim=1).indices


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
