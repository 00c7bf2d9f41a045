"""The continual runner: one training / evaluation loop for every registered method.

For each task: ``begin_task`` -> train (features resident on the device, batches as
slices of a seeded permutation) -> keep the best epoch on ``val`` -> encode the task's
database once into the code store -> score the queries of every task seen so far
against their stored codes (and, task-agnostic, against the union) -> ``end_task`` ->
checkpoint. ``mode: joint`` retrains a fresh model on all data seen so far and
re-encodes every database: the upper bound. A single-task benchmark is T = 1.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Literal, Optional

import torch
from tqdm.auto import tqdm

from common.calc_utils import calc_map_k, continual_summary
from common.code_store import CodeStore
from common.register import RUNNERS
from dataset.feature_set import FeatureSet, Task, TaskStream
from models.base import Batch, HashModel
from runners.evaluation import (
    empty_matrix, encode_codes, score_against_store, score_bit_prefixes, score_directions,
)
from runners.optim import build_optimizers
from runners.outputs import RunOutput
from utils.distributed import DistContext, init_distributed, shutdown, sync_rows
from utils.seed import resolve_device, seed_everything, task_seed

ModelFactory = Callable[[], HashModel]


@dataclass
class OptimSpec:
    """The optimiser and (optional) schedule config blocks of a run."""

    optimizer: Dict[str, Any]
    scheduler: Optional[Dict[str, Any]] = None


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
        keep_task_checkpoints: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
        num_threads: Optional[int] = None,
    ) -> None:
        if epochs < 0:
            raise ValueError(f"runner.epochs must be >= 0, got {epochs}")
        if batch_size < 1 or eval_batch_size < 1 or val_every < 1:
            raise ValueError("runner.batch_size, eval_batch_size and val_every must be >= 1")
        if topk is not None and topk < 1:
            raise ValueError(f"runner.topk must be a positive integer or null (mAP@all), got {topk}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"runner.grad_clip must be positive or null, got {grad_clip}")
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
    ) -> Dict[str, Any]:
        """Train and evaluate over ``stream``; returns the results dict (also written).
        ``method`` names the model in the results (the config's ``model.name``)."""
        self._dist, device = init_distributed(resolve_device(self.device_name))
        try:
            return self._run(stream, model_factory, optim, output, resume, method, device)
        finally:
            shutdown(self._dist)

    def _run(self, stream, model_factory, optim, output, resume, method, device) -> Dict[str, Any]:
        if not self._dist.is_main:
            output.enabled = False  # only rank 0 writes logs, TensorBoard, checkpoints and results
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        seed_everything(self.seed)
        model = model_factory()  # built before any output is written: a bad model config leaves nothing
        T = len(stream)
        state = self._fresh_state(stream, method)
        state["config"] = output.config
        store = CodeStore()
        start = 0
        if resume:
            ckpt = output.load_resume_state()
            if ckpt is not None:
                model.build_structure(ckpt["structure"])
                model.load_state_dict(ckpt["model"])
                store = CodeStore.from_state(ckpt["store"])
                state = ckpt["results"]
                start = int(ckpt["next_task"])
        output.prepare(resume=resume and start > 0)
        log = output.logger
        log.info(f"{state['method']} on {stream.name}: {T} task(s), device {device}, mode {self.mode}, "
                 f"seed {self.seed}" + (f", resuming at task {start + 1}" if start else "")
                 + (f", {self._dist.world_size} processes" if self._dist.enabled else ""))
        for line in stream.describe():
            log.info("  " + line)
        model.to(device)
        tasks = [t.to(device) for t in stream.tasks]

        if start == 0 and self.forward_transfer and T > 1 and self.mode == "continual":
            state["untrained"] = self._untrained_scores(model, tasks, device)

        for t in range(start, T):
            if self.mode == "joint":
                model = model_factory()
                torch.manual_seed(task_seed(self.seed, t))
                model.to(device)
                train_task = self._joint_task(tasks, t)
                code_task = 0
            else:
                train_task = tasks[t]
                code_task = t
            torch.manual_seed(task_seed(self.seed, t))
            model.begin_task(train_task, code_task)
            model.to(device)
            state["bits"].append(model.bits)
            t0 = time.perf_counter()
            model.fit(train_task, code_task)  # the closed-form hook: once per task, before the epochs
            val_info = self._train_task(model, train_task, code_task, optim, output, t)
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            self._evaluate_after(model, tasks, t, code_task, store, state)
            eval_s = time.perf_counter() - t0
            model.end_task(train_task, code_task, store)
            state["val"].append(val_info)
            state["timing"]["per_task"].append({"train_seconds": round(train_s, 3), "eval_seconds": round(eval_s, 3)})
            state["timing"]["train_seconds"] = round(state["timing"]["train_seconds"] + train_s, 3)
            state["timing"]["eval_seconds"] = round(state["timing"]["eval_seconds"] + eval_s, 3)
            state["completed_tasks"] = t + 1
            row = {d: state["map"][d][t] for d in ("i2t", "t2i")}
            log.info(f"task {t + 1}/{T} done ({model.bits} bits, train {train_s:.1f}s, eval {eval_s:.1f}s): "
                     + "  ".join(f"{d} " + " ".join("-" if v is None else f"{v:.4f}" for v in row[d]) for d in row))
            if t == T - 1:
                self._finish(model, tasks, store, state)
            self._summarise(state)
            output.save_task(t, model, store, state, keep=self.keep_task_checkpoints, last=(t == T - 1))
        output.close()
        return state

    # ================================================================== training
    def _train_task(
        self, model: HashModel, task: Task, task_index: int, optim: OptimSpec, output: RunOutput, t: int
    ) -> Dict[str, Any]:
        """Train on ``task.train``; keep the best epoch on ``task.val``; returns val info."""
        n = len(task.train)
        if not any(p.requires_grad for p in model.parameters()):  # closed-form model: fitted by fit(), no optimiser
            return {"best_epoch": None, "best_score": None, "history": []}
        steps_per_epoch = max(1, math.ceil(n / self.batch_size))
        optimizers, scheduler = build_optimizers(
            model.param_groups(task_index), optim.optimizer, optim.scheduler,
            total_steps=self.epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch,
        )
        best_score, best_epoch, best_state = -math.inf, -1, None
        history: List[Dict[str, float]] = []
        if self.epochs == 0:
            return {"best_epoch": None, "best_score": None, "history": history}
        gen = torch.Generator().manual_seed(task_seed(self.seed, t))
        bar = tqdm(range(self.epochs), desc=f"task {t + 1}", disable=not (self.progress and self._dist.is_main),
                   leave=False, dynamic_ncols=True)
        train_module = self._parallel(model)
        step = 0
        for epoch in bar:
            model.begin_epoch(task, task_index, epoch)
            model.train()
            perm = torch.randperm(n, generator=gen).to(task.train.image.device)
            chunks = list(perm.split(self.batch_size))
            if len(chunks) > 1 and len(chunks[-1]) < 2:  # a batch of 1 breaks batch norm and pairwise losses
                chunks.pop()
            sums: Dict[str, float] = {}
            for idx in chunks:
                # Under data parallelism every rank draws the same permutation and takes
                # its slice of each global batch; DDP averages the gradients.
                local = idx.tensor_split(self._dist.world_size)[self._dist.rank] if self._dist.enabled else idx
                batch = self._batch(task.train, local)
                losses = train_module(batch, task_index)
                total = losses["loss"]
                if not torch.isfinite(total):
                    raise FloatingPointError(f"task {t + 1} epoch {epoch + 1}: loss is {total.item()} (not finite)")
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                total.backward()
                if self.grad_clip:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], self.grad_clip)
                for opt in optimizers:
                    opt.step()
                if scheduler is not None:
                    scheduler.step()
                for buffer in model.train_buffers():
                    sync_rows(buffer, idx, self._dist)
                step += 1
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
            record = {k: v / max(1, len(chunks)) for k, v in sums.items()}
            for k, v in record.items():
                output.scalar(f"task{t + 1}/train_{k}", v, epoch)
            output.scalar(f"task{t + 1}/lr", optimizers[0].param_groups[0]["lr"], epoch)
            last = epoch == self.epochs - 1
            if len(task.val) and ((epoch + 1) % self.val_every == 0 or last):
                score = self._validate(model, task, task_index)
                record["val_map"] = score
                output.scalar(f"task{t + 1}/val_map", score, epoch)
                if self.select == "best" and score > best_score:
                    best_score, best_epoch = score, epoch
                    best_state = copy.deepcopy(model.state_dict())
            history.append({"epoch": epoch + 1, **{k: round(v, 6) for k, v in record.items()}})
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k in ("loss", "val_map")})
        bar.close()
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

    def _parallel(self, model: HashModel) -> torch.nn.Module:
        """The module the training step calls: DDP around the model under torchrun."""
        if not self._dist.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self._dist.local_rank] if next(model.parameters()).is_cuda else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)

    @staticmethod
    def _batch(fs: FeatureSet, idx: torch.Tensor) -> Batch:
        return Batch(
            image=fs.image[idx], text=fs.text[idx], labels=fs.labels[idx], index=idx,
            image_layers=None if fs.image_layers is None else fs.image_layers[idx],
            text_layers=None if fs.text_layers is None else fs.text_layers[idx],
        )

    def _validate(self, model: HashModel, task: Task, task_index: int) -> float:
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
        self, model: HashModel, tasks: List[Task], t: int, code_task: int, store: CodeStore, state: Dict[str, Any]
    ) -> None:
        """Store task t's database codes (joint: re-encode all seen databases), then
        fill row t of the result matrices and the task-agnostic column."""
        to_encode = range(t + 1) if self.mode == "joint" else [t]
        for j in to_encode:
            db = tasks[j].database
            codes = encode_codes(model, db, code_task if self.mode == "joint" else j, self.eval_batch_size, self._dist)
            store.add(j, codes["image"], codes["text"], db.labels, db.ids)
        for j in range(t + 1):
            q_task = code_task if self.mode == "joint" else j
            scores = score_against_store(model, tasks[j].query, q_task, store, [j], self.topk, self.eval_batch_size, self._dist)
            for d in ("i2t", "t2i"):
                state["map"][d][t][j] = round(scores[d], 6)
        if self.task_agnostic:
            queries = FeatureSet.concat([tasks[j].query for j in range(t + 1)])
            scores = score_against_store(model, queries, None, store, list(range(t + 1)), self.topk, self.eval_batch_size, self._dist)
            for d in ("i2t", "t2i"):
                state["task_agnostic"][d].append(round(scores[d], 6))
        if self.forward_transfer and self.mode == "continual" and t + 1 < len(tasks):
            # Score the next, unseen task with the current model (its database encoded
            # on the fly, not stored): the R[t, t+1] entry that forward transfer needs.
            nxt = tasks[t + 1]
            db = encode_codes(model, nxt.database, t, self.eval_batch_size, self._dist)
            q = encode_codes(model, nxt.query, t, self.eval_batch_size, self._dist)
            tmp = CodeStore()
            tmp.add(t + 1, db["image"], db["text"], nxt.database.labels)
            scores = score_directions(q, nxt.query.labels, tmp.entries(), self.topk)
            for d in ("i2t", "t2i"):
                state["map_next"][d][t] = round(scores[d], 6)

    def _untrained_scores(self, initial: HashModel, tasks: List[Task], device: torch.device) -> Dict[str, List[float]]:
        """b_j: each task scored by the run's own initial model before any training (a
        copy, set up for task 1 as the run does), for forward transfer. Runs under a
        forked RNG so it never changes what the real run draws."""
        out: Dict[str, List[float]] = {"i2t": [], "t2i": []}
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

    def _finish(self, model: HashModel, tasks: List[Task], store: CodeStore, state: Dict[str, Any]) -> None:
        """Bit-scalable figures when the model ranks its bits (SCAHN)."""
        significance = model.bit_significance()
        if significance is None:
            return
        entries = store.entries()
        if len({e.bits for e in entries}) != 1 or entries[0].bits != model.bits:
            state["notes"].append("bit_scalable skipped: stored codes differ in length")
            return
        lengths = sorted({b for b in self.scalable_bits if b < model.bits} | {model.bits})
        order = torch.argsort(significance.detach().float().cpu(), descending=True, stable=True)
        queries = FeatureSet.concat([task.query for task in tasks])
        q = encode_codes(model, queries, None, self.eval_batch_size, self._dist)
        state["bit_order"] = order.tolist()
        state["bit_scalable"] = {
            k: {d: round(v, 6) for d, v in s.items()}
            for k, s in score_bit_prefixes(q, queries.labels, entries, order, lengths, self.topk).items()
        }

    # ================================================================== bookkeeping
    def _fresh_state(self, stream: TaskStream, method: str) -> Dict[str, Any]:
        T = len(stream)
        return {
            "status": "running",
            "method": method or None,
            "dataset": stream.name,
            "metric": self.metric_name,
            "mode": self.mode,
            "tasks": T,
            "task_names": [t.name for t in stream.tasks],
            "task_sizes": [t.sizes() for t in stream.tasks],
            "completed_tasks": 0,
            "bits": [],
            "map": {"i2t": empty_matrix(T), "t2i": empty_matrix(T)},
            "task_agnostic": {"i2t": [], "t2i": []},
            "map_next": {"i2t": [None] * T, "t2i": [None] * T},
            "untrained": None,
            "summary": {},
            "val": [],
            "timing": {"train_seconds": 0.0, "eval_seconds": 0.0, "per_task": []},
            "seed": self.seed,
            "dims": {"image_dim": stream.image_dim, "text_dim": stream.text_dim, "num_classes": stream.num_classes},
            "label_names": list(stream.label_names),
            "notes": [],
        }

    @staticmethod
    def _summarise(state: Dict[str, Any]) -> None:
        """Continual summary over the rows finished so far. FWT needs R[j-1][j], the
        score on task j before training on it, which this runner measures
        (``map_next``), and the untrained scores b_j."""
        done = state["completed_tasks"]
        for d in ("i2t", "t2i"):
            R = [list(row[:done]) for row in state["map"][d][:done]]
            untrained = None
            if state.get("untrained") and done > 1:
                for t in range(done - 1):
                    R[t][t + 1] = state["map_next"][d][t]
                untrained = state["untrained"][d][:done]
            state["summary"][d] = continual_summary(R, untrained=untrained)
