"""Tie-aware (``ties="average"``) AP and precision in closed form from per-distance counts.

The expected value over all orders of every tie group (McSherry & Najork 2008): no
sampling and no enumeration, only the counts of (relevant, other) items per distance.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np

def _digamma(x: np.ndarray) -> np.ndarray:
    """psi(x) in float64 (accurate differences of harmonic numbers: H(n) = psi(n+1) + gamma)."""
    import torch

    return torch.special.digamma(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()


def _lgamma(x: np.ndarray) -> np.ndarray:
    import torch

    return torch.lgamma(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()


def _group_sums(before: np.ndarray, rel_before: np.ndarray, n: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Expected sum of P@rank over the relevant items of tie groups, in closed form.

    A group of n items (r relevant) follows `before` items (`rel_before` relevant). Over
    all n! orders, position p (1..n) holds a relevant item with probability r/n, and
    then (p-1)(r-1)/(n-1) relevant group items precede it on average, so the expected
    sum is (r/n) sum_p (rel_before + 1 + (p-1)(r-1)/(n-1)) / (before + p); with
    dH = H(before + n) - H(before) this is
    (r/n) [ (rel_before + 1) dH + (r-1)/(n-1) (n - (before + 1) dH) ].
    """
    n = n.astype(np.float64)
    r = r.astype(np.float64)
    b = before.astype(np.float64)
    dh = _digamma(b + n + 1.0) - _digamma(b + 1.0)
    safe_n = np.where(n > 0, n, 1.0)
    second = np.where(n > 1, (r - 1.0) / np.where(n > 1, n - 1.0, 1.0) * (n - (b + 1.0) * dh), 0.0)
    return np.where((n > 0) & (r > 0), (r / safe_n) * ((rel_before + 1.0) * dh + second), 0.0)


def average_ap(hist: np.ndarray, k: Optional[int]) -> np.ndarray:
    """Tie-aware expected AP (k=None) or AP@k per query from (Q, 2, bits+1) counts."""
    rel = hist[:, 1, :].astype(np.int64)
    cnt = hist[:, 0, :].astype(np.int64) + rel
    before = np.cumsum(cnt, axis=1) - cnt
    rel_before = np.cumsum(rel, axis=1) - rel
    total_items = int(cnt[0].sum())
    if k is None or k >= total_items:
        total_rel = rel.sum(axis=1)
        sums = _group_sums(before, rel_before, cnt, rel).sum(axis=1)
        return np.where(total_rel > 0, sums / np.maximum(total_rel, 1), 0.0)
    # Groups wholly inside the top k count in full; in the boundary group d (the one
    # holding rank k) only t = k - before[d] of its n items are inside, and the number
    # X of relevant ones among them is Hypergeometric(n, r, t); given X = x those x
    # are spread uniformly over the t places. R@k = relevant before d + X.
    rows = np.arange(hist.shape[0])
    upto = before + cnt
    d = np.argmax(upto >= k, axis=1)
    groups = _group_sums(before, rel_before, cnt, rel)
    full = np.where(np.arange(cnt.shape[1])[None, :] < d[:, None], groups, 0.0).sum(axis=1)
    n, r, B, BR = cnt[rows, d], rel[rows, d], before[rows, d], rel_before[rows, d]
    t = k - B
    lo = np.maximum(0, t - (n - r))
    length = np.minimum(r, t) - lo + 1
    out = np.zeros(hist.shape[0], dtype=np.float64)
    start = 0
    while start < len(rows):  # query blocks of at most ~4M (query, x) terms
        stop = start + 1
        budget = int(length[start])
        while stop < len(rows) and budget + int(length[stop]) <= (1 << 22):
            budget += int(length[stop])
            stop += 1
        qid = np.repeat(np.arange(start, stop), length[start:stop])
        first = np.repeat(np.cumsum(length[start:stop]) - length[start:stop], length[start:stop])
        x = lo[qid] + (np.arange(qid.size) - first)
        nq, rq, tq = n[qid], r[qid], t[qid]
        logp = (
            _lgamma(rq + 1) - _lgamma(x + 1) - _lgamma(rq - x + 1)
            + _lgamma(nq - rq + 1) - _lgamma(tq - x + 1) - _lgamma(nq - rq - tq + x + 1)
            - (_lgamma(nq + 1) - _lgamma(tq + 1) - _lgamma(nq - tq + 1))
        )
        part = _group_sums(B[qid], BR[qid], tq, x)
        denom = BR[qid] + x
        terms = np.where(denom > 0, np.exp(logp) * (full[qid] + part) / np.maximum(denom, 1), 0.0)
        out[start:stop] = np.bincount(qid - start, weights=terms, minlength=stop - start)
        start = stop
    return out


def average_topn_counts(hist: np.ndarray, ns: List[int]) -> np.ndarray:
    """Expected relevant items in the top n under random tie order: (Q, len(ns))."""
    rel = hist[:, 1, :].astype(np.float64)
    cnt = hist[:, 0, :] + hist[:, 1, :]
    upto = np.cumsum(cnt, axis=1)
    before = upto - cnt
    rel_before = np.cumsum(rel, axis=1) - rel
    total = int(upto[0, -1])
    out = np.zeros((hist.shape[0], len(ns)), dtype=np.float64)
    for c, m in enumerate(ns):
        m = min(m, total)
        d = np.argmax(upto >= m, axis=1)  # boundary group per query
        rows = np.arange(hist.shape[0])
        t = m - before[rows, d]
        out[:, c] = rel_before[rows, d] + t * rel[rows, d] / cnt[rows, d]
    return out

