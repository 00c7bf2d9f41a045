"""Row sums of softplus and their gradient in one pass: a compiled CPU kernel (numba);
and softplus itself, elementwise, from the same formula (``softplus``).

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
from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from common.jit import installed, njit
from common.vector_math import exp, log_ratio
from utils.errors import UserError


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


def softplus_elements(x, out):  # pragma: no cover - compiled by numba
    """``out[i] = softplus(x[i])`` (float64, rounded once) for flat arrays; ``x`` is
    overwritten with ``sigmoid(x)``, the gradient. ``softplus_rows``' formula, per element."""
    for i in range(x.shape[0]):
        v = np.float64(x[i])
        u = exp(-abs(v))
        d = 1.0 / ((1.0 + u) * (2.0 + u))
        r = (2.0 + u) * d
        out[i] = max(v, 0.0) + log_ratio(u * (1.0 + u) * d)
        x[i] = r if v >= 0.0 else u * r


def _build(kernel) -> Optional[Any]:
    """``kernel`` compiled with both kernels' options (lazily, cached on disk where
    possible); None without numba. ``reassoc`` lets LLVM vectorise the row sum; NaN and
    infinity keep their meaning."""
    return njit(kernel, helpers=(exp, log_ratio), nogil=True,
                fastmath={"reassoc", "contract"}, error_model="numpy")


@functools.lru_cache(maxsize=1)
def _kernel() -> Optional[Any]:
    """The compiled row-sum kernel; None without numba."""
    return _build(softplus_rows)


@functools.lru_cache(maxsize=1)
def _elements_kernel() -> Optional[Any]:
    """The compiled elementwise kernel; None without numba."""
    return _build(softplus_elements)


def available() -> bool:
    """Whether the kernel can run: numba is installed."""
    return installed()


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can run on these tensors: all on the CPU, numba present."""
    return all(t.device.type == "cpu" for t in tensors) and available()


def _compiled(build: Callable[[], Optional[Any]], user: str, key: str) -> Any:
    """The kernel ``build`` makes, or one line saying what to do when numba is installed
    but does not import (e.g. built for another NumPy): repair it or set config ``key``."""
    kernel = build()
    if kernel is None:
        raise UserError(f"{user}: numba is installed but does not import; repair it "
                        f"(pip install -U numba) or set {key}: torch")
    return kernel


def _scores(X: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``X H^T`` as the kernel reads it: in the matmul's dtype (bf16 under autocast)
    computed on in float32, contiguous."""
    scores = X.detach() @ H.detach().t()
    return (scores if scores.dtype in (torch.float32, torch.float64) else scores.float()).contiguous()


# ``sum_j softplus((X H^T)_ij)`` as a torch operator: opaque to torch.compile (it calls
# it, with the fake implementation for shapes, and never traces into numba). The (N, M)
# scores live only inside: the kernel overwrites them with their sigmoid, returned for
# the backward, so one (N, M) array is allocated per call instead of three (scores,
# sigmoid, scaled gradient); the upstream gradient, one value per row, scales ``X``
# (N, K) rather than the sigmoid (N, M).
@torch.library.custom_op("ccmh::product_softplus_row_sums", mutates_args=())
def _row_sums_op(X: torch.Tensor, H: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    sig = _scores(X, H)
    sums = np.empty(sig.shape[0], dtype=np.float64)
    kernel = _compiled(_kernel, "SCAHN's softplus kernel", "model.softplus_kernel")
    kernel(sig.numpy(), sums)  # sig holds the scores until the kernel overwrites them
    return torch.from_numpy(sums).to(sig.dtype), sig


@_row_sums_op.register_fake
def _(X, H):
    sig = _scores(X, H)
    return sig.new_empty(sig.shape[0]), sig


def _save(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no (N, M) zero gradient made for the sigmoid output
    ctx.save_for_backward(inputs[0], inputs[1], output[1])


def _row_sums_grad(ctx, grad, _grad_sig):
    """The gradient's matmuls in the inputs' dtype, as the forward matmul ran (bf16 ones
    under autocast, see ``product_softplus_row_sums``); the sigmoid is rounded to it."""
    X, H, sig = ctx.saved_tensors
    if grad is None:
        return None, None
    dtype = torch.promote_types(X.dtype, H.dtype)
    sig = sig.to(dtype)
    g = grad.to(dtype).unsqueeze(1)
    grad_x = grad_h = None
    if ctx.needs_input_grad[0]:
        grad_x = g * (sig @ H.to(dtype))
    if ctx.needs_input_grad[1]:
        grad_h = sig.t() @ (g * X.to(dtype))
    return grad_x, grad_h


_row_sums_op.register_autograd(_row_sums_grad, setup_context=_save)


def product_softplus_row_sums(X: torch.Tensor, H: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """``F.softplus(X @ H.t()).sum(1)`` for ``X`` (N, K) and ``H`` (M, K): through the
    kernel where it can run (``kernel="auto"``), else (or with ``kernel="torch"``)
    through torch. Under autocast both matmuls (forward and backward) run in its dtype,
    as they would in torch's path; the kernel works on the scores in float32."""
    if kernel == "auto" and usable(X, H):
        device = X.device.type
        if torch.is_autocast_enabled(device):
            # cast as autocast casts a matmul's inputs: the operator's backward then runs
            # its two matmuls in bf16 too (about 1 ms less per call at SCAHN's coco.yaml
            # sizes than in float32), and the casts carry the gradient back to float32.
            # Not torch.library.register_autocast: it casts to one fixed dtype, where this
            # follows the region's (bf16 or fp16) and leaves float64 alone, as autocast does
            low = torch.get_autocast_dtype(device)
            X, H = (t.to(low) if t.dtype == torch.float32 else t for t in (X, H))
        return _row_sums_op(X, H)[0]
    return F.softplus(X @ H.t()).sum(1)


# ``F.softplus(x)`` (beta 1) as a torch operator, like the row sums above: the output in
# float32 and the sigmoid kept for the backward, one pass, where torch's CPU softplus
# calls a scalar ``log1p`` per element (CAGMH's step sizes ``dt`` with it: 1.3 ms per
# call at its coco.yaml sizes, a few per cent of the step). torch returns ``x`` itself
# above its threshold 20; so does this (``x + log(1 + e^-x)`` rounds to ``x`` there).
@torch.library.custom_op("ccmh::softplus", mutates_args=())
def _softplus_op(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    sig = x.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    out = torch.empty_like(sig)
    kernel = _compiled(_elements_kernel, "CAGMH's softplus kernel", "model.scan_kernel")
    kernel(sig.view(-1).numpy(), out.view(-1).numpy())
    return out, sig


@_softplus_op.register_fake
def _(x):
    return torch.empty_like(x, dtype=torch.float32), torch.empty_like(x, dtype=torch.float32)


def _save_sigmoid(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])


def _softplus_grad(ctx, grad, _grad_sig):
    (sig,) = ctx.saved_tensors
    return None if grad is None else grad * sig


_softplus_op.register_autograd(_softplus_grad, setup_context=_save_sigmoid)


def softplus(x: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """``F.softplus(x)``: through the kernel where it can run (``kernel="auto"``, a
    float32 or lower-precision ``x``; the result in float32, e.g. for bf16 under
    autocast), else (float64, or ``kernel="torch"``) torch's. Values are the correctly
    rounded float32 of softplus where torch's differ in the last bit on about a tenth of
    inputs."""
    if kernel == "auto" and x.dtype != torch.float64 and usable(x):
        return _softplus_op(x)[0]
    return F.softplus(x)
