"""The sequential selective scan as one compiled CPU kernel (numba), with its backward.

``y_t = C_t . h_t`` with ``h_t = a_t * h_{t-1} + dt_t x_t B_t`` and ``a_t = exp(dt_t A)``
(the ``D x`` skip term stays outside). In plain PyTorch every token costs half a dozen
elementwise passes over a (b, d, n) state, each with autograd bookkeeping, and the
gradients of ``dt`` and ``A`` come from reductions over broadcast dimensions, slow on
CPU; that was about half of a CAGMH training step. Here the forward is one pass over
the state per token and the backward recomputes the states of one sample and walks
the tokens in reverse, accumulating every gradient in that same pass. The loops run
over channels innermost, one channel per vector lane: an earlier version looped over
the state size (16) innermost and paid a cross-lane sum per (sample, token, channel);
the channel order runs CAGMH's training shapes (128 x 8 tokens x 128 channels x 16
states, one thread) in 1.8 ms forward and 2.6 ms backward instead of 3.1 and 5.9 ms,
measured side by side in one process. ``a_t`` is computed inside both kernels
(``common.vector_math.exp``), not as a (b, L, d, n) tensor: the two such temporaries
of ``torch.exp(dt A)`` cost more than the arithmetic on the CPU (fresh pages of
several MB per call), up to a sixth of a CAGMH step.

The kernels are plain Python loops compiled by numba on first use (about 5 s, cached on
disk next to this file like the metric kernel), single-threaded (no numba threading
layer, so nothing shares or resets torch's OpenMP pool). At CAGMH's sizes on one thread
its forward + backward takes about half the time of autograd over the PyTorch loop; on
a many-core CPU with many torch threads the loop parallelises and may be the faster
one (``scan_kernel: torch`` in the CAGMH config selects it). ``available()`` is False
when numba is not installed; the caller then runs the PyTorch loop. Values equal the
PyTorch loop up to float rounding (the sums over states and over channels run in another order, and
``a_t`` is the correctly rounded float32 of ``exp`` where torch's may differ in the last
bit; tests/test_cagmh.py).
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import numpy as np
import torch

from common.jit import installed, njit
from common.vector_math import exp
from utils.errors import UserError


def scan_forward(x, dt, A, B, C, y):  # pragma: no cover - compiled by numba
    """``y[b, t, d] = sum_k C[b, t, k] h_t[k, d]`` for every sample b and channel d.

    The innermost loops run over the channels ``d`` (contiguous in ``x``, ``dt``, ``y``;
    ``A`` is transposed once): every lane of a vector is one channel's own recurrence,
    so nothing is reduced across lanes and the state ``(n, d)`` of a sample stays in L1."""
    nb, L, nd = x.shape
    n = A.shape[1]
    At = np.empty((n, nd), np.float32)
    for d in range(nd):
        for k in range(n):
            At[k, d] = A[d, k]
    h = np.empty((n, nd), np.float32)
    u = np.empty(nd, np.float32)
    acc = np.empty(nd, np.float32)
    for b in range(nb):
        h[:] = 0.0
        for t in range(L):
            for d in range(nd):
                u[d] = dt[b, t, d] * x[b, t, d]
                acc[d] = 0.0
            for k in range(n):
                bk, ck = B[b, t, k], C[b, t, k]
                for d in range(nd):
                    hk = np.float32(exp(dt[b, t, d] * At[k, d])) * h[k, d] + u[d] * bk
                    h[k, d] = hk
                    acc[d] += hk * ck
            for d in range(nd):
                y[b, t, d] = acc[d]


def scan_backward(x, dt, A, B, C, gy, gx, gdt, gA, gB, gC):  # pragma: no cover - compiled by numba
    """Gradients of ``sum(gy * y)``: written into ``gx``, ``gdt`` and accumulated into the
    zero-filled ``gA``, ``gB``, ``gC``. Per sample the states and decays of every token
    are recomputed, then ``g`` (dL/dh_t, one row per state and channel) is carried back
    through the tokens; the loops run over channels as in ``scan_forward``."""
    nb, L, nd = x.shape
    n = A.shape[1]
    At = np.empty((n, nd), np.float32)
    for d in range(nd):
        for k in range(n):
            At[k, d] = A[d, k]
    gAt = np.zeros((n, nd), np.float32)
    H = np.empty((L, n, nd), np.float32)
    a = np.empty((L, n, nd), np.float32)
    u = np.empty((L, nd), np.float32)
    g = np.empty((n, nd), np.float32)
    gu = np.empty(nd, np.float32)
    gd = np.empty(nd, np.float32)
    for b in range(nb):
        for t in range(L):  # the states and decays of this sample, recomputed
            for d in range(nd):
                u[t, d] = dt[b, t, d] * x[b, t, d]
            for k in range(n):
                bk = B[b, t, k]
                for d in range(nd):
                    av = np.float32(exp(dt[b, t, d] * At[k, d]))
                    a[t, k, d] = av
                    prev = H[t - 1, k, d] if t > 0 else np.float32(0.0)
                    H[t, k, d] = av * prev + u[t, d] * bk
        g[:] = 0.0
        for t in range(L - 1, -1, -1):
            gu[:] = 0.0                                     # dL/du_t, u_t = dt_t x_t
            for k in range(n):
                bk, ck = B[b, t, k], C[b, t, k]
                sc = np.float32(0.0)
                sb = np.float32(0.0)
                for d in range(nd):
                    gyv = gy[b, t, d]
                    gk = g[k, d] + gyv * ck                 # dL/dh_t
                    sc += gyv * H[t, k, d]
                    sb += gk * u[t, d]
                    gu[d] += gk * bk
                    g[k, d] = gk * a[t, k, d]               # dL/dh_{t-1} (also reused for dL/da_t below)
                gC[b, t, k] += sc
                gB[b, t, k] += sb
            for d in range(nd):
                gd[d] = gu[d] * x[b, t, d]
            if t > 0:                                       # a_t = exp(dt_t A): da = a (A ddt + dt dA)
                for k in range(n):
                    for d in range(nd):
                        ga = g[k, d] * H[t - 1, k, d]       # dL/da_t * a_t
                        gd[d] += ga * At[k, d]
                        gAt[k, d] += ga * dt[b, t, d]
            for d in range(nd):
                gx[b, t, d] = gu[d] * dt[b, t, d]
                gdt[b, t, d] = gd[d]
    for d in range(nd):
        for k in range(n):
            gA[d, k] += gAt[k, d]


@functools.lru_cache(maxsize=1)
def _kernels() -> Optional[Tuple[Any, Any]]:
    """Both kernels compiled (lazily, cached on disk when a cache directory is writable);
    None without numba. fastmath lets LLVM vectorise the loops over the state size."""
    options = dict(nogil=True, fastmath=True, error_model="numpy")
    forward, backward = (njit(fn, helpers=(exp,), **options) for fn in (scan_forward, scan_backward))
    return None if forward is None else (forward, backward)


def available() -> bool:
    """Whether the kernels can run: numba is installed."""
    return installed()


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can run on these tensors: numba present, every tensor on the CPU."""
    return all(t.device.type == "cpu" for t in tensors) and available()


