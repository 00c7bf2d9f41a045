"""Shared helpers for the model tests: a tiny structured task, a brute-force mAP, a
small training loop that builds optimisers the way the runner does, and the contract
checks every model must pass (batch independence, gradients on every parameter)."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from dataset.feature_set import FeatureSet, Task
from models.base import Batch, HashModel, sign_codes
from runners.continual import ContinualRunner, OptimSpec
from runners.optim import build_optimizers as runner_optimizers


def structured_features(n: int, num_classes: int, image_dim: int, text_dim: int, seed: int,
                        noise: float = 0.6, layers: Optional[int] = None) -> FeatureSet:
    """Samples of ``num_classes`` single-label classes: each modality is its own random
    class mean plus Gaussian noise (different dimensions per modality). With ``layers``,
    per-layer features (N, layers, image_dim) get class information growing with depth."""
    g = torch.Generator().manual_seed(1234)           # class means shared by every split
    mean_v = torch.randn(num_classes, image_dim, generator=g)
    mean_t = torch.randn(num_classes, text_dim, generator=g)
    mean_l = torch.randn(num_classes, image_dim, generator=g)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    labels = torch.nn.functional.one_hot(y, num_classes).float()
    image = mean_v[y] + noise * torch.randn(n, image_dim, generator=g)
    text = mean_t[y] + noise * torch.randn(n, text_dim, generator=g)
    extra = {}
    if layers:
        depth = torch.linspace(0.2, 1.0, layers).view(1, layers, 1)
        extra["image_layers"] = depth * mean_l[y].unsqueeze(1) + noise * torch.randn(n, layers, image_dim, generator=g)
        extra["text_layers"] = depth * mean_l[y].unsqueeze(1) + noise * torch.randn(n, layers, image_dim, generator=g)
    return FeatureSet(image=image, text=text, labels=labels, **extra)


def structured_task(num_classes: int = 4, image_dim: int = 20, text_dim: int = 12, n_train: int = 96,
                    n_query: int = 32, n_db: int = 96, noise: float = 0.6, layers: Optional[int] = None) -> Task:
    make = lambda n, s: structured_features(n, num_classes, image_dim, text_dim, s, noise, layers)  # noqa: E731
    return Task(index=0, name="toy", train=make(n_train, 1), val=make(8, 2), query=make(n_query, 3),
                database=make(n_db, 4), classes=tuple(range(num_classes)))


batch_of = Batch.rows


ADAMW = {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0}


def build_optimizers(model: HashModel, lr: float = 1e-2) -> List[torch.optim.Optimizer]:
    """The runner's optimisers for task 0's parameter groups: AdamW at ``lr`` over the
    groups without an optimiser of their own, plus each group's own optimiser."""
    optimizers, _ = runner_optimizers(model.param_groups(0), {**ADAMW, "lr": lr})
    return optimizers


def train(model: HashModel, task: Task, epochs: int = 10, batch_size: int = 32, lr: float = 1e-2,
          seed: int = 0) -> List[float]:
    """Train on ``task.train`` as the runner does (its ``train_epoch``); returns the mean
    loss per epoch."""
    torch.manual_seed(seed)
    model.begin_task(task, 0)
    runner = ContinualRunner(epochs=epochs, batch_size=batch_size, seed=seed, progress=False)
    opt = runner.task_optim(model, 0, len(task.train), OptimSpec({**ADAMW, "lr": lr}))
    gen = torch.Generator().manual_seed(seed)
    history = [runner.train_epoch(model, task, 0, epoch, opt, gen)["loss"] for epoch in range(epochs)]
    model.eval()
    return history


def task_steps(model: HashModel, task: Task, t: int, steps: int, lr: float = 3e-3, seed: int = 0,
               batch: int = 32) -> List[Dict[str, float]]:
    """``begin_task(t)`` plus ``steps`` runner steps (``train_step``) on random batches of
    ``task.train``; returns every step's losses."""
    torch.manual_seed(seed + t)
    model.begin_task(task, t)
    runner = ContinualRunner(batch_size=batch, seed=seed, progress=False)
    opt = runner.task_optim(model, t, len(task.train), OptimSpec({"name": "adamw", "lr": lr, "weight_decay": 0.01}))
    gen = torch.Generator().manual_seed(seed + 100 * t)
    history = []
    model.begin_epoch(task, t, 0)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(task.train), generator=gen)[:batch]
        losses = runner.train_step(model, model, task.train, idx, t, opt)
        history.append({k: float(v) for k, v in losses.items()})
    model.eval()
    return history


