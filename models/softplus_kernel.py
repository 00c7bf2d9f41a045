"""Row sums of softplus and their gradient in one pass: a compiled CPU kernel (numba).

SCAHN's likelihood terms take ``softplus`` of every (train row, batch output) score,
about a million per modality and step. On the CPU, torch's softplus calls a scalar
``log1p`` per element (its other elementwise functions are vectorised), which made it
the largest single cost of a SCAHN step (over 40 % on an AMD EPYC). Here one pass
computes ``sum_j softplus(theta_ij)`` per row in float64 and overwrites each score with
``sigmoid(theta_ij)``, its gradient, for the backward: ``softplus(x) = max(x, 0) +
log(1 + e^-|x|)`` with the polynomials of ``common.vector_math``, which LLVM vectorises
(correctly rounded to float32 on every float32 input of a 400k-point sweep of
[-110, 110]; torch's softplus is not on about 10 % of them).

Values agree with ``F.softplus(X @ H.t()).sum(1)`` to float rounding (the kernel rounds
once, from float64; torch rounds every element, and sums in another order), so a seeded
SCAHN run's figures move in their last digits (``softplus_kernel: torch`` in the SCAHN
config keeps torch's softplus). Single-threaded and ``nogil``, like the scan kernel:
nothing shares or resets torch's OpenMP pool.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from common.jit import njit
from common.vector_math import exp, log_ratio


def softplus_rows(theta, sums):  # pragma: no cover - compiled by numba
    """``sums[i] = sum_j softplus(theta[i, j])`` (float64); ``theta`` is overwritten
    with ``sigmoid(theta)``, the gradient of those sums."""
    n, m = theta.shape
    for i in range(n):
        acc = 0.0
        for j in range(m):
            x = np.float64(theta[i, j])
            u = exp(-abs(x))
            d = 1.0 / ((1.0 + u) * (2.0 + u))  # one division for both ratios below
            r = (2.0 + u) * d                   # 1 / (1 + u)
            acc += max(x, 0.0) + log_ratio(u * (1.0 + u) * d)  # log(1 + u), from u / (2 + u)
            theta[i, j] = r if x >= 0.0 else u * r
        sums[i] = acc


@functools.lru_cache(maxsize=1)
def _kernel() -> Optional[Any]:
    """The compiled kernel (lazily, cached on disk where possible); None without numba.
    ``reassoc`` lets LLVM vectorise the row sum; NaN and infinity keep their meaning."""
    return njit(softplus_rows, helpers=(exp, log_ratio), nogil=True,
                fastmath={"reassoc", "contract"}, error_model="numpy")


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether numba compiled the kernel. A constant to torch.compile, which calls it
    once instead of tracing into numba."""
    return _kernel() is not None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can run on these tensors: all on the CPU, numba present."""
    return all(t.device.type == "cpu" for t in tensors) and available()


class _ProductSoftplusRowSums(torch.autograd.Function):
    """``sum_j softplus((X H^T)_ij)``. The (N, M) scores live only inside: the kernel
    overwrites them with their sigmoid, which the backward reads, so one (N, M) array is
    allocated per call instead of three (scores, sigmoid, scaled gradient); the upstream
    gradient, one value per row, scales ``X`` (N, K) rather than the sigmoid (N, M)."""

    @staticmethod
    def forward(ctx, X, H):
        scores = (X.detach() @ H.detach().t())  # under autocast in its dtype, like any matmul
        sig = (scores if scores.dtype in (torch.float32, torch.float64) else scores.float()).contiguous()
        sums = np.empty(sig.shape[0], dtype=np.float64)
        _kernel()(sig.numpy(), sums)  # sig holds the scores until the kernel overwrites them
        ctx.save_for_backward(X, H, sig)
        return torch.from_numpy(sums).to(sig.dtype)

    @staticmethod
    def backward(ctx, grad):
        X, H, sig = ctx.saved_tensors
        g = grad.to(sig.dtype).unsqueeze(1)
        grad_x = grad_h = None
        if ctx.needs_input_grad[0]:
            grad_x = g * (sig @ H.to(sig.dtype))
        if ctx.needs_input_grad[1]:
            grad_h = sig.t() @ (g * X.to(sig.dtype))
        return grad_x, grad_h


def product_softplus_row_sums(X: torch.Tensor, H: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """``F.softplus(X @ H.t()).sum(1)`` for ``X`` (N, K) and ``H`` (M, K): through the
    kernel where it can run (``kernel="auto"``), else (or with ``kernel="torch"``)
    through torch. Scores of a dtype the kernel does not take (bf16 under autocast) are
    computed on in float32."""
    if kernel == "auto" and usable(X, H):
        return _kernel_row_sums(X, H)
    return F.softplus(X @ H.t()).sum(1)


@torch.compiler.disable
def _kernel_row_sums(X: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """The kernel path, run eagerly under ``runner.compile``: torch.compile must not trace
    into numba (its dispatcher's first call for new argument types broke dynamo's
    bytecode analysis), and a numba call is opaque to it anyway."""
    return _ProductSoftplusRowSums.apply(X, H)
