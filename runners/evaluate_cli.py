"""``python main.py evaluate``: re-score a finished run from its checkpoint and stored
codes with any metric of ``common.calc_utils``, without retraining.

Queries are re-encoded by the checkpointed model (task known: each task's queries as
that task; plus the task-agnostic union); database codes are the stored ones, never
re-encoded, exactly as in training-time evaluation.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List

from common.calc_utils import calc_map_k, calc_pr_curve, calc_precision_at_n
from runners.evaluation import direction_inputs, encode_codes
from runners.experiment import load_run
from runners.config import build
from utils.errors import UserError
from utils.io import atomic_write_json
from utils.seed import resolve_device


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, metavar="DIR", help="an output directory written by 'train'")
    parser.add_argument("--task", type=int, metavar="T",
                        help="evaluate the model and codes as they were after task T (1-based; default: the last)")
    parser.add_argument("--topk", metavar="K|all",
                        help="standard mAP@K, or 'all' for mAP@all (default: the metric the run was trained with, "
                             "its runner.topk)")
    parser.add_argument("--ties", choices=("index", "average"), default="index",
                        help="tie order inside equal Hamming distances: ascending database index (default) or the "
                             "tie-aware expectation over all orders")
    parser.add_argument("--precision-at", type=int, nargs="+", action="extend", default=[], metavar="N",
                        help="also report precision@N for these N")
    parser.add_argument("--pr-curve", action="store_true", help="also report precision / recall by Hamming radius")
    parser.add_argument("--output", metavar="FILE.json", help="write the figures to this JSON file (atomically)")
    parser.add_argument("--device", default="cpu", help="device to encode queries on (cpu, cuda, cuda:N, auto)")


def _fig(v: float) -> str:
    """As the run's log prints it: rounded to 6 decimals as in results.json, shown with 4."""
    return f"{round(v, 6):.4f}"


def report_lines(method: str, task: int, metric: str, ties: str, report: Dict[str, Any]) -> List[str]:
    """The console summary of an evaluation report: mAP per task and task-agnostic, and
    precision@N and the PR curve per task and for the task-agnostic queries when asked."""
    lines = [f"{method} after task {task}: {metric} (ties: {ties})"]
    rows = [(f"task {j + 1}", r) for j, r in enumerate(report["per_task"])] + [("agnostic", report["task_agnostic"])]
    for d in ("i2t", "t2i"):
        lines.append(f"{d}: " + "  ".join(f"{name} {_fig(r[d]['map'])}" for name, r in rows))
        for name, r in rows:
            if "precision_at" in r[d]:
                lines.append(f"  {name} precision@N: " + ", ".join(f"@{n} {_fig(v)}" for n, v in r[d]["precision_at"].items()))
            if "pr_curve" in r[d]:
                pr = r[d]["pr_curve"]
                lines.append(f"  {name} precision / recall by Hamming radius: " + ", ".join(
                    f"r{int(rad)} {p:.3f}/{rc:.3f}" for rad, p, rc in zip(pr["radius"], pr["precision"], pr["recall"])))
    return lines


def score_queries(codes, labels, entries, args) -> Dict[str, Any]:
    """Every requested figure, per direction, for one query set against ``entries``."""
    result: Dict[str, Any] = {}
    for direction, (q, db, dl) in direction_inputs(codes, entries).items():
        figs: Dict[str, Any] = {"map": float(calc_map_k(q, db, labels.cpu(), dl, k=args.topk, ties=args.ties))}
        if args.precision_at:
            p = calc_precision_at_n(q, db, labels.cpu(), dl, ns=args.precision_at, ties=args.ties)
            figs["precision_at"] = {str(n): float(v) for n, v in p.items()}
        if args.pr_curve:
            pr = calc_pr_curve(q, db, labels.cpu(), dl)
            figs["pr_curve"] = {k: [float(x) for x in pr[k]] for k in ("radius", "precision", "recall")}
        result[direction] = figs
    return result


def _topk(value: Any, run_topk: Any) -> Any:
    """``--topk``: None = the run's own metric, ``all`` = mAP@all, else a positive K."""
    if value is None:
        return run_topk
    if str(value).strip().lower() == "all":
        return None
    try:
        k = int(value)
    except ValueError:
        raise UserError(f"--topk: expected a positive integer or 'all', got {value!r}") from None
    if k < 1:
        raise UserError(f"--topk: must be >= 1 (or 'all' for mAP@all), got {k}")
    return k


def run_evaluate(args: argparse.Namespace) -> int:
    _topk(args.topk, None)  # a bad value is refused before anything is read
    if any(n < 1 for n in args.precision_at):
        raise UserError(f"--precision-at: every N must be >= 1, got {min(args.precision_at)}")
    device = resolve_device(args.device, key="--device")  # before reading anything: one line if absent
    run = load_run(args.run_dir, task=args.task, device=str(device))
    args.topk = _topk(args.topk, run.config["runner"].get("topk"))
    stream = build("dataset", run.config).load()
    metric = "mAP@all" if args.topk is None else f"mAP@{args.topk}"
    report: Dict[str, Any] = {
        "run_dir": str(Path(args.run_dir)), "after_task": run.task, "metric": metric, "ties": args.ties,
        "bits": run.store.bits(), "per_task": [], "task_agnostic": None,
    }
    joint = run.results.mode == "joint"
    for j in range(run.task):
        query = stream.tasks[j].query.to(device)
        codes = encode_codes(run.model, query, 0 if joint else j)
        report["per_task"].append(score_queries(codes, query.labels, run.store.entries([j]), args))
    queries = [stream.tasks[j].query.to(device) for j in range(run.task)]
    from dataset.feature_set import FeatureSet

    allq = FeatureSet.concat(queries)
    codes = encode_codes(run.model, allq, None)
    report["task_agnostic"] = score_queries(codes, allq.labels, run.store.entries(), args)
    print("\n".join(report_lines(run.config["model"]["name"], run.task, metric, args.ties, report)))
    if args.output:
        atomic_write_json(args.output, report)
        print(f"written: {args.output}")
    return 0
