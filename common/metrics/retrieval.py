"""The public retrieval metrics: Hamming distance, mAP@all / mAP@K, precision@N, the top-N
curve and PR by Hamming radius.

Each validates its arguments, states its per-query work as a typed query (queries.py)
for ``dispatch.per_query`` and reduces the per-query results (``math.fsum``: the mean
does not depend on the engine's order of queries).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import numpy as np

from . import cpu
from .dispatch import per_query
from .queries import AveragePrecision, DistanceCounts, RelevantInTop
from .tie_average import average_ap, average_topn_counts
from .validation import Inputs, MetricInputError, check_codes, check_ties, is_tensor, prepare


def hamming_distance(query_codes: Any, db_codes: Any) -> Any:
    """Integer Hamming distances (Q, N) between {-1,+1} codes of equal length.

    Returns an int64 NumPy array, or an int64 tensor on the queries' device when the
    queries are a tensor. Meant for small inputs and references: it builds Q x N.
    """
    q = check_codes("query_codes", query_codes)
    d = check_codes("db_codes", db_codes)
    if q.shape[1] != d.shape[1]:
        raise MetricInputError(f"db_codes: {d.shape[1]} bits but query_codes has {q.shape[1]}")
    if is_tensor(q) or is_tensor(d):
        import torch

        device = q.device if is_tensor(q) else d.device
        qt = torch.as_tensor(q, device=device).to(torch.float32)
        dt = torch.as_tensor(d, device=device).to(torch.float32)
        return torch.round((q.shape[1] - qt @ dt.T) * 0.5).to(torch.int64)
    words = cpu.code_words(int(q.shape[1]))
    qw = cpu.pack_words(np.asarray(q) > 0, [8] * words)
    dw = cpu.pack_words(np.asarray(d) > 0, [8] * words)
    out = np.zeros((q.shape[0], d.shape[0]), dtype=np.int64)
    for a, b in zip(qw, dw):
        out += cpu.bitcount(a[:, None] ^ b[None, :])
    return out


def calc_map_k(
    query_codes: Any,
    db_codes: Any,
    query_labels: Any,
    db_labels: Any,
    k: Optional[int] = None,
    ties: str = "index",
    chunk_size: Optional[int] = None,
    *,
    backend: str = "auto",
    num_threads: Optional[int] = None,
) -> float:
    """Mean average precision over all queries: mAP@all (k=None) or standard mAP@k.

    mAP@k counts only the top k ranks, with R = relevant items inside them (a query
    with none scores 0). ``ties="index"`` orders a tie by ascending database index;
    ``ties="average"`` gives the expected AP over all orders of every tie group.
    ``db_codes``/``db_labels`` may be lists of segments (truncated matching: segment s
    is compared on the first L_s bits of the query; the global index is their
    concatenation). ``chunk_size``: queries per block (CPU) or per batch (torch);
    ``backend``: "auto" (torch for CUDA tensors, else numba if installed, else NumPy),
    "numba", "numpy" or "torch"; ``num_threads``: CPU threads (default: available cores,
    at most 8). Results do not depend on chunk_size, num_threads or the CPU backend
    (beyond float64 rounding: the backends sum the same terms in different orders).
    """
    query = AveragePrecision(k)
    ties = check_ties(ties)
    inp = prepare(query_codes, db_codes, query_labels, db_labels)
    if ties == "average":
        ap = average_ap(per_query(inp, DistanceCounts(), backend, chunk_size, num_threads), query.k)
    else:
        ap = per_query(inp, query, backend, chunk_size, num_threads)
    return math.fsum(ap.tolist()) / inp.num_queries


def _precision_values(inp: Inputs, query: RelevantInTop, ties: str, backend: str, chunk_size,
                      num_threads) -> np.ndarray:
    """Mean precision at each n (denominator min(n, N): the list that was returned)."""
    ns = query.ns
    if ties == "average":
        counts = average_topn_counts(per_query(inp, DistanceCounts(), backend, chunk_size, num_threads), ns)
    else:
        counts = per_query(inp, query, backend, chunk_size, num_threads)
    denom = np.array([min(m, inp.num_items) for m in ns], dtype=np.float64)
    prec = counts / denom
    return np.array([math.fsum(prec[:, c].tolist()) / inp.num_queries for c in range(len(ns))])


def calc_precision_at_n(
    query_codes: Any,
    db_codes: Any,
    query_labels: Any,
    db_labels: Any,
    ns: Sequence[int] = (100, 500, 1000),
    ties: str = "index",
    chunk_size: Optional[int] = None,
    *,
    backend: str = "auto",
    num_threads: Optional[int] = None,
) -> Dict[int, float]:
    """{n: mean precision of the top n} with the same ranking as calc_map_k.

    If the database has fewer than n items, the top n is the whole database and the
    denominator is its size. Segments work as in calc_map_k.
    """
    query = RelevantInTop(ns)
    ties = check_ties(ties)
    inp = prepare(query_codes, db_codes, query_labels, db_labels)
    values = _precision_values(inp, query, ties, backend, chunk_size, num_threads)
    return {m: float(v) for m, v in zip(query.ns, values)}


def calc_topn_precision(
    query_codes: Any,
    db_codes: Any,
    query_labels: Any,
    db_labels: Any,
    ns: Optional[Sequence[int]] = None,
    ties: str = "index",
    chunk_size: Optional[int] = None,
    *,
    backend: str = "auto",
    num_threads: Optional[int] = None,
) -> Dict[str, np.ndarray]:
    """Top-N precision curve: {"n": array of N, "precision": array}; default N = 100..1000 by 100."""
    query = RelevantInTop(range(100, 1001, 100) if ns is None else ns)
    ties = check_ties(ties)
    inp = prepare(query_codes, db_codes, query_labels, db_labels)
    values = _precision_values(inp, query, ties, backend, chunk_size, num_threads)
    return {"n": np.array(query.ns, dtype=np.int64), "precision": values}


def calc_pr_curve(
    query_codes: Any,
    db_codes: Any,
    query_labels: Any,
    db_labels: Any,
    chunk_size: Optional[int] = None,
    *,
    backend: str = "auto",
    num_threads: Optional[int] = None,
) -> Dict[str, np.ndarray]:
    """Precision and recall by Hamming radius r = 0..bits, micro-averaged over queries.

    precision[r] = sum_q relevant-and-within-r / sum_q within-r, and 0.0 where nothing
    lies within r (no retrieved item: no precision to measure; ``retrieved`` says where).
    recall[r] = sum_q relevant-and-within-r / sum_q relevant (0.0 if nothing is
    relevant). Also returns the counts: ``retrieved``, ``relevant_retrieved``, ``relevant``.
    """
    inp = prepare(query_codes, db_codes, query_labels, db_labels)
    hist = per_query(inp, DistanceCounts(), backend, chunk_size, num_threads).sum(axis=0)
    rel_within = np.cumsum(hist[1])
    within = np.cumsum(hist[0] + hist[1])
    total_rel = int(hist[1].sum())
    precision = np.divide(rel_within, within, out=np.zeros(len(within)), where=within > 0)
    recall = rel_within / total_rel if total_rel else np.zeros(len(within))
    return {
        "radius": np.arange(inp.bits + 1, dtype=np.int64),
        "precision": precision,
        "recall": recall,
        "retrieved": within.astype(np.int64),
        "relevant_retrieved": rel_within.astype(np.int64),
        "relevant": np.int64(total_rel),
    }
