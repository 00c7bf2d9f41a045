"""The sequential selective scan as one compiled CPU kernel (numba), with its backward.

``y_t = C_t . h_t`` with ``h_t = a_t * h_{t-1} + dt_t x_t B_t`` and ``a_t = exp(dt_t A)``
(the ``D x`` skip term stays outside). In plain PyTorch every token costs half a dozen
elementwise passes over a (b, d, n) state, each with autograd bookkeeping, and the
gradients of ``dt`` and ``A`` come from reductions over broadcast dimensions, slow on
CPU; that was about half of a CAGMH training step. Here the forward is one pass over
the state per token and the backward recomputes the states of one (sample, channel)
row and walks the tokens in reverse, accumulating every gradient in that same pass.
``a_t`` is computed inside both kernels (``common.vector_math.exp``, vectorised over the
state; the backward recomputes it with the states), not as a (b, L, d, n) tensor: the
two such temporaries of ``torch.exp(dt A)`` cost more than the arithmetic on the CPU
(fresh pages of several MB per call), up to a sixth of a CAGMH step.

The kernels are plain Python loops compiled by numba on first use (about 5 s, cached on
disk next to this file like the metric kernel), single-threaded (no numba threading
layer, so nothing shares or resets torch's OpenMP pool). At CAGMH's sizes on one thread
its forward + backward takes about half the time of autograd over the PyTorch loop; on
a many-core CPU with many torch threads the loop parallelises and may be the faster
one (``scan_kernel: torch`` in the CAGMH config selects it). ``available()`` is False
when numba is not installed; the caller then runs the PyTorch loop. Values equal the
PyTorch loop up to float rounding (the per-state sums run in another order, and
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
    """``y[b, t, d] = sum_k C[b, t, k] h_t[k]`` for every sample b and channel d."""
    nb, L, nd = x.shape
    n = A.shape[1]
    h = np.empty(n, np.float32)
    for b in range(nb):
        for d in range(nd):
            h[:] = 0.0
            for t in range(L):
                dtv = dt[b, t, d]
                u = dtv * x[b, t, d]
                acc = np.float32(0.0)
                for k in range(n):
                    hk = np.float32(exp(dtv * A[d, k])) * h[k] + u * B[b, t, k]
                    h[k] = hk
                    acc += hk * C[b, t, k]
                y[b, t, d] = acc


def scan_backward(x, dt, A, B, C, gy, gx, gdt, gA, gB, gC):  # pragma: no cover - compiled by numba
    """Gradients of ``sum(gy * y)``: written into ``gx``, ``gdt`` and accumulated into the
    zero-filled ``gA``, ``gB``, ``gC``. ``g`` carries dL/dh_t back through the tokens."""
    nb, L, nd = x.shape
    n = A.shape[1]
    H = np.empty((L, n), np.float32)
    a = np.empty((L, n), np.float32)
    g = np.empty(n, np.float32)
    for b in range(nb):
        for d in range(nd):
            for t in range(L):  # the states and decays of this (sample, channel) row, recomputed
                dtv = dt[b, t, d]
                u = dtv * x[b, t, d]
                for k in range(n):
                    prev = H[t - 1, k] if t > 0 else np.float32(0.0)
                    a[t, k] = np.float32(exp(dtv * A[d, k]))
                    H[t, k] = a[t, k] * prev + u * B[b, t, k]
            g[:] = 0.0
            for t in range(L - 1, -1, -1):
                gyv, dtv, xv = gy[b, t, d], dt[b, t, d], x[b, t, d]
                u = dtv * xv
                g_u = np.float32(0.0)
                for k in range(n):
                    gk = g[k] + gyv * C[b, t, k]           # dL/dh_t
                    gC[b, t, k] += gyv * H[t, k]
                    gB[b, t, k] += gk * u
                    g_u += gk * B[b, t, k]                  # dL/du_t, u_t = dt_t x_t
                    g[k] = gk * a[t, k]                     # dL/dh_{t-1} (also reused for dL/da_t below)
                g_dt = g_u * xv
                if t > 0:                                   # a_t = exp(dt_t A): da = a (A ddt + dt dA)
                    for k in range(n):
                        ga = g[k] * H[t - 1, k]             # dL/da_t * a_t
                        g_dt += ga * A[d, k]
                        gA[d, k] += ga * dtv
                gx[b, t, d] = g_u * dtv
                gdt[b, t, d] = g_dt


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
