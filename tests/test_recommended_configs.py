"""The recommended configs: one per registered method, on a realistic preset, and the
same model / optimizer / scheduler / runner blocks valid on every bundled stream with
only the dataset block swapped (the promise the README makes)."""
from __future__ import annotations

from pathlib import Path

import pytest

import dataset  # noqa: F401  (registers the datasets)
import models  # noqa: F401  (registers the models)
from common.register import MODELS
from dataset.synthetic import CLIP_LIKE
from runners.config import load_config, read_config

ROOT = Path(__file__).resolve().parents[1]
STREAMS = [
    "dataset={name: demo, root: data/demo}",
    "dataset={name: synthetic, preset: coco_clip_like}",
    "dataset={name: synthetic, preset: nus_clip_like}",
]


@pytest.mark.parametrize("method", MODELS.names())
def test_every_method_has_a_recommended_config_on_a_realistic_preset(method):
    path = ROOT / "configs" / method / "recommended.yaml"
    assert path.is_file(), f"{path} is missing"
    cfg = load_config(path)
    assert cfg["model"]["name"] == method
    assert cfg["dataset"]["name"] == "synthetic" and cfg["dataset"]["preset"] in CLIP_LIKE
    assert cfg["runner"]["topk"] == 1000
    if method != "ridge":  # closed form: no epochs
        assert cfg["runner"]["epochs"] == 10  # the budget every recommended config shares


@pytest.mark.parametrize("method", MODELS.names())
@pytest.mark.parametrize("stream", STREAMS)
def test_only_the_dataset_block_changes_between_streams(method, stream):
    path = ROOT / "configs" / method / "recommended.yaml"
    base, swapped = read_config(path), load_config(path, [stream])
    for block in ("model", "optimizer", "scheduler", "runner"):
        assert swapped.get(block) == load_config(path).get(block), block
    assert swapped["dataset"] != base["dataset"]
