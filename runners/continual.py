"""The continual runner: one training / evaluation loop for every registered method.

For each task: ``begin_task`` -> train (features resident on the device, batches as
slices of a seeded permutation) -> keep the best epoch on ``val`` -> encode the task's
database once into the code store -> score the queries of every task seen so far
against their stored codes (and, task-agnostic, against the union) -> ``end_task`` ->
checkpoint. ``mode: joint`` retrains a fresh model on all data seen so far and
re-encodes every database: the upper bound. A single-task benchmark is T = 1.

The loop is ``run`` -> ``fit_task`` (epochs) -> ``train_epoch`` -> ``train_step``; the
last three are public so that tests and benchmarks train exactly as a run does.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple, Union

import torch
from tqdm.auto import tqdm

from common.calc_utils import calc_map_k, continual_summary
from common.code_store import CodeStore
from common.collapse import code_collapse
from common.register import RUNNERS
from dataset.feature_set import FeatureSet, Task, TaskStream
from models.base import Batch, HashModel
from runners.evaluation import (
    encode_codes, retrieval_curves, score_against_store, score_bit_prefixes, score_directions, task_inference_accuracy,
)
from runners.optim import build_optimizers
from runners.outputs import RunOutput
from runners.results import DIRECTIONS, RunResults
from utils.distributed import DistContext, init_distributed, shutdown, sync_rows
from utils.errors import UserError
from utils.provenance import environment
from utils.seed import resolve_device, seed_everything, task_seed

ModelFactory = Callable[[], HashModel]


class TrainingDiverged(UserError):
    """A loss went non-finite; the message names the task, epoch and loss term."""


@dataclass
class OptimSpec:
    """The optimiser and (optional) schedule config blocks of a run."""

    optimizer: Dict[str, Any]
    scheduler: Optional[Dict[str, Any]] = None


@dataclass
class TaskOptim:
    """The optimisers and schedule of one task (rebuilt for every task)."""

    optimizers: List[torch.optim.Optimizer]
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
    scaler: Optional[Any] = None  # a GradScaler for fp16 autocast

    @property
    def lr(self) -> float:
        return float(self.optimizers[0].param_groups[0]["lr"])


@dataclass
class TaskPlan:
    """What step t of the stream trains on and how it encodes: the one place where
    continual and joint runs differ."""

    train_task: Task          # continual: task t; joint: tasks 0..t as one task
    code_task: int            # the task index the model's hooks and encoders see
    stored: List[int]         # databases (re)encoded into the store after training
    fresh_model: bool         # joint: a new model for every step
    joint: bool

    def query_task(self, j: int) -> int:
        """The task index the queries of task j are encoded as."""
        return self.code_task if self.joint else j


@RUNNERS.register("continual")
class ContinualRunner:
    """Trains and evaluates any HashModel over a TaskStream (see the module docstring)."""

    def __init__(
        self,
        epochs: int = 20,
        batch_size: int = 64,
        seed: int = 1,
        device: str = "auto",
        mode: Literal["continual", "joint"] = "continual",
        eval_batch_size: int = 4096,
        val_every: int = 1,
        select: Literal["best", "last"] = "best",
        topk: Optional[int] = None,
        grad_clip: Optional[float] = None,
        task_agnostic: bool = True,
        forward_transfer: bool = True,
        scalable_bits: List[int] = (8, 16, 32, 64),
        keep_task_checkpoints: bool = False,
        tensorboard: bool = True,
        progress: bool = True,
        num_threads: Optional[int] = None,
        amp: Literal["off", "bf16", "fp16"] = "off",
        compile: Union[bool, Literal["inductor", "aot_eager", "eager"]] = False,
    ) -> None:
        if epochs < 0:
            raise ValueError(f"runner.epochs must be >= 0, got {epochs}")
        if batch_size < 1 or eval_batch_size < 1 or val_every < 1:
            raise ValueError("runner.batch_size, eval_batch_size and val_every must be >= 1")
        if topk is not None and topk < 1:
            raise ValueError(f"runner.topk must be a positive integer or null (mAP@all), got {topk}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"runner.grad_clip must be positive or null, got {grad_clip}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"runner.num_threads must be a positive integer or null (torch's default), got {num_threads}")
        self.epochs = epochs
        self.batch_size = batch_size
        self.seed = seed
        self.device_name = device
        self.mode = mode
        self.eval_batch_size = eval_batch_size
        self.val_every = val_every
        self.select = select
        self.topk = topk
        self.grad_clip = grad_clip
        self.task_agnostic = task_agnostic
        self.forward_transfer = forward_transfer
        self.scalable_bits = [int(b) for b in scalable_bits]
        self.keep_task_checkpoints = keep_task_checkpoints
        self.tensorboard = tensorboard
        self.progress = progress
        self.num_threads = num_threads
        self.amp = amp
        self.compile = compile
        self._dist = DistContext()  # set by run() from the torchrun environment

    @property
    def metric_name(self) -> str:
        return "mAP@all" if self.topk is None else f"mAP@{self.topk}"

    # ================================================================== the run
    def run(
        self,
        stream: TaskStream,
        model_factory: ModelFactory,
        optim: OptimSpec,
        output: RunOutput,
        resume: bool = False,
        method: str = "",
    ) -> RunResults:
        """Train and evaluate over ``stream``; returns the results (also written).
        ``method`` names the model in the results (the config's ``model.name``).
        The process's torch thread count is restored afterwards, so runs in one process
        never see each other's settings."""
        threads = torch.get_num_threads()
        self._dist, device = init_distributed(resolve_device(self.device_name))
        try:
            if self.amp == "fp16" and device.type != "cuda":
                raise UserError(f"runner.amp: fp16 needs a CUDA device, the run is on {device}; use bf16 or off")
            return self._run(stream, model_factory, optim, output, resume, method, device)
        finally:
            shutdown(self._dist)
            torch.set_num_threads(threads)

    def _run(self, stream, model_factory, optim, output, resume, method, device) -> RunResults:
        if not self._dist.is_main:
            output.enabled = False  # only rank 0 writes logs, TensorBoard, checkpoints and results
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        seed_everything(self.seed)
        model = model_factory()  # built before any output is written: a bad model config leaves nothing
        T = len(stream)
        results = self._fresh_results(stream, method)
        results.config = output.config
        results.environment = environment(device)
        store = CodeStore()
        start = 0
        if resume:
            ckpt = output.load_resume_state()
            if ckpt is not None:
                model.build_structure(ckpt["structure"])
                model.load_state_dict(ckpt["model"])
                store = CodeStore.from_state(ckpt["store"])
                results = RunResults.from_dict(ckpt["results"])
                results.environment = environment(device)  # the process that finishes the run
                start = int(ckpt["next_task"])
        output.prepare(resume=resume and start > 0)
        log = output.logger
        log.info(f"{results.method} on {stream.name}: {T} task(s), device {device}, mode {self.mode}, "
                 f"seed {self.seed}" + (f", resuming at task {start + 1}" if start else "")
                 + (f", {self._dist.world_size} processes" if self._dist.enabled else ""))
        for line in stream.describe():
            log.info("  " + line)
        model.to(device)
        tasks = [t.to(device) for t in stream.tasks]

        if start == 0 and self.forward_transfer and T > 1 and self.mode == "continual":
            results.untrained = self._untrained_scores(model, tasks, device)

        for t in range(start, T):
            plan = self.plan(tasks, t)
            if plan.fresh_model:
                model = model_factory()
                torch.manual_seed(task_seed(self.seed, t))
                model.to(device)
            torch.manual_seed(task_seed(self.seed, t))
            model.begin_task(plan.train_task, plan.code_task)
            model.to(device)
            results.bits.append(model.bits)
            t0 = time.perf_counter()
            model.fit(plan.train_task, plan.code_task)  # closed-form models: once per task, before the epochs
            val_info = self.fit_task(model, plan.train_task, plan.code_task, optim, output, t)
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            agnostic = self._evaluate_after(model, tasks, t, plan, store, results, output)
            eval_s = time.perf_counter() - t0
            model.end_task(plan.train_task, plan.code_task, store)
            results.val.append(val_info)
            timing = results.timing
            timing["per_task"].append({"train_seconds": round(train_s, 3), "eval_seconds": round(eval_s, 3)})
            timing["train_seconds"] = round(timing["train_seconds"] + train_s, 3)
            timing["eval_seconds"] = round(timing["eval_seconds"] + eval_s, 3)
            results.completed_tasks = t + 1
            log.info(f"task {t + 1}/{T} done ({model.bits} bits, train {train_s:.1f}s, eval {eval_s:.1f}s): "
                     + "  ".join(f"{d} " + " ".join("-" if v is None else f"{v:.4f}" for v in results.row(d, t))
                                 for d in DIRECTIONS))
            if t == T - 1:
                self._finish(model, tasks, store, results, agnostic)
            self._summarise(results)
            output.task_scalars(results, t)
            output.save_task(t, model, store, results, keep=self.keep_task_checkpoints, last=(t == T - 1))
        output.close()
        return results

    def plan(self, tasks: List[Task], t: int) -> TaskPlan:
        """Step t of a continual run trains on task t and stores its database; of a joint
        run, a fresh model on tasks 0..t as one task that re-encodes every database."""
        if self.mode == "joint":
            return TaskPlan(self._joint_task(tasks, t), 0, list(range(t + 1)), fresh_model=True, joint=True)
        return TaskPlan(tasks[t], t, [t], fresh_model=False, joint=False)

    # ================================================================== training
    def task_optim(self, model: HashModel, task_index: int, n_train: int, optim: OptimSpec) -> TaskOptim:
        """The optimisers (and schedule) of one task, from the model's ``param_groups``."""
        steps_per_epoch = max(1, math.ceil(n_train / self.batch_size))
        optimizers, scheduler = build_optimizers(
            model.param_groups(task_index), optim.optimizer, optim.scheduler,
            total_steps=self.epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch,
        )
        scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        return TaskOptim(optimizers, scheduler, scaler)

    def fit_task(
        self, model: HashModel, task: Task, task_index: int, optim: OptimSpec, output: RunOutput, t: int
    ) -> Dict[str, Any]:
        """Train ``self.epochs`` epochs on ``task.train``; keep the best epoch on
        ``task.val``; returns the validation record of the task."""
        history: List[Dict[str, float]] = []
        if self.epochs == 0 or not any(p.requires_grad for p in model.parameters()):  # closed form: fit() did it
            return {"best_epoch": None, "best_score": None, "history": history}
        opt = self.task_optim(model, task_index, len(task.train), optim)
        gen = torch.Generator().manual_seed(task_seed(self.seed, t))
        module = self.training_module(model)
        best: Tuple[float, int, Optional[Dict[str, torch.Tensor]]] = (-math.inf, -1, None)
        bar = self._bar(t, self.epochs * self._steps_per_epoch(len(task.train)))
        for epoch in range(self.epochs):
            record = self.train_epoch(model, task, task_index, epoch, opt, gen, module=module, bar=bar)
            self._check_finite(record, t, epoch, output)
            step = t * self.epochs + epoch  # one global step per epoch, so curves span the stream
            for k, v in record.items():
                output.scalar(f"train/{k}", v, step)
            output.scalar("train/lr", opt.lr, step)
            if len(task.val) and ((epoch + 1) % self.val_every == 0 or epoch == self.epochs - 1):
                record["val_map"] = score = self.validate(model, task, task_index)
                output.scalar("val/map", score, step)
                if self.select == "best" and score > best[0]:
                    best = (score, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
            history.append({"epoch": epoch + 1, **{k: round(v, 6) for k, v in record.items()}})
            bar.set_postfix({"epoch": epoch + 1, **{k: f"{v:.4f}" for k, v in record.items() if k in ("loss", "val_map")}})
        bar.close()
        best_score, best_epoch, best_state = best
        if self.select == "best" and best_state is not None:
            model.load_state_dict(best_state)
        else:
            best_epoch = self.epochs - 1
            best_score = history[-1].get("val_map", None)
        output.logger.info(
            f"task {t + 1}: kept epoch {best_epoch + 1}/{self.epochs}"
            + (f" (val {self.metric_name} {best_score:.4f})" if best_score not in (None, -math.inf) else "")
        )
        return {"best_epoch": best_epoch + 1, "best_score": best_score, "history": history}

    def train_epoch(
        self, model: HashModel, task: Task, task_index: int, epoch: int, opt: TaskOptim, gen: torch.Generator,
        module: Optional[torch.nn.Module] = None, bar: Optional[Any] = None,
    ) -> Dict[str, float]:
        """Epoch ``epoch``: one pass over ``task.train`` in batches of a permutation drawn
        from ``gen``; returns the mean of every loss term (one host synchronisation per
        epoch, not per step)."""
        model.begin_epoch(task, task_index, epoch)
        model.train()
        module = module if module is not None else self.training_module(model)
        sums: Dict[str, torch.Tensor] = {}
        chunks = self.batches(len(task.train), gen, task.train.image.device)
        for idx in chunks:
            losses = self.train_step(module, model, task.train, idx, task_index, opt)
            for k, v in losses.items():
                # float64 sums in step order: the epoch means equal a Python-float running sum
                sums[k] = sums[k] + v.double() if k in sums else v.double()
            if bar is not None:
                bar.update(1)
        values = torch.stack(list(sums.values())).cpu().tolist() if sums else []
        return {k: v / max(1, len(chunks)) for k, v in zip(sums, values)}

    def batches(self, n: int, gen: torch.Generator, device: torch.device) -> List[torch.Tensor]:
        """The index batches of one epoch; a last batch of one sample is dropped (it
        breaks batch norm and pairwise losses)."""
        return list(torch.randperm(n, generator=gen).to(device).split(self.batch_size))[: self._steps_per_epoch(n)]

    def train_step(
        self, module: torch.nn.Module, model: HashModel, train: FeatureSet, idx: torch.Tensor,
        task_index: int, opt: TaskOptim,
    ) -> Dict[str, torch.Tensor]:
        """One optimiser step on the train rows ``idx``; returns the detached losses, left
        on the device. Under data parallelism every rank draws the same permutation and
        takes its slice of each global batch; DDP averages the gradients."""
        local = idx.tensor_split(self._dist.world_size)[self._dist.rank] if self._dist.enabled else idx
        with self._autocast(train.image.device):
            losses = module(Batch.rows(train, local), task_index)
        for o in opt.optimizers:
            o.zero_grad(set_to_none=True)
        total = losses["loss"]
        if opt.scaler is not None:
            opt.scaler.scale(total).backward()
            for o in opt.optimizers:
                opt.scaler.unscale_(o)
        else:
            total.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], self.grad_clip)
        for o in opt.optimizers:
            if opt.scaler is not None:
                opt.scaler.step(o)
            else:
                o.step()
        if opt.scaler is not None:
            opt.scaler.update()
        if opt.scheduler is not None:
            opt.scheduler.step()
        for buffer in model.train_buffers():
            sync_rows(buffer, idx, self._dist)
        return {k: v.detach() for k, v in losses.items()}

    def _check_finite(self, record: Dict[str, float], t: int, epoch: int, output: RunOutput) -> None:
        bad = [k for k, v in record.items() if not math.isfinite(v)]
        if not bad:
            return
        term = "loss" if "loss" in bad and len(bad) == 1 else next(k for k in bad if k != "loss")
        done = f"tasks 1..{t} are checkpointed in {output.root}" if t else "no task was finished"
        raise TrainingDiverged(
            f"task {t + 1} epoch {epoch + 1}: loss term '{term}' is not finite ({record[term]}); the run stopped "
            f"({done}); lower optimizer.lr or set runner.grad_clip and run again (--resume continues only with "
            f"the same config)"
        )

    def _autocast(self, device: torch.device):
        if self.amp == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)

    def training_module(self, model: HashModel) -> torch.nn.Module:
        """The module the training step calls: DDP around the model under torchrun, and
        torch.compile's wrapper with ``runner.compile``."""
        module: torch.nn.Module = model
        if self._dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self._dist.local_rank] if next(model.parameters()).is_cuda else None
            module = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)
        if self.compile:  # true = torch's default backend (inductor); "eager" only traces (a cheap check)
            module = torch.compile(module, backend="inductor" if self.compile is True else self.compile)
        return module

    def _steps_per_epoch(self, n: int) -> int:
        """Batches per epoch: every slice of ``batch_size``, less a last one of one sample."""
        steps = max(1, math.ceil(n / self.batch_size))
        return steps - 1 if steps > 1 and n - (steps - 1) * self.batch_size < 2 else steps

    def _bar(self, t: int, total: int, what: str = "train", unit: str = "step"):
        """A bar over task t's optimiser steps (or evaluation parts), shown only on an
        interactive terminal."""
        show = self.progress and self._dist.is_main and sys.stderr.isatty()
        return tqdm(total=total, desc=f"task {t + 1} {what}", unit=unit, disable=not show, leave=False,
                    dynamic_ncols=True)

    def validate(self, model: HashModel, task: Task, task_index: int) -> float:
        """Mean of both directions' mAP: val queries against the task's train split."""
        q = encode_codes(model, task.val, task_index, self.eval_batch_size, self._dist)
        db = encode_codes(model, task.train, task_index, self.eval_batch_size, self._dist)
        ql, dl = task.val.labels.cpu(), task.train.labels.cpu()
        i2t = calc_map_k(q["image"].cpu(), db["text"].cpu(), ql, dl, k=self.topk)
        t2i = calc_map_k(q["text"].cpu(), db["image"].cpu(), ql, dl, k=self.topk)
        return 0.5 * (float(i2t) + float(t2i))

    @staticmethod
    def _joint_task(tasks: List[Task], t: int) -> Task:
        """All train / val data of tasks 0..t as one task (joint training)."""
        seen = tasks[: t + 1]
        return Task(
            index=0,
            name="+".join(x.name for x in seen),
            train=FeatureSet.concat([x.train for x in seen]),
            val=FeatureSet.concat([x.val for x in seen]),
            query=FeatureSet.concat([x.query for x in seen]),
            database=FeatureSet.concat([x.database for x in seen]),
            classes=tuple(c for x in seen for c in x.classes),
        )

    # ================================================================== evaluation
    def _evaluate_after(
        self, model: HashModel, tasks: List[Task], t: int, plan: TaskPlan, store: CodeStore, results: RunResults,
        output: RunOutput,
    ) -> Optional[Dict[str, torch.Tensor]]:
        """Store the plan's database codes, then fill row t of the result matrices and
        the task-agnostic column (and R[t, t+1] for forward transfer); a bar counts the
        parts (one per database encoded, per task scored, the agnostic and the next-task
        score). Returns the task-agnostic codes of the queries of tasks 0..t (None
        without ``task_agnostic``)."""
        forward = self.forward_transfer and not plan.joint and t + 1 < len(tasks)
        bar = self._bar(t, len(plan.stored) + t + 1 + int(self.task_agnostic) + int(forward), "eval", "part")
        for j in plan.stored:
            db = tasks[j].database
            codes = encode_codes(model, db, plan.query_task(j), self.eval_batch_size, self._dist)
            store.add(j, codes["image"], codes["text"], db.labels, db.ids)
            for collapse in code_collapse(store.get(j)):
                output.logger.warning("warning: " + collapse.message())
                results.notes.append(collapse.message())
            bar.update(1)
        per_task: List[Dict[str, torch.Tensor]] = []  # query codes of tasks 0..t, kept when the task is ignored
        for j in range(t + 1):
            codes = encode_codes(model, tasks[j].query, plan.query_task(j), self.eval_batch_size, self._dist)
            scores = score_directions(codes, tasks[j].query.labels, store.entries([j]), self.topk)
            if model.codes_ignore_task:
                per_task.append(codes)
            for d in DIRECTIONS:
                results.map[d][t][j] = round(scores[d], 6)
            bar.update(1)
        agnostic: Optional[Dict[str, torch.Tensor]] = None
        if self.task_agnostic:
            queries = FeatureSet.concat([tasks[j].query for j in range(t + 1)])
            if per_task:  # the same codes a task-agnostic encoding would give, row for row
                agnostic = {m: torch.cat([c[m] for c in per_task]) for m in ("image", "text")}
            else:
                agnostic = encode_codes(model, queries, None, self.eval_batch_size, self._dist)
            scores = score_directions(agnostic, queries.labels, store.entries(list(range(t + 1))), self.topk)
            for d in DIRECTIONS:
                results.task_agnostic[d].append(round(scores[d], 6))
            if not plan.joint:
                truth = torch.cat([torch.full((len(tasks[j].query),), j, dtype=torch.long) for j in range(t + 1)])
                accuracy = task_inference_accuracy(model, queries, truth, self.eval_batch_size)
                if accuracy is not None:
                    if results.task_inference is None:
                        results.task_inference = {m: [] for m in accuracy}
                    for m, value in accuracy.items():
                        results.task_inference[m].append(round(value, 6))
            bar.update(1)
        if forward:
            # Score the next, unseen task with the current model (its database encoded
            # on the fly, not stored): the R[t, t+1] entry that forward transfer needs.
            nxt = tasks[t + 1]
            db = encode_codes(model, nxt.database, t, self.eval_batch_size, self._dist)
            q = encode_codes(model, nxt.query, t, self.eval_batch_size, self._dist)
            tmp = CodeStore()
            tmp.add(t + 1, db["image"], db["text"], nxt.database.labels)
            scores = score_directions(q, nxt.query.labels, tmp.entries(), self.topk)
            for d in DIRECTIONS:
                results.map_next[d][t] = round(scores[d], 6)
            bar.update(1)
        bar.close()
        return agnostic

    def _untrained_scores(self, initial: HashModel, tasks: List[Task], device: torch.device) -> Dict[str, List[float]]:
        """b_j: each task scored by the run's own initial model before any training (a
        copy, set up for task 1 as the run does), for forward transfer. Runs under a
        forked RNG so it never changes what the real run draws."""
        import copy

        out: Dict[str, List[float]] = {d: [] for d in DIRECTIONS}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            fresh = copy.deepcopy(initial)
            torch.manual_seed(task_seed(self.seed, 0))
            fresh.begin_task(tasks[0], 0)
            fresh.to(device)
            for task in tasks:
                tmp = CodeStore()
                db = encode_codes(fresh, task.database, 0, self.eval_batch_size, self._dist)
                tmp.add(task.index, db["image"], db["text"], task.database.labels)
                scores = score_against_store(fresh, task.query, 0, tmp, [task.index], self.topk, self.eval_batch_size, self._dist)
                for d in out:
                    out[d].append(round(scores[d], 6))
        return out

    def _finish(self, model: HashModel, tasks: List[Task], store: CodeStore, results: RunResults,
                agnostic: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """After the last task: the retrieval curves of all queries, task-agnostic, against
        every stored code (with ``task_agnostic``), and the bit-scalable figures when the
        model ranks its bits (SCAHN). ``agnostic``: the last task's task-agnostic query
        codes, which are these queries' codes (encoded here when None)."""
        significance = model.bit_significance()
        if not self.task_agnostic and significance is None:
            return
        entries = store.entries()
        queries = FeatureSet.concat([task.query for task in tasks])
        q = agnostic if agnostic is not None else encode_codes(model, queries, None, self.eval_batch_size, self._dist)
        if self.task_agnostic:
            results.curves = retrieval_curves(q, queries.labels, entries)
        if significance is None:
            return
        if len({e.bits for e in entries}) != 1 or entries[0].bits != model.bits:
            results.notes.append("bit_scalable skipped: stored codes differ in length")
            return
        lengths = sorted({b for b in self.scalable_bits if b < model.bits} | {model.bits})
        order = torch.argsort(significance.detach().float().cpu(), descending=True, stable=True)
        results.bit_order = order.tolist()
        results.bit_scalable = {
            k: {d: round(v, 6) for d, v in s.items()}
            for k, s in score_bit_prefixes(q, queries.labels, entries, order, lengths, self.topk).items()
        }

    # ================================================================== bookkeeping
    def _fresh_results(self, stream: TaskStream, method: str) -> RunResults:
        return RunResults.start(
            len(stream),
            method=method or None,
            dataset=stream.name,
            metric=self.metric_name,
            mode=self.mode,
            task_names=[t.name for t in stream.tasks],
            task_sizes=[t.sizes() for t in stream.tasks],
            seed=self.seed,
            dims={"image_dim": stream.image_dim, "text_dim": stream.text_dim, "num_classes": stream.num_classes},
            label_names=list(stream.label_names),
        )

    @staticmethod
    def _summarise(results: RunResults) -> None:
        """Continual summary over the rows finished so far. FWT needs R[j-1][j], the
        score on task j before training on it, which this runner measures
        (``map_next``), and the untrained scores b_j."""
        done = results.completed_tasks
        for d in DIRECTIONS:
            R = [list(row[:done]) for row in results.map[d][:done]]
            untrained = None
            if results.untrained and done > 1:
                for t in range(done - 1):
                    R[t][t + 1] = results.map_next[d][t]
                untrained = results.untrained[d][:done]
            results.summary[d] = continual_summary(R, untrained=untrained)
