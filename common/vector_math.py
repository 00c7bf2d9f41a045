"""Elementwise math for numba kernels, written so that LLVM can vectorise it.

numba lowers ``math.exp`` / ``math.log1p`` to scalar libm calls, which keep a loop from
being vectorised; these are polynomials in float64 (plain arithmetic, no branches), with
the accuracy given in each docstring, far inside float32's rounding. Plain Python too
(on NumPy scalars): they run uncompiled in tests.
"""
from __future__ import annotations

import numpy as np

# ln 2 split so that n * LN2_HI is exact for the n used here (Cody and Waite).
LOG2E = 1.4426950408889634
LN2_HI = 0.6931471803691238
LN2_LO = 1.9082149292705877e-10
EXP_LIMIT = 708.0  # e^+-708 are still normal float64 numbers


def exp(x):
    """``e^x``, relative error below 1e-14 for ``|x| <= 708``; ``x`` is clamped to that
    range (beyond it float32 is 0 or infinite anyway).

    ``e^x = 2^n e^r`` with ``n = round(x / ln 2)`` and ``r = x - n ln 2`` in
    ``[-0.35, 0.35]``: a degree-11 Taylor polynomial for ``e^r`` (truncation below
    1e-14), ``2^n`` built from its exponent bits."""
    x = min(max(x, -EXP_LIMIT), EXP_LIMIT)
    n = np.floor(x * LOG2E + 0.5)
    r = (x - n * LN2_HI) - n * LN2_LO
    p = 1.0 / 39916800
    p = p * r + 1.0 / 3628800
    p = p * r + 1.0 / 362880
    p = p * r + 1.0 / 40320
    p = p * r + 1.0 / 5040
    p = p * r + 1.0 / 720
    p = p * r + 1.0 / 120
    p = p * r + 1.0 / 24
    p = p * r + 1.0 / 6
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    return p * np.int64((np.int64(n) + 1023) << 52).view(np.float64)


def log_ratio(s):
    """``log((1 + s) / (1 - s)) = 2 atanh(s)`` for ``0 <= s <= 1/3``, relative error
    below 1e-14: the odd series ``2 s (1 + s^2/3 + s^4/5 + ...)`` to ``s^25``."""
    s2 = s * s
    q = 1.0 / 25
    q = q * s2 + 1.0 / 23
    q = q * s2 + 1.0 / 21
    q = q * s2 + 1.0 / 19
    q = q * s2 + 1.0 / 17
    q = q * s2 + 1.0 / 15
    q = q * s2 + 1.0 / 13
    q = q * s2 + 1.0 / 11
    q = q * s2 + 1.0 / 9
    q = q * s2 + 1.0 / 7
    q = q * s2 + 1.0 / 5
    q = q * s2 + 1.0 / 3
    q = q * s2 + 1.0
    return 2.0 * s * q


def log1p_unit(u):
    """``log(1 + u)`` for ``0 <= u <= 1``, relative error below 1e-14: ``log_ratio`` of
    ``s = u / (2 + u)`` in ``[0, 1/3]``, with no cancellation for small ``u`` (``s`` is
    formed from ``u`` directly)."""
    return log_ratio(u / (2.0 + u))
