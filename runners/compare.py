"""Side-by-side comparison: run several configs (or reuse finished runs) and write one
table and a few plots.

``python main.py compare --config-file A.yaml B.yaml ... [--output-dir D] [--set k=v ...]
[--reuse]`` runs every config into ``D/runs/<METHOD>_<config name>/`` through
``run_config`` (the same code path as ``train``) and writes, in ``D``:

* ``comparison.md`` / ``comparison.csv``: per run the method, dataset, final code
  length, the final row of the result matrices (mAP of every task after the last
  one), ACC, BWT and forgetting per direction, the task-agnostic mAP after the last
  task, and training seconds;
* ``heatmap_<run>_<direction>.png``: each result matrix R[t, j];
* ``final_row.png``: mAP per task after the last task, grouped bars per method;
* ``code_length.png`` (when a run reports ``bit_scalable``, e.g. SCAHN): mAP of all
  queries against all stored codes versus code length; other runs appear as one
  point at their own length.

``--reuse`` keeps a run whose ``results.json`` says finished and whose stored config
equals the requested one (display-only keys aside); an unfinished run with the same
config is resumed; anything else is run again. A run folder that already holds a run
and is not reused or resumed is refused, before anything runs, unless ``--overwrite``
(the old run is then kept until the new one has finished).
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from runners.outputs import without_display_keys
from runners.run_guard import run_status
from utils.errors import DataError, OutputError, UserError
from utils.io import atomic_write_bytes, atomic_write_text

DIRECTIONS = (("i2t", "image -> text"), ("t2i", "text -> image"))
CSV_FIELDS = [
    "method", "config", "dataset", "metric", "mode", "tasks", "bits",
    "final_row_i2t", "final_row_t2i", "acc_i2t", "acc_t2i", "bwt_i2t", "bwt_t2i",
    "forgetting_i2t", "forgetting_t2i", "agnostic_i2t", "agnostic_t2i",
    "train_seconds", "eval_seconds", "run_dir", "reused",
]


@dataclass
class ComparedRun:
    """One config of the comparison, with its results."""

    label: str
    slug: str
    config_file: str
    run_dir: Path
    results: Dict[str, Any]
    reused: bool


# ====================================================================== command line
def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-file", dest="config_files", nargs="+", action="extend", required=True,
                        metavar="FILE",
                        help="two or more YAML configs to run side by side, e.g. configs/DSPH/demo.yaml "
                             "configs/DCMHT/demo.yaml (a second --config-file adds to the list)")
    parser.add_argument("--output-dir", default="outputs/compare", metavar="DIR",
                        help="where comparison.md, comparison.csv, the PNG plots and runs/<METHOD>_<config>/ go "
                             "(default: outputs/compare)")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override keys in every config, e.g. --set runner.epochs=5 runner.seed=2")
    parser.add_argument("--reuse", action="store_true",
                        help="keep runs in DIR/runs/ whose results.json is finished and whose config equals the "
                             "requested one; resume unfinished ones with the same config; run the rest")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace runs in DIR/runs/ that are not reused (each old run is kept until its "
                             "new one has finished); without it such a run is refused before anything runs")
    parser.add_argument("--quiet", action="store_true", help="no log lines from the runs on the console")


def run_compare(args: argparse.Namespace) -> int:
    """Run or reuse every config, then write the table and the plots; returns 0."""
    from utils.config import load_config

    files = list(getattr(args, "config_files", None) or getattr(args, "config_file", None) or [])
    if not files:
        raise DataError("compare: give at least one --config-file")
    if not str(args.output_dir).strip():
        raise UserError("--output-dir: empty; give a directory, or leave the flag out for outputs/compare")
    out = Path(args.output_dir)
    # Every config is read and validated before anything runs.
    configs = [(str(f), load_config(f, list(args.overrides or []))) for f in files]
    quiet = bool(getattr(args, "quiet", False))
    if quiet:  # as `train --quiet`: no progress bars either (runner.progress is neutral for --reuse)
        for _, config in configs:
            config["runner"]["progress"] = False
    names = run_names([(f, c) for f, c in configs])
    plans = [plan_run(out / "runs" / name, config, args.reuse, getattr(args, "overwrite", False))
             for (_, config), name in zip(configs, names)]
    runs: List[ComparedRun] = []
    for (path, config), name, action in zip(configs, names, plans):
        run_dir = out / "runs" / name
        if action == "reuse":
            print(f"compare: reusing {run_dir} ({path})")
            results = load_results(run_dir)
        else:
            from runners.experiment import run_config

            print(f"compare: {'resuming' if action == 'resume' else 'running'} {path} -> {run_dir}")
            results = run_config(config, run_dir, resume=action == "resume", quiet=quiet,
                                 overwrite=action == "overwrite")
        runs.append(ComparedRun("", name, path, run_dir, results, action == "reuse"))
    assign_labels(runs)
    write_comparison(out, runs)
    print(format_table(runs))
    print(f"\ncomparison: {out / 'comparison.md'}")
    return 0


def run_names(configs: Sequence[Tuple[str, Dict[str, Any]]]) -> List[str]:
    """``<model name>_<config file stem>``, made unique with ``_2``, ``_3`` ..."""
    names: List[str] = []
    for path, config in configs:
        base = _slug(f"{config['model']['name']}_{Path(path).stem}")
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def assign_labels(runs: List[ComparedRun]) -> None:
    """The method name (+ `` joint`` for joint training); repeated labels get the run name."""
    for run in runs:
        r = run.results
        run.label = f"{r.get('method') or '?'}" + (" joint" if r.get("mode") == "joint" else "")
    counts: Dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run in runs:
        if counts[run.label] > 1:
            run.label = f"{run.label} ({run.slug})"


# ====================================================================== reuse
def plan_run(run_dir: Path, config: Dict[str, Any], reuse: bool, overwrite: bool) -> str:
    """``reuse``, ``resume``, ``run`` (nothing there) or ``overwrite``; a folder holding
    a run that is neither reused nor resumed is an OutputError unless ``overwrite``."""
    if reuse:
        status = reusable(run_dir, config)
        if status == "finished":
            return "reuse"
        if status == "unfinished":
            return "resume"
    held = run_status(run_dir) if run_dir.is_dir() else "empty"
    if held == "empty":
        return "run"
    if overwrite:
        return "overwrite"
    why = " with another config" if reuse else ""
    raise OutputError(f"{run_dir}: holds a{'n unfinished' if held == 'unfinished' else ' finished'} run{why}; "
                      "use --overwrite to replace it" + ("" if reuse else ", or --reuse to keep it"))


def stored_config(run_dir: Path, results: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """The resolved config a run was made with: ``results.json``'s ``config`` when the
    runner stored it there, else the run's ``config.yaml``."""
    if results and isinstance(results.get("config"), dict):
        return results["config"]
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def load_results(run_dir: Path) -> Dict[str, Any]:
    path = run_dir / "results.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no results.json (run it without --reuse)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable results file ({exc})") from None
    if not isinstance(data, dict) or "map" not in data:
        raise DataError(f"{path}: not a results file written by the runner (no 'map' key)")
    return data


