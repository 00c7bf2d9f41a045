"""Retrieval metrics (mAP@all, mAP@K, precision@N, PR by Hamming radius) and continual figures.

One definition for the whole library, written down in notes/metrics.md (after the
project's metrics reference):

* relevance: query and item share at least one label;
* ranking: ascending Hamming distance; inside a tie, ascending database index (a stable
  sort, as MATLAB's ``sort``), or ``ties="average"``: the expected value over all orders
  of every tie group (McSherry & Najork 2008), computed in closed form from counts;
* AP(q) = (1/R) * sum over relevant ranks k of P@k; mAP@K counts only the top K ranks
  and R = relevant items inside them; mAP averages over *all* queries (a query with
  no relevant item scores 0), so it is never NaN.

Inputs may be NumPy arrays or torch tensors with {-1,+1} codes of any dtype. On CPU
the work runs in a numba kernel when numba is installed (packed XOR-popcount distances
and no sort: distances are integers 0..bits, so two counting passes per query give
every rank; queries in parallel on numba's threads), else in NumPy (one unique-key sort
per query, worker threads); for CUDA tensors it runs in torch on that device, in query
chunks. Memory stays O(N) per CPU thread and O(chunk x N) on a GPU: never a full Q x N
matrix. numba is imported on first use only.

Modules: validation (input checks), queries (what is computed per query), cpu (bit
packing and threads), numpy_engine / numba_engine / torch_engine, dispatch (backend
choice, distinct queries), tie_average (closed forms), retrieval (the public
functions), continual (continual_summary).
"""
from .continual import continual_summary
from .queries import AveragePrecision, DistanceCounts, Query, RelevantInTop
from .retrieval import calc_map_k, calc_pr_curve, calc_precision_at_n, calc_topn_precision, hamming_distance
from .validation import MetricInputError

__all__ = [
    "MetricInputError",
    "hamming_distance",
    "calc_map_k",
    "calc_precision_at_n",
    "calc_pr_curve",
    "calc_topn_precision",
    "continual_summary",
    "AveragePrecision",
    "RelevantInTop",
    "DistanceCounts",
    "Query",
]
