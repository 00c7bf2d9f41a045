"""The dataset contract, checked for every registered dataset: each gets a small input it
can read (the bundled demo file, a generated stream, task .mat files written in the
published layout, a feature cache written by the cache writer), and a new loader is
asked for one here (the first test fails until it has one).

Checked: construction reads nothing (a missing file fails in ``load``), loading twice
gives the same arrays, the stream keeps every loader invariant (``check_stream``:
dtypes, multi-hot labels, unique ids, val carved out of train, query disjoint from the
rest, label columns owned by one task), dimensions agree with the stream's, and the
config block validates through the one construction path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np
import pytest
import torch

from common.register import DATASETS
from conftest import REPO, TINY_STREAM
from runners.config import build_block, validate_block
from test_datasets import SIZES, check_stream, write_tasks
from utils.errors import UserError


def _cache(tmp: Path) -> Dict[str, Any]:
    from dataset.feature_cache import CacheWriter

    rng = np.random.default_rng(0)
    n, names = 40, ["cat", "dog", "car", "tree"]
    labels = np.zeros((n, 4), np.uint8)
    labels[np.arange(n), np.arange(n) % 4] = 1
    path = tmp / "cache.h5"
    writer = CacheWriter.open(path, {"model": "tiny"}, {}, {"image": (8,), "text": (6,)}, labels, names,
                              [f"img/{i}.jpg" for i in range(n)], [[f"caption {i}"] for i in range(n)], chunk_size=n)
    writer.write(0, {"image": rng.standard_normal((n, 8)).astype(np.float32),
                     "text": rng.standard_normal((n, 6)).astype(np.float32)})
    writer.finish()
    return {"path": str(path), "tasks": [["cat", "dog"], ["car", "tree"]], "task_query": 4, "task_train": 0.5,
            "val_size": 2}


def _task_mat(tmp: Path) -> Dict[str, Any]:
    write_tasks(tmp / "mat", "coco", "v7.3", SIZES)
    return {"root": str(tmp / "mat"), "scheme": "coco"}


# One small readable input per registered dataset: name -> kwargs of its block.
INPUTS: Dict[str, Callable[[Path], Dict[str, Any]]] = {
    "demo": lambda tmp: {"root": str(REPO / "data" / "demo")},
    "synthetic": lambda tmp: {k: v for k, v in TINY_STREAM.items() if k != "name"},
    "task_mat": _task_mat,
    "clip_cache": _cache,
}
NAMES = DATASETS.names()


def test_every_registered_dataset_has_a_test_input():
    missing = sorted(set(NAMES) - set(INPUTS))
    assert not missing, f"add a small input for {missing} to INPUTS in {Path(__file__).name}"


@pytest.mark.parametrize("name", NAMES)
def test_loads_deterministically_and_keeps_the_invariants(name, tmp_path):
    kwargs = INPUTS[name](tmp_path)
    spec = validate_block("dataset", {"name": name, **kwargs}, "dataset")
    first = build_block("dataset", spec, "dataset").load()
    again = build_block("dataset", spec, "dataset").load()
    check_stream(first)
    assert len(first) >= 1 and len(first.label_names) in (0, first.num_classes)  # .mat files carry no names
    for a, b in zip(first.tasks, again.tasks):
        for split in ("train", "val", "query", "database"):
            fa, fb = getattr(a, split), getattr(b, split)
            assert fa.ids == fb.ids and torch.equal(fa.image, fb.image) and torch.equal(fa.labels, fb.labels)
            assert fa.image.shape[1] == first.image_dim and fa.text.shape[1] == first.text_dim


@pytest.mark.parametrize("name", [n for n in NAMES if n != "synthetic"])
def test_construction_reads_nothing_and_a_missing_input_fails_in_load(name, tmp_path):
    kwargs = INPUTS[name](tmp_path)
    key = "path" if "path" in kwargs else "root"
    kwargs[key] = str(tmp_path / "nowhere" / "missing")
    dataset = build_block("dataset", {"name": name, **kwargs}, "dataset")   # no error: nothing read yet
    with pytest.raises(UserError, match="missing"):
        dataset.load()
