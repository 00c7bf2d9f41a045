"""Shared fixtures: one torch thread per test (tiny models run fastest on one, and far
faster than on two threads of a busy machine), paths from the repository root, and the
tiny stream and model factory the registry-driven contract suites use."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict

import pytest
import torch

import main  # noqa: F401  (fills every registry)
from runners.config import build_block, load_config

REPO = Path(__file__).resolve().parent.parent
TINY_STREAM = {
    "name": "synthetic", "num_classes": 8, "num_tasks": 2, "image_dim": 24, "text_dim": 16, "query_size": 12,
    "train_size": 48, "database_size": 60, "max_labels": 2, "noise": 0.3, "latent_dim": 8, "seed": 5,
}


@pytest.fixture(autouse=True, scope="session")
def single_thread_session():
    """One torch thread for the whole session, so module-scoped fixtures (which pytest
    sets up before any function-scoped one) compute at the thread count of the tests that
    compare against them: on some CPUs (an AMD EPYC here) a CLIP text embedding differs in
    its last bit between 1 and 2 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def single_thread():
    """One torch thread inside each test; the previous setting is restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def demo_config(name: str) -> Dict[str, Any]:
    """The resolved ``configs/<name>/demo.yaml`` of a registered model (every method
    ships one; the contract suite takes the model's settings from it)."""
    path = REPO / "configs" / name / "demo.yaml"
    if not path.is_file():
        pytest.fail(f"model {name!r} has no {path.relative_to(REPO)}: every registered model ships a demo config")
    return load_config(path)


def tiny_config(name: str, **runner: Any) -> Dict[str, Any]:
    """The demo config of model ``name`` on a tiny 2-task synthetic stream, few epochs."""
    cfg = copy.deepcopy(demo_config(name))
    cfg["dataset"] = dict(TINY_STREAM)
    cfg["runner"].update({"epochs": 2, "batch_size": 16, "progress": False, "tensorboard": False,
                          "scalable_bits": [8], **runner})
    return cfg


def build_model(name: str, stream, seed: int = 0):
    """Model ``name`` with its demo settings for ``stream``, its weights drawn from ``seed``
    (torch's generator, and the model's own ``seed`` argument where it takes one, as
    closed-form models do for their projections)."""
    from common.register import MODELS
    from utils.config import signature_params

    torch.manual_seed(seed)
    spec = dict(demo_config(name)["model"])
    if "seed" in signature_params(MODELS.get(name)):
        spec["seed"] = seed
    return build_block("model", spec, "model", image_dim=stream.image_dim, text_dim=stream.text_dim,
                       num_classes=stream.num_classes)


# A three-task multi-label stream for the continual methods' own tests (CASH, PBEH).
CONTINUAL_STREAM = dict(num_classes=12, num_tasks=3, image_dim=24, text_dim=20, query_size=20, train_size=64,
                        database_size=100, noise=0.5, seed=3)


@pytest.fixture(scope="module")
def stream():
    """``CONTINUAL_STREAM`` loaded (the tests that take ``stream`` train on it)."""
    from common.register import DATASETS

    return DATASETS.get("synthetic")(**CONTINUAL_STREAM).load()


@pytest.fixture(scope="session")
def tiny_stream():
    from common.register import DATASETS

    kwargs = {k: v for k, v in TINY_STREAM.items() if k != "name"}
    return DATASETS.get("synthetic")(**kwargs).load()


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished small demo run (DSPH, 5 tasks, 1 epoch); copy it before changing it."""
    from run_dir_checks import train

    out = tmp_path_factory.mktemp("finished") / "run"
    assert train(out) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A copy of ``finished_run`` this test may change."""
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst
