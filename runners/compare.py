"""Side-by-side comparison: run several configs over one or more seeds (or reuse finished
runs) and write tables of mean +/- std, paired differences and plots.

``python main.py compare --config-file A.yaml B.yaml ... [--seeds 1 2 3] [--jobs N]
[--reference A] [--output-dir D] [--set k=v ...] [--reuse]`` runs every config (once
per seed, ``runner.seed`` set to it) into ``D/runs/<METHOD>_<config name>/[seed_<s>/]``
through the same code path as ``train`` and writes, in ``D``:

* ``comparison.md``: the summary table (ACC, BWT, forgetting, FWT, average incremental
  mAP, task-agnostic mAP per direction, training seconds; mean +/- sample std over
  seeds), mAP per task after the last task, and, with two or more seeds, each config's
  paired difference to the reference config with a 95 % t interval;
* ``comparison.csv`` (one row per config: every figure's mean and ``_std``),
  ``runs.csv`` (one row per config and seed) and ``paired.csv``;
* PNG plots (``runners/compare_plots.py``): all result matrices side by side, A_t over
  the tasks with seed bands, the final row, training curves, precision / recall by
  Hamming radius, precision@N, and mAP versus code length where a run reports
  bit-scalable figures; PNGs an earlier comparison in ``D`` drew and this one does not
  are removed.

Runs are independent processes' worth of state: each starts from the same RNGs, so a
config gives the same numbers alone and in any order. With ``--jobs N`` the N worker
processes share the cores: each gets ``max(1, T // N)`` of the parent's T torch threads
(``worker_threads``) unless its config sets ``runner.num_threads``. A config that sets
``runner.num_threads`` therefore gives the same numbers with any ``--jobs``; one that
does not may differ in float rounding, since its thread count differs.

``--reuse`` keeps a run whose ``results.json`` says finished and whose stored config
equals the requested one (display-only keys aside); an unfinished run with the same
config is resumed; anything else is run again.
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from runners.outputs import without_display_keys
from runners.results import RunResults
from runners.run_guard import run_status
from runners.seed_stats import PairedDifference, Spread, paired_difference, spread
from utils.errors import DataError, OutputError, UserError
from utils.io import atomic_write_text

DIRECTIONS = (("i2t", "image -> text"), ("t2i", "text -> image"))
SUMMARY_KEYS = ("acc", "avg_incremental", "bwt", "forgetting", "fwt")


@dataclass
class ComparedRun:
    """One config at one seed, with its results."""

    label: str
    slug: str
    config_file: str
    run_dir: Path
    results: RunResults
    reused: bool
    seed: Optional[int] = None


@dataclass
class ComparedConfig:
    """One config of the comparison and its runs, one per seed."""

    label: str
    slug: str
    config_file: str
    runs: List[ComparedRun] = field(default_factory=list)

    @property
    def first(self) -> RunResults:
        return self.runs[0].results

    def values(self, figure: str) -> Dict[int, Optional[float]]:
        """``figure`` of every run, by seed."""
        return {run.seed if run.seed is not None else i: figure_value(run.results, figure)
                for i, run in enumerate(self.runs)}

    def spread(self, figure: str) -> Spread:
        return spread(list(self.values(figure).values()))


def _summary_figures() -> Dict[str, Callable[[RunResults], Optional[float]]]:
    """The per-run figures every comparison reports, by column name."""
    out: Dict[str, Callable[[RunResults], Optional[float]]] = {}
    for key in SUMMARY_KEYS:
        for d, _ in DIRECTIONS:
            out[f"{key}_{d}"] = (lambda k, dd: lambda r: r.figure(dd, k))(key, d)
    for d, _ in DIRECTIONS:
        out[f"agnostic_{d}"] = (lambda dd: lambda r: r.agnostic(dd))(d)
    for m in ("image", "text"):
        out[f"task_inference_{m}"] = (lambda mm: lambda r: r.inferred(mm))(m)
    out["train_seconds"] = lambda r: r.timing.get("train_seconds")
    return out


FIGURES = _summary_figures()
_FINAL = re.compile(r"final_(i2t|t2i)_task_(\d+)")


def figure_value(results: RunResults, name: str) -> Optional[float]:
    """A figure of ``FIGURES`` or ``final_<direction>_task_<j>`` (R[T][j], 1-based j)."""
    match = _FINAL.fullmatch(name)
    if match:
        row, j = results.final_row(match.group(1)), int(match.group(2)) - 1
        return row[j] if j < len(row) else None
    return FIGURES[name](results)


def final_figures(tasks: int) -> List[str]:
    return [f"final_{d}_task_{j + 1}" for d, _ in DIRECTIONS for j in range(tasks)]


TABLE_COLUMNS = [
    ("acc_i2t", "ACC i2t"), ("acc_t2i", "ACC t2i"), ("bwt_i2t", "BWT i2t"), ("bwt_t2i", "BWT t2i"),
    ("forgetting_i2t", "forget i2t"), ("forgetting_t2i", "forget t2i"), ("fwt_i2t", "FWT i2t"),
    ("fwt_t2i", "FWT t2i"), ("avg_incremental_i2t", "avg inc i2t"), ("avg_incremental_t2i", "avg inc t2i"),
    ("agnostic_i2t", "agnostic i2t"), ("agnostic_t2i", "agnostic t2i"),
    ("task_inference_image", "task inf image"), ("task_inference_text", "task inf text"), ("train_seconds", "train s"),
]
PAIRED_FIGURES = ["acc_i2t", "acc_t2i", "bwt_i2t", "bwt_t2i", "agnostic_i2t", "agnostic_t2i"]


# ====================================================================== command line
def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-file", dest="config_files", nargs="+", action="extend", required=True,
                        metavar="FILE",
                        help="YAML configs to run side by side, e.g. configs/DSPH/demo.yaml configs/DCMHT/demo.yaml "
                             "(a second --config-file adds to the list)")
    parser.add_argument("--output-dir", default="outputs/compare", metavar="DIR",
                        help="where comparison.md, comparison.csv, runs.csv, paired.csv, the PNG plots and "
                             "runs/<METHOD>_<config>/ go (default: outputs/compare)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override keys in every config, e.g. --set runner.epochs=5; may be repeated (every "
                             "--set applies, in order)")
    parser.add_argument("--seeds", nargs="+", action="extend", type=int, metavar="S",
                        help="run every config once per seed (runner.seed=S) and report mean +/- std; "
                             "default: each config's own runner.seed")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="runs at once, in N worker processes (default 1), each with 1/N of the torch threads "
                             "unless its config sets runner.num_threads (then its numbers equal those of --jobs 1)")
    parser.add_argument("--reference", metavar="CONFIG",
                        help="the config the others are compared with, pair by pair over the seeds "
                             "(a config file given to --config-file or its method label; default: the first)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep runs in DIR/runs/ whose results.json is finished and whose config equals the "
                             "requested one; resume unfinished ones with the same config; run the rest")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace runs in DIR/runs/ that are not reused (each old run is kept until its "
                             "new one has finished); without it such a run is refused before anything runs")
    parser.add_argument("--quiet", action="store_true", help="no log lines from the runs on the console")


@dataclass
class PlannedRun:
    """One run the comparison needs: where it goes and whether it is reused or resumed."""

    slug: str
    config_file: str
    seed: Optional[int]
    config: Dict[str, Any]
    run_dir: Path
    action: str = "run"   # run | resume | reuse | overwrite
    experiment: Any = None  # the validated, prepared run (runners.experiment.Experiment)


def plan_runs(files: Sequence[str], overrides: Sequence[str], seeds: Optional[Sequence[int]], out: Path,
              reuse: bool, quiet: bool, overwrite: bool = False) -> List[PlannedRun]:
    """Read and validate every config (nothing runs before all are valid) and decide, per
    config and seed, where it runs and whether a finished run is reused."""
    from runners.config import load_config
    from runners.experiment import prepare

    if not files:
        raise DataError("compare: give at least one --config-file")
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise DataError(f"--seeds: each seed once, got {' '.join(map(str, seeds))}")
    configs = [(str(f), load_config(f, list(overrides))) for f in files]
    planned: List[PlannedRun] = []
    for (path, config), name in zip(configs, run_names(configs)):
        if quiet:  # as `train --quiet`: no progress bars either (runner.progress is neutral for --reuse)
            config["runner"]["progress"] = False
        for seed in (seeds if seeds else [None]):
            cfg = copy.deepcopy(config)
            if seed is not None:
                cfg["runner"]["seed"] = seed
            experiment = prepare(cfg, source=path)   # validated once, here: nothing runs before all are valid
            run_dir = out / "runs" / name / f"seed_{seed}" if seed is not None else out / "runs" / name
            planned.append(PlannedRun(name, path, seed, cfg, run_dir, plan_run(run_dir, cfg, reuse, overwrite),
                                      experiment))
    return planned


def execute(planned: Sequence[PlannedRun], jobs: int = 1, quiet: bool = False) -> List[ComparedRun]:
    """Run (or reuse) every planned run, ``jobs`` at a time in worker processes; the
    results come back in plan order."""
    results: Dict[int, RunResults] = {}
    todo = []
    for i, p in enumerate(planned):
        if p.action == "reuse":
            results[i] = load_results(p.run_dir)
            print(f"compare: reusing {p.run_dir} ({p.config_file})")
        else:
            todo.append(i)
            print(f"compare: {'resuming' if p.action == 'resume' else 'running'} {p.config_file}"
                  + (f" seed {p.seed}" if p.seed is not None else "") + f" -> {p.run_dir}")
    if jobs == 1 or len(todo) <= 1:
        for i in todo:
            p = planned[i]
            results[i] = p.experiment.run(p.run_dir, resume=p.action == "resume", quiet=quiet,
                                          overwrite=p.action == "overwrite")
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        import torch

        context = multiprocessing.get_context("spawn")   # a clean interpreter per worker, on every platform
        workers = min(jobs, len(todo))
        threads = worker_threads(torch.get_num_threads(), workers)
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_stop_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            futures = {i: pool.submit(_run_in_worker, planned[i].config, str(planned[i].run_dir),
                                      planned[i].action, threads) for i in todo}
            for i, future in futures.items():
                results[i] = RunResults.from_dict(future.result())
    return [ComparedRun("", p.slug, p.config_file, p.run_dir, results[i], p.action == "reuse", p.seed)
            for i, p in enumerate(planned)]


def _stop_with_parent(parent: int) -> None:
    """Worker initializer: on Linux the kernel sends this worker SIGTERM when the compare
    process dies, however it dies (``kill``, not only Ctrl-C, which reaches the whole
    process group anyway), so no run goes on training for nobody. What the worker had
    finished stays on disk and ``--resume`` continues it. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:   # the parent died before the request was in place
        os._exit(1)


