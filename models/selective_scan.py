"""A Mamba-style selective state-space block in plain PyTorch (CPU and GPU).

The block maps a token sequence ``(B, L, d_model)`` to a sequence of the same shape:
input projection to a signal and a gate, causal depthwise convolution, data-dependent
step ``dt`` and input / output matrices ``B``, ``C`` per token, the diagonal selective
scan ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t h_t + D x_t``, gating by
``silu(z)`` and an output projection (Gu & Dao, "Mamba", 2023). Written from the
paper's equations so that no CUDA-only package is needed. The scan runs along the
sequence axis of each sample only: samples of a batch never interact. On the CPU the
sequential scan runs as one compiled kernel (``models/scan_kernel.py``, numba) unless
``kernel: torch``; the PyTorch loops below are the reference and the GPU path.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from models import scan_kernel, softplus_kernel


def selective_scan_sequential(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor
) -> torch.Tensor:
    """Reference scan, one token after another.

    Shapes: ``x``, ``dt`` (b, L, d); ``A`` (d, n); ``B``, ``C`` (b, L, n); ``D`` (d,).
    Returns ``y`` (b, L, d).
    """
    b, L, d = x.shape
    h = x.new_zeros(b, d, A.shape[1])
    ys = []
    # unbind, not x[:, t]: its backward stacks the L token gradients once, where each
    # indexing would scatter into a zero tensor of the full shape (same values)
    for dt_t, x_t, B_t, C_t in zip(dt.unbind(1), x.unbind(1), B.unbind(1), C.unbind(1)):
        decay = torch.exp(dt_t[:, :, None] * A)                        # (b, d, n)
        h = decay * h + (dt_t[:, :, None] * x_t[:, :, None]) * B_t[:, None, :]
        ys.append((h * C_t[:, None, :]).sum(-1))
    return torch.stack(ys, dim=1) + x * D


def selective_scan_parallel(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor
) -> torch.Tensor:
    """The same scan as an associative (Hillis-Steele) prefix scan: ceil(log2 L) steps
    over all tokens at once, combining ``(a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2)``
    where ``a = exp(dt A)`` is a decay in (0, 1] and ``b = dt B x``. Every product stays
    in (0, 1], so it is as stable as the sequential form (no ``exp(-cumsum)``)."""
    L = x.shape[1]
    a = torch.exp(dt.unsqueeze(-1) * A)                                # (b, L, d, n)
    h = (dt * x).unsqueeze(-1) * B.unsqueeze(2)                        # (b, L, d, n)
    offset = 1
    while offset < L:
        h = torch.cat([h[:, :offset], a[:, offset:] * h[:, :-offset] + h[:, offset:]], dim=1)
        a = torch.cat([a[:, :offset], a[:, offset:] * a[:, :-offset]], dim=1)
        offset *= 2
    return (h * C.unsqueeze(2)).sum(-1) + x * D


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Causal depthwise convolution along the tokens of ``x`` (b, L, d) with the
    ``Conv1d(d, d, k, groups=d, padding=k - 1)`` parameters ``weight`` (d, 1, k) and
    ``bias`` (d,): ``y_t = bias + sum_j w_j x_{t - k + 1 + j}`` (zeros before the first
    token), i.e. the convolution with its right padding dropped. Written as k shifted,
    per-channel scaled copies in the (b, L, d) layout: the convolution's values up to
    float rounding, without the two transposes and the much slower depthwise
    convolution backward of the CPU kernels."""
    k, L = weight.shape[-1], x.shape[1]
    w = weight[:, 0, :]                                                # (d, k)
    padded = F.pad(x, (0, 0, k - 1, 0))                                # (b, L + k - 1, d)
    y = bias + padded[:, :L] * w[:, 0]
    for j in range(1, k):
        y = y + padded[:, j:j + L] * w[:, j]
    return y


class SelectiveScanBlock(nn.Module):
    """One Mamba mixer: ``(B, L, d_model) -> (B, L, d_model)`` (no residual, no norm:
    the caller wraps it, as Mamba's own models do)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Optional[int] = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        scan: Literal["sequential", "parallel"] = "parallel",
        kernel: Literal["auto", "torch"] = "auto",
    ) -> None:
        super().__init__()
        if min(d_model, d_state, d_conv, expand) < 1:
            raise ValueError(f"selective scan: d_model, d_state, d_conv, expand must be >= 1, got "
                             f"{d_model}, {d_state}, {d_conv}, {expand}")
        if scan not in ("sequential", "parallel"):
            raise ValueError(f"selective scan: scan must be 'sequential' or 'parallel', got {scan!r}")
        if kernel not in ("auto", "torch"):
            raise ValueError(f"selective scan: kernel must be 'auto' or 'torch', got {kernel!r}")
        self.d_model, self.d_state, self.scan, self.kernel = d_model, d_state, scan, kernel
        d_inner = expand * d_model
        self.d_inner = d_inner
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * d_inner)
        # the conv's parameters; forward applies them with causal_depthwise_conv
        self.conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        self.out_proj = nn.Linear(d_inner, d_model)
        # S4D-real initialisation: A = -(1..n) for every channel, kept as log(-A) > 0.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        # dt = softplus(bias) starts log-uniform in [dt_min, dt_max].
        with torch.no_grad():
            dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        L = tokens.shape[1]
        x, z = self.in_proj(tokens).chunk(2, dim=-1)                     # (b, L, d_inner) each
        x = F.silu(causal_depthwise_conv(x, self.conv.weight, self.conv.bias))
        dt, Bm, Cm = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        A = -torch.exp(self.A_log)
        if self.scan == "sequential" and self.kernel == "auto" and scan_kernel.usable(x):
            # with the scan kernel, softplus from its compiled counterpart (float32, correctly
            # rounded; torch's CPU softplus is a scalar loop); kernel: torch keeps torch's
            dt = softplus_kernel.softplus(self.dt_proj(dt))
            y = scan_kernel.sequential_scan(x, dt, A, Bm, Cm) + x * self.D
        else:
            scan = selective_scan_parallel if self.scan == "parallel" else selective_scan_sequential
            y = scan(x, F.softplus(self.dt_proj(dt)), A, Bm, Cm, self.D)
        return self.out_proj(y * F.silu(z))
