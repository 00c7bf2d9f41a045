"""Continual ridge hashing: a closed-form baseline with no deep learning and no replay.

Per modality, a ridge regression from features (plus an unpenalised intercept) onto the
full multi-hot label space, solved from sufficient statistics accumulated over the
tasks (``X^T X``, ``X^T Y``, label sums): after task t it equals the ridge fit on all
train data of tasks 1..t, yet no old sample is kept. A code is the sign of the
predicted label scores, centred on the label prior seen so far, times a fixed
projection ``P`` (classes x bits) drawn once from ``seed``. Because the target space
and ``P`` never change, codes stored after an early task stay comparable with codes
computed later: old codes stay valid by construction.

The projection: ``orthogonal`` (default) takes ``P`` with orthonormal columns (QR of a
Gaussian matrix; with more bits than classes, orthonormal rows), so the bits read
decorrelated directions of the label space and no two bits repeat each other;
``gaussian`` is the plain random projection (sign random projection / SimHash of the
label scores), kept for comparison.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch

from common.register import MODELS
from models.base import Batch, HashModel


def ridge_solution(xtx: torch.Tensor, xty: torch.Tensor, lam: float) -> torch.Tensor:
    """``(X^T X + lam I')^{-1} X^T Y`` for features with an appended ones column;
    ``I'`` leaves the intercept (last row) unpenalised."""
    penalty = torch.full((xtx.shape[0],), float(lam), dtype=xtx.dtype, device=xtx.device)
    penalty[-1] = 0.0
    return torch.linalg.solve(xtx + torch.diag(penalty), xty)


def with_intercept(x: torch.Tensor) -> torch.Tensor:
    """Features (N, D) -> float64 (N, D + 1) with a ones column."""
    x = x.to(torch.float64)
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)


def label_projection(num_classes: int, bits: int, kind: str, seed: int) -> torch.Tensor:
    """The fixed (classes, bits) projection of the label space, float64."""
    gen = torch.Generator().manual_seed(int(seed))
    g = torch.randn(num_classes, bits, generator=gen, dtype=torch.float64)
    if kind == "gaussian":
        return g
    if num_classes >= bits:
        return torch.linalg.qr(g)[0]
    return torch.linalg.qr(g.t())[0].t()


@MODELS.register("ridge")
class RidgeHash(HashModel):
    """Closed-form continual ridge regression to the label space + a fixed projection
    (see the module doc). ``lam`` is the ridge penalty on the feature weights."""

    codes_ignore_task = True  # a code never depends on the task

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        num_classes: int,
        bits: int = 16,
        lam: float = 1.0,
        projection: Literal["orthogonal", "gaussian"] = "orthogonal",
        seed: int = 0,
    ) -> None:
        super().__init__(image_dim, text_dim, num_classes, bits)
        if lam <= 0:
            raise ValueError(f"model.lam: the ridge penalty must be > 0, got {lam}")
        if projection not in ("orthogonal", "gaussian"):
            raise ValueError(f"model.projection: expected 'orthogonal' or 'gaussian', got {projection!r}")
        self.lam = float(lam)
        f64 = torch.float64
        self.register_buffer("projection", label_projection(num_classes, bits, projection, seed))
        for m, d in (("image", image_dim), ("text", text_dim)):
            self.register_buffer(f"{m}_xtx", torch.zeros(d + 1, d + 1, dtype=f64))
            self.register_buffer(f"{m}_xty", torch.zeros(d + 1, num_classes, dtype=f64))
            self.register_buffer(f"{m}_weights", torch.zeros(d + 1, num_classes, dtype=f64))
        self.register_buffer("label_sum", torch.zeros(num_classes, dtype=f64))
        self.register_buffer("count", torch.zeros((), dtype=f64))

    def fit(self, task, task_index: int) -> None:
        """Add the task's train statistics and re-solve both regressions."""
        train = task.train
        y = train.labels.to(torch.float64)
        self.label_sum += y.sum(0)
        self.count += float(y.shape[0])
        for m in ("image", "text"):
            x = with_intercept(getattr(train, m))
            getattr(self, f"{m}_xtx").add_(x.t() @ x)
            getattr(self, f"{m}_xty").add_(x.t() @ y)
            getattr(self, f"{m}_weights").copy_(
                ridge_solution(getattr(self, f"{m}_xtx"), getattr(self, f"{m}_xty"), self.lam))

    def loss(self, batch: Batch, task_index: int):
        raise RuntimeError("ridge is fitted in closed form by fit(); it has no training loss")

    def _encode(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        prior = self.label_sum / self.count.clamp(min=1.0)
        scores = with_intercept(x) @ getattr(self, f"{modality}_weights") - prior
        return (scores @ self.projection).to(x.dtype)

    def encode_image(self, image, task_index: Optional[int] = None, layers=None):
        return self._encode(image, "image")

    def encode_text(self, text, task_index: Optional[int] = None, layers=None):
        return self._encode(text, "text")
