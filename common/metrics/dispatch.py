"""One entry for every engine: pick the backend, score each distinct query once, expand.

``per_query(inp, query, ...)`` returns what ``query`` describes (see queries.py) for
every query, whatever engine computed it.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from . import numba_engine, numpy_engine, torch_engine
from .queries import AveragePrecision, DistanceCounts, Query, RelevantInTop
from .validation import Inputs, MetricInputError, check_k, is_tensor, to_numpy

BACKENDS = ("auto", "numba", "numpy", "torch")
USE_NUMBA = True  # False: backend="auto" takes the NumPy path even if numba is installed


def choose_backend(inp: Inputs, backend: str) -> Tuple[str, Any]:
    """('numba' | 'numpy', None) or ('torch', device).

    "auto": CUDA tensors run in torch on their device; everything else runs in the numba
    kernel when numba is importable (and the sizes fit its integer layout), else in NumPy.
    """
    if backend not in BACKENDS:
        raise MetricInputError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    devices = {x.device for x in inp.arrays() if is_tensor(x)}
    non_cpu = sorted((d for d in devices if d.type != "cpu"), key=str)
    if len(non_cpu) > 1:
        raise MetricInputError(f"inputs live on several devices: {[str(d) for d in non_cpu]}")
    if backend == "numba" or (backend == "auto" and not non_cpu and USE_NUMBA):
        if numba_engine.fits(inp) and numba_engine.available():
            return "numba", None
        if backend == "numba":
            why = "numba is not installed" if not numba_engine.available() else (
                f"{inp.bits}-bit codes x {inp.num_items} items exceed its integer layout")
            raise MetricInputError(f"backend: 'numba' unavailable ({why}); use 'auto' or 'numpy'")
    if backend in ("numpy", "auto") and not (backend == "auto" and non_cpu):
        return "numpy", None
    import torch  # only the torch path needs it

    return "torch", (non_cpu[0] if non_cpu else torch.device("cpu"))


def unique_queries(inp: Inputs) -> Tuple[np.ndarray, np.ndarray]:
    """Rows of distinct (labels, code) queries and the map back to every query.

    Identical queries have identical AP, so each is scored once. The distinct rows come
    sorted by label set first, which lets the CPU path reuse one relevance row.
    """
    lab = np.packbits(to_numpy(inp.qlabels) != 0, axis=1)
    code = np.packbits(to_numpy(inp.qcodes) > 0, axis=1)
    rows = np.ascontiguousarray(np.concatenate([lab, code], axis=1))
    _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    return first.astype(np.int64), inverse.reshape(-1).astype(np.int64)


def _row_kernels(engine: Any, query: Query, num_items: int, run) -> np.ndarray:
    """``query`` through the row-range kernels (ap_all, top, counts) that the NumPy and
    torch engines share; ``run(kernel, *args)`` applies one over all rows."""
    if isinstance(query, DistanceCounts):
        return run(engine.counts)
    if isinstance(query, RelevantInTop):
        return run(engine.top, max(query.ns), False, query.ns)
    depth = query.cutoff(num_items)
    return run(engine.ap_all) if depth is None else run(engine.top, depth, True, ())[:, 0]


def per_query(
    inp: Inputs,
    query: Query,
    backend: str,
    chunk_size: Optional[int],
    num_threads: Optional[int],
) -> np.ndarray:
    """``query`` computed for every distinct query and expanded to all queries (first axis)."""
    if not isinstance(query, (AveragePrecision, RelevantInTop, DistanceCounts)):
        raise TypeError(f"query: expected AveragePrecision, RelevantInTop or DistanceCounts, got {query!r}")
    if chunk_size is not None:
        chunk_size = check_k("chunk_size", chunk_size)
    kind, device = choose_backend(inp, backend)
    rows, inverse = unique_queries(inp)
    if kind == "numba":
        res = numba_engine.run(inp, rows, query, chunk_size, num_threads)
    elif kind == "numpy":
        plan = numpy_engine.plan(inp, rows)
        res = _row_kernels(numpy_engine, query, inp.num_items,
                           lambda fn, *a: numpy_engine.run_rows(fn, plan, len(rows), chunk_size, num_threads, *a))
    else:
        plan = torch_engine.Plan(inp, rows, device, chunk_size)
        res = _row_kernels(torch_engine, query, inp.num_items,
                           lambda fn, *a: torch_engine.run_rows(fn, plan, len(rows), *a))
    return res[inverse]
