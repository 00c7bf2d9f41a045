"""Query latency, recall@k and memory of FAISS binary indexes against exhaustive search.

Exhaustive references: ``IndexBinaryFlat`` (FAISS popcount scan) and a numpy XOR +
popcount scan per query (the naive way). Hashed / approximate kinds: ``IndexBinaryHash``,
``IndexBinaryMultiHash``, ``IndexBinaryIVF``, ``IndexBinaryHNSW``, built with the same
code as ``python main.py index`` (``common.binary_index``).

Data: structured random codes, so that near neighbours exist: ``--clusters`` random
centres, each code a centre with every bit flipped with probability ``--flip``;
queries drawn the same way (fresh noise). Recall@k is tie-aware: the fraction of the
true top-k distance multiset matched (an item at the k-th true distance counts as any
other of its tie group), since the top k of a tie is not unique.

    python benchmarks/bench_index.py                  # 1M x 64-bit codes, 1000 queries
    python benchmarks/bench_index.py --quick          # 100k codes, 200 queries, ~1 min

Timings use ``--threads`` FAISS threads (default 1) on a shared machine: expect noise of
10-20 %; compare ratios, not absolute figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.binary_index import (  # noqa: E402
    build_faiss_index, faiss_module, faiss_search, resolve_params, serialized_bytes,
)

MISSING = -1


def make_codes(n: int, nq: int, bits: int, clusters: int, flip: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(database (n, bits/8), queries (nq, bits/8)) packed uint8 clustered codes."""
    rng = np.random.default_rng(seed)
    centres = rng.random((clusters, bits)) < 0.5

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, bits // 8), dtype=np.uint8)
        for s in range(0, m, 100_000):  # chunks keep the boolean temporaries small
            e = min(m, s + 100_000)
            c = centres[rng.integers(0, clusters, size=e - s)]
            out[s:e] = np.packbits(c ^ (rng.random((e - s, bits)) < flip), axis=1)
        return out

    return draw(n), draw(nq)


def rss() -> int:
    """Resident set size of this process in bytes (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def numpy_search(db: np.ndarray, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Naive exhaustive search: per query XOR + popcount over every code, then the k
    smallest (argpartition) in (distance, index) order."""
    words = db.shape[1] // 8
    db64 = db.view(np.uint64).reshape(-1, words)
    q64 = queries.view(np.uint64).reshape(-1, words)
    D = np.empty((len(queries), k), dtype=np.int64)
    I = np.empty((len(queries), k), dtype=np.int64)
    for i in range(len(queries)):
        dist = np.bitwise_count(db64 ^ q64[i]).sum(axis=1, dtype=np.int64)
        part = np.argpartition(dist, k - 1)[:k]
        order = np.lexsort((part, dist[part]))
        I[i], D[i] = part[order], dist[part][order]
    return D, I


def recall_at_k(D: np.ndarray, I: np.ndarray, D_true: np.ndarray) -> float:
    """Tie-aware recall@k: per query, (returned items closer than the true k-th distance
    + returned items at it, capped by the room the true top k leaves at it) / k."""
    k = D_true.shape[1]
    total = 0.0
    for d, i, t in zip(D, I, D_true):
        d = d[i != MISSING]
        kth = t[-1]
        closer_true = int((t < kth).sum())
        total += (min(int((d < kth).sum()), closer_true) + min(int((d == kth).sum()), k - closer_true)) / k
    return total / len(D)