def worker_threads(parent_threads: int, workers: int) -> int:
    """Torch threads of each of ``workers`` parallel runs: the parent's share,
    ``max(1, parent_threads // workers)``, so that together they do not oversubscribe
    the cores (a run whose config sets ``runner.num_threads`` uses that instead)."""
    return max(1, int(parent_threads) // max(1, int(workers)))


def _run_in_worker(config: Dict[str, Any], run_dir: str, action: str, threads: int) -> Dict[str, Any]:
    """One run in a worker process with ``threads`` torch threads (the runner applies
    ``runner.num_threads`` over it when the config sets one); returns the results as
    plain data. The config was validated by the parent; a fresh interpreter prepares its
    own objects from it."""
    import torch

    import dataset  # noqa: F401  (fills the registries in the fresh interpreter)
    import models  # noqa: F401
    from runners.experiment import run_config

    torch.set_num_threads(threads)
    return run_config(config, run_dir, resume=action == "resume", quiet=True, overwrite=action == "overwrite").to_dict()


def run_compare(args: argparse.Namespace) -> int:
    """Run or reuse every config and seed, then write the tables and the plots; returns 0."""
    if not str(args.output_dir).strip():
        raise UserError("--output-dir: empty; give a directory, or leave the flag out for outputs/compare")
    out = Path(args.output_dir)
    quiet = bool(getattr(args, "quiet", False))
    jobs = getattr(args, "jobs", 1)
    if jobs < 1:
        raise DataError(f"--jobs: expected a positive number of worker processes, got {jobs}")
    planned = plan_runs(list(args.config_files), list(args.overrides or []), getattr(args, "seeds", None), out,
                        bool(args.reuse), quiet, bool(getattr(args, "overwrite", False)))
    runs = execute(planned, jobs, quiet)
    groups = group_runs(runs)
    reference = pick_reference(groups, getattr(args, "reference", None))
    write_comparison(out, groups, reference)
    print(format_table(groups))
    paired = format_paired(groups, reference)
    if paired:
        print("\n" + paired)
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


def group_runs(runs: Sequence[ComparedRun]) -> List[ComparedConfig]:
    """Runs grouped by config (in the order given), each labelled by its method
    (+ `` joint`` for joint training); repeated labels get the run name."""
    groups: Dict[str, ComparedConfig] = {}
    for run in runs:
        if run.slug not in groups:
            r = run.results
            label = f"{r.method or '?'}" + (" joint" if r.mode == "joint" else "")
            groups[run.slug] = ComparedConfig(label, run.slug, run.config_file)
        groups[run.slug].runs.append(run)
    counts: Dict[str, int] = {}
    for g in groups.values():
        counts[g.label] = counts.get(g.label, 0) + 1
    for g in groups.values():
        if counts[g.label] > 1:
            g.label = f"{g.label} ({g.slug})"
        for run in g.runs:
            run.label = g.label
    return list(groups.values())


def pick_reference(groups: Sequence[ComparedConfig], wanted: Optional[str]) -> ComparedConfig:
    """The config named by ``--reference`` (its file, as given, or its label), else the first."""
    if wanted is None:
        return groups[0]
    for g in groups:
        if wanted in (g.config_file, g.label, g.slug) or Path(wanted) == Path(g.config_file):
            return g
    known = ", ".join(g.config_file for g in groups)
    raise DataError(f"--reference {wanted!r}: not one of the compared configs ({known})")


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


def stored_config(run_dir: Path, results: Optional[RunResults] = None) -> Optional[Dict[str, Any]]:
    """The resolved config a run was made with: ``results.json``'s ``config`` when the
    runner stored it there, else the run's ``config.yaml``."""
    if results is not None and isinstance(results.config, dict):
        return results.config
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def load_results(run_dir: Path) -> RunResults:
    path = run_dir / "results.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no results.json (run it without --reuse)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable results file ({exc})") from None
    if not isinstance(data, dict) or "map" not in data:
        raise DataError(f"{path}: not a results file written by the runner (no 'map' key)")
    return RunResults.from_dict(data)


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
    if results.finished:
        return "finished"
    return "unfinished"


