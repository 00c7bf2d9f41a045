"""DCMHT: Differentiable Cross-modal Hashing via Multimodal Transformers, on frozen features.

Each bit is a two-way softmax: a hash head maps a feature to ``(K, 2)`` probabilities,
the code is the argmax of each pair (index 1 -> +1, index 0 -> -1), and training pulls
the concatenated probability vectors of relevant pairs together and pushes irrelevant
ones beyond a margin, within and across modalities. On a task stream it is the
sequential fine-tuning baseline (it ignores the task identity).

Deviations from the public code, on purpose:
- CLIP is frozen (features are precomputed), so only the hash heads train.
- The projection is multi-head attention over a length-1 sequence, as in the unified
  library. With one key its attention weight is exactly 1, so the block equals
  ``out_proj(v_proj(x))`` whatever the head count; the number of heads is therefore
  taken as ``gcd(dim, heads)`` so that any feature width (e.g. 76-d text) is accepted
  without changing the function. The block is computed as that (``attend``); the
  query / key rows of its in-projection get a zero gradient (the softmax over one key
  is constant) and are kept so that the block's parameters and checkpoint keys are the
  library's block's.
- BatchNorm (image head) uses batch statistics while training and its running
  statistics in eval mode, so at retrieval a sample's code never depends on its
  batch-mates (the runner encodes in eval mode).
- The continuous code handed to the runner is ``p1 - p0`` per bit, whose sign is the
  argmax (a tie, both ReLU outputs 0, gives 0 and the runner maps it to +1).
- Distances use ``sqrt(max(D^2, 1e-12))`` so that the zero self-distance on the
  diagonal of the intra-modal terms has a finite gradient.
- ``D^2`` comes from the Gram expansion in float64 (``squared_distances``), not from
  the (B, B, 2K) difference tensor: the same values up to float32 rounding, several
  times faster on CPU (a seeded run's figures can move in their last digits).
"""
from __future__ import annotations

import math
from typing import Dict, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from common.register import MODELS
from models.base import Batch, HashModel
from models.losses import label_overlap


class SoftmaxHashHead(nn.Module):
    """Attention projection - norm - ``Linear(d, 2K)`` - ReLU - per-bit softmax.

    ``forward`` returns the probabilities ``(B, K, 2)``.
    """

    def __init__(self, dim: int, bits: int, heads: int = 8, norm: Literal["batch", "layer"] = "batch") -> None:
        super().__init__()
        self.bits = bits
        self.attention = nn.MultiheadAttention(dim, math.gcd(dim, max(1, heads)), batch_first=True)
        self.norm = nn.BatchNorm1d(dim) if norm == "batch" else nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, 2 * bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.attend(x))
        logits = torch.relu(self.linear(h)).view(-1, self.bits, 2)
        return torch.softmax(logits, dim=-1)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention block over the one-token sequence ``[x]``, ``(B, d)``: its single
        attention weight is exactly 1, so the block is ``out_proj(v_proj(x))`` and is
        computed so. The query / key projections, the softmax and the attention product
        of ``nn.MultiheadAttention`` are skipped (over a third of a coco.yaml step on CPU);
        the output is the same, and the query / key rows get an exact zero gradient
        instead of float rounding noise (about 1e-7)."""
        attn = self.attention
        d = attn.embed_dim
        return attn.out_proj(F.linear(x, attn.in_proj_weight[2 * d:], attn.in_proj_bias[2 * d:]))


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a_i - b_j||^2`` for every pair, as ``|a_i|^2 + |b_j|^2 - 2 a_i . b_j`` in
    float64, returned in the inputs' dtype. One matmul instead of a (B, B, 2K)
    difference tensor; float64 keeps the cancellation error far below float32 rounding
    (the float32 form of the expansion loses about 1e-6 and can go negative), so the
    values are the direct difference's up to float32 rounding."""
    a64, b64 = a.double(), b.double()
    d2 = a64.pow(2).sum(1, keepdim=True) + b64.pow(2).sum(1) - 2 * (a64 @ b64.t())
    return d2.clamp(min=0).to(a.dtype)


def margin_distance_loss(a: torch.Tensor, b: torch.Tensor, sim: torch.Tensor, margin: float) -> Dict[str, torch.Tensor]:
    """``L_pos = mean S D^2`` and ``L_neg = mean (1 - S)(m - min(D, m))^2`` over all pairs,
    ``D_ij = ||a_i - b_j||`` on the flattened per-bit probability vectors."""
    d2 = squared_distances(a, b)
    dist = torch.sqrt(d2.clamp(min=1e-12))
    pos = (sim * d2).mean()
    neg = ((1 - sim) * (margin - dist.clamp(max=margin)).pow(2)).mean()
    return {"pos": pos, "neg": neg}


@MODELS.register("DCMHT")
class DCMHT(HashModel):
    """DCMHT hash heads (per-bit two-way softmax) and its margin distance loss."""

    codes_ignore_task = True  # a code never depends on the task

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        num_classes: int,
        bits: int = 64,
        heads: int = 8,
        theta: float = 0.75,
        quant_weight: float = 0.001,
    ) -> None:
        super().__init__(image_dim, text_dim, num_classes, bits)
        if not 0.0 < theta <= 1.0:
            raise ValueError(f"theta: the margin fraction must be in (0, 1], got {theta}")
        self.image_head = SoftmaxHashHead(image_dim, bits, heads, norm="batch")
        self.text_head = SoftmaxHashHead(text_dim, bits, heads, norm="layer")
        # Two one-hot-per-bit vectors differing in every bit are sqrt(2K) apart.
        self.margin = math.sqrt(2 * bits * theta)
        self.quant_weight = float(quant_weight)

    def loss(self, batch: Batch, task_index: int) -> Dict[str, torch.Tensor]:
        p_img = self.image_head(batch.image)
        p_txt = self.text_head(batch.text)
        a, b = p_img.flatten(1), p_txt.flatten(1)
        labels = batch.labels.float()
        sim = label_overlap(labels, labels)
        parts: Dict[str, torch.Tensor] = {}
        total = a.new_zeros(())
        for name, (u, v) in {"i2t": (a, b), "i2i": (a, a), "t2t": (b, b)}.items():
            terms = margin_distance_loss(u, v, sim, self.margin)
            parts[name] = terms["pos"] + terms["neg"]
            total = total + parts[name]
        # 1 - mean((2p - 1)^2): zero when every probability is 0 or 1.
        quant = sum(1 - (2 * p - 1).pow(2).mean() for p in (p_img, p_txt))
        parts["quantization"] = self.quant_weight * quant
        parts["loss"] = total + parts["quantization"]
        return parts

    @staticmethod
    def _continuous(probs: torch.Tensor) -> torch.Tensor:
        return probs[..., 1] - probs[..., 0]

    def encode_image(self, image: torch.Tensor, task_index: Optional[int] = None,
                     layers: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._continuous(self.image_head(image))

    def encode_text(self, text: torch.Tensor, task_index: Optional[int] = None,
                    layers: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._continuous(self.text_head(text))
