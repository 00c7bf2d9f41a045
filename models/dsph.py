"""DSPH: Deep Semantic-aware Proxy Hashing on frozen features.

Per-modality hash heads ``Linear(D, K) - Dropout - tanh`` trained with the HyP proxy
loss: learnable class proxies pull a sample's continuous code towards the proxies of
its labels and push it below a margin ``delta`` from the others, plus a regulariser
that separates multi-label samples sharing no label. On a task stream it is the
sequential fine-tuning baseline (it ignores the task identity).

Deviations from the public code, on purpose:
- CLIP is frozen (features are precomputed), so only the heads and proxies train.
- ``delta`` is computed (``proxy_margin``), not read from a table.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from common.register import MODELS
from models.base import Batch, HashModel
from models.dropout import Dropout


def proxy_margin(bits: int, num_classes: int) -> float:
    """The cosine margin ``delta = 1 - 2 d / K`` that K-bit codes can keep between the
    ``M = 2^ceil(log2 C)`` codewords of the class proxies.

    ``d`` is the largest even distance d <= K/2 that the Plotkin bound
    ``A(K, d) <= d * 2^(K - 2d + 2)`` admits for M codewords (even, because an odd
    distance on K bits is an even one on K + 1). This reproduces the authors' values
    (C = 80: 0.25 / 0.125 / 0 at 16 / 32 / 64 bits; C = 21 or 24: 0).
    """
    if bits < 2 or num_classes < 1:
        raise ValueError(f"proxy_margin needs bits >= 2 and num_classes >= 1, got {bits}, {num_classes}")
    m = 2 ** max(1, math.ceil(math.log2(num_classes)))
    for d in range(bits // 2 - (bits // 2) % 2, 0, -2):
        if d * 2 ** (bits - 2 * d + 2) >= m:
            return 1.0 - 2.0 * d / bits
    return 1.0 - 2.0 / bits


_NORM_EPS = 1e-12  # F.normalize's default


class DSPHHead(nn.Module):
    """``Linear(in_dim, bits) - Dropout - tanh``: one modality's hash function."""

    def __init__(self, in_dim: int, bits: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, bits)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dropout(self.linear(x)))


def _unit_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``F.normalize(x, dim=1)`` with what its gradient needs: the unit rows, the divisor
    ``max(|x_i|, eps)`` and 1 where the norm was not clamped (0 where it was)."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    free = (norm - _NORM_EPS).clamp_(min=0).sign_()
    norm = norm.clamp_(min=_NORM_EPS)
    return x / norm, norm, free


def _unit_rows_backward(grad: torch.Tensor, unit: torch.Tensor, norm: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """The gradient through ``_unit_rows`` (``grad`` is overwritten): the component along
    the row is removed where the norm was not clamped, then divided by the divisor."""
    along = (unit * grad).sum(dim=1, keepdim=True).mul_(free)
    return grad.sub_(unit * along).div_(norm)


class _HyPTerms(torch.autograd.Function):
    """The proxy and separation terms of the HyP loss with their gradient written out.

    Autograd's version records about forty nodes per step, whose fixed cost was most of
    a DSPH step (a 70k-parameter model); this is one node. Every comparison is a float
    op (``clamp`` then ``sign``: exactly 0 or 1), several times faster on the CPU than a
    comparison to bool and back at these sizes. The values are the same sums as the
    masked autograd form up to float rounding (another order); ``tests/test_dsph.py``
    checks values and gradients against it and ``gradcheck``s this one.
    """

    @staticmethod
    def forward(ctx, u_img, u_txt, proxies, labels, delta: float, alpha: float):
        n = u_img.shape[0]
        pos = labels.clamp(min=0).sign_()                     # 1 on a sample's labels
        n_pos = pos.sum()
        w_pos = pos / n_pos.clamp(min=1)                      # mean over positive pairs
        w_neg = (1 - pos).div_((pos.numel() - n_pos).clamp(min=1))
        multi = (pos.sum(dim=1) - 1).clamp_(0, 1)             # 1 on multi-label samples
        pairs = (pos @ pos.t()).sign_().neg_().add_(1).mul_(multi[:, None]).mul_(multi[None, :])
        pairs = pairs.div_(pairs.sum().clamp(min=1))          # mean over disjoint pairs
        units, norm, free = _unit_rows(torch.cat([u_img, u_txt]))
        p_unit, p_norm, p_free = _unit_rows(proxies)
        cos = (units @ p_unit.t()).view(2, n, -1)             # [image; text] x proxies
        above = (cos - delta).clamp_(min=0)
        proxy = (1 - cos).mul_(w_pos).sum() + (above * w_neg).sum()
        img, txt = units[:n], units[n:]
        cross = (units @ img.t()).sub_(delta).clamp_(min=0).view(2, n, n)  # [img-img; txt-img]
        txt_txt = (txt @ txt.t()).sub_(delta).clamp_(min=0)
        # txt-img is img-txt transposed and the pair mask is symmetric: the same sum
        separation = alpha * ((cross * pairs).sum() + (txt_txt * pairs).sum())
        ctx.save_for_backward(units, norm, free, p_unit, p_norm, p_free, above, w_pos, w_neg, cross, txt_txt, pairs)
        ctx.alpha = alpha
        return proxy, separation

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_proxy, grad_separation):
        units, norm, free, p_unit, p_norm, p_free, above, w_pos, w_neg, cross, txt_txt, pairs = ctx.saved_tensors
        n = units.shape[0] // 2
        grad_cos = above.sign().mul_(w_neg).sub_(w_pos).mul_(grad_proxy).view(2 * n, -1)
        grad_units = grad_cos @ p_unit
        grad_p = grad_cos.t() @ units
        weight = pairs * (grad_separation * ctx.alpha)
        grad_cross = cross.sign().mul_(weight).view(2 * n, n)
        grad_tt = txt_txt.sign().mul_(weight)
        img, txt = units[:n], units[n:]
        grad_units += grad_cross @ img
        grad_units[:n] += grad_cross.t() @ units
        grad_units[n:] += (grad_tt + grad_tt.t()) @ txt
        grad_units = _unit_rows_backward(grad_units, units, norm, free)
        return (grad_units[:n], grad_units[n:], _unit_rows_backward(grad_p, p_unit, p_norm, p_free),
                None, None, None)


