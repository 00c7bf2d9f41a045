"""One experiment from a resolved config (build dataset, model factory and runner, run
it in a guarded output directory), and a finished run loaded back.

The CLI, the comparison command and the tests all go through ``prepare`` / ``run_config``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from common.code_store import CodeStore
from runners import run_guard
from runners.config import build, validate_config
from runners.continual import OptimSpec
from runners.outputs import RunOutput, read_checkpoint, write_results
from runners.results import DIRECTIONS, RunResults
from utils.errors import DataError, OutputError


@dataclass
class Experiment:
    """A validated config with its dataset and runner objects built (no data read yet):
    what ``run`` needs, prepared up front so that a batch of configs (``compare``) is
    checked before anything trains."""

    config: Dict[str, Any]
    dataset: Any
    runner: Any

    def run(self, output_dir: str | Path, resume: bool = False, quiet: bool = False,
            overwrite: bool = False) -> RunResults:
        """Load the data, train and evaluate into ``output_dir``; returns the results.

        A run already there is continued only with ``resume`` and replaced only with
        ``overwrite`` (and then kept until the new run has finished); one writer at a
        time holds the directory's lock (``runners.run_guard``)."""
        stream = self.dataset.load()  # a missing or corrupt data file fails here, before any output
        config = self.config

        def model_factory():
            return build("model", config, image_dim=stream.image_dim, text_dim=stream.text_dim,
                         num_classes=stream.num_classes)

        need = estimate_run_bytes(model_factory(), stream, self.runner)  # a bad model config fails here too
        root = Path(output_dir)
        if int(os.environ.get("RANK", "0")) != 0:
            # Data-parallel workers write nothing and take no lock (rank 0 holds it); they
            # judge the folder as rank 0 does, so that they refuse what it refuses.
            run_guard.check_new_run(root, resume, overwrite, locked=True)
            return self._train(stream, model_factory, root, resume, quiet)
        run_guard.check_new_run(root, resume, overwrite)  # refused before the directory is even created
        with run_guard.RunLock(root):
            run_guard.clean_temporaries(root)
            run_guard.recover(root)  # what an interrupted --overwrite run replaced is back
            status = run_guard.check_new_run(root, resume, overwrite, locked=True)  # again, now that no one else writes
            run_guard.check_free_space(root, need)
            replacing = overwrite and status != "empty"
            if replacing:
                run_guard.set_aside(root)
            try:
                results = self._train(stream, model_factory, root, resume, quiet)
            except BaseException as exc:
                if replacing:
                    run_guard.put_back(root)
                if isinstance(exc, OutputError):
                    kept = ("the run it was to replace is restored" if replacing else
                            "the last finished task is checkpointed: fix it and continue with --resume")
                    raise OutputError(f"{exc}; {kept}") from None
                raise
            if results.status == "finished" and run_guard.run_status(root) != "finished":
                write_results(root, results)  # killed after the final last.pt, before its results.json
            if replacing:
                run_guard.discard_aside(root)
        return results

    def _train(self, stream, model_factory, root: Path, resume: bool, quiet: bool) -> RunResults:
        config = self.config
        output = RunOutput(root, config, tensorboard=getattr(self.runner, "tensorboard", True), quiet=quiet)
        try:
            return self.runner.run(
                stream, model_factory,
                OptimSpec(optimizer=config["optimizer"], scheduler=config.get("scheduler")),
                output, resume=resume, method=config["model"]["name"],
            )
        finally:
            output.close()


def prepare(config: Dict[str, Any], source: str = "config") -> Experiment:
    """Validate ``config`` (in place) and build its dataset and runner objects; the
    optimiser and schedule blocks are built once on a stand-in parameter, so a value they
    refuse (a negative learning rate, betas out of range, a bad warm-up) is refused
    before anything runs."""
    import torch

    validate_config(config, source=source)
    optimizer = build("optimizer", config, params=[torch.nn.Parameter(torch.zeros(1))])
    if config.get("scheduler"):
        build("scheduler", config, optimizer=optimizer, total_steps=1, steps_per_epoch=1)
    return Experiment(config, build("dataset", config), build("runner", config))


def run_config(
    config: Dict[str, Any], output_dir: str | Path, resume: bool = False, quiet: bool = False,
    overwrite: bool = False,
) -> RunResults:
    """Run the experiment ``config`` describes; writes ``output_dir`` and returns the
    results (the content of results.json)."""
    return prepare(config).run(output_dir, resume=resume, quiet=quiet, overwrite=overwrite)