def finish_task(model: HashModel, task: Task, t: int, store) -> None:
    """Store task t's database codes and call ``end_task``, as the runner does."""
    with torch.no_grad():
        db = task.database
        store.add(t, sign_codes(model.encode_image(db.image, t)), sign_codes(model.encode_text(db.text, t)), db.labels)
    model.end_task(task, t, store)


def run_task_sequence(build, stream, n: int, steps: int, seed: int = 0, **kw):
    """A model from ``build(**kw)`` trained on the first ``n`` tasks of ``stream``;
    returns (model, store)."""
    from common.code_store import CodeStore

    torch.manual_seed(seed)
    model = build(**kw)
    store = CodeStore()
    for t in range(n):
        task_steps(model, stream.tasks[t], t, steps, seed=seed)
        finish_task(model, stream.tasks[t], t, store)
    return model, store


def brute_map(q: torch.Tensor, db: torch.Tensor, q_labels: torch.Tensor, db_labels: torch.Tensor) -> float:
    """mAP@all with ties broken by database index (the library's definition)."""
    q, db = q.float(), db.float()
    ham = 0.5 * (q.shape[1] - q @ db.t())
    rel = ((q_labels @ db_labels.t()) > 0).float()
    order = torch.argsort(ham, dim=1, stable=True)
    r = torch.gather(rel, 1, order)
    prec = r.cumsum(1) / torch.arange(1, r.shape[1] + 1)
    return float(((prec * r).sum(1) / r.sum(1).clamp(min=1)).mean())


@torch.no_grad()
def codes(model: HashModel, fs: FeatureSet) -> Dict[str, torch.Tensor]:
    model.eval()
    return {"image": sign_codes(model.encode_image(fs.image, 0, fs.image_layers)),
            "text": sign_codes(model.encode_text(fs.text, 0, fs.text_layers))}


def retrieval_map(model: HashModel, task: Task, columns: Optional[torch.Tensor] = None) -> float:
    """Mean of i2t and t2i mAP, query vs database (optionally on the code ``columns``)."""
    q, d = codes(model, task.query), codes(model, task.database)
    if columns is not None:
        q = {m: c[:, columns] for m, c in q.items()}
        d = {m: c[:, columns] for m, c in d.items()}
    ql, dl = task.query.labels, task.database.labels
    return 0.5 * (brute_map(q["image"], d["text"], ql, dl) + brute_map(q["text"], d["image"], ql, dl))


@torch.no_grad()
def assert_batch_independent(model: HashModel, fs: FeatureSet, atol: float = 1e-5) -> None:
    """Eval mode: each sample encoded alone equals its row in the full batch, per modality."""
    model.eval()
    for modality, encode in (("image", model.encode_image), ("text", model.encode_text)):
        data, layers = getattr(fs, modality), getattr(fs, f"{modality}_layers")
        full = encode(data, 0, layers)
        assert full.shape == (len(fs), model.bits)
        for i in (0, len(fs) // 2, len(fs) - 1):
            alone = encode(data[i:i + 1], 0, None if layers is None else layers[i:i + 1])
            torch.testing.assert_close(alone[0], full[i], atol=atol, rtol=0)
        # reversing the batch permutes the rows and changes nothing else
        rev = encode(data.flip(0), 0, None if layers is None else layers.flip(0))
        torch.testing.assert_close(rev.flip(0), full, atol=atol, rtol=0)


def assert_every_parameter_gets_gradient(model: HashModel, task: Task, batch_size: int = 16) -> bool:
    """After ``begin_task(0)``: every trainable parameter is in some optimiser group and
    gets a non-zero gradient from one loss whose parts are scalars. Returns False, with
    the loss never called, for a closed-form model (nothing trainable: the runner only
    calls its ``fit``)."""
    torch.manual_seed(0)
    model.begin_task(task, 0)
    model.begin_epoch(task, 0, 0)
    model.train()
    grouped = {id(p) for g in model.param_groups(0) for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in grouped]
    assert not missing, f"parameters given to no optimiser: {missing}"
    if not any(p.requires_grad for p in model.parameters()):
        return False
    model.zero_grad()
    losses = model(batch_of(task.train, torch.arange(batch_size)), 0)
    assert "loss" in losses and all(v.dim() == 0 for v in losses.values())
    losses["loss"].backward()
    dead = [n for n, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not bool(p.grad.abs().sum() > 0))]
    assert not dead, f"trainable parameters without a gradient: {dead}"
    return True


def assert_finite_loss(parts: Dict[str, torch.Tensor]) -> None:
    assert "loss" in parts
    for k, v in parts.items():
        assert v.dim() == 0 and math.isfinite(float(v.detach())), f"{k} = {v}"