# ====================================================================== tables
def _num(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.6f}"


def comparison_csv(groups: Sequence[ComparedConfig]) -> str:
    """One row per config: facts, then every figure's mean and its ``_std`` over seeds."""
    figures = list(FIGURES) + final_figures(max(g.first.tasks for g in groups))
    fields = ["method", "config", "dataset", "metric", "mode", "tasks", "bits", "seeds"]
    fields += [c for f in figures for c in (f, f"{f}_std")] + ["run_dirs", "reused"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for g in groups:
        r = g.first
        row = {"method": g.label, "config": g.config_file, "dataset": r.dataset, "metric": r.metric,
               "mode": r.mode, "tasks": r.tasks, "bits": r.bits[-1] if r.bits else "",
               "seeds": " ".join(str(run.results.seed) for run in g.runs),
               "run_dirs": " ".join(str(run.run_dir) for run in g.runs),
               "reused": all(run.reused for run in g.runs)}
        for f in figures:
            s = g.spread(f)
            row[f], row[f"{f}_std"] = _num(s.mean), _num(s.std)
        writer.writerow(row)
    return buf.getvalue()


def runs_csv(groups: Sequence[ComparedConfig]) -> str:
    """One row per config and seed, every figure as measured."""
    figures = list(FIGURES) + final_figures(max(g.first.tasks for g in groups))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "config", "seed"] + figures + ["run_dir", "reused"])
    for g in groups:
        for run in g.runs:
            writer.writerow([g.label, g.config_file, run.results.seed]
                            + [_num(figure_value(run.results, f)) for f in figures] + [str(run.run_dir), run.reused])
    return buf.getvalue()


