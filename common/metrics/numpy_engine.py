"""The NumPy engine: per query, one sort (or partial selection) of a unique integer key.

The fallback when numba is missing and a reference for it. Each item's key packs
(distance, database index[, relevant]) into one integer, so a plain sort gives the
stable tie order; worker threads take blocks of queries, each with O(N) scratch.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import numpy as np

from . import cpu
from .validation import Inputs


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
class Plan:
    """Packed query and database words, shared read-only by the worker threads."""

    segments: List[_Segment]
    qlab: List[np.ndarray]  # per label word, (Qu,)
    dlab: List[np.ndarray]  # per label word, (N,)
    label_group: List[int]  # per query row: rows with equal ids have equal label sets
    qhas: List[bool]  # per query row: it has at least one label
    num_items: int
    bits: int


def plan(inp: Inputs, rows: np.ndarray) -> Plan:
    """Pack the distinct query ``rows`` and the database for the kernels below."""
    bits = inp.bits
    qbits, ql, seg_codes, dl = cpu.boolean_inputs(inp, rows)
    qwords = cpu.pack_words(qbits, [8] * cpu.code_words(bits))
    segments, offset = [], 0
    for c in seg_codes:
        seg_bits = int(c.shape[1])
        sw = cpu.code_words(seg_bits)
        qmask = cpu.prefix_mask(seg_bits, bits)
        masked = [qwords[w] & qmask[w] for w in range(sw)]
        segments.append(_Segment(offset, int(c.shape[0]), seg_bits, cpu.pack_words(c, [8] * sw), masked))
        offset += int(c.shape[0])
    sizes = _label_word_sizes(int(inp.qlabels.shape[1]))
    packed = np.packbits(ql, axis=1)
    changes = np.any(packed[1:] != packed[:-1], axis=1) if len(rows) > 1 else np.zeros(0, dtype=bool)
    return Plan(
        segments=segments,
        qlab=cpu.pack_words(ql, sizes),
        dlab=cpu.pack_words(dl, sizes),
        label_group=np.concatenate([[0], np.cumsum(changes)]).astype(np.int64).tolist(),
        qhas=ql.any(axis=1).tolist(),
        num_items=offset,
        bits=bits,
    )


class _RowScratch:
    """Per-worker O(N) buffers (and their per-segment views), reused row after row."""

    def __init__(self, plan: Plan, key_dtype: Any) -> None:
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
                cpu.bitcount(x, out=o)
            else:
                cpu.bitcount(x, out=pc)
                np.add(o, pc, out=o)


def _relevance_into(plan: Plan, i: int, s: _RowScratch) -> bool:
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


def ap_all(plan: Plan, lo: int, hi: int) -> np.ndarray:
    """AP over the whole database for query rows [lo, hi), stable (index) tie order.

    Each item gets the unique key (distance, index, relevant) packed in one integer, so
    one plain sort gives the stable order and carries the relevance bit along.
    """
    n = plan.num_items
    shift = cpu.index_bits(n) + 1
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


def top(plan: Plan, lo: int, hi: int, depth: int, ap: bool, ns: Sequence[int]) -> np.ndarray:
    """Per query row: [AP over the top ``depth`` ranks (if ``ap``), relevant count in the top n
    for n in ns].

    Only the top ``depth`` ranks matter: a partial selection (np.partition) on the
    unique (distance, index) key, a sort of those ``depth`` keys, and relevance for
    them alone.
    """
    n = plan.num_items
    jbits = cpu.index_bits(n)
    kdt = _key_dtype(plan.bits.bit_length() + jbits)
    s = _RowScratch(plan, kdt)
    jj = np.arange(n, dtype=kdt)
    jmask = kdt((1 << jbits) - 1)
    depth = min(depth, n)
    hits = np.arange(1, depth + 1, dtype=np.float64)
    out = np.zeros((hi - lo, int(ap) + len(ns)), dtype=np.float64)
    key = s.key
    for r, i in enumerate(range(lo, hi)):
        if not plan.qhas[i]:
            continue
        _distances_into_key(i, s)
        np.left_shift(key, kdt(jbits), out=key)
        np.bitwise_or(key, jj, out=key)
        if depth < n:
            key.partition(depth - 1)
        top_keys = key[:depth]
        top_keys.sort()
        idx = (top_keys & jmask).astype(np.intp)
        rel = np.zeros(depth, dtype=bool)
        for q, d in zip(plan.qlab, plan.dlab):
            if q[i] != 0:
                rel |= (d[idx] & q[i]) != 0
        if ap:
            pos = np.flatnonzero(rel)
            if pos.size:
                out[r, 0] = float(np.add.reduce(hits[: pos.size] / (pos + 1))) / pos.size
        csum = np.cumsum(rel, dtype=np.int64)
        for c, m in enumerate(ns):
            out[r, int(ap) + c] = csum[min(m, n) - 1]
    return out


def counts(plan: Plan, lo: int, hi: int) -> np.ndarray:
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
        hist = np.bincount(key, minlength=2 * nb)
        out[r] = hist.reshape(nb, 2).T
    return out


def run_rows(fn, plan: Plan, num_rows: int, chunk_size: Optional[int], num_threads: Optional[int], *args):
    """Apply a row-range kernel over all rows, in blocks, on worker threads; order kept."""
    threads = cpu.thread_count(num_threads, num_rows, plan.num_items)
    block = chunk_size or max(1, -(-num_rows // (4 * threads)))
    bounds = [(lo, min(lo + block, num_rows)) for lo in range(0, num_rows, block)]
    if threads == 1 or len(bounds) == 1:
        parts = [fn(plan, lo, hi, *args) for lo, hi in bounds]
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            parts = list(pool.map(lambda b: fn(plan, b[0], b[1], *args), bounds))
    return np.concatenate(parts, axis=0)
