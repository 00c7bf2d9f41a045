"""One experiment from a resolved config (build dataset, model factory and runner, run),
and a finished run loaded back.

The CLI, the comparison command and the tests all go through ``prepare`` / ``run_config``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from common.code_store import CodeStore
from runners.config import build, validate_config
from runners.continual import OptimSpec
from runners.outputs import RunOutput
from runners.results import DIRECTIONS, RunResults
from utils.errors import DataError


@dataclass
class Experiment:
    """A validated config with its dataset and runner objects built (no data read yet):
    what ``run`` needs, prepared up front so that a batch of configs (``compare``) is
    checked before anything trains."""

    config: Dict[str, Any]
    dataset: Any
    runner: Any

    def run(self, output_dir: str | Path, resume: bool = False, quiet: bool = False) -> RunResults:
        """Load the data, train and evaluate; writes ``output_dir`` and returns the results."""
        config = self.config
        stream = self.dataset.load()  # a missing or corrupt data file fails here, before any output

        def model_factory():
            return build("model", config, image_dim=stream.image_dim, text_dim=stream.text_dim,
                         num_classes=stream.num_classes)

        output = RunOutput(output_dir, config, tensorboard=getattr(self.runner, "tensorboard", True), quiet=quiet)
        try:
            return self.runner.run(
                stream, model_factory,
                OptimSpec(optimizer=config["optimizer"], scheduler=config.get("scheduler")),
                output, resume=resume, method=config["model"]["name"],
            )
        finally:
            output.close()


def prepare(config: Dict[str, Any], source: str = "config") -> Experiment:
    """Validate ``config`` (in place) and build its dataset and runner objects."""
    validate_config(config, source=source)
    return Experiment(config, build("dataset", config), build("runner", config))


def run_config(
    config: Dict[str, Any], output_dir: str | Path, resume: bool = False, quiet: bool = False
) -> RunResults:
    """Run the experiment ``config`` describes; writes ``output_dir`` and returns the
    results (the content of results.json)."""
    return prepare(config).run(output_dir, resume=resume, quiet=quiet)


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
    import torch

    root = Path(run_dir)
    last = root / "checkpoints" / "last.pt"
    if not last.is_file():
        raise DataError(f"{root}: not a run directory (expected checkpoints/last.pt written by 'python main.py train')")
    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        if task is not None and task != ckpt["next_task"]:
            path = root / "checkpoints" / f"task_{task}.pt"
            if not path.is_file():
                raise DataError(f"{path}: no checkpoint for task {task} (finished tasks: 1..{ckpt['next_task']}; "
                                f"a run keeps one per task with runner.keep_task_checkpoints=true)")
            model_ckpt = torch.load(path, map_location="cpu", weights_only=False)
        else:
            model_ckpt = ckpt
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{last}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from None
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
