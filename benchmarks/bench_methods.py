"""Wall time of a 5-task continual run per method on a synthetic stream with the MS-COCO
balanced split sizes of the CASH / PBEH protocol (query 600, train ~2.4k, database ~6.7k
per task, 80 labels, 512-d features).

Each method runs with the model, optimiser and batch size of its ``configs/<METHOD>/coco.yaml``
(the authors' defaults; ``demo.yaml`` where no coco config exists) for ``--epochs``
epochs per task, and the script prints measured train and evaluation seconds plus the
train time projected to the config's own epoch count (linear in epochs).

    python benchmarks/bench_methods.py                    # all six methods, 1 epoch per task
    python benchmarks/bench_methods.py --methods CASH DSPH --epochs 2
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import main  # noqa: E402,F401  (fills the registries)
from runners.experiment import run_config  # noqa: E402
from runners.config import load_config  # noqa: E402

METHODS = ("CASH", "PBEH", "CAGMH", "SCAHN", "DCMHT", "DSPH")


def config_for(method: str) -> tuple:
    for name in ("coco.yaml", "demo.yaml"):
        path = ROOT / "configs" / method / name
        if path.is_file():
            return path, load_config(path)
    raise SystemExit(f"no config for {method} in configs/{method}/")


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--epochs", type=int, default=1, help="epochs per task actually run (default 1)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the COCO balanced sizes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    rows = []
    for method in args.methods:
        path, cfg = config_for(method)
        cfg = copy.deepcopy(cfg)
        full_epochs = int(cfg["runner"].get("epochs", 20))
        cfg["dataset"] = {"name": "synthetic", "preset": "coco_balanced", "scale": args.scale, "seed": 0}
        cfg["runner"].update(epochs=args.epochs, device=args.device, tensorboard=False, progress=False,
                             forward_transfer=False, num_threads=args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = run_config(cfg, Path(tmp) / method, quiet=True)
            wall = time.perf_counter() - t0
        train, evals = res.timing["train_seconds"], res.timing["eval_seconds"]
        rows.append((method, path.relative_to(ROOT), res.bits[-1], cfg["runner"]["batch_size"], wall, train, evals,
                     train / args.epochs * full_epochs, full_epochs, res.figure("i2t", "acc")))
        print(f"{method}: wall {wall:.1f}s (train {train:.1f}s, eval {evals:.1f}s)", flush=True)

    print(f"\n5 tasks, synthetic coco_balanced x{args.scale}, {args.epochs} epoch(s) per task, device {args.device}")
    print("| method | config | bits | batch | wall s | train s | eval s | train s projected to config epochs | "
          "ACC i2t after these epochs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m, p, b, bs, wall, train, ev, proj, ep, acc in rows:
        print(f"| {m} | {p} | {b} | {bs} | {wall:.1f} | {train:.1f} | {ev:.1f} | {proj:.0f} ({ep} epochs) | {acc:.3f} |")


if __name__ == "__main__":
    main_()
