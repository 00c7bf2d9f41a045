"""CAGMH: Covariance Attention Guidance Mamba Hashing, per sample, on frozen features.

Each modality's feature is cut into a short token sequence by a learned tokenizer; a
selective state-space block (``models/selective_scan.py``) scans that sequence, a
covariance attention over the sample's own tokens adds a small guidance term, and a
DSPH-style hash head maps the result to K bits. Training uses DSPH's HyP proxy loss on
both modalities plus a class-centre loss towards Hadamard-row centres. On a task
stream it is the sequential fine-tuning baseline (it ignores the task identity).

Deviations from the public code, on purpose (each keeps a sample's code a function of
that sample and modality alone, which retrieval requires):
- No ``mamba-ssm``: the selective scan is plain PyTorch, so it runs on CPU and GPU
  (``scan: sequential``, the default, loops over the few tokens and is the faster on
  CPU; ``scan: parallel`` is an associative prefix scan with the same results). On the
  CPU the sequential scan runs as a compiled numba kernel with a hand-written backward
  (``models/scan_kernel.py``) and the softplus of its step sizes as another
  (``models/softplus_kernel.py``); ``scan_kernel: torch`` keeps the PyTorch loop and
  torch's softplus: the same values up to float rounding, in about half the time of
  autograd over the loop.
- The public scan runs over the *batch* axis of ``[I || T]`` (the batch is the
  sequence), so a code depends on its batch-mates and on its paired caption. Here each
  modality is encoded alone: a learned linear tokenizer turns its feature into
  ``num_tokens`` tokens of width ``token_dim`` and the scan runs over those tokens of
  one sample. The scan block is shared by both modalities (one block sees both, the
  weight-space remnant of the public fusion over ``[I || T]``); ``share_scan: false``
  gives each modality its own. Around the block: a pre-norm residual
  ``Y = X + Scan(LayerNorm(X))`` (as Mamba's own models wrap the mixer), because a
  freshly initialised block without it would scramble the features at the start.
- Covariance attention guidance, re-derived per sample. The public version forms
  ``M = i i^T - t t^T`` over the B samples of a batch from the image and text row sums
  ``i = I 1``, ``t = T 1``, i.e. it compares two views of the same items. Here the
  items are the L tokens of one sample and the two views are the tokens before (X)
  and after (Y) the scan, both from the same modality: ``s_X = X_hat 1``,
  ``s_Y = Y_hat 1`` (row sums of L2-normalised tokens, so the sums are O(1) like those
  of unit-length CLIP features), ``M = s_X s_X^T - s_Y s_Y^T`` (L x L),
  ``A = (1 - tanh^2 M) sigmoid(M) (1 - sigmoid(M))`` elementwise as published, and
  ``E = guidance_weight * A X`` (0.1 as published). ``Z = L2norm(flatten(Y + E))``.
  Nothing crosses samples or modalities.
- Every block is trained: the public code never gives the fusion block to the
  optimiser; here tokenizers, scan, norms and heads are in ``param_groups`` (the
  proxies keep DSPH's own SGD optimiser).
- Hash head: ``L2norm - Linear(in, hidden) - ReLU - Dropout - [DSPHHead: Linear(hidden, K)
  - tanh] - L2norm`` (dropout 0.3 image / 0.1 text, hidden 4096 as published); the
  final ``Linear - tanh`` is DSPH's head with its dropout set to 0.
- Class-centre loss: centres ``c(y) = sign(y^T H)`` from rows of ``[H; -H]`` (H the
  Sylvester-Hadamard matrix, first K columns when K is not a power of two), skipping
  the all-ones / all-minus-ones rows, which are not balanced; when the classes
  outnumber those rows (e.g. 80 classes at 16 bits) the remaining centres are balanced
  random +-1 vectors from a fixed generator. The hinge ``mean relu(1 - h c)`` is applied
  to the tanh output ``h`` before the final L2 normalisation (same signs), so it also
  drives bits to +-1; bits where a multi-label centre sums to 0 give a constant.
  Its weight (``center_weight``, default 1.0) is not stated in the reference notes.
"""
from __future__ import annotations

import math
from typing import Dict, List, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from common.register import MODELS
from models.base import Batch, HashModel
from models.dropout import Dropout
from models.dsph import DSPHHead, HyPProxyLoss
from models.selective_scan import SelectiveScanBlock