def reusable(run_dir: Path, config: Dict[str, Any]) -> str:
    """``finished`` (reuse), ``unfinished`` (resume) or ``no`` (run again)."""
    path = run_dir / "results.json"
    if not path.is_file():
        return "no"
    try:
        results = load_results(run_dir)
    except DataError:
        return "no"
    stored = stored_config(run_dir, results)
    if stored is None or without_display_keys(stored) != without_display_keys(config):
        return "no"
    if results.get("status") == "finished" and results.get("completed_tasks", results.get("tasks")) == results.get("tasks"):
        return "finished"
    return "unfinished"


# ====================================================================== table
def _final_row(results: Dict[str, Any], direction: str) -> List[Optional[float]]:
    done = int(results.get("completed_tasks", results["tasks"]))
    if done < 1:
        return []
    return list(results["map"][direction][done - 1][:done])


def _summary(results: Dict[str, Any], direction: str, key: str) -> Optional[float]:
    value = (results.get("summary") or {}).get(direction, {}).get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _agnostic(results: Dict[str, Any], direction: str) -> Optional[float]:
    col = (results.get("task_agnostic") or {}).get(direction) or []
    return float(col[-1]) if col else None


def row_of(run: ComparedRun) -> Dict[str, Any]:
    """One CSV / table row (numbers unrounded; None where undefined)."""
    r = run.results
    timing = r.get("timing") or {}
    bits = r.get("bits") or []
    return {
        "method": run.label,
        "config": run.config_file,
        "dataset": r.get("dataset"),
        "metric": r.get("metric"),
        "mode": r.get("mode", "continual"),
        "tasks": r.get("tasks"),
        "bits": bits[-1] if bits else None,
        "final_row_i2t": _final_row(r, "i2t"),
        "final_row_t2i": _final_row(r, "t2i"),
        "acc_i2t": _summary(r, "i2t", "acc"),
        "acc_t2i": _summary(r, "t2i", "acc"),
        "bwt_i2t": _summary(r, "i2t", "bwt"),
        "bwt_t2i": _summary(r, "t2i", "bwt"),
        "forgetting_i2t": _summary(r, "i2t", "forgetting"),
        "forgetting_t2i": _summary(r, "t2i", "forgetting"),
        "agnostic_i2t": _agnostic(r, "i2t"),
        "agnostic_t2i": _agnostic(r, "t2i"),
        "train_seconds": timing.get("train_seconds"),
        "eval_seconds": timing.get("eval_seconds"),
        "run_dir": str(run.run_dir),
        "reused": run.reused,
    }


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, list):
        return " ".join(_fmt(x, digits) for x in v)
    return str(v)