def _compiled() -> Tuple[Any, Any]:
    """The kernels, or one line saying what to do when numba is installed but does not
    import (e.g. built for another NumPy)."""
    kernels = _kernels()
    if kernels is None:
        raise UserError("CAGMH's scan kernel: numba is installed but does not import; repair it "
                        "(pip install -U numba) or set model.scan_kernel: torch")
    return kernels


# The kernels as torch operators: opaque to torch.compile (it calls them, with the fake
# implementations for shapes, and never traces into numba), differentiable through
# the registered backward. Inputs are float32 and contiguous (``sequential_scan`` casts).
@torch.library.custom_op("ccmh::selective_scan", mutates_args=())
def _scan_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    _compiled()[0](*(v.detach().numpy() for v in (x, dt, A, B, C, y)))
    return y


@_scan_op.register_fake
def _(x, dt, A, B, C):
    return torch.empty_like(x)


@torch.library.custom_op("ccmh::selective_scan_backward", mutates_args=())
def _scan_backward_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      gy: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gx, gdt = torch.empty_like(x), torch.empty_like(dt)
    gA, gB, gC = torch.zeros_like(A), torch.zeros_like(B), torch.zeros_like(C)
    _compiled()[1](*(v.detach().numpy() for v in (x, dt, A, B, C, gy, gx, gdt, gA, gB, gC)))
    return gx, gdt, gA, gB, gC


@_scan_backward_op.register_fake
def _(x, dt, A, B, C, gy):
    return tuple(torch.empty_like(v) for v in (x, dt, A, B, C))


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _scan_grad(ctx, gy):
    return _scan_backward_op(*ctx.saved_tensors, gy.float().contiguous())


_scan_op.register_autograd(_scan_grad, setup_context=_save_inputs)


def sequential_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    C: torch.Tensor) -> torch.Tensor:
    """``y`` (b, L, d) of the scan without its ``D x`` term, in float32 (inputs of another
    float dtype, e.g. bf16 under autocast, are computed in float32; gradients come back in
    float32, which autograd casts to each input's dtype). Shapes as
    ``models.selective_scan.selective_scan_sequential``."""
    return _scan_op(*(v.float().contiguous() for v in (x, dt, A, B, C)))