def hadamard_centres(num_classes: int, bits: int) -> torch.Tensor:
    """(num_classes, bits) balanced +-1 class centres: Hadamard rows first (see the
    module docstring), then balanced random rows from a fixed generator."""
    n = 1 << max(0, math.ceil(math.log2(bits)))
    H = torch.ones(1, 1)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    rows = torch.cat([H, -H])[:, :bits]
    balanced = rows.sum(1).abs() < bits          # drops the all-ones / all-minus-ones rows
    rows = rows[balanced]
    if rows.shape[0] >= num_classes:
        return rows[:num_classes].clone()
    gen = torch.Generator().manual_seed(bits * 1_000 + num_classes)
    extra = []
    for _ in range(num_classes - rows.shape[0]):
        row = torch.ones(bits)
        row[torch.randperm(bits, generator=gen)[: bits // 2]] = -1
        extra.append(row)
    return torch.cat([rows, torch.stack(extra)])


def covariance_guidance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample covariance attention ``A`` (B, L, L) between the tokens of one sample
    before (``x``) and after (``y``) the scan; see the module docstring."""
    sx = F.normalize(x, dim=-1).sum(-1)
    sy = F.normalize(y, dim=-1).sum(-1)
    M = sx.unsqueeze(2) * sx.unsqueeze(1) - sy.unsqueeze(2) * sy.unsqueeze(1)
    sig = torch.sigmoid(M)
    return (1 - torch.tanh(M).pow(2)) * sig * (1 - sig)


class CAGMHHead(nn.Module):
    """``L2norm - Linear(in, hidden) - ReLU - Dropout - DSPHHead(hidden, K) - L2norm``.

    ``forward`` returns (tanh output, L2-normalised code)."""

    def __init__(self, in_dim: int, hidden: int, bits: int, dropout: float) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_dim, hidden)
        self.dropout = Dropout(dropout)
        self.out = DSPHHead(hidden, bits, dropout=0.0)

    def forward(self, z: torch.Tensor):
        h = self.out(self.dropout(torch.relu(self.hidden(F.normalize(z, dim=-1)))))
        return h, F.normalize(h, dim=-1)


class GuidedScanEncoder(nn.Module):
    """Tokenizer -> residual selective scan -> covariance guidance -> flat feature."""

    def __init__(self, in_dim: int, num_tokens: int, token_dim: int, scan: SelectiveScanBlock,
                 guidance_weight: float) -> None:
        super().__init__()
        self.num_tokens, self.token_dim = num_tokens, token_dim
        self.tokenizer = nn.Linear(in_dim, num_tokens * token_dim)
        self.norm = nn.LayerNorm(token_dim)
        self.scan = scan
        self.guidance_weight = guidance_weight

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        x = self.tokenizer(feature).view(-1, self.num_tokens, self.token_dim)
        y = x + self.scan(self.norm(x))
        e = self.guidance_weight * covariance_guidance(x, y) @ x
        return F.normalize((y + e).flatten(1), dim=-1)


@MODELS.register("CAGMH")
class CAGMH(HashModel):
    """Per-sample CAGMH: guided selective-scan encoders, DSPH-style heads, HyP proxy
    loss + class-centre loss (see the module docstring for every deviation)."""

    codes_ignore_task = True  # a code never depends on the task

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        num_classes: int,
        bits: int = 64,
        num_tokens: int = 8,
        token_dim: int = 64,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        scan: Literal["sequential", "parallel"] = "sequential",
        scan_kernel: Literal["auto", "torch"] = "auto",
        share_scan: bool = True,
        guidance_weight: float = 0.1,
        hidden: int = 4096,
        image_dropout: float = 0.3,
        text_dropout: float = 0.1,
        alpha: float = 0.8,
        delta: Optional[float] = None,
        center_weight: float = 1.0,
        proxy_lr: float = 0.02,
        proxy_momentum: float = 0.9,
        proxy_weight_decay: float = 5e-4,
    ) -> None:
        super().__init__(image_dim, text_dim, num_classes, bits)
        if num_tokens < 1 or token_dim < 1 or hidden < 1:
            raise ValueError(f"num_tokens, token_dim and hidden must be >= 1, got {num_tokens}, {token_dim}, {hidden}")
        image_scan = SelectiveScanBlock(token_dim, d_state=d_state, d_conv=d_conv, expand=expand, scan=scan,
                                        kernel=scan_kernel)
        text_scan = image_scan if share_scan else SelectiveScanBlock(
            token_dim, d_state=d_state, d_conv=d_conv, expand=expand, scan=scan, kernel=scan_kernel)
        width = num_tokens * token_dim
        self.image_encoder = GuidedScanEncoder(image_dim, num_tokens, token_dim, image_scan, guidance_weight)
        self.text_encoder = GuidedScanEncoder(text_dim, num_tokens, token_dim, text_scan, guidance_weight)
        self.image_head = CAGMHHead(width, hidden, bits, image_dropout)
        self.text_head = CAGMHHead(width, hidden, bits, text_dropout)
        self.criterion = HyPProxyLoss(num_classes, bits, alpha=alpha, delta=delta)
        self.register_buffer("centres", hadamard_centres(num_classes, bits))
        self.center_weight = float(center_weight)
        self.proxy_optimizer = {
            "name": "sgd", "lr": proxy_lr, "momentum": proxy_momentum, "weight_decay": proxy_weight_decay,
        }

    def _center_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = torch.sign(labels.float() @ self.centres)
        return F.relu(1 - h * target).mean()

    def loss(self, batch: Batch, task_index: int) -> Dict[str, torch.Tensor]:
        h_img, u_img = self.image_head(self.image_encoder(batch.image))
        h_txt, u_txt = self.text_head(self.text_encoder(batch.text))
        parts = self.criterion(u_img, u_txt, batch.labels)
        parts["center"] = self.center_weight * (
            self._center_loss(h_img, batch.labels) + self._center_loss(h_txt, batch.labels))
        parts["loss"] = parts["proxy"] + parts["separation"] + parts["center"]
        return parts

    def param_groups(self, task_index: int) -> List[Dict]:
        body = [p for n, p in self.named_parameters() if not n.startswith("criterion.")]
        return [
            {"params": body, "name": "encoders_and_heads"},
            {"params": [self.criterion.proxies], "name": "proxies", "optimizer": dict(self.proxy_optimizer)},
        ]

    def encode_image(self, image: torch.Tensor, task_index: Optional[int] = None,
                     layers: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.image_head(self.image_encoder(image))[1]

    def encode_text(self, text: torch.Tensor, task_index: Optional[int] = None,
                    layers: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.text_head(self.text_encoder(text))[1]
