"""Optimisers (registered in OPTIMIZERS) and learning-rate schedules (in SCHEDULERS).

An optimiser entry takes ``params`` (a list of parameter groups) plus its config
kwargs. A schedule entry takes the optimiser, the task's ``total_steps`` and
``steps_per_epoch`` plus its kwargs, and is stepped once per optimiser step. Both are
built through ``runners.config.build_block``, like every other config block.

``impl`` picks torch's kernel: ``fused`` (one kernel over all parameters; 4x faster
than the per-tensor loop on CPU for AdamW), ``foreach`` (multi-tensor, bit-identical to
``single``) or ``single`` (the per-tensor loop). ``auto`` is ``fused``. Fused AdamW
rounds the update in another order: results differ from ``single`` in the last bit of
float32 and so, after many steps, in the last digits of a run's figures.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import torch
from torch.optim.lr_scheduler import LambdaLR

from common.register import OPTIMIZERS, SCHEDULERS
from runners.config import build_block
from utils.errors import ConfigError

Impl = Literal["auto", "fused", "foreach", "single"]


def build_optimizers(
    groups: Sequence[Dict[str, Any]],
    optimizer: Dict[str, Any],
    scheduler: Optional[Dict[str, Any]] = None,
    total_steps: int = 1,
    steps_per_epoch: int = 1,
) -> Tuple[List[torch.optim.Optimizer], Optional[LambdaLR]]:
    """Optimisers for a model's ``param_groups``: the configured ``optimizer`` block over
    every group without an ``optimizer`` of its own (lr times the group's ``lr_scale``),
    one optimiser per group that has one (validated like a config block, at
    ``model.param_groups[i].optimizer``), and the ``scheduler`` block on the first.
    Frozen parameters and empty groups are left out."""
    base_lr = float(optimizer.get("lr", 1e-3))
    main_groups, extra = [], []
    for i, group in enumerate(groups):
        group = dict(group)
        params = [p for p in group.pop("params") if p.requires_grad]
        own = group.pop("optimizer", None)
        scale = float(group.pop("lr_scale", 1.0))
        group.pop("name", None)
        if not params:
            continue
        if own is not None:
            extra.append(build_block("optimizer", own, f"model.param_groups[{i}].optimizer",
                                     params=[{"params": params, **group}]))
        else:
            main_groups.append({"params": params, "lr": base_lr * scale, **group})
    if not main_groups and not extra:
        raise ConfigError("the model has no trainable parameters for this task")
    optimizers: List[torch.optim.Optimizer] = []
    schedule = None
    if main_groups:
        main = build_block("optimizer", optimizer, "optimizer", params=main_groups)
        optimizers.append(main)
        if scheduler is not None:
            schedule = build_block("scheduler", scheduler, "scheduler", optimizer=main,
                                   total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    optimizers.extend(extra)
    return optimizers, schedule


def _kernel(impl: Impl) -> Dict[str, bool]:
    """torch's keyword for the chosen kernel (``single`` = neither foreach nor fused)."""
    if impl in ("auto", "fused"):
        return {"fused": True}
    return {"foreach": impl == "foreach"}


def _check_lr(lr: float) -> None:
    if not (lr >= 0 and math.isfinite(lr)):  # NaN fails both comparisons
        raise ValueError(f"lr must be a finite number >= 0, got {lr}")


@OPTIMIZERS.register("adamw")
def adamw(params: Sequence[Dict[str, Any]], lr: float = 1e-3, weight_decay: float = 0.01,
          betas: List[float] = (0.9, 0.999), eps: float = 1e-8, impl: Impl = "auto") -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay)."""
    _check_lr(lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, **_kernel(impl))


@OPTIMIZERS.register("adam")
def adam(params: Sequence[Dict[str, Any]], lr: float = 1e-3, weight_decay: float = 0.0,
         betas: List[float] = (0.9, 0.999), eps: float = 1e-8, impl: Impl = "auto") -> torch.optim.Optimizer:
    """Adam (L2 weight decay added to the gradient)."""
    _check_lr(lr)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, **_kernel(impl))


@OPTIMIZERS.register("sgd")
def sgd(params: Sequence[Dict[str, Any]], lr: float = 1e-2, momentum: float = 0.0,
        weight_decay: float = 0.0, nesterov: bool = False, impl: Impl = "auto") -> torch.optim.Optimizer:
    """SGD with optional (Nesterov) momentum."""
    _check_lr(lr)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                           **_kernel(impl))


@SCHEDULERS.register("constant")
def constant(optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int) -> LambdaLR:
    """No schedule: the configured learning rate throughout."""
    return LambdaLR(optimizer, lambda step: 1.0)


@SCHEDULERS.register("exponential")
def exponential(optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int,
                gamma: float = 0.99) -> LambdaLR:
    """lr * gamma^epoch (CASH's ExponentialLR per epoch, applied at epoch boundaries)."""
    per_epoch = max(1, int(steps_per_epoch))
    return LambdaLR(optimizer, lambda step: gamma ** (step // per_epoch))


@SCHEDULERS.register("warmup_cosine")
def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int,
                  warmup: float = 0.1, min_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up over the first ``warmup`` fraction of steps, then cosine decay to
    ``min_ratio * lr`` (the BertAdam-style schedule of DCMHT / DSPH, per task)."""
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup must be a fraction in [0, 1), got {warmup}")
    total = max(1, int(total_steps))
    warm = int(round(warmup * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
