"""CPU time of a whole CASH run: this library against the authors' public CASH code
(github.com/Liuwwhh/CASH), on the same task files, one torch thread each.

The stream is the synthetic ``coco_clip_like_small`` preset (5 tasks, a quarter of the
MS-COCO balanced sizes: 600 train pairs, 150 queries and 1650 database items per task,
80 labels, 512-d CLIP-like features), written once as the nine MATLAB v7.3 files per task
that both loaders read (``dataset.task_mat.write_task_mat``: ``{train,test,database}_{t}_
{image,text,label}.mat``). Each side then runs in a fresh subprocess and its CPU time
(user + system, ``resource.getrusage(RUSAGE_CHILDREN)``, start-up and evaluation
included) is measured:

- ours: ``main.py train --config-file configs/CASH/coco.yaml`` (the authors' defaults)
  with ``dataset.root`` set to the files, ``runner.epochs`` = ``--epochs``,
  ``runner.num_threads`` = 1. Our loader carves its validation split (10 %) from the
  train file, so ours trains on 540 pairs per task (9 steps per epoch) and selects its
  epoch on those 60 held-out pairs.
- the authors': their ``main.py`` with ``--epoch`` = ``--epochs`` and otherwise their
  defaults (16 bits, batch 64, lr 1e-5, share prompts, selection on the test queries),
  through a small adapter in this file that runs their code unmodified on the CPU:
  ``Tensor.cuda`` and ``Module.cuda`` become the identity and ``torch.randn(...,
  device="cuda")`` draws on the CPU (their code calls ``.cuda()`` everywhere and has no
  CPU path), and ``torch.set_num_threads(1)``. They train on all
  600 train pairs of the file (10 steps per epoch: their loop draws a random batch for
  every batch of a DataLoader over the train split) and, every epoch, encode the 150
  queries and the 1650 database items of the task and score them.

The authors' code is not part of this project. ``--authors`` names a copy of their
repository: a checkout (a folder with their ``main.py``) or a bare git directory, whose
``HEAD`` is unpacked into a temporary folder with ``git archive``; nothing of it is
copied into the project. Their code needs h5py and tqdm (both dependencies here).

Sides alternate (``--repeats`` rounds, authors first in odd rounds) so that both see
the same machine load; the load average is printed before and after. On a shared
machine compare the ratio, not the seconds.

    python benchmarks/bench_vs_authors.py --authors /path/to/CASH             # 3 epochs per task
    python benchmarks/bench_vs_authors.py --authors /path/to/CASH --repeats 2 --epochs 3
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import resource
import runpy
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
PRESET = "coco_clip_like_small"
CONFIG = ROOT / "configs" / "CASH" / "coco.yaml"


# ====================================================================== the authors' side
def run_authors(src: Path, data: Path, out: Path, epochs: int, threads: int) -> None:
    """Run the authors' ``main.py`` from ``src`` in this process, on the CPU."""
    import torch

    torch.set_num_threads(threads)
    # Their code moves every tensor and module with .cuda(), draws each new prompt with
    # torch.randn(..., device="cuda") and has no device option: all of it stays on the CPU.
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    randn = torch.randn

    def randn_on_cpu(*size, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return randn(*size, **kwargs)

    torch.randn = randn_on_cpu
    sys.path.insert(0, str(src))
    os.chdir(out)
    sys.argv = [str(src / "main.py"), "--data_path", str(data) + "/", "--dataset_name", "MSCOCO",
                "--output_dir", str(out) + "/", "--epoch", str(epochs), "--runid", "bench"]
    runpy.run_path(str(src / "main.py"), run_name="__main__")


def authors_scores(out: Path) -> Dict[str, float]:
    """Mean mAP@1000 over the tasks after the last one, from the authors' CSV (rows =
    after task t, columns 0..T-1 = task j)."""
    files = sorted((out / "csv_result" / "bench").glob("*.csv"))
    if not files:
        return {}
    rows: Dict[str, List[List[float]]] = {}
    key = None
    for line in files[0].read_text().splitlines():
        if line.strip() in ("I2T", "T2I"):
            key = line.strip()
            rows[key] = []
        elif key and line.strip():
            rows[key].append([float(v) for v in next(csv.reader([line]))])
    out_scores = {}
    for key, name in (("I2T", "i2t"), ("T2I", "t2i")):
        last = rows.get(key, [])
        if last:
            t = len(last)
            out_scores[name] = sum(last[-1][:t]) / t
    return out_scores


# ====================================================================== our side
def our_command(data: Path, out: Path, epochs: int, threads: int) -> List[str]:
    return [sys.executable, str(ROOT / "main.py"), "train", "--config-file", str(CONFIG), "--output-dir", str(out),
            "--quiet", "--set", f"dataset.root={data}", f"runner.epochs={epochs}", f"runner.num_threads={threads}",
            "runner.device=cpu"]


def our_scores(out: Path) -> Dict[str, float]:
    path = out / "results.json"
    if not path.is_file():
        return {}
    res = json.loads(path.read_text())
    scores = {}
    for d in ("i2t", "t2i"):
        last = [v for v in res["map"][d][-1] if v is not None]
        scores[d] = sum(last) / len(last)
    return scores


# ====================================================================== driver
def fail(message: str) -> None:
    """A one-line refusal, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def unpack_authors(path: Path, into: Path) -> Path:
    """A folder with the authors' ``main.py``: ``path`` itself, or ``HEAD`` of the git
    directory ``path`` unpacked under ``into``."""
    if (path / "main.py").is_file():
        return path
    try:
        data = subprocess.run(["git", "--git-dir", str(path), "archive", "--format=tar", "HEAD"],
                              check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = (getattr(exc, "stderr", b"") or b"").decode(errors="replace").strip().splitlines()
        fail(f"--authors {path}: neither a folder with the authors' main.py nor a git directory "
             f"({detail[0] if detail else exc})")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    if not (into / "main.py").is_file():
        fail(f"--authors {path}: HEAD has no main.py (expected the CASH repository)")
    return into


def write_files(folder: Path, seed: int) -> Dict[str, int]:
    sys.path.insert(0, str(ROOT))
    from dataset.synthetic import SyntheticDataset
    from dataset.task_mat import write_task_mat

    stream = SyntheticDataset(preset=PRESET, seed=seed, val_size=0).load()
    write_task_mat(stream, folder, scheme="coco")
    first = stream.tasks[0]
    return {"tasks": len(stream), "train": len(first.train), "query": len(first.query),
            "database": len(first.database)}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(label: str, cmd: List[str], log: Path, env: Dict[str, str], cwd: Path) -> Dict[str, float]:
    """CPU (user + system) and wall seconds of the subprocess ``cmd``; output to ``log``."""
    cpu0, t0 = children_cpu(), time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(cwd))
    wall, cpu = time.perf_counter() - t0, children_cpu() - cpu0
    if proc.returncode:
        tail = log.read_text(errors="replace").strip().splitlines()[-6:]
        raise SystemExit(f"error: the {label} run failed (exit {proc.returncode}); its last lines:\n  "
                         + "\n  ".join(tail))
    return {"cpu": cpu, "wall": wall}


def load() -> float:
    return os.getloadavg()[0]


def run_driver(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench_vs_authors_"))
    try:
        src = unpack_authors(Path(args.authors).expanduser().resolve(), tmp / "authors_src")
        data = tmp / "data" / "MSCOCO"  # the authors' loader reads <data_path>/<dataset_name>/
        sizes = write_files(data, args.seed)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   PYTHONPATH="", PYTHONHASHSEED="0")
        runs: Dict[str, List[Dict[str, float]]] = {"authors": [], "ours": []}
        scores: Dict[str, Dict[str, float]] = {}
        loads = [load()]
        for r in range(args.repeats):
            order = ("authors", "ours") if r % 2 == 0 else ("ours", "authors")
            for side in order:
                out = tmp / f"{side}_{r}"
                out.mkdir()
                if side == "authors":
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--authors", str(src),
                           "--data", str(data.parent), "--out", str(out), "--epochs", str(args.epochs),
                           "--threads", str(args.threads)]
                    runs[side].append(timed("authors'", cmd, tmp / f"{side}_{r}.log", env, out))
                    scores[side] = authors_scores(out)
                else:
                    runs[side].append(timed("ccmh", our_command(data, out / "run", args.epochs, args.threads),
                                            tmp / f"{side}_{r}.log", env, ROOT))
                    scores[side] = our_scores(out / "run")
                print(f"round {r + 1} {side}: {runs[side][-1]['cpu']:.1f} s CPU, {runs[side][-1]['wall']:.1f} s wall, "
                      f"load {load():.2f}", file=sys.stderr, flush=True)
                loads.append(load())
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"CASH, {sizes['tasks']} tasks of {PRESET} (train {sizes['train']} / query {sizes['query']} / database "
          f"{sizes['database']} per task), {args.epochs} epochs per task, {args.threads} thread(s), "
          f"{args.repeats} round(s); load average {min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} cores")
    print("| code | CPU s per run | wall s per run | mean mAP@1000 after the last task (i2t / t2i) |")
    print("|---|---|---|---|")
    for side, label in (("authors", "authors' CASH (Liuwwhh/CASH)"), ("ours", "ccmh CASH, configs/CASH/coco.yaml")):
        cpu = ", ".join(f"{x['cpu']:.1f}" for x in runs[side])
        wall = ", ".join(f"{x['wall']:.1f}" for x in runs[side])
        sc = scores.get(side) or {}
        shown = " / ".join(f"{sc[d]:.3f}" for d in ("i2t", "t2i") if d in sc) or "-"
        print(f"| {label} | {cpu} | {wall} | {shown} |")
    ratios = [o["cpu"] / a["cpu"] for o, a in zip(runs["ours"], runs["authors"])]
    print("ours / authors CPU per round: " + ", ".join(f"{x:.2f}" for x in ratios))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authors", required=True,
                        help="the authors' CASH repository: a checkout or a bare git directory (HEAD is used)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per task for both (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both (default 1)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds, sides alternating (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic stream (default 0)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (files, logs, outputs)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.threads < 1 or args.repeats < 1:
        parser.error("--epochs, --threads and --repeats must be >= 1")
    if not args.worker and not Path(args.authors).expanduser().is_dir():
        parser.error(f"--authors {args.authors}: no such folder (give a checkout or a bare git copy of the "
                     "authors' CASH repository)")
    return args


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.worker:
        run_authors(Path(ARGS.authors), Path(ARGS.data), Path(ARGS.out), ARGS.epochs, ARGS.threads)
    else:
        run_driver(ARGS)
