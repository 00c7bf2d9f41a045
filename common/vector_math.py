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


# Horner coefficients, highest power first: 1/k! for k = 11..0 (Taylor series of e^r),
# and 1/(2k + 1) for k = 12..0 (series of atanh(s) / s in s^2). numba unrolls a loop
# over a tuple of floats, so these compile to the same straight-line code as a
# written-out chain.
EXP_COEFFS = tuple(1.0 / float(np.prod(np.arange(1, k + 1, dtype=np.float64))) for k in range(11, -1, -1))
ATANH_COEFFS = tuple(1.0 / (2 * k + 1) for k in range(12, -1, -1))


def exp(x):
    """``e^x``, relative error below 1e-14 for ``|x| <= 708``; ``x`` is clamped to that
    range (beyond it float32 is 0 or infinite anyway).

    ``e^x = 2^n e^r`` with ``n = round(x / ln 2)`` and ``r = x - n ln 2`` in
    ``[-0.35, 0.35]``: a degree-11 Taylor polynomial for ``e^r`` (truncation below
    1e-14), ``2^n`` built from its exponent bits."""
    x = min(max(x, -EXP_LIMIT), EXP_LIMIT)
    n = np.floor(x * LOG2E + 0.5)
    r = (x - n * LN2_HI) - n * LN2_LO
    p = 0.0
    for c in EXP_COEFFS:
        p = p * r + c
    return p * np.int64((np.int64(n) + 1023) << 52).view(np.float64)


def log_ratio(s):
    """``log((1 + s) / (1 - s)) = 2 atanh(s)`` for ``0 <= s <= 1/3``, relative error
    below 1e-14: the odd series ``2 s (1 + s^2/3 + s^4/5 + ...)`` to ``s^25``. ``log(1 +
    u)`` is ``log_ratio(u / (2 + u))``, with no cancellation for small ``u``."""
    s2 = s * s
    q = 0.0
    for c in ATANH_COEFFS:
        q = q * s2 + c
    return 2.0 * s * q