def comparison_csv(runs: Sequence[ComparedRun]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for run in runs:
        row = row_of(run)
        writer.writerow({k: ("" if row[k] is None else (" ".join("" if x is None else f"{x:.6f}" for x in row[k])
                                                         if isinstance(row[k], list) else
                                                         (f"{row[k]:.6f}" if isinstance(row[k], float) else row[k])))
                         for k in CSV_FIELDS})
    return buf.getvalue()


TABLE_COLUMNS = [
    ("method", "method"), ("dataset", "dataset"), ("bits", "bits"),
    ("final_row_i2t", "final row i2t"), ("final_row_t2i", "final row t2i"),
    ("acc_i2t", "ACC i2t"), ("acc_t2i", "ACC t2i"), ("bwt_i2t", "BWT i2t"), ("bwt_t2i", "BWT t2i"),
    ("forgetting_i2t", "forget i2t"), ("forgetting_t2i", "forget t2i"),
    ("agnostic_i2t", "agnostic i2t"), ("agnostic_t2i", "agnostic t2i"), ("train_seconds", "train s"),
]


def format_table(runs: Sequence[ComparedRun]) -> str:
    """The comparison as a markdown table (also printed on the console)."""
    lines = ["| " + " | ".join(h for _, h in TABLE_COLUMNS) + " |",
             "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    for run in runs:
        row = row_of(run)
        cells = [_fmt(row[k], 1 if k == "train_seconds" else 4) for k, _ in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_markdown(runs: Sequence[ComparedRun], figures: Dict[str, List[str]]) -> str:
    metrics = sorted({str(r.results.get("metric")) for r in runs})
    lines = ["# Comparison", ""]
    lines.append(f"Metric: {', '.join(metrics)}" + (" (runs differ in metric: do not compare across them)"
                                                    if len(metrics) > 1 else "") + ". "
                 "`final row` = mAP of every task after training the last one; ACC = its mean; "
                 "BWT and forgetting average over the first T - 1 tasks; `agnostic` = all queries "
                 "against all stored codes after the last task.")
    lines += ["", format_table(runs), "", "Runs:", ""]
    for run in runs:
        lines.append(f"- {run.label}: `{run.config_file}` -> `{run.run_dir}`" + (" (reused)" if run.reused else ""))
    if figures.get("heatmaps"):
        lines += ["", "## Result matrices (row = after task t, column = task evaluated)", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in figures["heatmaps"]]
    if figures.get("final_row"):
        lines += ["", "## mAP per task after the last task", ""] + [f"![final row]({p})" for p in figures["final_row"]]
    if figures.get("code_length"):
        lines += ["", "## mAP versus code length", "",
                  "Lines: the most significant bits of one model's codes (bit-scalable runs); "
                  "points: other runs at their own code length (task-agnostic mAP).", ""]
        lines += [f"![code length]({p})" for p in figures["code_length"]]
    return "\n".join(lines) + "\n"


def write_comparison(out: Path, runs: Sequence[ComparedRun]) -> Dict[str, List[str]]:
    """Write comparison.csv, the plots and comparison.md into ``out``; returns the
    figure file names written, by kind."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "comparison.csv", comparison_csv(runs))
    figures = write_plots(out, runs)
    atomic_write_text(out / "comparison.md", comparison_markdown(runs, figures))
    return figures


# ====================================================================== plots
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())


def _matrix(results: Dict[str, Any], direction: str):
    import numpy as np

    T = int(results["tasks"])
    done = int(results.get("completed_tasks", T))
    M = np.full((done, T), np.nan)
    for t in range(done):
        for j, v in enumerate(results["map"][direction][t]):
            if v is not None:
                M[t, j] = float(v)
    return M


def write_plots(out: Path, runs: Sequence[ComparedRun]) -> Dict[str, List[str]]:
    """Heatmaps, grouped final-row bars and (when available) mAP vs code length, drawn
    with matplotlib's Agg canvas (no display, no global backend switch)."""
    from matplotlib.figure import Figure

    colour = {id(run): f"C{i % 10}" for i, run in enumerate(runs)}   # one colour per run in every plot
    figures: Dict[str, List[str]] = {"heatmaps": [], "final_row": [], "code_length": []}
    for run in runs:
        for d, title in DIRECTIONS:
            M = _matrix(run.results, d)
            if M.size == 0:
                continue
            T = M.shape[1]
            fig = Figure(figsize=(1.2 + 0.75 * T, 0.9 + 0.65 * M.shape[0]))
            ax = fig.add_subplot()
            im = ax.imshow(M, vmin=0.0, vmax=1.0, cmap="viridis")
            for t in range(M.shape[0]):
                for j in range(T):
                    if not math.isnan(M[t, j]):
                        ax.text(j, t, f"{M[t, j]:.2f}", ha="center", va="center", fontsize=8,
                                color="black" if M[t, j] > 0.6 else "white")
            ax.set_xticks(range(T), [str(j + 1) for j in range(T)])
            ax.set_yticks(range(M.shape[0]), [str(t + 1) for t in range(M.shape[0])])
            ax.set_xlabel("task evaluated")
            ax.set_ylabel("after training task")
            ax.set_title(f"{run.label}: {title}", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            name = f"heatmap_{run.slug}_{d}.png"
            _save(fig, out / name)
            figures["heatmaps"].append(name)

    # grouped bars: one panel per dataset and direction
    datasets: Dict[str, List[ComparedRun]] = {}
    for run in runs:
        datasets.setdefault(str(run.results.get("dataset")), []).append(run)
    fig = Figure(figsize=(11, 3.2 * len(datasets)))
    axes = fig.subplots(len(datasets), 2, squeeze=False)
    for row, (dataset, group) in enumerate(datasets.items()):
        for col, (d, title) in enumerate(DIRECTIONS):
            ax = axes[row][col]
            T = max(len(_final_row(r.results, d)) for r in group)
            width = 0.8 / max(1, len(group))
            for k, run in enumerate(group):
                vals = [float("nan") if v is None else v for v in _final_row(run.results, d)]
                xs = [j + (k - (len(group) - 1) / 2) * width for j in range(len(vals))]
                ax.bar(xs, vals, width=width, label=run.label, color=colour[id(run)])
            ax.set_xticks(range(T), [f"task {j + 1}" for j in range(T)])
            ax.set_ylim(0, 1)
            ax.set_ylabel("mAP")
            ax.set_title(f"{dataset}: {title}, after the last task", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    _save(fig, out / "final_row.png")
    figures["final_row"].append("final_row.png")

    scalable = [r for r in runs if r.results.get("bit_scalable")]
    if scalable:
        fig = Figure(figsize=(10, 3.4))
        axes = fig.subplots(1, 2, squeeze=False)[0]
        for ax, (d, title) in zip(axes, DIRECTIONS):
            for run in runs:
                bs = run.results.get("bit_scalable")
                if bs:
                    pts = sorted((int(b), float(v[d])) for b, v in bs.items())
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=run.label, color=colour[id(run)])
                else:
                    agn, bits = _agnostic(run.results, d), run.results.get("bits") or []
                    if agn is not None and bits:
                        ax.scatter([bits[-1]], [agn], marker="s", label=run.label, color=colour[id(run)])
            ax.set_xscale("log", base=2)
            ticks = sorted({int(b) for r in runs for b in (r.results.get("bit_scalable") or {})}
                           | {int(r.results["bits"][-1]) for r in runs if r.results.get("bits")})
            ax.set_xticks(ticks, [str(b) for b in ticks])
            ax.minorticks_off()
            ax.set_xlabel("code length (bits)")
            ax.set_ylabel("mAP, all queries vs all stored codes")
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        _save(fig, out / "code_length.png")
        figures["code_length"].append("code_length.png")
    return figures
