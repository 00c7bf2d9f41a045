"""Everything a run writes under its output directory, each file written atomically.

Layout: ``config.yaml`` (resolved), ``train.log``, ``tensorboard/``,
``checkpoints/task_<t>.pt`` (the model after task t), ``checkpoints/last.pt`` (what
``--resume`` needs), ``codes.npz`` (the stored database codes), ``results.json`` and
``results.csv``.

``results.json`` is written last, after ``last.pt``: its ``status: finished`` is the
one fact that says the whole run is on disk. Checkpoints hold only tensors, numbers,
strings, lists and dicts, and are read with ``torch.load(weights_only=True)``: a
checkpoint carrying any other Python object is refused, never unpickled.
"""
from __future__ import annotations

import copy
import csv
import io
import logging
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from common.code_store import CodeStore
from models.base import HashModel
from runners.config import dump_config
from runners.results import DIRECTIONS, RunResults
from utils.errors import ConfigError, DataError, OutputError
from utils.io import atomic_torch_save, atomic_write_json, atomic_write_text
from utils.logging import close_logger, run_logger

STALE = ("results.json", "results.csv", "codes.npz", "train.log", "checkpoints", "tensorboard")
# Config keys that change how a run looks, not what it computes: they never block a
# resume and never make a finished run unreusable (the one place that says so).
DISPLAY_ONLY_KEYS = (("runner", "progress"),)
# The keys each kind of checkpoint must hold.
CHECKPOINT_KEYS = {
    "resume": ("next_task", "structure", "model", "store", "results", "config", "dims"),
    "task": ("task", "structure", "model", "config", "dims"),
}


def without_display_keys(config: Any) -> Any:
    """A copy of ``config`` without DISPLAY_ONLY_KEYS, for comparing two configs."""
    cfg = copy.deepcopy(config)
    if isinstance(cfg, dict):
        for block, key in DISPLAY_ONLY_KEYS:
            if isinstance(cfg.get(block), dict):
                cfg[block].pop(key, None)
    return cfg