class HyPProxyLoss(nn.Module):
    """The HyP proxy loss of DSPH for both modalities (proxies are its parameters).

    Per modality: mean over positive (sample, label) pairs of ``1 - cos(u, P_y)`` plus
    mean over negative pairs of ``relu(cos(u, P_k) - delta)``; plus ``alpha`` times the
    mean of ``relu(cos(u_i, u_j) - delta)`` over pairs of multi-label samples that share
    no label, for image-image, text-text and image-text. A label is positive where it
    is above 0.

    The selections are masks multiplied in, not boolean indexing: no index gathering
    and no host read per step, the gradients of the selected terms are the same values,
    and a loss value differs from the gathered sum only in float rounding (the sum
    runs over the zeros too). Forward and backward are written out in ``_HyPTerms``.
    Under autocast the loss runs in float32 (its matmuls are a few hundred by a few
    hundred by the code length: nothing to gain from bf16, and its cosines keep their
    precision).
    """

    def __init__(self, num_classes: int, bits: int, alpha: float = 0.8, delta: Optional[float] = None) -> None:
        super().__init__()
        self.proxies = nn.Parameter(torch.empty(num_classes, bits))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")
        self.alpha = float(alpha)
        self.delta = proxy_margin(bits, num_classes) if delta is None else float(delta)

    def forward(self, u_img: torch.Tensor, u_txt: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        if u_img.shape != u_txt.shape or labels.shape[0] != u_img.shape[0]:
            raise ValueError(f"HyP loss needs codes of one shape and a label row per sample, got "
                             f"{tuple(u_img.shape)}, {tuple(u_txt.shape)} and labels {tuple(labels.shape)}")
        device = u_img.device.type
        outside = torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()
        dtype = torch.promote_types(torch.promote_types(u_img.dtype, u_txt.dtype), self.proxies.dtype)
        with outside:
            proxy, separation = _HyPTerms.apply(u_img.to(dtype), u_txt.to(dtype), self.proxies.to(dtype),
                                                labels.to(dtype), self.delta, self.alpha)
        return {"proxy": proxy, "separation": separation}


@MODELS.register("DSPH")
class DSPH(HashModel):
    """DSPH hash heads + HyP proxy loss on frozen image / text features."""

    codes_ignore_task = True  # a code never depends on the task

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        num_classes: int,
        bits: int = 64,
        dropout: float = 0.2,
        alpha: float = 0.8,
        delta: Optional[float] = None,
        proxy_lr: float = 0.02,
        proxy_momentum: float = 0.9,
        proxy_weight_decay: float = 5e-4,
    ) -> None:
        super().__init__(image_dim, text_dim, num_classes, bits)
        self.image_head = DSPHHead(image_dim, bits, dropout)
        self.text_head = DSPHHead(text_dim, bits, dropout)
        self.criterion = HyPProxyLoss(num_classes, bits, alpha=alpha, delta=delta)
        self.proxy_optimizer = {
            "name": "sgd", "lr": proxy_lr, "momentum": proxy_momentum, "weight_decay": proxy_weight_decay,
        }

    def loss(self, batch: Batch, task_index: int) -> Dict[str, torch.Tensor]:
        parts = self.criterion(self.image_head(batch.image), self.text_head(batch.text), batch.labels)
        parts["loss"] = parts["proxy"] + parts["separation"]
        return parts

    def param_groups(self, task_index: int) -> List[Dict]:
        heads = [p for n, p in self.named_parameters() if not n.startswith("criterion.")]
        return [
            {"params": heads, "name": "heads"},
            {"params": [self.criterion.proxies], "name": "proxies", "optimizer": dict(self.proxy_optimizer)},
        ]

    def encode_image(self, image, task_index=None, layers=None):
        return self.image_head(image)

    def encode_text(self, text, task_index=None, layers=None):
        return self.text_head(text)
