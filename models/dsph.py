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

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

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


class DSPHHead(nn.Module):
    """``Linear(in_dim, bits) - Dropout - tanh``: one modality's hash function."""

    def __init__(self, in_dim: int, bits: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, bits)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dropout(self.linear(x)))


class HyPProxyLoss(nn.Module):
    """The HyP proxy loss of DSPH for both modalities (proxies are its parameters).

    Per modality: mean over positive (sample, label) pairs of ``1 - cos(u, P_y)`` plus
    mean over negative pairs of ``relu(cos(u, P_k) - delta)``; plus ``alpha`` times the
    mean of ``relu(cos(u_i, u_j) - delta)`` over pairs of multi-label samples that share
    no label, for image-image, text-text and image-text.

    The selections are masks multiplied in, not boolean indexing: no index gathering
    and no host read per step, the gradients of the selected terms are the same values,
    and a loss value differs from the gathered sum only in float rounding (the sum
    runs over the zeros too).
    """

    def __init__(self, num_classes: int, bits: int, alpha: float = 0.8, delta: Optional[float] = None) -> None:
        super().__init__()
        self.proxies = nn.Parameter(torch.empty(num_classes, bits))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")
        self.alpha = float(alpha)
        self.delta = proxy_margin(bits, num_classes) if delta is None else float(delta)

    def _proxy_term(self, u_unit: torch.Tensor, proxies_unit: torch.Tensor, pos: torch.Tensor,
                    neg: torch.Tensor, n_pos: torch.Tensor, n_neg: torch.Tensor) -> torch.Tensor:
        cos = u_unit @ proxies_unit.t()
        return ((1 - cos) * pos).sum() / n_pos + (F.relu(cos - self.delta) * neg).sum() / n_neg

    def _separation(self, img_unit: torch.Tensor, txt_unit: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of the image-image, text-text and image-text separation means over the
        pairs (i, j) of multi-label samples that share no label (0 when there is none)."""
        multi = (labels.sum(dim=1) > 1).to(labels.dtype)
        pairs = (labels @ labels.t() == 0).to(labels.dtype) * multi[:, None] * multi[None, :]
        count = pairs.sum().clamp(min=1)

        def mean_over_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (F.relu(a @ b.t() - self.delta) * pairs).sum() / count

        return sum(mean_over_pairs(a, b) for a, b in ((img_unit, img_unit), (txt_unit, txt_unit), (img_unit, txt_unit)))

    def forward(self, u_img: torch.Tensor, u_txt: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        labels = labels.float()
        pos = (labels > 0).to(labels.dtype)
        neg = 1 - pos
        counts = (pos.sum().clamp(min=1), neg.sum().clamp(min=1))
        img_unit, txt_unit = F.normalize(u_img, dim=1), F.normalize(u_txt, dim=1)
        proxies_unit = F.normalize(self.proxies, dim=1)
        proxy = (self._proxy_term(img_unit, proxies_unit, pos, neg, *counts)
                 + self._proxy_term(txt_unit, proxies_unit, pos, neg, *counts))
        return {"proxy": proxy, "separation": self.alpha * self._separation(img_unit, txt_unit, labels)}


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
