"""Seeding and device choice, done once by the runner (never inside models)."""
from __future__ import annotations

import random
import re

import numpy as np
import torch

from utils.errors import ConfigError


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) and ask cuDNN for determinism."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def task_seed(seed: int, task_index: int, epoch: int = -1) -> int:
    """A seed derived from the run seed, the task and optionally the epoch, so that a
    resumed run draws exactly what an uninterrupted one would."""
    return (int(seed) * 1_000_003 + (task_index + 1) * 10_007 + (epoch + 1)) % (2**63 - 1)


def resolve_device(name: str, key: str = "runner.device") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is refused.
    ``key`` names the setting in the error (a config key or a command-line flag)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}: '{name}' requested but no CUDA device is available; use auto or cpu")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"{key}: expected auto, cpu, cuda or cuda:N, got {name!r}")
