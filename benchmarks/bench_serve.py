"""Load benchmark of ``python main.py serve``: a bounded number of concurrent HTTP
clients on loopback, for a bounded time, against a run whose index holds ~1M codes;
throughput and p50 / p99 request latency per index kind and batch size, next to the
in-process library call (``runners.retrieval.search``) as the anchor, so the server's
overhead is the difference.

The run is real: DSPH trained one epoch per task on a synthetic 4-task stream whose
databases hold ``--n`` items in all (encoded once, stored, indexed by ``main.py index``).
Queries are the stream's own text queries (task-agnostic, every task's codes).

    python benchmarks/bench_serve.py                       # 1M codes, flat / ivf / hnsw / multihash
    python benchmarks/bench_serve.py --quick               # 100k codes, flat and ivf, 3 s per cell

Each cell: the anchor calls ``search`` back to back in this process for ``--seconds``;
then ``--clients`` threads, each with its own HTTP connection, post the same batches
to the service for ``--seconds``. Latency is per request (one batch). The machine may be
shared: compare the two columns of one row, not figures across machines.
"""
from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import main  # noqa: E402  (fills the registries)
from runners.query_inputs import QueryFeatures  # noqa: E402
from runners.retrieval import open_target, search  # noqa: E402
from runners.serve import set_search_threads  # noqa: E402


def train_run(workdir: Path, n: int, bits: int) -> Path:
    """A DSPH run over a synthetic stream with ``n`` database items in all (reused if there)."""
    from runners.experiment import run_config

    run = workdir / f"run_{n}_{bits}"
    if (run / "checkpoints" / "last.pt").is_file():
        return run
    tasks = 4
    config = {
        "dataset": {"name": "synthetic", "num_classes": 8, "num_tasks": tasks, "image_dim": 64, "text_dim": 64,
                    "query_size": 64, "train_size": 2000, "database_size": n // tasks, "seed": 0},
        "model": {"name": "DSPH", "bits": bits},
        "optimizer": {"name": "adamw", "lr": 1.0e-3},
        "runner": {"name": "continual", "epochs": 1, "batch_size": 256, "seed": 1, "device": "cpu",
                   "tensorboard": False, "progress": False, "topk": 1000},
    }
    run_config(config, run, quiet=True)
    return run


def percentiles(lat: List[float]) -> Dict[str, float]:
    a = np.sort(np.asarray(lat))
    return {"p50": 1e3 * float(np.percentile(a, 50)), "p99": 1e3 * float(np.percentile(a, 99))}


def anchor(target, queries: np.ndarray, batch: int, k: int, seconds: float) -> Dict[str, float]:
    """The library call back to back in this process."""
    lat, done, i = [], 0, 0
    end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < end:
        rows = queries[(np.arange(batch) + i) % len(queries)]
        s = time.perf_counter()
        search(target, QueryFeatures("text", rows), k)
        lat.append(time.perf_counter() - s)
        done += batch
        i += batch
    return {"qps": done / (time.perf_counter() - t0), **percentiles(lat)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(run: Path, index: Path, max_batch: int, threads: int):
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "main.py", "serve", "--run-dir", str(run), "--index", str(index),
                             "--host", "127.0.0.1", "--port", str(port), "--max-batch", str(max_batch),
                             "--threads", str(threads)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("serve did not answer /health within 600 s")


def load(url: str, queries: np.ndarray, batch: int, k: int, clients: int, seconds: float) -> Dict[str, float]:
    """``clients`` threads posting batches for ``seconds``; every answer is checked."""
    import httpx

    lat: List[float] = []
    errors: List[str] = []
    counts = [0] * clients
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            i = c * batch
            while time.perf_counter() < end:
                rows = queries[(np.arange(batch) + i) % len(queries)]
                s = time.perf_counter()
                r = http.post("/search", json={"modality": "text", "features": rows.tolist(), "k": k})
                took = time.perf_counter() - s
                if r.status_code != 200 or len(r.json()["results"]) != batch:
                    errors.append(f"HTTP {r.status_code}: {r.text[:100]}")
                    return
                with lock:
                    lat.append(took)
                counts[c] += batch
                i += batch * clients

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"a request failed: {errors[0]}")
    return {"qps": sum(counts) / (time.perf_counter() - t0), **percentiles(lat)}


def main_() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="database codes in all (default 1M)")
    ap.add_argument("--bits", type=int, default=64, help="code length (default 64)")
    ap.add_argument("--kinds", nargs="+", default=["flat", "ivf", "hnsw", "multihash"], help="index kinds")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64], help="queries per request")
    ap.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients (default 4)")
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds per cell and side (default 8)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1,
                    help="FAISS / torch threads per search, in the anchor and the service (serve --threads)")
    ap.add_argument("--workdir", default="outputs/bench_serve", help="where the run and indexes go")
    ap.add_argument("--quick", action="store_true", help="100k codes, flat and ivf, 3 s per cell")
    args = ap.parse_args()
    if args.quick:
        args.n, args.kinds, args.seconds = 100_000, ["flat", "ivf"], 3.0
    if not 1 <= args.clients <= 64 or not 0 < args.seconds <= 120:
        ap.error("--clients must be 1..64 and --seconds in (0, 120]: the load is bounded")
    workdir = Path(args.workdir)
    t = time.perf_counter()
    run = train_run(workdir, args.n, args.bits)
    set_search_threads(args.threads)
    print(f"run {run} ready in {time.perf_counter() - t:.0f} s", flush=True)
    rows = []
    for kind in args.kinds:
        index = run / f"index_{kind}"
        if not (index / "manifest.json").is_file():
            t = time.perf_counter()
            assert main.main(["index", "--run-dir", str(run), "--kind", kind, "--modalities", "image",
                              "--output", str(index)]) == 0
            print(f"{kind} index built in {time.perf_counter() - t:.0f} s", flush=True)
        target = open_target(run, index, catalog=False)
        from runners.config import build

        stream = build("dataset", target.run.config).load()
        queries = np.concatenate([task.query.text.numpy() for task in stream.tasks]).astype(np.float32)
        del stream
        proc, url = start_service(run, index, max(args.batch), args.threads)
        try:
            for b in args.batch:
                a = anchor(target, queries, b, args.k, args.seconds)
                s = load(url, queries, b, args.k, args.clients, args.seconds)
                rows.append((kind, b, a, s))
                print(f"  {kind:<9} batch {b:>3}: library {a['qps']:9.0f} q/s p50 {a['p50']:7.2f} ms | "
                      f"served {s['qps']:9.0f} q/s p50 {s['p50']:7.2f} ms p99 {s['p99']:7.2f} ms", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"\n{args.n:,} codes of {args.bits} bits, k={args.k}, {args.clients} HTTP clients on loopback, "
          f"{args.seconds:g} s per cell, {args.threads} FAISS thread(s) per search")
    print(f"{'index':<10}{'batch':>6} | {'library q/s':>12}{'p50 ms':>9}{'p99 ms':>9} | {'served q/s':>11}"
          f"{'p50 ms':>9}{'p99 ms':>9} | {'overhead p50 ms':>16}")
    for kind, b, a, s in rows:
        print(f"{kind:<10}{b:>6} | {a['qps']:>12.0f}{a['p50']:>9.2f}{a['p99']:>9.2f} | {s['qps']:>11.0f}"
              f"{s['p50']:>9.2f}{s['p99']:>9.2f} | {s['p50'] - a['p50']:>16.2f}")
    print("library: one caller in process, back to back; served: latency per request under concurrent load, "
          "so its p50 includes queueing behind the other clients")
    return 0


if __name__ == "__main__":
    sys.exit(main_())