def paired_rows(groups: Sequence[ComparedConfig], reference: ComparedConfig) -> List[Tuple[ComparedConfig, Dict[str, PairedDifference]]]:
    """Each other config's paired difference to ``reference`` per figure (needs 2+ shared seeds)."""
    out = []
    for g in groups:
        if g is reference:
            continue
        diffs = {f: paired_difference(g.values(f), reference.values(f)) for f in PAIRED_FIGURES}
        if any(d.n >= 2 for d in diffs.values()):
            out.append((g, diffs))
    return out


def paired_csv(groups: Sequence[ComparedConfig], reference: ComparedConfig) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "reference", "figure", "difference", "ci_low", "ci_high", "level", "seeds"])
    for g, diffs in paired_rows(groups, reference):
        for f, d in diffs.items():
            writer.writerow([g.label, reference.label, f, _num(d.mean), _num(d.low), _num(d.high), d.level, d.n])
    return buf.getvalue()


def format_table(groups: Sequence[ComparedConfig]) -> str:
    """The summary as a markdown table (also printed on the console): mean +/- std over seeds."""
    head = ["method", "dataset", "bits", "seeds"] + [h for _, h in TABLE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for g in groups:
        r = g.first
        cells = [g.label, str(r.dataset), str(r.bits[-1]) if r.bits else "-", str(len(g.runs))]
        cells += [g.spread(k).text(1 if k == "train_seconds" else 4) for k, _ in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_final_rows(groups: Sequence[ComparedConfig]) -> str:
    """mAP of every task after the last one, per config and direction (mean +/- std)."""
    T = max(g.first.tasks for g in groups)
    head = ["method", "direction"] + [f"task {j + 1}" for j in range(T)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for g in groups:
        for d, _ in DIRECTIONS:
            cells = [g.spread(f"final_{d}_task_{j + 1}").text() for j in range(T)]
            lines.append("| " + " | ".join([g.label, d] + cells) + " |")
    return "\n".join(lines)


def format_paired(groups: Sequence[ComparedConfig], reference: ComparedConfig) -> str:
    """Paired differences to the reference (mean [95 % t interval]); empty with one seed."""
    rows = paired_rows(groups, reference)
    if not rows:
        return ""
    head = ["method", "seeds"] + [f"Δ {h}" for k, h in TABLE_COLUMNS if k in PAIRED_FIGURES]
    lines = [f"Paired differences to {reference.label} over shared seeds: mean [95% t interval]; "
             "* marks an interval that excludes 0.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for g, diffs in rows:
        cells = [d.text() + (" *" if d.significant else "") for d in diffs.values()]
        lines.append("| " + " | ".join([g.label, str(max(d.n for d in diffs.values()))] + cells) + " |")
    return "\n".join(lines)


def comparison_markdown(groups: Sequence[ComparedConfig], reference: ComparedConfig,
                        figures: Dict[str, str], notes: Sequence[str] = ()) -> str:
    metrics = sorted({str(g.first.metric) for g in groups})
    lines = ["# Comparison", ""]
    lines.append(f"Metric: {', '.join(metrics)}" + (" (runs differ in metric: do not compare across them)"
                                                    if len(metrics) > 1 else "") + ". "
                 "ACC = mean mAP over all tasks after the last one; BWT and forgetting average over the "
                 "first T - 1 tasks; FWT = score on a task before training on it minus the untrained "
                 "model's; `agnostic` = all queries against all stored codes after the last task; `task inf` = "
                 "the share of those queries whose task a task-inferring model (CASH, PBEH) picks correctly. "
                 "Cells are mean ± sample std over seeds.")
    lines += ["", format_table(groups), "", "## mAP per task after the last task", "", format_final_rows(groups)]
    paired = format_paired(groups, reference)
    if paired:
        lines += ["", "## Paired differences", "", paired]
    lines += ["", "Runs:", ""]
    for g in groups:
        for run in g.runs:
            lines.append(f"- {g.label}: `{g.config_file}`" + (f" seed {run.seed}" if run.seed is not None else "")
                         + f" -> `{run.run_dir}`" + (" (reused)" if run.reused else ""))
    for kind, title, caption in FIGURE_SECTIONS:
        if figures.get(kind):
            lines += ["", f"## {title}", "", caption, "", f"![{title}]({figures[kind]})"]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


FIGURE_SECTIONS = (
    ("result_matrices", "Result matrices",
     "R[t, j]: mAP on task j (column) after training task t (row), every config side by side; first seed."),
    ("map_over_tasks", "mAP over tasks",
     "A_t = mean of R[t, 1..t] after each task t; with several seeds the line is the mean and the band ± the "
     "sample std."),
    ("final_row", "mAP per task after the last task", "R[T, j] per task j; first seed."),
    ("training_curves", "Training curves",
     "Mean training loss per epoch and validation mAP (val queries against the task's train split) along the "
     "stream; dotted lines separate tasks, a star marks the epoch each task kept; first seed."),
    ("pr_curve", "Precision / recall by Hamming radius",
     "All queries, task-agnostic, against every stored code after the last task; one point per radius; mean "
     "over seeds."),
    ("precision_at_n", "Precision of the top N",
     "All queries, task-agnostic, against every stored code after the last task; mean (± std over seeds)."),
    ("code_length", "mAP versus code length",
     "Lines: the most significant bits of one model's codes (bit-scalable runs); points: other runs at their own "
     "code length (task-agnostic mAP), spread sideways where several share a length."),
)


def write_comparison(out: Path, groups: Sequence[ComparedConfig], reference: ComparedConfig) -> Dict[str, str]:
    """Write the CSV files, the plots and comparison.md into ``out``, after removing the
    figures of an earlier comparison there that this one does not draw; returns the
    figure file names written, by kind."""
    from runners.compare_plots import write_plots

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "comparison.csv", comparison_csv(groups))
    atomic_write_text(out / "runs.csv", runs_csv(groups))
    atomic_write_text(out / "paired.csv", paired_csv(groups, reference))
    notes = fill_curves(groups)
    figures = write_plots(out, groups)
    remove_stale_figures(out, list(figures.values()))
    atomic_write_text(out / "comparison.md", comparison_markdown(groups, reference, figures, notes))
    return figures


# ====================================================================== plots
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def fill_curves(groups: Sequence[ComparedConfig]) -> List[str]:
    """Give every finished run without recorded retrieval curves (runs from before the
    runner recorded them) the curves computed from its checkpoint, in memory only: a
    reused run's files are never changed. Returns a note per run that cannot have them."""
    from runners.experiment import curves_from_checkpoint

    notes = []
    for g in groups:
        for run in g.runs:
            r = run.results
            wanted = (r.config or {}).get("runner", {}).get("task_agnostic", True)
            if r.curves or not r.finished or not wanted:
                continue
            try:
                r.curves = curves_from_checkpoint(run.run_dir)
            except (UserError, OSError, ValueError, KeyError, RuntimeError) as exc:
                # best effort: e.g. no checkpoint, data moved, or a model whose code changed since (its
                # state no longer loads); the comparison goes on without these two figures for the run
                notes.append(f"{g.label}: no precision / recall curves ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]})")
    return notes


def remove_stale_figures(out: Path, written: Sequence[str]) -> List[str]:
    """Delete the PNG files an earlier comparison in ``out`` wrote (the images its
    comparison.md shows) that this one does not write; nothing else is touched."""
    old = out / "comparison.md"
    try:
        text = old.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    removed = []
    for name in sorted(set(re.findall(r"!\[[^\]]*\]\(([^)/\\]+\.png)\)", text)) - set(written)):
        path = out / name
        if path.is_file():
            path.unlink()
            removed.append(name)
    return removed