def checkpoint_payload(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` with NumPy arrays as tensors (string arrays as lists) and NumPy scalars as
    Python numbers; anything but tensors, numbers, strings, None, lists, tuples and
    str-keyed dicts is a TypeError naming where it sits (it could not be read back with
    ``weights_only=True``)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "US":
            return [str(x) for x in obj.reshape(-1).tolist()] if obj.ndim else str(obj)
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"{where}: a NumPy array of dtype {obj.dtype} cannot be checkpointed")
        return torch.from_numpy(np.array(obj, copy=True))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, str):
        return str(obj)  # a str subclass (e.g. torch's TorchVersion) would be pickled as its class
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    if isinstance(obj, (list, tuple)):
        out = [checkpoint_payload(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return out if isinstance(obj, list) else tuple(out)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} cannot be checkpointed")
            out[k] = checkpoint_payload(v, f"{where}.{k}")
        return out
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be checkpointed (only tensors, numbers, strings, "
                    "lists and dicts are)")


def read_checkpoint(path: Path, kind: str) -> Dict[str, Any]:
    """Load a checkpoint of ``kind`` (``resume``: last.pt, ``task``: task_<t>.pt) safely;
    a truncated, foreign, unsafe or wrong-kind file is a DataError naming ``path``."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found is None:  # not a checkpoint at all: garbage or truncated
            raise DataError(f"{path}: cannot read the checkpoint (UnpicklingError); it is truncated or not a "
                            "checkpoint of this library") from None
        raise DataError(f"{path}: refused: it holds a Python object ({found.group(1)}), not only tensors, numbers, "
                        "strings, lists and dicts (loading it could run code); this library never writes such "
                        "checkpoints") from None
    except Exception as exc:  # a truncated or foreign file
        raise DataError(f"{path}: cannot read the checkpoint ({type(exc).__name__}); it is truncated or not a "
                        "checkpoint of this library") from None
    expected = CHECKPOINT_KEYS[kind]
    if not isinstance(ckpt, dict):
        raise DataError(f"{path}: expected a checkpoint of this library, found a {type(ckpt).__name__}")
    missing = [k for k in expected if k not in ckpt]
    if missing:
        found = ckpt.get("kind") or ("task" if "task" in ckpt else "resume" if "next_task" in ckpt else None)
        wanted = "the resume checkpoint (last.pt)" if kind == "resume" else "a task checkpoint (task_<t>.pt)"
        what = f"a {found} checkpoint" if found and found != kind else "a file without " + ", ".join(missing)
        raise DataError(f"{path}: expected {wanted}, found {what}")
    return ckpt


class RunOutput:
    """The output directory of one run (see the module docstring)."""

    def __init__(self, root: str | Path, config: Dict[str, Any], tensorboard: bool = True, quiet: bool = False) -> None:
        self.root = Path(root)
        self.config = config
        self.use_tensorboard = tensorboard
        self.quiet = quiet
        self.enabled = True  # False on data-parallel ranks other than 0: they write nothing
        self.logger: logging.Logger = run_logger(None, quiet=quiet)
        self._writer = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoints"

    def load_resume_state(self) -> Optional[Dict[str, Any]]:
        """The state saved after the last finished task, or None when there is none."""
        path = self.checkpoint_dir / "last.pt"
        if not path.is_file():
            self.logger.info(f"--resume: no checkpoint in {self.checkpoint_dir}; starting from the first task")
            return None
        ckpt = read_checkpoint(path, "resume")
        if without_display_keys(ckpt.get("config")) != without_display_keys(self.config):
            diff = _first_difference(without_display_keys(ckpt.get("config")), without_display_keys(self.config))
            raise ConfigError(
                f"{path}: this run was made with a different config ({diff}); use another --output-dir or the same config"
            )
        return ckpt

    def prepare(self, resume: bool) -> None:
        """Create the directory; a fresh (not resumed) run clears what a run that failed
        before its first checkpoint left. ``runners.run_guard`` has already moved a
        finished run aside (``--overwrite``) or refused the run; this refuses again."""
        if not self.enabled:
            self.logger = run_logger(None, name="ccmh.worker", quiet=True)
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if not resume:
            from runners.run_guard import run_status

            if run_status(self.root) == "finished":
                raise OutputError(f"{self.root}: holds a finished run; use --overwrite to replace it")
            for name in STALE:
                p = self.root / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        atomic_write_text(self.root / "config.yaml", dump_config(self.config))
        self.logger = run_logger(self.root / "train.log", quiet=self.quiet)
        if self.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported late: slow, and only runs need it

            self._writer = SummaryWriter(log_dir=str(self.root / "tensorboard"))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, value, step)

    def task_scalars(self, results: RunResults, t: int) -> None:
        """TensorBoard figures after task t (step = tasks finished): row t of R, its
        average A_t, the task-agnostic mAP and the continual summary so far."""
        if self._writer is None:
            return
        for d in DIRECTIONS:
            for j, v in enumerate(results.row(d, t)[: t + 1]):
                self._writer.add_scalar(f"map_{d}/task_{j + 1}", v, t + 1)
            self.scalar(f"continual_{d}/average", results.row_average(d, t), t + 1)
            if results.agnostic(d, t) is not None:
                self.scalar(f"continual_{d}/task_agnostic", results.agnostic(d, t), t + 1)
            for key in ("acc", "bwt", "forgetting", "fwt"):
                if results.figure(d, key) is not None:
                    self.scalar(f"continual_{d}/{key}", results.figure(d, key), t + 1)

    def hparams(self, results: RunResults) -> None:
        """The run's hyperparameters beside its final ACC and task-agnostic mAP."""
        if self._writer is None:
            return
        flat = {f"{block}.{k}": v if isinstance(v, (int, float, str, bool)) else str(v)
                for block, spec in self.config.items() if isinstance(spec, dict) for k, v in spec.items()}
        metrics = {f"hparam/acc_{d}": results.figure(d, "acc") for d in DIRECTIONS}
        metrics.update({f"hparam/agnostic_{d}": results.agnostic(d) for d in DIRECTIONS})
        self._writer.add_hparams(flat, {k: v for k, v in metrics.items() if v is not None}, run_name="hparams")

    def save_task(
        self, t: int, model: HashModel, store: CodeStore, results: RunResults, keep: bool, last: bool
    ) -> None:
        """After task t: task checkpoint, codes, resume checkpoint, then results. Each
        file is atomic; results.json comes last, so its ``finished`` status is only
        ever seen with the final ``last.pt``, and an interruption anywhere leaves a
        consistent earlier state (``last.pt`` is what ``--resume`` trusts).
        Nothing else is needed to resume exactly: the runner reseeds every task from the
        run seed and rebuilds optimisers per task."""
        if last:
            results.status = "finished"
        if not self.enabled:
            return
        if last:
            self.hparams(results)
        state = results.to_dict()
        model_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if keep:
            atomic_torch_save(
                self.checkpoint_dir / f"task_{t + 1}.pt",
                checkpoint_payload({"kind": "task", "task": t + 1, "structure": model.structure(), "model": model_state,
                                    "config": self.config, "dims": state["dims"]}),
            )
        store.save(self.root / "codes.npz")
        atomic_torch_save(
            self.checkpoint_dir / "last.pt",
            checkpoint_payload({
                "kind": "resume", "next_task": t + 1, "structure": model.structure(), "model": model_state,
                "store": store.state(), "results": state, "config": self.config, "dims": state["dims"],
            }),
        )
        write_results(self.root, results)
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        close_logger(self.logger)


def write_results(root: Path, results: RunResults) -> None:
    """``results.csv`` (the matrices, one row per training step and direction, with the
    row average and the task-agnostic column), then ``results.json`` (everything)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["direction", "after_task", "bits"] + [f"task_{j + 1}" for j in range(results.tasks)]
                    + ["average", "task_agnostic"])
    num = lambda v: "" if v is None else f"{v:.6f}"  # noqa: E731
    for d in DIRECTIONS:
        for t in range(results.completed_tasks):
            writer.writerow([d, t + 1, results.bits[t]] + [num(v) for v in results.row(d, t)]
                            + [num(results.row_average(d, t)), num(results.agnostic(d, t))])
    atomic_write_text(root / "results.csv", buf.getvalue())
    atomic_write_json(root / "results.json", results.to_dict())


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
    return f"{path or 'config'}: {a!r} then, {b!r} now"
