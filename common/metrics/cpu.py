"""Bit packing, popcount and thread counts shared by the two CPU engines (NumPy, numba)."""
from __future__ import annotations

import functools
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .validation import Inputs, to_numpy

# Below this many query x item pairs, worker threads cost more than they save.
THREADS_MIN_PAIRS = 1 << 22


@functools.lru_cache(maxsize=1)
def _popcount_table() -> np.ndarray:
    """Bits set in every 16-bit value."""
    values = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(-1, 2)
    return np.unpackbits(values, axis=1).sum(axis=1).astype(np.uint8)


def popcount_lut(x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Bits set per uint64 element through a 16-bit table: the fallback for NumPy < 2.0."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    counts = _popcount_table()[x.view(np.uint16).reshape(x.shape + (4,))].sum(axis=-1, dtype=np.uint8)
    if out is None:
        return counts
    out[...] = counts
    return out


# np.bitwise_count (NumPy >= 2.0) is a hardware popcount per element. Callers look it up
# as ``cpu.bitcount`` at call time, so the fallback can be swapped in (tests do).
bitcount = getattr(np, "bitwise_count", popcount_lut)


def pack_words(bits: np.ndarray, word_bytes: Sequence[int]) -> List[np.ndarray]:
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


def code_words(bits: int) -> int:
    """64-bit words that hold a code of ``bits`` bits."""
    return -(-bits // 64)


def stack_words(bits: np.ndarray, nwords: int) -> np.ndarray:
    """Bool (n, b) -> uint64 (n, nwords), zero past the b bits."""
    return np.stack(pack_words(bits, [8] * nwords), axis=1) if bits.shape[0] else np.zeros((0, nwords), np.uint64)


def prefix_mask(seg_bits: int, bits: int) -> np.ndarray:
    """uint64 (code_words(bits),): the words of a ``bits``-bit code with its first ``seg_bits`` bits set."""
    prefix = np.zeros((1, bits), dtype=bool)
    prefix[0, :seg_bits] = True
    return stack_words(prefix, code_words(bits))[0]


def boolean_inputs(inp: Inputs, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray, List[np.ndarray], np.ndarray]:
    """The inputs as booleans on the CPU: codes > 0 and labels != 0 of the distinct query
    ``rows``, each database segment's codes, and the database labels concatenated."""
    qbits = to_numpy(inp.qcodes)[rows] > 0
    qlab = to_numpy(inp.qlabels)[rows] != 0
    seg_bits = [to_numpy(codes) > 0 for codes, _ in inp.segments]
    dlab = np.concatenate([to_numpy(lab) != 0 for _, lab in inp.segments], axis=0)
    return qbits, qlab, seg_bits, dlab


def default_threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def thread_count(num_threads: Optional[int], num_rows: int, num_items: int, most: Optional[int] = None) -> int:
    """Threads for a call: ``num_threads`` (default: available cores, at most 8), capped at
    ``most``; one for small inputs (under THREADS_MIN_PAIRS query x item pairs)."""
    threads = default_threads() if num_threads is None else max(1, int(num_threads))
    if most is not None:
        threads = min(threads, most)
    return 1 if num_rows * num_items < THREADS_MIN_PAIRS else threads


def index_bits(num_items: int) -> int:
    """Bits that hold a database index 0..num_items-1 (at least one)."""
    return max(1, (num_items - 1).bit_length())
