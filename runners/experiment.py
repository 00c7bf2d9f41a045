"""One experiment from a resolved config: build dataset, model factory and runner, run.

The CLI, the comparison command and the tests all go through ``run_config``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from common.code_store import CodeStore
from runners import run_guard
from runners.continual import OptimSpec
from runners.outputs import RunOutput, read_checkpoint, write_results
from utils.config import build, validate_config
from utils.errors import ConfigError, DataError, OutputError


def run_config(
    config: Dict[str, Any], output_dir: str | Path, resume: bool = False, quiet: bool = False, overwrite: bool = False
) -> Dict[str, Any]:
    """Run the experiment ``config`` describes; writes ``output_dir`` and returns the
    results dict (the content of results.json).

    A run already in ``output_dir`` is continued only with ``resume`` and replaced only
    with ``overwrite`` (and then kept until the new run has finished); one writer at a
    time holds the directory's lock (``runners.run_guard``)."""
    validate_config(config)
    dataset = build("dataset", config)
    runner = build("runner", config)
    check_optimizer_blocks(config)
    stream = dataset.load()  # a missing or corrupt data file fails here, before any output

    def model_factory():
        return build(
            "model", config, image_dim=stream.image_dim, text_dim=stream.text_dim, num_classes=stream.num_classes
        )

    need = estimate_run_bytes(model_factory(), stream)  # also: a bad model config fails here, before any output
    root = Path(output_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        # Data-parallel workers write nothing and take no lock (rank 0 holds it); they
        # judge the folder as rank 0 does, so that they refuse what it refuses.
        run_guard.check_new_run(root, resume, overwrite, locked=True)
        return _run(runner, stream, model_factory, config, root, resume, quiet)
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
            results = _run(runner, stream, model_factory, config, root, resume, quiet)
        except BaseException as exc:
            if replacing:
                run_guard.put_back(root)
            if isinstance(exc, OutputError):
                kept = ("the run it was to replace is restored" if replacing else
                        "the last finished task is checkpointed: fix it and continue with --resume")
                raise OutputError(f"{exc}; {kept}") from None
            raise
        if results.get("status") == "finished" and run_guard.run_status(root) != "finished":
            write_results(root, results)  # killed after the final last.pt, before its results.json
        if replacing:
            run_guard.discard_aside(root)
    return results


def _run(runner, stream, model_factory, config, root: Path, resume: bool, quiet: bool) -> Dict[str, Any]:
    output = RunOutput(root, config, tensorboard=getattr(runner, "tensorboard", True), quiet=quiet)
    try:
        return runner.run(
            stream,
            model_factory,
            OptimSpec(optimizer=config["optimizer"], scheduler=config.get("scheduler")),
            output,
            resume=resume,
            method=config["model"]["name"],
        )
    finally:
        output.close()


def check_optimizer_blocks(config: Dict[str, Any]) -> None:
    """Build the optimiser and schedule on a stand-in parameter, so that a value they
    refuse (a negative learning rate, betas out of range, a bad warm-up) is a
    ConfigError before anything runs; the runner passes ``lr`` per parameter group,
    where torch does not check it, so it is checked here too."""
    import torch

    lr = config["optimizer"].get("lr")
    if lr is not None and not (math.isfinite(lr) and lr >= 0):
        raise ConfigError(f"optimizer.lr: expected a finite learning rate >= 0, got {lr}")
    optimizer = build("optimizer", config, params=[torch.nn.Parameter(torch.zeros(1))])
    if config.get("scheduler"):
        build("scheduler", config, optimizer=optimizer, total_steps=1, steps_per_epoch=1)


def estimate_run_bytes(model, stream) -> int:
    """About what a run writes at most: its task checkpoints and resume checkpoint
    (twice the model's size each, for models that grow) and its stored codes (one byte
    per bit, counted twice: codes.npz and last.pt), with room for the temporary copy
    of the largest file while it is written atomically."""
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    bits = int(getattr(model, "bits", 64) or 64)
    codes = sum(len(task.database) for task in stream.tasks) * 2 * bits
    checkpoints = 2 * model_bytes * (len(stream) + 1)
    return checkpoints + 2 * codes + (2 * model_bytes + codes) + (1 << 20)


@dataclass
class TrainedRun:
    """A finished (or partly finished) run loaded back: its config, model and codes."""

    root: Path
    config: Dict[str, Any]
    model: Any
    store: CodeStore
    results: Dict[str, Any]
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
            raise DataError(f"{path}: no checkpoint for task {task} (finished tasks: 1..{ckpt['next_task']})")
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
    return TrainedRun(root, config, model, store, ckpt["results"], finished)


def _fmt(v: Optional[float]) -> str:
    return f"{'-':>9}" if v is None else f"{v:>9.4f}"


def format_results(results: Dict[str, Any]) -> str:
    """The result matrices, the task-agnostic column and the summary as plain text."""
    T = results["tasks"]
    done = results.get("completed_tasks", T)
    lines: List[str] = [
        f"{results['method']} on {results['dataset']} ({results['metric']}, {results['mode']}, "
        f"bits per task {results['bits']})",
    ]
    for d, title in (("i2t", "image -> text"), ("t2i", "text -> image")):
        lines.append("")
        lines.append(f"{title}: row = after training task t, column = task evaluated")
        header = f"{'after':<9}" + "".join(f"{'task ' + str(j + 1):>9}" for j in range(T)) + f"{'average':>11}{'agnostic':>11}"
        lines.append(header)
        for t in range(done):
            row = results["map"][d][t]
            seen = [v for v in row[: t + 1] if v is not None]
            agn = results["task_agnostic"][d][t] if t < len(results["task_agnostic"][d]) else None
            avg = sum(seen) / len(seen) if seen else None
            lines.append(f"{'task ' + str(t + 1):<9}" + "".join(_fmt(v) for v in row) + "  " + _fmt(avg) + "  " + _fmt(agn))
    summ = results.get("summary") or {}
    if summ:
        lines.append("")
        keys = ["acc", "avg_incremental", "bwt", "forgetting", "fwt"]
        lines.append("summary    " + "".join(f"{k:>16}" for k in keys))
        for d in ("i2t", "t2i"):
            s = summ.get(d, {})
            lines.append(f"{d:<11}" + "".join(
                f"{'-' if s.get(k) is None else format(s[k], '.4f'):>16}" for k in keys
            ))
    if results.get("bit_scalable"):
        lines.append("")
        lines.append("bit-scalable (most significant bits first): " + ", ".join(
            f"{b} bits i2t {v['i2t']:.4f} t2i {v['t2i']:.4f}" for b, v in results["bit_scalable"].items()
        ))
    tm = results.get("timing", {})
    lines.append("")
    lines.append(f"train {tm.get('train_seconds', 0):.1f}s, evaluation {tm.get('eval_seconds', 0):.1f}s")
    return "\n".join(lines)