def estimate_run_bytes(model, stream, runner: Any = None) -> int:
    """About what a run writes at most: the resume checkpoint and, with
    ``keep_task_checkpoints``, one per task (twice the model's size each, for models
    that grow), and its stored codes (one byte per bit, counted twice: codes.npz and
    last.pt), with room for the temporary copy of the largest file while it is written
    atomically."""
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    bits = int(getattr(model, "bits", 64) or 64)
    codes = sum(len(task.database) for task in stream.tasks) * 2 * bits
    per_task = len(stream) if getattr(runner, "keep_task_checkpoints", True) else 0
    checkpoints = 2 * model_bytes * (per_task + 1)
    return checkpoints + 2 * codes + (2 * model_bytes + codes) + (1 << 20)


@dataclass
class TrainedRun:
    """A finished (or partly finished) run loaded back: its config, model and codes."""

    root: Path
    config: Dict[str, Any]
    model: Any
    store: CodeStore
    results: RunResults
    task: int


def load_run(run_dir: str | Path, task: Optional[int] = None, device: str = "cpu") -> TrainedRun:
    """Rebuild the model of ``run_dir`` after ``task`` (1-based; default: the last
    finished task) with the stored database codes, in eval mode, for evaluation,
    export and search."""
    root = Path(run_dir)
    last = root / "checkpoints" / "last.pt"
    if not last.is_file():
        raise DataError(f"{root}: not a run directory (expected checkpoints/last.pt written by 'python main.py train')")
    ckpt = read_checkpoint(last, "resume")
    model_ckpt = ckpt
    if task is not None and task != ckpt["next_task"]:
        path = root / "checkpoints" / f"task_{task}.pt"
        if not path.is_file():
            raise DataError(f"{path}: no checkpoint for task {task} (finished tasks: 1..{ckpt['next_task']}; "
                            f"a run keeps one per task with runner.keep_task_checkpoints=true)")
        model_ckpt = read_checkpoint(path, "task")
    config = ckpt["config"]
    validate_config(config, source=str(root / "config.yaml"))
    model = build("model", config, **ckpt["dims"])
    model.build_structure(model_ckpt["structure"])
    model.load_state_dict(model_ckpt["model"])
    model.to(device).eval()
    store = CodeStore.from_state(ckpt["store"])
    finished = int(model_ckpt.get("task", ckpt["next_task"]))
    if task is not None:
        store = store.subset(t for t in store.tasks() if t < finished)
    return TrainedRun(root, config, model, store, RunResults.from_dict(ckpt["results"]), finished)


def curves_from_checkpoint(run_dir: str | Path) -> Dict[str, Dict[str, Any]]:
    """The retrieval curves a run records after its last task (``RunResults.curves``:
    all queries, task-agnostic, against every stored code), computed from its checkpoint
    and data, for runs written before the runner recorded them."""
    from dataset.feature_set import FeatureSet
    from runners.evaluation import encode_codes, retrieval_curves

    run = load_run(run_dir)
    stream = build("dataset", run.config).load()
    queries = FeatureSet.concat([task.query for task in stream.tasks[: run.task]])
    return retrieval_curves(encode_codes(run.model, queries, None), queries.labels, run.store.entries())


def _fmt(v: Optional[float]) -> str:
    return f"{'-':>9}" if v is None else f"{v:>9.4f}"


def format_results(results: RunResults) -> str:
    """The result matrices, the task-agnostic column and the summary as plain text."""
    T = results.tasks
    lines: List[str] = [
        f"{results.method} on {results.dataset} ({results.metric}, {results.mode}, bits per task {results.bits})",
    ]
    for d, title in zip(DIRECTIONS, ("image -> text", "text -> image")):
        lines.append("")
        lines.append(f"{title}: row = after training task t, column = task evaluated")
        header = f"{'after':<9}" + "".join(f"{'task ' + str(j + 1):>9}" for j in range(T)) + f"{'average':>11}{'agnostic':>11}"
        lines.append(header)
        for t in range(results.completed_tasks):
            lines.append(f"{'task ' + str(t + 1):<9}" + "".join(_fmt(v) for v in results.row(d, t)) + "  "
                         + _fmt(results.row_average(d, t)) + "  " + _fmt(results.agnostic(d, t)))
    if results.summary:
        lines.append("")
        keys = ["acc", "avg_incremental", "bwt", "forgetting", "fwt"]
        lines.append("summary    " + "".join(f"{k:>16}" for k in keys))
        for d in DIRECTIONS:
            lines.append(f"{d:<11}" + "".join(
                f"{'-' if results.figure(d, k) is None else format(results.figure(d, k), '.4f'):>16}" for k in keys
            ))
    if results.bit_scalable:
        lines.append("")
        lines.append("bit-scalable (most significant bits first): " + ", ".join(
            f"{b} bits i2t {v['i2t']:.4f} t2i {v['t2i']:.4f}" for b, v in results.bit_scalable.items()
        ))
    tm = results.timing
    lines.append("")
    lines.append(f"train {tm.get('train_seconds', 0):.1f}s, evaluation {tm.get('eval_seconds', 0):.1f}s")
    return "\n".join(lines)
