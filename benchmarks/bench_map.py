"""Benchmark calc_map_k against the naive way of the public CLIP-hashing repositories (DCMHT, DSPH), on the same data.

Three ways, same data, same run:
* ours: calc_map_k as users call it (backend "auto": the numba kernel on CPU when numba
  is installed, torch on CUDA tensors with --device cuda);
* numpy: calc_map_k(backend="numpy"), the previous NumPy path (one unique-key sort per
  query), kept as the fallback without numba: shows the gain of the kernel;
* naive: a float Q x N distance matrix 0.5 * (K - Bq Bd^T), one full argsort (stable,
  so that its tie order and therefore its values equal ours; the seed code's default
  quicksort leaves the tie order unspecified), then a per-query NumPy loop that gathers
  relevance in rank order and averages hits / rank.

Every measurement runs in a fresh subprocess that loads the data from .npy files, so
its peak RSS (VmHWM) belongs to that measurement alone. For ours, a one-query call first
pays numba's import and the loading of the compiled kernel (reported as "warm-up"; the
timed call does not include it); a separate pair of processes with an empty
NUMBA_CACHE_DIR measures the one-time compilation. tracemalloc sees NumPy's allocations
only (numba's kernel scratch, about 9 bytes per database item per thread, is not
traced; peak RSS includes it). At MS-COCO scale the naive way needs ~7 GB (float matrix
+ int64 sort indices) and minutes, so it runs on a subset of the queries and its time
is extrapolated linearly (it is linear in Q); the output says so.

    python benchmarks/bench_map.py            # 2000 x 40000 and 5000 x 117218, 64 bits
    python benchmarks/bench_map.py --quick    # small smoke run (seconds)
    python benchmarks/bench_map.py --device cuda   # calc_map_k on CUDA tensors
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------- data
def make_data(num_query: int, num_db: int, bits: int = 64, classes: int = 80, seed: int = 0):
    """Structured multi-label data that looks like trained codes on MS-COCO.

    Class frequencies fall off like a Zipf law (the first class, 'person'-like, in half
    of the samples; about 3 labels per sample, every sample has at least one); a code is
    the sign of the sum of its classes' random prototypes plus noise, so codes cluster
    by label set and ties are frequent, as with real hash codes.
    """
    rng = np.random.default_rng(seed)
    freq = np.clip(0.5 / np.arange(1, classes + 1) ** 0.9, 0.004, 0.5)
    proto = rng.standard_normal((classes, bits))

    def labels(n):
        lab = rng.random((n, classes)) < freq
        empty = ~lab.any(axis=1)
        lab[empty, rng.integers(0, classes, int(empty.sum()))] = True
        return lab.astype(np.uint8)

    def codes(lab):
        x = lab.astype(np.float32) @ proto
        x += rng.standard_normal(x.shape) * np.sqrt(lab.sum(axis=1, keepdims=True))
        return np.where(x >= 0, 1, -1).astype(np.int8)

    ql, dl = labels(num_query), labels(num_db)
    return codes(ql), codes(dl), ql, dl


# ----------------------------------------------------------------------------- naive
def naive_map(qc, dc, ql, dl, k=None):
    """The public repositories' way: full float distance matrix, one argsort, a Python loop."""
    bits = qc.shape[1]
    dist = 0.5 * (bits - qc.astype(np.float32) @ dc.astype(np.float32).T)
    order = np.argsort(dist, axis=1, kind="stable")
    qf, df = ql.astype(np.float32), dl.astype(np.float32)
    total = 0.0
    for i in range(qc.shape[0]):
        gnd = (qf[i] @ df.T > 0)[order[i]]
        if k is not None:
            gnd = gnd[:k]
        hits = int(gnd.sum())
        if hits == 0:
            continue
        rank = np.flatnonzero(gnd) + 1.0
        total += float(np.mean(np.arange(1, hits + 1) / rank))
    return total / qc.shape[0]


