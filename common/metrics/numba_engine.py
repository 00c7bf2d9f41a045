"""The numba engine: a sort-free ranking kernel over packed codes, queries in parallel.

Distances are integers 0..bits and a tie keeps ascending database index, so one pass in
index order with a running (items, relevant items) counter per distance gives every
relevant item its position inside its distance group; with the per-distance totals from
the same pass, rank = items at smaller distances + position and hits = relevant items at
smaller distances + relevant position. The kernel is plain Python (it runs as such,
slowly, with ``_prange = range``); ``engine()`` compiles a copy of it with numba.prange,
so importing this module never imports numba.
"""
from __future__ import annotations

import contextlib
import sys
import functools
import threading
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from common.jit import njit

from . import cpu
from .queries import AveragePrecision, DistanceCounts, Query, RelevantInTop
from .validation import Inputs

_prange = range
# Popcount by SWAR bit tricks: LLVM turns this exact pattern into popcnt / vpopcntq.
_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)
_U0, _U1, _U2, _U4, _U56 = (np.uint64(v) for v in (0, 1, 2, 4, 56))
_NB_SUM_BLOCK = 1024  # a query's AP terms are summed in blocks, then the block sums


def rank_kernel(qw, dw, seg_start, seg_mask, qlab, dlab, key_proto, nbins, sh_r, depth, ns,
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
class Engine:
    """The compiled kernel, numba itself, and a lock: one kernel launch at a time (numba's
    workqueue threading layer aborts on concurrent launches from several Python threads)."""

    numba: Any
    kernel: Any
    lock: Any


@functools.lru_cache(maxsize=1)
def engine() -> Optional[Engine]:
    """Import numba and wrap the kernel; None if numba is not importable.

    Compilation happens at the first call of each key width (uint8 / uint16 keys), about
    4 s each, and is cached on disk next to this file (__pycache__, or numba's user cache
    dir if that is read-only); later processes load it in well under a second.
    error_model="numpy": no zero-division checks (every divisor is a rank >= 1), which
    lets LLVM vectorise the loops.
    """
    kernel = njit(rank_kernel, replace={"_prange": "prange"}, parallel=True, nogil=True, error_model="numpy")
    if kernel is None:
        return None
    import numba

    return Engine(numba, kernel, threading.Lock())


def available() -> bool:
    return engine() is not None


def _key_dtype(bits: int) -> Optional[Any]:
    """Key = distance << 1 | relevant: uint8 up to 127 bits, uint16 up to 32767."""
    return np.uint8 if 2 * bits + 1 <= 0xFF else np.uint16 if 2 * bits + 1 <= 0xFFFF else None


def fits(inp: Inputs) -> bool:
    """Whether the kernel's integer layout holds these sizes (else the NumPy path runs)."""
    sh_r = max(1, inp.num_items.bit_length())
    return _key_dtype(inp.bits) is not None and 2 * sh_r + (inp.bits + 1).bit_length() <= 63


@contextlib.contextmanager
def _numba_threads(numba: Any, threads: int):
    """numba's thread count for this call (thread-local in numba), restored afterwards;
    blocks of queries go to threads one at a time (dynamic schedule).

    numba's OpenMP threading layer shares the OpenMP runtime with torch, and a kernel
    launch resets that runtime's thread count: after it torch computes with numba's
    count (e.g. 2 threads where the run asked for 1), and float sums change with it. So
    torch's own setting is put back after every launch.
    """
    torch = sys.modules.get("torch")  # only restored if the process uses torch at all
    torch_threads = torch.get_num_threads() if torch is not None else None
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    chunking = getattr(numba, "parallel_chunksize", None)  # numba >= 0.57
    try:
        with chunking(1) if chunking is not None else contextlib.nullcontext():
            yield
    finally:
        numba.set_num_threads(previous)
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)


def run(inp: Inputs, rows: np.ndarray, query: Query, chunk_size: Optional[int],
        num_threads: Optional[int]) -> np.ndarray:
    """Compute ``query`` for the distinct query ``rows`` in the kernel; the NumPy engine's outputs."""
    eng = engine()
    bits, n = inp.bits, inp.num_items
    nwords = cpu.code_words(bits)
    qbits, ql, seg_codes, dl = cpu.boolean_inputs(inp, rows)
    qw = cpu.stack_words(qbits, nwords)
    starts = np.cumsum([0] + [int(c.shape[0]) for c in seg_codes])
    dw = np.ascontiguousarray(np.concatenate([cpu.stack_words(c, nwords) for c in seg_codes], axis=0).T)
    seg_mask = np.ascontiguousarray(np.stack([cpu.prefix_mask(int(c.shape[1]), bits) for c in seg_codes]))
    seg_start = starts.astype(np.int64)
    lwords = max(1, cpu.code_words(int(inp.qlabels.shape[1])))
    qlab = cpu.stack_words(ql, lwords)
    dlab = np.ascontiguousarray(cpu.stack_words(dl, lwords).T)
    num_q = len(rows)
    nbins = bits + 1
    want_ap = isinstance(query, AveragePrecision)
    want_hist = isinstance(query, DistanceCounts)
    depth = (query.cutoff(n) or n) if want_ap else n
    ns = query.ns if isinstance(query, RelevantInTop) else ()
    order = sorted(set(min(m, n) for m in ns))
    ns_arr = np.array(order, dtype=np.int64)
    ap = np.zeros(num_q, dtype=np.float64)
    cnt = np.zeros((num_q, len(order)), dtype=np.float64)
    hist = np.zeros((num_q if want_hist else 1, 2, nbins), dtype=np.int64)
    threads = cpu.thread_count(num_threads, num_q, n, most=int(eng.numba.config.NUMBA_NUM_THREADS))
    block = chunk_size or max(1, -(-num_q // (8 * threads)))
    with eng.lock, _numba_threads(eng.numba, threads):
        eng.kernel(
            qw, dw, seg_start, seg_mask, qlab, dlab, np.empty(0, dtype=_key_dtype(bits)),
            nbins, max(1, n.bit_length()), depth, ns_arr, want_ap, want_hist, block, ap, cnt, hist,
        )
    if want_ap:
        return ap
    if want_hist:
        return hist
    return np.stack([cnt[:, order.index(min(m, n))] for m in ns], axis=1)