def timed(fn: Callable[[], object]) -> Tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# (kind, build params, [search-parameter variants]) benchmarked at full size
def variants(n: int, d: int, quick: bool, skip_hnsw: bool) -> List[Tuple[str, Dict[str, int], List[Dict[str, int]]]]:
    out = [
        ("flat", {}, [{}]),
        ("hash", {}, [{"nflip": 0}, {"nflip": 1}, {"nflip": 2}]),
        ("multihash", {}, [{"nflip": 0}, {"nflip": 1}, {"nflip": 2}]),
        ("ivf", {}, [{"nprobe": 1}, {"nprobe": 8}, {"nprobe": 32}]),
    ]
    if not skip_hnsw:
        out.append(("hnsw", {}, [{"ef_search": 32}, {"ef_search": 128}]))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="database codes (default 1,000,000)")
    ap.add_argument("--queries", type=int, default=1000, help="queries (default 1000)")
    ap.add_argument("--bits", type=int, default=64, help="code length, a multiple of 8 (default 64)")
    ap.add_argument("--k", type=int, nargs="+", default=[10, 100], help="k values (default 10 100)")
    ap.add_argument("--clusters", type=int, help="cluster centres (default n / 100)")
    ap.add_argument("--flip", type=float, default=0.05, help="per-bit flip probability around a centre (default 0.05)")
    ap.add_argument("--single", type=int, default=100, help="queries timed one at a time (default 100)")
    ap.add_argument("--threads", type=int, default=1, help="FAISS threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-hnsw", action="store_true", help="skip HNSW (its build is the slowest)")
    ap.add_argument("--no-numpy", action="store_true", help="skip the numpy reference (ground truth from flat)")
    ap.add_argument("--quick", action="store_true", help="100,000 codes, 200 queries, 50 single queries")
    ap.add_argument("--json-out", metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.queries, args.single = min(args.n, 100_000), min(args.queries, 200), min(args.single, 50)
    if args.bits % 8:
        ap.error("--bits must be a multiple of 8 here (the library pads other lengths; see common/binary_index.py)")
    faiss = faiss_module()  # one line naming the extra when FAISS is missing
    faiss.omp_set_num_threads(args.threads)
    clusters = args.clusters or max(1, args.n // 100)
    t_data, (db, queries) = timed(lambda: make_codes(args.n, args.queries, args.bits, clusters, args.flip, args.seed))
    print(f"{args.n:,} codes x {args.bits} bits, {args.queries} queries, {clusters:,} clusters, flip {args.flip}, "
          f"k {args.k}, faiss {faiss.__version__} with {args.threads} thread(s); data made in {t_data:.1f}s", flush=True)
    rows: List[Dict[str, object]] = []
    truth: Dict[int, np.ndarray] = {}

    if not args.no_numpy:
        for k in args.k:
            t, (D_np, _) = timed(lambda: numpy_search(db, queries, k))
            single = [timed(lambda i=i: numpy_search(db, queries[i : i + 1], k))[0] for i in range(min(args.single, 20))]
            truth[k] = D_np
            rows.append({"index": "numpy scan", "params": "-", "build_s": 0.0, "bytes": db.nbytes, "rss_mb": 0.0,
                         "k": k, "batch_ms": 1e3 * t / args.queries, "single_ms": 1e3 * statistics.median(single),
                         "recall": 1.0, "returned": float(k)})
            print(f"  numpy scan                                   k={k:<4} {1e3 * t / args.queries:8.3f} ms/q", flush=True)

    for kind, build_params, searches in variants(args.n, args.bits, args.quick, args.no_hnsw):
        params = resolve_params(kind, args.n, args.bits, build_params)
        r0 = rss()
        t_build, index = timed(lambda: build_faiss_index(kind, db, args.bits, params))
        rss_mb = (rss() - r0) / 2**20
        nbytes = len(serialized_bytes(index))
        fixed = ", ".join(f"{k}={v}" for k, v in params.items() if k not in ("nflip", "nprobe", "ef_search"))
        for sp in searches:
            call = {**params, **sp}  # this variant's search-time parameters, passed with each search
            label = ", ".join(x for x in (fixed, ", ".join(f"{k}={v}" for k, v in sp.items())) if x) or "-"
            for k in args.k:
                t, (D, I) = timed(lambda: faiss_search(index, kind, queries, k, call))
                if kind == "flat" and k not in truth:
                    truth[k] = D.astype(np.int64)
                if kind == "flat" and not args.no_numpy:
                    assert np.array_equal(np.sort(D, axis=1), truth[k]), "flat and numpy distances differ"
                single = [timed(lambda i=i: faiss_search(index, kind, queries[i : i + 1], k, call))[0]
                          for i in range(args.single)]
                row = {"index": kind, "params": label, "build_s": t_build, "bytes": nbytes, "rss_mb": rss_mb,
                       "k": k, "batch_ms": 1e3 * t / args.queries, "single_ms": 1e3 * statistics.median(single),
                       "recall": recall_at_k(D, I, truth[k]), "returned": float((I != MISSING).sum(axis=1).mean())}
                rows.append(row)
                print(f"  {kind:<9} {label:<34} k={k:<4} {row['batch_ms']:8.3f} ms/q  recall {row['recall']:.3f}", flush=True)
        del index

    print()
    print(table(rows, args.k))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return 0


def table(rows: List[Dict[str, object]], ks: List[int]) -> str:
    """Rows grouped by k, with speed and memory ratios against IndexBinaryFlat."""
    lines = []
    for k in ks:
        flat = next(r for r in rows if r["index"] == "flat" and r["k"] == k)
        lines.append(f"k = {k}")
        lines.append(f"{'index':<11}{'parameters':<36}{'build s':>8}{'size MB':>9}{'RSS+ MB':>9}"
                     f"{'batch ms/q':>11}{'single ms':>10}{'speed-up':>9}{'size x':>7}{'recall@k':>9}{'got/q':>7}")
        for r in rows:
            if r["k"] != k:
                continue
            lines.append(
                f"{r['index']:<11}{str(r['params'])[:35]:<36}{r['build_s']:>8.1f}{r['bytes'] / 2**20:>9.1f}"
                f"{r['rss_mb']:>9.1f}{r['batch_ms']:>11.3f}{r['single_ms']:>10.3f}"
                f"{flat['batch_ms'] / r['batch_ms']:>9.2f}{r['bytes'] / flat['bytes']:>7.2f}{r['recall']:>9.3f}"
                f"{r['returned']:>7.1f}"
            )
        lines.append("")
    lines.append("speed-up and size x: against IndexBinaryFlat (batched search); size = serialised index bytes; "
                 "RSS+ = resident memory added by the build; got/q = results returned per query (hash kinds may "
                 "return fewer than k).")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