# ----------------------------------------------------------------------------- child
def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """VmHWM: this process image's peak RSS (ru_maxrss would carry the parent's over exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(spec: dict) -> dict:
    """One measurement: load the data, time the call, report time, memory and value."""
    d = Path(spec["dir"])
    qc, dc, ql, dl = (np.load(d / f"{n}.npy") for n in ("qc", "dc", "ql", "dl"))
    if spec.get("queries"):
        qc, ql = qc[: spec["queries"]], ql[: spec["queries"]]
    k = spec["k"]
    warmup = None
    if spec["impl"] == "naive":
        fn = lambda: naive_map(qc, dc, ql, dl, k)  # noqa: E731
    else:
        from common.calc_utils import calc_map_k

        args = (qc, dc, ql, dl)
        if spec["device"] != "cpu":
            import torch

            args = tuple(torch.from_numpy(a).to(spec["device"]) for a in args)
            torch.cuda.synchronize()
        backend = "numpy" if spec["impl"] == "numpy" else "auto"
        fn = lambda: calc_map_k(*args, k=k, num_threads=spec.get("threads"), backend=backend)  # noqa: E731
        w0 = time.perf_counter()
        calc_map_k(*(a[:1] for a in args), k=k, backend=backend)  # imports, loads or compiles the kernel
        warmup = time.perf_counter() - w0
    rss0 = _rss_mb()
    load0 = os.getloadavg()[0]
    w0, c0 = time.perf_counter(), time.process_time()
    value = fn()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    out = {"value": value, "wall": wall, "cpu": cpu, "rss0": rss0, "peak_rss": _peak_rss_mb(),
           "warmup": warmup, "load": (load0 + os.getloadavg()[0]) / 2,
           "engine": _engine_name(spec)}
    if spec["impl"] != "naive" and spec["device"] == "cpu":
        tracemalloc.start()
        fn()
        out["traced_peak"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    if spec["device"] != "cpu" and spec["impl"] == "ours":
        import torch

        out["gpu_peak"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _engine_name(spec: dict) -> str:
    if spec["impl"] != "ours":
        return spec["impl"]
    if spec["device"] != "cpu":
        return "torch"
    return "numba" if "numba" in sys.modules else "numpy (numba not installed)"


def measure(spec: dict, extra_env: Optional[dict] = None) -> dict:
    # One BLAS thread for the NumPy ways: the naive loop's many small products otherwise
    # spend their time in thread hand-offs on a busy machine, which would flatter our
    # speed-up. OMP_NUM_THREADS is left alone for ours (numba's OpenMP layer reads it).
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(extra_env or {})}
    if spec["impl"] != "ours":
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, __file__, "--_child", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {spec} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def jit_child() -> dict:
    """First calc_map_k call of a fresh process on a tiny 64-bit input (numba import +
    compile, or load from the cache), and the import of calc_utils alone."""
    w0 = time.perf_counter()
    from common import calc_utils

    imported = time.perf_counter() - w0
    qc, dc, ql, dl = make_data(2, 50)
    w0 = time.perf_counter()
    calc_utils.calc_map_k(qc, dc, ql, dl)
    return {"import": imported, "first_call": time.perf_counter() - w0, "numba": "numba" in sys.modules}


def measure_jit() -> Optional[dict]:
    """Compile once into an empty NUMBA_CACHE_DIR, then load from it in a second process."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        out = []
        for _ in range(2):
            proc = subprocess.run([sys.executable, __file__, "--_jit"], capture_output=True, text=True,
                                  cwd=ROOT, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"JIT measurement failed:\n{proc.stderr}")
            out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if not out[0]["numba"]:
        return None
    return {"import": out[1]["import"], "compile": out[0]["first_call"], "cached": out[1]["first_call"]}


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (a few seconds)")
    ap.add_argument("--device", default="cpu", help="device for calc_map_k inputs: cpu (numba/NumPy) or cuda")
    ap.add_argument("--threads", type=int, default=None, help="calc_map_k CPU threads (default: all cores, <= 8)")
    ap.add_argument("--naive-queries", type=int, default=None, help="queries for the naive way at COCO scale")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_jit", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(child(json.loads(args._child))))
        return
    if args._jit:
        print(json.dumps(jit_child()))
        return

    if args.quick:
        scales = [("small 300 x 4000", 300, 4000, None), ("COCO-shaped 500 x 11722", 500, 11722, 100)]
        ks = [None, 100]
    else:
        scales = [
            ("2000 x 40000", 2000, 40000, None),
            ("MS-COCO 5000 x 117218", 5000, 117218, args.naive_queries or 500),
        ]
        ks = [None, 1000]
    cores = len(os.sched_getaffinity(0))
    print(f"# calc_map_k vs the previous NumPy path vs naive | 64 bits, 80 labels | device={args.device} | "
          f"{cores} cores visible, threads={args.threads or 'default'} | load average {os.getloadavg()[0]:.2f} "
          f"at start | numpy {np.__version__}")
    if args.device == "cpu":
        jit = measure_jit()
        if jit is None:
            print("# numba not installed: 'ours' is the NumPy path")
        else:
            print(f"# numba JIT, fresh process, tiny input: import calc_utils {jit['import']:.2f} s (numba not "
                  f"imported); first call {jit['compile']:.2f} s with an empty cache (import numba + compile), "
                  f"{jit['cached']:.2f} s from the on-disk cache")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, Q, N, naive_q in scales:
            d = Path(tmp) / name.split()[0]
            d.mkdir()
            qc, dc, ql, dl = make_data(Q, N)
            for n, a in zip(("qc", "dc", "ql", "dl"), (qc, dc, ql, dl)):
                np.save(d / f"{n}.npy", a)
            data_mb = sum(a.nbytes for a in (qc, dc, ql, dl)) / 2**20
            rel = float(((ql[:200].astype(np.float32) @ dl.T.astype(np.float32)) > 0).mean())
            print(f"\n## {name}: {ql.sum(1).mean():.2f} labels/sample, relevance density {rel:.3f}, "
                  f"inputs {data_mb:.1f} MB")
            for k in ks:
                base = {"dir": str(d), "k": k, "device": args.device, "threads": args.threads}
                ours = measure({**base, "impl": "ours"})
                prev = measure({**base, "impl": "numpy", "device": "cpu"})
                nq = naive_q or Q
                naive = measure({**base, "impl": "naive", "queries": naive_q})
                scale = Q / nq
                naive_wall, naive_cpu = naive["wall"] * scale, naive["cpu"] * scale
                if naive_q:
                    ours_sub = measure({**base, "impl": "ours", "queries": naive_q})["value"]
                else:
                    ours_sub = ours["value"]
                diff = abs(ours_sub - naive["value"])
                diff_prev = abs(ours["value"] - prev["value"])
                label = "all" if k is None else str(k)
                mem = (f"peak RSS {ours['peak_rss']:.0f} MB ({ours['rss0']:.0f} MB before the call)"
                       + (f", traced NumPy allocations peak {ours['traced_peak']:.1f} MB"
                          if "traced_peak" in ours else "")
                       + (f", GPU peak {ours['gpu_peak']:.0f} MB" if "gpu_peak" in ours else ""))
                print(f"mAP@{label:<4} ours ({ours['engine']}): {ours['wall']:.3f} s wall, {ours['cpu']:.3f} s CPU "
                      f"(load {ours['load']:.1f}; warm-up call before it {ours['warmup']:.2f} s) | {mem}")
                print(f"          previous NumPy path: {prev['wall']:.3f} s wall, {prev['cpu']:.3f} s CPU "
                      f"(load {prev['load']:.1f}) | peak RSS {prev['peak_rss']:.0f} MB | "
                      f"x{prev['cpu'] / ours['cpu']:.1f} CPU, x{prev['wall'] / ours['wall']:.1f} wall for ours | "
                      f"|diff| {diff_prev:.1e}")
                if naive_q:
                    print(f"          naive: {naive['wall']:.2f} s wall, {naive['cpu']:.2f} s CPU "
                          f"on {nq} of {Q} queries "
                          f"-> {naive_wall:.1f} s wall, {naive_cpu:.1f} s CPU extrapolated linearly (x{scale:.1f}) "
                          f"| peak RSS {naive['peak_rss']:.0f} MB for the subset (load {naive['load']:.1f})")
                else:
                    print(f"          naive: {naive_wall:.2f} s wall, {naive_cpu:.2f} s CPU "
                          f"| peak RSS {naive['peak_rss']:.0f} MB (load {naive['load']:.1f})")
                print(f"          speed-up over naive x{naive_wall / ours['wall']:.1f} wall, "
                      f"x{naive_cpu / ours['cpu']:.1f} CPU time | "
                      f"mAP on the same {nq} queries: ours {ours_sub:.12f} naive {naive['value']:.12f} "
                      f"|diff| {diff:.1e} -> {'identical (<= 1e-12)' if diff <= 1e-12 else 'DIFFERENT'}")
                rows.append((name, label, ours, prev, naive_wall, naive_cpu, bool(naive_q), diff, diff_prev))
    print("\n| scale | metric | ours wall s | ours CPU s | NumPy path wall / CPU s | naive wall / CPU s "
          "| speed-up vs naive wall / CPU | vs NumPy path CPU | ours peak RSS MB | load | |diff| naive / NumPy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, label, ours, prev, nw, nc, extrap, diff, diff_prev in rows:
        e = " (extrap.)" if extrap else ""
        print(f"| {name} | mAP@{label} | {ours['wall']:.3f} | {ours['cpu']:.3f} "
              f"| {prev['wall']:.2f} / {prev['cpu']:.2f} "
              f"| {nw:.1f} / {nc:.1f}{e} | x{nw / ours['wall']:.0f} / x{nc / ours['cpu']:.0f} "
              f"| x{prev['cpu'] / ours['cpu']:.1f} | {ours['peak_rss']:.0f} | {ours['load']:.1f} "
              f"| {diff:.0e} / {diff_prev:.0e} |")
    print(f"# load average {os.getloadavg()[0]:.2f} at end (2 shared cores: wall times are noisy; CPU s is steadier)")


if __name__ == "__main__":
    main()
