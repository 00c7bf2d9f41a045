"""The torch engine: codes and labels as float tensors on one device, queries in chunks.

What runs for CUDA tensors (and for ``backend="torch"``): distances from a float matmul
and one sort or top-k per chunk of queries, so scratch memory is O(chunk x N).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from . import cpu
from .validation import Inputs, is_tensor, torch_module

# Bytes of scratch memory per query chunk (about 64 bytes per query x database pair are
# alive at once).
_CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 1 << 28}


class Plan:
    """Query and database codes/labels as float tensors on one device, for chunked work.

    Distances come from a float matmul, 0.5 * (L - B_q B_d^T) (exact: +-1 products
    summed in fp32, also under TF32), and relevance from labels_q labels_d^T > 0.
    """

    def __init__(self, inp: Inputs, rows: np.ndarray, device: Any, chunk_size: Optional[int]) -> None:
        import torch

        self.torch = torch
        self.device = device
        idx = torch.as_tensor(rows, device=device)

        def dev(x: Any) -> Any:
            t = x if is_tensor(x) else torch.from_numpy(np.ascontiguousarray(x))
            return t.to(device=device, dtype=torch.float32)

        self.q = dev(inp.qcodes)[idx]
        self.ql = (dev(inp.qlabels) != 0).to(torch.float32)[idx]
        self.segments = [(dev(c), c.shape[0], int(c.shape[1])) for c, _ in inp.segments]
        self.dl = torch.cat([(dev(lab) != 0).to(torch.float32) for _, lab in inp.segments], dim=0)
        self.n = int(self.dl.shape[0])
        self.bits = inp.bits
        budget = _CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
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


def ap_all(plan: Plan, lo: int, hi: int) -> np.ndarray:
    """AP over the whole database for query rows [lo, hi): one sort of the unique
    (distance, index, relevant) key."""
    torch = plan.torch
    jbits = cpu.index_bits(plan.n)
    j = torch.arange(plan.n, device=plan.device, dtype=torch.int64)
    rank = torch.arange(1, plan.n + 1, device=plan.device, dtype=torch.float64)
    rel = plan.relevance(lo, hi)
    key = (plan.distances(lo, hi) << (jbits + 1)) | (j << 1) | rel.to(torch.int64)
    key = torch.sort(key, dim=1).values  # keys are unique: any sort is the stable order
    rs = key & 1
    del key
    return _ap_rows(rs, rank)


def _ap_rows(rs: Any, rank: Any) -> np.ndarray:
    """AP of each row of a 0/1 int64 relevance matrix in rank order.

    The hit counts are an integer cumsum (a float cumsum on CUDA is not deterministic).
    """
    torch = torch_module()
    hits = torch.cumsum(rs, dim=1)
    total = hits[:, -1].to(torch.float64)
    ap_sum = torch.where(rs > 0, hits.to(torch.float64) / rank, 0.0).sum(dim=1)
    ap = torch.where(total > 0, ap_sum / total.clamp(min=1), torch.zeros_like(ap_sum))
    return ap.cpu().numpy()


def top(plan: Plan, lo: int, hi: int, depth: int, ap: bool, ns: Sequence[int]) -> np.ndarray:
    """Per query row: [AP over the top ``depth`` ranks (if ``ap``), relevant count in the top n
    for n in ns], from a top-k of the unique (distance, index) key."""
    torch = plan.torch
    jbits = cpu.index_bits(plan.n)
    j = torch.arange(plan.n, device=plan.device, dtype=torch.int64)
    depth = min(depth, plan.n)
    key = (plan.distances(lo, hi) << jbits) | j
    if depth < plan.n:
        top_keys = torch.topk(key, depth, dim=1, largest=False, sorted=True).values
    else:
        top_keys = torch.sort(key, dim=1).values
    del key
    idx = top_keys & ((1 << jbits) - 1)
    rel = torch.gather(plan.relevance(lo, hi), 1, idx).to(torch.int64)
    cols = []
    if ap:
        rank = torch.arange(1, depth + 1, device=plan.device, dtype=torch.float64)
        cols.append(_ap_rows(rel, rank))
    csum = torch.cumsum(rel, dim=1)
    for m in ns:
        cols.append(csum[:, min(m, plan.n) - 1].cpu().numpy().astype(np.float64))
    return np.stack(cols, axis=1)


def counts(plan: Plan, lo: int, hi: int) -> np.ndarray:
    """Per query row: counts (2, bits+1) of [non-relevant, relevant] items by distance."""
    torch = plan.torch
    nb = plan.bits + 1
    rows = hi - lo
    code = plan.distances(lo, hi) + plan.relevance(lo, hi).to(torch.int64) * nb
    code += torch.arange(rows, device=plan.device, dtype=torch.int64)[:, None] * (2 * nb)
    hist = torch.bincount(code.reshape(-1), minlength=rows * 2 * nb)
    return hist.reshape(rows, 2, nb).cpu().numpy().astype(np.int64)


def run_rows(fn, plan: Plan, num_rows: int, *args) -> np.ndarray:
    """Apply a row-range kernel over all rows, one chunk after another; order kept."""
    parts = [fn(plan, lo, min(lo + plan.chunk, num_rows), *args) for lo in range(0, num_rows, plan.chunk)]
    return np.concatenate(parts, axis=0)
