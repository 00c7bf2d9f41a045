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
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from utils.errors import DataError

__all__ = [
    "MetricInputError",
    "hamming_distance",
    "calc_map_k",
    "calc_precision_at_n",
    "calc_pr_curve",
    "calc_topn_precision",
    "continual_summary",
]

TIES = ("index", "average")
BACKENDS = ("auto", "numba", "numpy", "torch")
# Bytes of scratch memory per query chunk on the torch path (about 64 bytes per
# query x database pair are alive at once).
_TORCH_CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 1 << 28}
# Below this many query x item pairs, worker threads cost more than they save.
_THREADS_MIN_PAIRS = 1 << 22


@functools.lru_cache(maxsize=1)
def _popcount_table() -> np.ndarray:
    """Bits set in every 16-bit value."""
    values = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(-1, 2)
    return np.unpackbits(values, axis=1).sum(axis=1).astype(np.uint8)


def _popcount_lut(x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Bits set per uint64 element through a 16-bit table: the fallback for NumPy < 2.0."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    counts = _popcount_table()[x.view(np.uint16).reshape(x.shape + (4,))].sum(axis=-1, dtype=np.uint8)
    if out is None:
        return counts
    out[...] = counts
    return out


# np.bitwise_count (NumPy >= 2.0) is a hardware popcount per element.
_bitcount = getattr(np, "bitwise_count", _popcount_lut)


class MetricInputError(DataError, ValueError):
    """Bad metric input (shape, value, argument); one line saying what was expected."""


# ============================================================================ inputs
def _torch_module():
    """The torch module if it is already imported (no input can be a tensor otherwise)."""
    return sys.modules.get("torch")


def _is_tensor(x: Any) -> bool:
    torch = _torch_module()
    return torch is not None and isinstance(x, torch.Tensor)


def _shape(x: Any) -> Tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def _as_array(name: str, x: Any) -> Any:
    """A tensor stays a tensor (detached; bfloat16, which NumPy lacks, becomes float32)."""
    if _is_tensor(x):
        x = x.detach()
        return x.float() if x.dtype == _torch_module().bfloat16 else x
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise MetricInputError(f"{name}: expected an array or tensor, got {type(x).__name__} ({exc})") from None


def _check_values(name: str, x: Any, allowed: Tuple[int, int], hint: str) -> None:
    """Raise unless every entry of ``x`` is one of ``allowed`` (works for arrays and tensors)."""
    a, b = allowed
    if x.dtype == np.bool_ or (_is_tensor(x) and x.dtype == _torch_module().bool):
        if (a, b) == (0, 1):
            return
        raise MetricInputError(f"{name}: boolean values; expected {{{a},{b}}} codes{hint}")
    ok = ((x == a) | (x == b)).all()
    if not bool(ok):
        bad = x[~((x == a) | (x == b))]
        sample = bad.flatten()[:3].tolist() if _is_tensor(bad) else bad.ravel()[:3].tolist()
        raise MetricInputError(f"{name}: expected only {{{a},{b}}} values, found e.g. {sample}{hint}")


def _check_codes(name: str, x: Any) -> Any:
    x = _as_array(name, x)
    if x.ndim != 2:
        raise MetricInputError(f"{name}: expected a 2-D (n, bits) array of {{-1,+1}} codes, got shape {_shape(x)}")
    if x.shape[1] < 1:
        raise MetricInputError(f"{name}: codes have 0 bits")
    _check_values(name, x, (-1, 1), " (map {0,1} codes with 2*b-1)")
    return x


def _check_labels(name: str, x: Any, rows: int, codes_name: str) -> Any:
    x = _as_array(name, x)
    if x.ndim != 2:
        raise MetricInputError(
            f"{name}: expected 2-D multi-hot labels (n, classes), got shape {_shape(x)}"
            + (" (one-hot encode class ids first)" if x.ndim == 1 else "")
        )
    if x.shape[0] != rows:
        raise MetricInputError(f"{name}: {x.shape[0]} label rows for {rows} rows of {codes_name}")
    _check_values(name, x, (0, 1), "")
    return x


@dataclass
class _Inputs:
    """Validated inputs: query codes/labels and the database as segments (global order)."""

    qcodes: Any
    qlabels: Any
    segments: List[Tuple[Any, Any]]  # (codes (n_s, L_s), labels (n_s, C)) in database order

    @property
    def num_queries(self) -> int:
        return int(self.qcodes.shape[0])

    @property
    def bits(self) -> int:
        return int(self.qcodes.shape[1])

    @property
    def num_items(self) -> int:
        return sum(int(c.shape[0]) for c, _ in self.segments)

    def arrays(self) -> List[Any]:
        return [self.qcodes, self.qlabels] + [a for seg in self.segments for a in seg]


def _prepare(query_codes: Any, db_codes: Any, query_labels: Any, db_labels: Any) -> _Inputs:
    """Validate shapes and values; a single database array becomes one segment."""
    q = _check_codes("query_codes", query_codes)
    ql = _check_labels("query_labels", query_labels, int(q.shape[0]), "query_codes")
    if q.shape[0] == 0:
        raise MetricInputError("query_codes: no queries (0 rows)")
    if isinstance(db_codes, (list, tuple)):
        if not isinstance(db_labels, (list, tuple)):
            raise MetricInputError(
                f"db_labels: db_codes is a list of {len(db_codes)} segments, so db_labels must be a list too"
            )
        if len(db_labels) != len(db_codes):
            raise MetricInputError(f"db_labels: {len(db_labels)} label arrays for {len(db_codes)} code segments")
        if len(db_codes) == 0:
            raise MetricInputError("db_codes: an empty list of segments")
        names = [f"db_codes[{s}]" for s in range(len(db_codes))]
        lnames = [f"db_labels[{s}]" for s in range(len(db_codes))]
        pairs = list(zip(db_codes, db_labels))
        single = False
    else:
        if isinstance(db_labels, (list, tuple)):
            raise MetricInputError("db_labels: a list of label arrays needs db_codes as a list of segments too")
        names, lnames, pairs, single = ["db_codes"], ["db_labels"], [(db_codes, db_labels)], True
    segments = []
    for name, lname, (c, lab) in zip(names, lnames, pairs):
        c = _check_codes(name, c)
        lab = _check_labels(lname, lab, int(c.shape[0]), name)
        if single and c.shape[1] != q.shape[1]:
            raise MetricInputError(
                f"db_codes: {c.shape[1]} bits but query_codes has {q.shape[1]}; "
                "pass a list of segments for truncated matching"
            )
        if c.shape[1] > q.shape[1]:
            raise MetricInputError(
                f"{name}: {c.shape[1]}-bit codes are longer than the {q.shape[1]}-bit queries "
                "(a segment is matched on a prefix of the query)"
            )
        if lab.shape[1] != ql.shape[1]:
            raise MetricInputError(f"{lname}: {lab.shape[1]} label columns but query_labels has {ql.shape[1]}")
        segments.append((c, lab))
    if sum(int(c.shape[0]) for c, _ in segments) == 0:
        raise MetricInputError(f"{names[0] if single else 'db_codes'}: empty database (0 rows)")
    return _Inputs(q, ql, segments)


def _choose_backend(inp: _Inputs, backend: str) -> Tuple[str, Any]:
    """('numba' | 'numpy', None) or ('torch', device).

    "auto": CUDA tensors run in torch on their device; everything else runs in the numba
    kernel when numba is importable (and the sizes fit its integer layout), else in NumPy.
    """
    if backend not in BACKENDS:
        raise MetricInputError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    devices = {x.device for x in inp.arrays() if _is_tensor(x)}
    non_cpu = sorted((d for d in devices if d.type != "cpu"), key=str)
    if len(non_cpu) > 1:
        raise MetricInputError(f"inputs live on several devices: {[str(d) for d in non_cpu]}")
    if backend == "numba" or (backend == "auto" and not non_cpu and _USE_NUMBA):
        if _numba_fits(inp) and _numba_available():
            return "numba", None
        if backend == "numba":
            why = "numba is not installed" if not _numba_available() else (
                f"{inp.bits}-bit codes x {inp.num_items} items exceed its integer layout")
            raise MetricInputError(f"backend: 'numba' unavailable ({why}); use 'auto' or 'numpy'")
    if backend in ("numpy", "auto") and not (backend == "auto" and non_cpu):
        return "numpy", None
    import torch  # only the torch path needs it

    return "torch", (non_cpu[0] if non_cpu else torch.device("cpu"))


def _to_numpy(x: Any) -> np.ndarray:
    return x.cpu().numpy() if _is_tensor(x) else np.asarray(x)


def _check_k(name: str, k: Any, allow_none: bool = True) -> Optional[int]:
    if k is None and allow_none:
        return None
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or int(k) < 1:
        raise MetricInputError(f"{name}: expected a positive integer{' or None' if allow_none else ''}, got {k!r}")
    return int(k)


def _check_ns(ns: Any) -> List[int]:
    try:
        values = [ns] if isinstance(ns, (int, np.integer)) else list(ns)
    except TypeError:
        raise MetricInputError(f"ns: expected a list of positive integers, got {ns!r}") from None
    if not values:
        raise MetricInputError("ns: expected at least one N")
    return [_check_k("ns", n, allow_none=False) for n in values]


def _check_ties(ties: str) -> str:
    if ties not in TIES:
        raise MetricInputError(f"ties: expected one of {TIES}, got {ties!r}")
    return ties


# ============================================================================ query dedup
def _unique_queries(inp: _Inputs) -> Tuple[np.ndarray, np.ndarray]:
    """Rows of distinct (labels, code) queries and the map back to every query.

    Identical queries have identical AP, so each is scored once. The distinct rows come
    sorted by label set first, which lets the CPU path reuse one relevance row.
    """
    lab = np.packbits(_to_numpy(inp.qlabels) != 0, axis=1)
    code = np.packbits(_to_numpy(inp.qcodes) > 0, axis=1)
    rows = np.ascontiguousarray(np.concatenate([lab, code], axis=1))
    _, first, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    return first.astype(np.int64), inverse.reshape(-1).astype(np.int64)


# ============================================================================ NumPy engine
def _pack_words(bits: np.ndarray, word_bytes: Sequence[int]) -> List[np.ndarray]:
    """Bool (n, b) -> one contiguous unsigned array per word (sizes in bytes, in order).

    Byte order inside a word does not matter: words are only XOR/AND-ed with words
    packed the same way, then popcounted or tested for zero.
    """
    packed = np.packbits(bits, axis=1)
    out, start = [], 0
    for size in word_bytes:
        chunk = packed[:, start : start + size]
        if chunk.shape[1] < size:
            chunk = np.pad(chunk, ((0, 0), (0, size - chunk.shape[1])))
        out.append(np.ascontiguousarray(chunk).view(f"u{size}").reshape(-1).copy())
        start += size
    return out


def _label_word_sizes(num_classes: int) -> List[int]:
    """8-byte words, then the narrowest unsigned word that holds the remaining label bytes."""
    nbytes = max(1, -(-num_classes // 8))
    sizes = [8] * (nbytes // 8)
    rest = nbytes % 8
    if rest:
        sizes.append(1 if rest == 1 else 2 if rest == 2 else 4 if rest <= 4 else 8)
    return sizes


@dataclass
class _Segment:
    offset: int
    n: int
    bits: int
    words: List[np.ndarray]  # one (n,) uint64 array per 64-bit word of the code
    qwords: List[np.ndarray]  # per word, (Qu,) query words masked to the first `bits` bits


@dataclass
class _NumpyPlan:
    """Packed query and database words, shared read-only by the worker threads."""

    segments: List[_Segment]
    qlab: List[np.ndarray]  # per label word, (Qu,)
    dlab: List[np.ndarray]  # per label word, (N,)
    label_group: List[int]  # per query row: rows with equal ids have equal label sets
    qhas: List[bool]  # per query row: it has at least one label
    num_items: int
    bits: int


def _numpy_plan(inp: _Inputs, rows: np.ndarray) -> _NumpyPlan:
    bits = inp.bits
    nwords = -(-bits // 64)
    qwords = _pack_words(_to_numpy(inp.qcodes)[rows] > 0, [8] * nwords)
    segments, offset = [], 0
    for codes, _ in inp.segments:
        c = _to_numpy(codes) > 0
        seg_bits = int(c.shape[1])
        sw = -(-seg_bits // 64)
        mask = np.zeros((1, bits), dtype=bool)
        mask[0, :seg_bits] = True
        qmask = _pack_words(mask, [8] * nwords)
        masked = [qwords[w] & qmask[w][0] for w in range(sw)]
        segments.append(_Segment(offset, int(c.shape[0]), seg_bits, _pack_words(c, [8] * sw), masked))
        offset += int(c.shape[0])
    sizes = _label_word_sizes(int(inp.qlabels.shape[1]))
    ql = _to_numpy(inp.qlabels)[rows] != 0
    dl = np.concatenate([_to_numpy(lab) != 0 for _, lab in inp.segments], axis=0)
    packed = np.packbits(ql, axis=1)
    changes = np.any(packed[1:] != packed[:-1], axis=1) if len(rows) > 1 else np.zeros(0, dtype=bool)
    return _NumpyPlan(
        segments=segments,
        qlab=_pack_words(ql, sizes),
        dlab=_pack_words(dl, sizes),
        label_group=np.concatenate([[0], np.cumsum(changes)]).astype(np.int64).tolist(),
        qhas=ql.any(axis=1).tolist(),
        num_items=offset,
        bits=bits,
    )


class _RowScratch:
    """Per-worker O(N) buffers (and their per-segment views), reused row after row."""

    def __init__(self, plan: _NumpyPlan, key_dtype: Any) -> None:
        n = plan.num_items
        self.key = np.empty(n, dtype=key_dtype)
        x64 = np.empty(n, dtype=np.uint64)
        pc8 = np.empty(n, dtype=np.uint8)
        self.views = [
            (seg, self.key[seg.offset : seg.offset + seg.n], x64[seg.offset : seg.offset + seg.n],
             pc8[seg.offset : seg.offset + seg.n])
            for seg in plan.segments
        ]
        self.rel = np.empty(n, dtype=bool)
        self.rel2 = np.empty(n, dtype=bool)
        self.lab = [np.empty(n, dtype=w.dtype) for w in plan.dlab]
        self.rel_group = -1  # the label group whose relevance `rel` holds


def _distances_into_key(i: int, s: _RowScratch) -> None:
    """s.key[j] = Hamming distance of query row i to item j (segment prefixes)."""
    for seg, o, x, pc in s.views:
        for w, dw in enumerate(seg.words):
            np.bitwise_xor(seg.qwords[w][i], dw, out=x)
            if w == 0:
                _bitcount(x, out=o)
            else:
                _bitcount(x, out=pc)
                np.add(o, pc, out=o)


def _relevance_into(plan: _NumpyPlan, i: int, s: _RowScratch) -> bool:
    """s.rel[j] = query row i shares a label with item j; False if s.rel already held it.

    Distinct queries come sorted by label set, so consecutive rows often share it.
    """
    group = plan.label_group[i]
    if group == s.rel_group:
        return False
    first = True
    for q, d, tmp in zip(plan.qlab, plan.dlab, s.lab):
        word = q[i]
        if word == 0:
            continue
        np.bitwise_and(word, d, out=tmp)
        if first:
            np.not_equal(tmp, 0, out=s.rel)
            first = False
        else:
            np.not_equal(tmp, 0, out=s.rel2)
            np.bitwise_or(s.rel, s.rel2, out=s.rel)
    if first:
        s.rel[:] = False
    s.rel_group = group
    return True


def _key_dtype(max_value_bits: int) -> Any:
    return np.uint32 if max_value_bits <= 32 else np.uint64


def _np_ap_all(plan: _NumpyPlan, lo: int, hi: int) -> np.ndarray:
    """AP over the whole database for query rows [lo, hi), stable (index) tie order.

    Each item gets the unique key (distance, index, relevant) packed in one integer, so
    one plain sort gives the stable order and carries the relevance bit along.
    """
    n = plan.num_items
    jbits = max(1, (n - 1).bit_length())
    shift = jbits + 1
    kdt = _key_dtype(plan.bits.bit_length() + shift)
    s = _RowScratch(plan, kdt)
    jj = np.arange(n, dtype=kdt) << kdt(1)
    jrel = np.empty(n, dtype=kdt)  # (index << 1) | relevant, for the current label set
    hits = np.arange(1, n + 1, dtype=np.float64)
    terms = np.empty(n, dtype=np.float64)
    out = np.zeros(hi - lo, dtype=np.float64)
    key = s.key
    for r, i in enumerate(range(lo, hi)):
        if not plan.qhas[i]:
            continue
        if _relevance_into(plan, i, s):
            np.bitwise_or(jj, s.rel, out=jrel)
        _distances_into_key(i, s)
        np.left_shift(key, kdt(shift), out=key)
        np.bitwise_or(key, jrel, out=key)
        key.sort()
        np.bitwise_and(key, kdt(1), out=key)
        np.not_equal(key, 0, out=s.rel2)
        pos = np.flatnonzero(s.rel2)  # 0-based ranks of the relevant items
        R = pos.size
        if R == 0:
            continue
        pos += 1
        np.divide(hits[:R], pos, out=terms[:R])
        out[r] = float(np.add.reduce(terms[:R])) / R
    return out


def _np_topn(plan: _NumpyPlan, lo: int, hi: int, depth: int, k: Optional[int], ns: List[int]) -> np.ndarray:
    """Per query row: [AP@k (if k), relevant count in the top n for n in ns].

    Only the top ``depth`` ranks matter: a partial selection (np.partition) on the
    unique (distance, index) key, a sort of those ``depth`` keys, and relevance for
    them alone.
    """
    n = plan.num_items
    jbits = max(1, (n - 1).bit_length())
    kdt = _key_dtype(plan.bits.bit_length() + jbits)
    s = _RowScratch(plan, kdt)
    jj = np.arange(n, dtype=kdt)
    jmask = kdt((1 << jbits) - 1)
    depth = min(depth, n)
    hits = np.arange(1, depth + 1, dtype=np.float64)
    ncols = (1 if k else 0) + len(ns)
    out = np.zeros((hi - lo, ncols), dtype=np.float64)
    key = s.key
    kk = min(k, n) if k else 0
    for r, i in enumerate(range(lo, hi)):
        if not plan.qhas[i]:
            continue
        _distances_into_key(i, s)
        np.left_shift(key, kdt(jbits), out=key)
        np.bitwise_or(key, jj, out=key)
        if depth < n:
            key.partition(depth - 1)
        top = key[:depth]
        top.sort()
        idx = (top & jmask).astype(np.intp)
        rel = np.zeros(depth, dtype=bool)
        for q, d in zip(plan.qlab, plan.dlab):
            if q[i] != 0:
                rel |= (d[idx] & q[i]) != 0
        col = 0
        if k:
            pos = np.flatnonzero(rel[:kk])
            if pos.size:
                out[r, 0] = float(np.add.reduce(hits[: pos.size] / (pos + 1))) / pos.size
            col = 1
        csum = np.cumsum(rel, dtype=np.int64)
        for c, m in enumerate(ns):
            out[r, col + c] = csum[min(m, n) - 1]
    return out


def _np_hist(plan: _NumpyPlan, lo: int, hi: int) -> np.ndarray:
    """Per query row: counts (2, bits+1) of [non-relevant, relevant] items by distance."""
    nb = plan.bits + 1
    code_dt = np.uint8 if 2 * nb <= 256 else np.uint16 if 2 * nb <= 65536 else np.uint32
    s = _RowScratch(plan, code_dt)
    out = np.zeros((hi - lo, 2, nb), dtype=np.int64)
    key = s.key
    for r, i in enumerate(range(lo, hi)):
        _distances_into_key(i, s)
        if plan.qhas[i]:
            _relevance_into(plan, i, s)
            np.left_shift(key, code_dt(1), out=key)
            np.bitwise_or(key, s.rel, out=key)
        else:
            np.left_shift(key, code_dt(1), out=key)
        counts = np.bincount(key, minlength=2 * nb)
        out[r] = counts.reshape(nb, 2).T
    return out


def _default_threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _np_run(fn, plan: _NumpyPlan, num_rows: int, chunk_size: Optional[int], num_threads: Optional[int], *args):
    """Apply a row-range kernel over all rows, in blocks, on worker threads; order kept."""
    threads = _default_threads() if num_threads is None else max(1, int(num_threads))
    if num_rows * plan.num_items < _THREADS_MIN_PAIRS:
        threads = 1
    block = chunk_size or max(1, -(-num_rows // (4 * threads)))
    bounds = [(lo, min(lo + block, num_rows)) for lo in range(0, num_rows, block)]
    if threads == 1 or len(bounds) == 1:
        parts = [fn(plan, lo, hi, *args) for lo, hi in bounds]
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            parts = list(pool.map(lambda b: fn(plan, b[0], b[1], *args), bounds))
    return np.concatenate(parts, axis=0)


# ============================================================================ numba engine
# No sort at all: distances are integers 0..bits and a tie keeps ascending database
# index, so one pass in index order with a running (items, relevant items) counter per
# distance gives every relevant item its position inside its distance group; with the
# per-distance totals from the same pass, rank = items at smaller distances + position
# and hits = relevant items at smaller distances + relevant position. The kernel below
# is plain Python (it runs as such, slowly, with `_prange = range`); _numba_engine()
# compiles a copy of it with numba.prange, so importing this module never imports numba.
_USE_NUMBA = True  # False: backend="auto" takes the NumPy path even if numba is installed
_prange = range
# Popcount by SWAR bit tricks: LLVM turns this exact pattern into popcnt / vpopcntq.
_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)
_U0, _U1, _U2, _U4, _U56 = (np.uint64(v) for v in (0, 1, 2, 4, 56))
_NB_SUM_BLOCK = 1024  # a query's AP terms are summed in blocks, then the block sums


def _nb_rank_kernel(qw, dw, seg_start, seg_mask, qlab, dlab, key_proto, nbins, sh_r, depth, ns,
                    want_ap, want_hist, block, ap_out, cnt_out, hist_out):
    """Per distinct query: AP over ranks <= depth, relevant counts at ranks <= ns, histograms.

    qw (Q, W) / dw (W, N): uint64 code words (database as word planes, zero past each
    segment's bits); seg_start (S+1,), seg_mask (S, W): a segment's items and the mask of
    its code prefix; qlab (Q, LW) / dlab (LW, N): uint64 label words; key_proto: an empty
    array whose dtype holds 2 * bits + 1; sh_r: bits of a count (N < 2**sh_r); ns: sorted.
    Outputs: ap_out (Q,), cnt_out (Q, len(ns)), hist_out (Q or 1, 2, nbins).
    Every query is computed alone, in the same order of operations whatever the thread.
    """
    num_q = qw.shape[0]
    words = qw.shape[1]
    n = dw.shape[1]
    lwords = qlab.shape[1]
    nseg = seg_mask.shape[0]
    nns = ns.shape[0]
    max_n = ns[nns - 1] if nns > 0 else 0
    sh_r = np.uint64(sh_r)
    sh_d = np.uint64(2) * sh_r
    low = (_U1 << sh_r) - _U1
    one = key_proto.dtype.type(1)
    # ranks that must be exact: all (histograms), else the deepest of AP@depth and ns
    reach = n if want_hist else max(depth if want_ap else 0, max_n)
    nblocks = (num_q + block - 1) // block
    for blk in _prange(nblocks):
        # O(N) scratch per block (a block runs on one thread)
        key = np.empty(n, key_proto.dtype)
        packed = np.empty(n, np.uint64)
        state = np.empty(nbins, np.uint64)
        less = np.empty(nbins, np.float64)  # items / relevant items at smaller distances
        rless = np.empty(nbins, np.float64)  # (integers, exact in float64)
        for i in range(blk * block, min(num_q, (blk + 1) * block)):
            ap_out[i] = 0.0
            for c in range(nns):
                cnt_out[i, c] = 0.0
            has_label = False
            for w in range(lwords):
                if qlab[i, w] != _U0:
                    has_label = True
            if not has_label and not want_hist:
                continue
            # 1. key = distance << 1 | relevant: vectorised passes over the word planes
            for s in range(nseg):
                lo = seg_start[s]
                hi = seg_start[s + 1]
                ks = key[lo:hi]
                for w in range(words):
                    m = seg_mask[s, w]
                    if w > 0 and m == _U0:
                        break
                    qm = qw[i, w] & m
                    ds = dw[w, lo:hi]
                    if w == 0:
                        for j in range(hi - lo):
                            x = qm ^ ds[j]
                            x = x - ((x >> _U1) & _M1)
                            x = (x & _M2) + ((x >> _U2) & _M2)
                            x = (x + (x >> _U4)) & _M4
                            ks[j] = (x * _H01) >> _U56
                    else:
                        for j in range(hi - lo):
                            x = qm ^ ds[j]
                            x = x - ((x >> _U1) & _M1)
                            x = (x & _M2) + ((x >> _U2) & _M2)
                            x = (x + (x >> _U4)) & _M4
                            ks[j] += (x * _H01) >> _U56
            first = True
            for w in range(lwords):
                qlw = qlab[i, w]
                if qlw == _U0:
                    continue
                dl = dlab[w]
                if first:
                    for j in range(n):
                        key[j] = (key[j] << one) | ((qlw & dl[j]) != _U0)
                    first = False
                else:
                    for j in range(n):
                        key[j] |= (qlw & dl[j]) != _U0
            if first:
                for j in range(n):
                    key[j] = key[j] << one
            # 2. one pass in index order: state[d] = d | relevant seen | items seen (bit
            # fields, unsigned: no negative-index checks); each relevant item leaves its
            # state word in `packed`
            for d in range(nbins):
                state[d] = np.uint64(d) << sh_d
            nr = 0
            for j in range(n):
                c = np.uint64(key[j])
                r = c & _U1
                v = state[c >> _U1] + _U1 + (r << sh_r)
                state[c >> _U1] = v
                packed[nr] = v
                nr += r
            before = 0
            rbefore = 0
            dmax = _U0  # the distance of rank `reach`: farther items rank below it
            for d in range(nbins):
                cnt = np.int64(state[d] & low)
                rc = np.int64((state[d] >> sh_r) & low)
                less[d] = before
                rless[d] = rbefore
                if before < reach:
                    dmax = np.uint64(d)
                before += cnt
                rbefore += rc
                if want_hist:
                    hist_out[i, 0, d] = cnt - rc
                    hist_out[i, 1, d] = rc
            if reach < n:  # keep only the relevant items at distances <= dmax (in place)
                kept = 0
                for t in range(nr):
                    v = packed[t]
                    packed[kept] = v
                    kept += (v >> sh_d) <= dmax
                nr = kept
            if nr == 0:
                continue
            # 3. rank = less + position, hits = rless + relevant position (index order)
            if want_ap:
                kept = 0
                total = 0.0
                for start in range(0, nr, _NB_SUM_BLOCK):
                    part = 0.0
                    for t in range(start, min(nr, start + _NB_SUM_BLOCK)):
                        v = packed[t]
                        d = v >> sh_d
                        rank = less[d] + np.float64(v & low)
                        if rank <= depth:
                            part += (rless[d] + np.float64((v >> sh_r) & low)) / rank
                            kept += 1
                    total += part
                if kept > 0:
                    ap_out[i] = total / kept
            if nns > 0:
                for t in range(nr):
                    v = packed[t]
                    rank = less[v >> sh_d] + np.float64(v & low)
                    if rank <= max_n:
                        for c in range(nns):
                            if rank <= ns[c]:
                                cnt_out[i, c] += 1.0


@dataclass
class _NumbaEngine:
    """The compiled kernel, numba itself, and a lock: one kernel launch at a time (numba's
    workqueue threading layer aborts on concurrent launches from several Python threads)."""

    numba: Any
    kernel: Any
    lock: Any


@functools.lru_cache(maxsize=1)
def _numba_engine() -> Optional[_NumbaEngine]:
    """Import numba and wrap the kernel; None if numba is not importable.

    Compilation happens at the first call of each key width (uint8 / uint16 keys), about
    4 s each, and is cached on disk next to this file (__pycache__, or numba's user cache
    dir if that is read-only); later processes load it in well under a second.
    error_model="numpy": no zero-division checks (every divisor is a rank >= 1), which
    lets LLVM vectorise the loops.
    """
    try:
        import numba
    except ImportError:
        return None
    g = dict(_nb_rank_kernel.__globals__)
    g["_prange"] = numba.prange
    fn = types.FunctionType(_nb_rank_kernel.__code__, g, _nb_rank_kernel.__name__)
    fn.__qualname__ = _nb_rank_kernel.__qualname__
    options = dict(parallel=True, nogil=True, error_model="numpy")
    try:
        kernel = numba.njit(cache=True, **options)(fn)
    except RuntimeError:  # no writable cache location: compile in every process instead
        kernel = numba.njit(**options)(fn)
    return _NumbaEngine(numba, kernel, threading.Lock())


def _numba_available() -> bool:
    return _numba_engine() is not None


def _numba_key_dtype(bits: int) -> Optional[Any]:
    """Key = distance << 1 | relevant: uint8 up to 127 bits, uint16 up to 32767."""
    return np.uint8 if 2 * bits + 1 <= 0xFF else np.uint16 if 2 * bits + 1 <= 0xFFFF else None


def _numba_fits(inp: _Inputs) -> bool:
    """Whether the kernel's integer layout holds these sizes (else the NumPy path runs)."""
    sh_r = max(1, inp.num_items.bit_length())
    return _numba_key_dtype(inp.bits) is not None and 2 * sh_r + (inp.bits + 1).bit_length() <= 63


def _stack_words(bits: np.ndarray, nwords: int) -> np.ndarray:
    """Bool (n, b) -> uint64 (n, nwords), zero past the b bits."""
    return np.stack(_pack_words(bits, [8] * nwords), axis=1) if bits.shape[0] else np.zeros((0, nwords), np.uint64)


@contextlib.contextmanager
def _numba_threads(numba: Any, threads: int):
    """numba's thread count for this call (thread-local in numba), restored afterwards;
    blocks of queries go to threads one at a time (dynamic schedule)."""
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    chunking = getattr(numba, "parallel_chunksize", None)  # numba >= 0.57
    try:
        with chunking(1) if chunking is not None else contextlib.nullcontext():
            yield
    finally:
        numba.set_num_threads(previous)


def _numba_run(inp: _Inputs, rows: np.ndarray, what: str, chunk_size: Optional[int],
               num_threads: Optional[int], *args) -> np.ndarray:
    """Run the kernel on the distinct query rows; same outputs as the NumPy engine."""
    engine = _numba_engine()
    bits, n = inp.bits, inp.num_items
    nwords = -(-bits // 64)
    qw = _stack_words(_to_numpy(inp.qcodes)[rows] > 0, nwords)
    planes, masks, starts = [], [], [0]
    for codes, _ in inp.segments:
        c = _to_numpy(codes) > 0
        seg_bits = int(c.shape[1])
        planes.append(_stack_words(c, nwords))
        prefix = np.zeros((1, bits), dtype=bool)
        prefix[0, :seg_bits] = True
        masks.append(_stack_words(prefix, nwords)[0])
        starts.append(starts[-1] + int(c.shape[0]))
    dw = np.ascontiguousarray(np.concatenate(planes, axis=0).T)
    seg_mask = np.ascontiguousarray(np.stack(masks))
    seg_start = np.array(starts, dtype=np.int64)
    lwords = max(1, -(-int(inp.qlabels.shape[1]) // 64))
    qlab = _stack_words(_to_numpy(inp.qlabels)[rows] != 0, lwords)
    dl = np.concatenate([_to_numpy(lab) != 0 for _, lab in inp.segments], axis=0)
    dlab = np.ascontiguousarray(_stack_words(dl, lwords).T)
    num_q = len(rows)
    nbins = bits + 1
    k, ns = (args[1], args[2]) if what == "topn" else (None, [])
    want_ap = what == "ap_all" or (what == "topn" and k is not None)
    want_hist = what == "hist"
    depth = min(int(k), n) if (what == "topn" and k) else n
    order = sorted(set(min(int(m), n) for m in ns))
    ns_arr = np.array(order, dtype=np.int64)
    ap = np.zeros(num_q, dtype=np.float64)
    cnt = np.zeros((num_q, len(order)), dtype=np.float64)
    hist = np.zeros((num_q if want_hist else 1, 2, nbins), dtype=np.int64)
    threads = _default_threads() if num_threads is None else max(1, int(num_threads))
    threads = min(threads, int(engine.numba.config.NUMBA_NUM_THREADS))
    if num_q * n < _THREADS_MIN_PAIRS:
        threads = 1
    block = chunk_size or max(1, -(-num_q // (8 * threads)))
    with engine.lock, _numba_threads(engine.numba, threads):
        engine.kernel(
            qw, dw, seg_start, seg_mask, qlab, dlab, np.empty(0, dtype=_numba_key_dtype(bits)),
            nbins, max(1, n.bit_length()), depth, ns_arr, want_ap, want_hist, block, ap, cnt, hist,
        )
    if what == "ap_all":
        return ap
    if what == "hist":
        return hist
    cols = ([ap] if k else []) + [cnt[:, order.index(min(int(m), n))] for m in ns]
    return np.stack(cols, axis=1)


# ============================================================================ torch engine
class _TorchPlan:
    """Query and database codes/labels as float tensors on one device, for chunked work.

    Distances come from a float matmul, 0.5 * (L - B_q B_d^T) (exact: +-1 products
    summed in fp32, also under TF32), and relevance from labels_q labels_d^T > 0.
    """

    def __init__(self, inp: _Inputs, rows: np.ndarray, device: Any, chunk_size: Optional[int]) -> None:
        import torch

        self.torch = torch
        self.device = device
        idx = torch.as_tensor(rows, device=device)

        def dev(x: Any) -> Any:
            t = x if _is_tensor(x) else torch.from_numpy(np.ascontiguousarray(x))
            return t.to(device=device, dtype=torch.float32)

        self.q = dev(inp.qcodes)[idx]
        self.ql = (dev(inp.qlabels) != 0).to(torch.float32)[idx]
        self.segments = [(dev(c), c.shape[0], int(c.shape[1])) for c, _ in inp.segments]
        self.dl = torch.cat([(dev(lab) != 0).to(torch.float32) for _, lab in inp.segments], dim=0)
        self.n = int(self.dl.shape[0])
        self.bits = inp.bits
        budget = _TORCH_CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
        self.chunk = chunk_size or max(1, budget // (64 * self.n))

    def distances(self, lo: int, hi: int) -> Any:
        torch = self.torch
        out = torch.empty((hi - lo, self.n), dtype=torch.int64, device=self.device)
        off = 0
        for codes, n_s, bits in self.segments:
            dot = self.q[lo:hi, :bits] @ codes.T
            out[:, off : off + n_s] = torch.round((bits - dot) * 0.5).to(torch.int64)
            off += n_s
        return out

    def relevance(self, lo: int, hi: int) -> Any:
        return (self.ql[lo:hi] @ self.dl.T) > 0


def _torch_ap_all(plan: _TorchPlan, lo: int, hi: int) -> np.ndarray:
    torch = plan.torch
    jbits = max(1, (plan.n - 1).bit_length())
    j = torch.arange(plan.n, device=plan.device, dtype=torch.int64)
    rank = torch.arange(1, plan.n + 1, device=plan.device, dtype=torch.float64)
    rel = plan.relevance(lo, hi)
    key = (plan.distances(lo, hi) << (jbits + 1)) | (j << 1) | rel.to(torch.int64)
    key = torch.sort(key, dim=1).values  # keys are unique: any sort is the stable order
    rs = key & 1
    del key
    return _torch_ap_rows(rs, rank)


def _torch_ap_rows(rs: Any, rank: Any) -> np.ndarray:
    """AP of each row of a 0/1 int64 relevance matrix in rank order.

    The hit counts are an integer cumsum (a float cumsum on CUDA is not deterministic).
    """
    torch = _torch_module()
    hits = torch.cumsum(rs, dim=1)
    total = hits[:, -1].to(torch.float64)
    ap_sum = torch.where(rs > 0, hits.to(torch.float64) / rank, 0.0).sum(dim=1)
    ap = torch.where(total > 0, ap_sum / total.clamp(min=1), torch.zeros_like(ap_sum))
    return ap.cpu().numpy()


def _torch_topn(plan: _TorchPlan, lo: int, hi: int, depth: int, k: Optional[int], ns: List[int]) -> np.ndarray:
    torch = plan.torch
    jbits = max(1, (plan.n - 1).bit_length())
    j = torch.arange(plan.n, device=plan.device, dtype=torch.int64)
    depth = min(depth, plan.n)
    key = (plan.distances(lo, hi) << jbits) | j
    if depth < plan.n:
        top = torch.topk(key, depth, dim=1, largest=False, sorted=True).values
    else:
        top = torch.sort(key, dim=1).values
    del key
    idx = top & ((1 << jbits) - 1)
    rel = torch.gather(plan.relevance(lo, hi), 1, idx).to(torch.int64)
    cols = []
    if k:
        rk = rel[:, : min(k, plan.n)]
        rank = torch.arange(1, rk.shape[1] + 1, device=plan.device, dtype=torch.float64)
        cols.append(_torch_ap_rows(rk, rank))
    csum = torch.cumsum(rel, dim=1)
    for m in ns:
        cols.append(csum[:, min(m, plan.n) - 1].cpu().numpy().astype(np.float64))
    return np.stack(cols, axis=1)


def _torch_hist(plan: _TorchPlan, lo: int, hi: int) -> np.ndarray:
    torch = plan.torch
    nb = plan.bits + 1
    rows = hi - lo
    code = plan.distances(lo, hi) + plan.relevance(lo, hi).to(torch.int64) * nb
    code += torch.arange(rows, device=plan.device, dtype=torch.int64)[:, None] * (2 * nb)
    counts = torch.bincount(code.reshape(-1), minlength=rows * 2 * nb)
    return counts.reshape(rows, 2, nb).cpu().numpy().astype(np.int64)


def _torch_run(fn, plan: _TorchPlan, num_rows: int, *args) -> np.ndarray:
    parts = [fn(plan, lo, min(lo + plan.chunk, num_rows), *args) for lo in range(0, num_rows, plan.chunk)]
    return np.concatenate(parts, axis=0)


# ============================================================================ dispatch
def _per_query(
    inp: _Inputs,
    what: str,
    backend: str,
    chunk_size: Optional[int],
    num_threads: Optional[int],
    *args,
) -> np.ndarray:
    """Run one kernel ('ap_all', 'topn', 'hist') for every distinct query; expand to all."""
    if chunk_size is not None:
        chunk_size = _check_k("chunk_size", chunk_size)
    kind, device = _choose_backend(inp, backend)
    rows, inverse = _unique_queries(inp)
    if kind == "numba":
        res = _numba_run(inp, rows, what, chunk_size, num_threads, *args)
    elif kind == "numpy":
        plan = _numpy_plan(inp, rows)
        fn = {"ap_all": _np_ap_all, "topn": _np_topn, "hist": _np_hist}[what]
        res = _np_run(fn, plan, len(rows), chunk_size, num_threads, *args)
    else:
        plan = _TorchPlan(inp, rows, device, chunk_size)
        fn = {"ap_all": _torch_ap_all, "topn": _torch_topn, "hist": _torch_hist}[what]
        res = _torch_run(fn, plan, len(rows), *args)
    return res[inverse]


# ============================================================================ tie-aware closed forms
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


def _average_ap(hist: np.ndarray, k: Optional[int]) -> np.ndarray:
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


def _average_topn_counts(hist: np.ndarray, ns: List[int]) -> np.ndarray:
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


# ============================================================================ public API
def hamming_distance(query_codes: Any, db_codes: Any) -> Any:
    """Integer Hamming distances (Q, N) between {-1,+1} codes of equal length.

    Returns an int64 NumPy array, or an int64 tensor on the queries' device when the
    queries are a tensor. Meant for small inputs and references: it builds Q x N.
    """
    q = _check_codes("query_codes", query_codes)
    d = _check_codes("db_codes", db_codes)
    if q.shape[1] != d.shape[1]:
        raise MetricInputError(f"db_codes: {d.shape[1]} bits but query_codes has {q.shape[1]}")
    if _is_tensor(q) or _is_tensor(d):
        import torch

        device = q.device if _is_tensor(q) else d.device
        qt = torch.as_tensor(q, device=device).to(torch.float32)
        dt = torch.as_tensor(d, device=device).to(torch.float32)
        return torch.round((q.shape[1] - qt @ dt.T) * 0.5).to(torch.int64)
    words = -(-int(q.shape[1]) // 64)
    qw = _pack_words(np.asarray(q) > 0, [8] * words)
    dw = _pack_words(np.asarray(d) > 0, [8] * words)
    out = np.zeros((q.shape[0], d.shape[0]), dtype=np.int64)
    for a, b in zip(qw, dw):
        out += _bitcount(a[:, None] ^ b[None, :])
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
    k = _check_k("k", k)
    ties = _check_ties(ties)
    inp = _prepare(query_codes, db_codes, query_labels, db_labels)
    if ties == "average":
        hist = _per_query(inp, "hist", backend, chunk_size, num_threads)
        ap = _average_ap(hist, k)
    elif k is None or k >= inp.num_items:
        ap = _per_query(inp, "ap_all", backend, chunk_size, num_threads)
    else:
        ap = _per_query(inp, "topn", backend, chunk_size, num_threads, k, k, [])[:, 0]
    return math.fsum(ap.tolist()) / inp.num_queries


def _precision_values(inp: _Inputs, ns: List[int], ties: str, backend: str, chunk_size, num_threads) -> np.ndarray:
    """Mean precision at each n (denominator min(n, N): the list that was returned)."""
    n_items = inp.num_items
    if ties == "average":
        counts = _average_topn_counts(_per_query(inp, "hist", backend, chunk_size, num_threads), ns)
    else:
        counts = _per_query(inp, "topn", backend, chunk_size, num_threads, max(ns), None, ns)
    denom = np.array([min(m, n_items) for m in ns], dtype=np.float64)
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
    ns = _check_ns(ns)
    ties = _check_ties(ties)
    inp = _prepare(query_codes, db_codes, query_labels, db_labels)
    values = _precision_values(inp, ns, ties, backend, chunk_size, num_threads)
    return {m: float(v) for m, v in zip(ns, values)}


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
    ns = _check_ns(range(100, 1001, 100) if ns is None else ns)
    ties = _check_ties(ties)
    inp = _prepare(query_codes, db_codes, query_labels, db_labels)
    values = _precision_values(inp, ns, ties, backend, chunk_size, num_threads)
    return {"n": np.array(ns, dtype=np.int64), "precision": values}


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
    inp = _prepare(query_codes, db_codes, query_labels, db_labels)
    hist = _per_query(inp, "hist", backend, chunk_size, num_threads).sum(axis=0)
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


# ============================================================================ continual figures
def _entry(R: Sequence[Sequence[Any]], t: int, j: int) -> Optional[float]:
    row = R[t]
    if j >= len(row) or row[j] is None:
        return None
    v = float(row[j])
    return None if math.isnan(v) else v


def continual_summary(R: Sequence[Sequence[Any]], untrained: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """ACC, average incremental mAP, BWT, forgetting and FWT from the result matrix R.

    R[t][j] = score on task j after training through task t (0-based here; j > t may be
    None). A_t = mean_{j<=t} R[t][j]; acc = A_T; avg_incremental = mean_t A_t;
    bwt = sum_{j<T} (R[T][j] - R[j][j]) / (T-1); forgetting = mean_{j<T} of
    max_{j<=l<T} R[l][j] - R[T][j] (over the T-1 old tasks; a score from before task j
    was learned is not knowledge to forget, so l starts at j); fwt = sum_{j>=2}
    (R[j-1][j] - b_j) / (T-1) with b_j = ``untrained[j]`` (needs R[j-1][j], the score
    on a task before training on it; ``untrained[0]`` is not used). For T == 1, bwt,
    forgetting and fwt are None. The denominators are returned in "denominators"
    (the reference GEM code divides BWT/FWT by T; this one by T-1).
    """
    try:
        T = len(R)
        rows = [list(row) for row in R]
    except TypeError:
        raise MetricInputError("R: expected a T x T list of lists of scores") from None
    if T == 0:
        raise MetricInputError("R: empty result matrix")
    for t in range(T):
        if not t + 1 <= len(rows[t]) <= T:
            raise MetricInputError(f"R[{t}]: {len(rows[t])} entries; row {t} needs {t + 1} to {T} (T = {T})")
        for j in range(t + 1):
            if _entry(rows, t, j) is None:
                raise MetricInputError(f"R[{t}][{j}]: missing; every entry with j <= t must be a number")
    per_step = [math.fsum(rows[t][j] for j in range(t + 1)) / (t + 1) for t in range(T)]
    last = T - 1
    out: Dict[str, Any] = {
        "acc": per_step[last],
        "avg_incremental": math.fsum(per_step) / T,
        "bwt": None,
        "forgetting": None,
        "fwt": None,
        "per_step_average": per_step,
        "num_tasks": T,
    }
    old = T - 1
    den: Dict[str, Any] = {
        "per_step_average": "t (tasks seen after task t)",
        "acc": T,
        "avg_incremental": T,
        "bwt": old or None,
        "forgetting": old or None,
        "fwt": None,
    }
    if T > 1:
        out["bwt"] = math.fsum(float(rows[last][j]) - float(rows[j][j]) for j in range(old)) / old
        forget = [max(float(rows[l][j]) for l in range(j, last)) - float(rows[last][j]) for j in range(old)]
        out["forgetting"] = math.fsum(forget) / old
        out["forgetting_per_task"] = forget
    if untrained is not None:
        b = list(untrained)
        if len(b) != T:
            raise MetricInputError(f"untrained: {len(b)} scores for {T} tasks (one b_j per task; b_1 is unused)")
        if T > 1:
            gains = []
            for j in range(1, T):
                v = _entry(rows, j - 1, j)
                if v is None:
                    raise MetricInputError(
                        f"R[{j - 1}][{j}]: missing; FWT needs the score on task {j} before training on it"
                    )
                gains.append(v - float(b[j]))
            out["fwt"] = math.fsum(gains) / old
            den["fwt"] = old
    out["denominators"] = den
    return out
