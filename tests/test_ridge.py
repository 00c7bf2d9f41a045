"""Continual ridge hashing: the solution from accumulated statistics equals a direct
ridge fit on all data seen so far, it runs through the runner without an optimiser,
and it beats chance on a structured stream."""
import copy

import pytest
import torch

import main  # noqa: F401  (fills the registries)
from dataset.feature_set import FeatureSet, Task
from dataset.synthetic import SyntheticDataset
from models.base import sign_codes
from models.ridge import RidgeHash, label_projection
from runners.experiment import run_config
from runners.config import build, validate_config
from utils.errors import ConfigError

STREAM = dict(num_classes=12, num_tasks=3, image_dim=16, text_dim=16, query_size=20, train_size=60,
              database_size=80, noise=0.5, seed=5)


def direct_ridge(x, y, lam):
    """The textbook solution on all samples at once, intercept unpenalised."""
    x1 = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    reg = lam * torch.eye(x1.shape[1], dtype=torch.float64)
    reg[-1, -1] = 0
    return torch.linalg.lstsq(x1.T @ x1 + reg, x1.T @ y.double()).solution, x1


def test_continual_statistics_equal_a_direct_fit_on_all_data_seen():
    stream = SyntheticDataset(**STREAM).load()
    model = RidgeHash(16, 16, 12, bits=8, lam=0.5)
    for t, task in enumerate(stream.tasks):
        model.fit(task, t)
        seen = FeatureSet.concat([s.train for s in stream.tasks[: t + 1]])
        prior = seen.labels.double().mean(0)
        proj = label_projection(12, 8, "orthogonal", 0)
        probe = FeatureSet.concat([s.query for s in stream.tasks])
        for m, encode in (("image", model.encode_image), ("text", model.encode_text)):
            w, _ = direct_ridge(getattr(seen, m), seen.labels, 0.5)
            q1 = torch.cat([getattr(probe, m).double(), torch.ones(len(probe), 1, dtype=torch.float64)], 1)
            expected = (q1 @ w - prior) @ proj
            got = encode(getattr(probe, m))
            torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
            assert torch.equal(sign_codes(got), sign_codes(expected))


def test_projection_kinds_and_bad_values():
    p = label_projection(12, 8, "orthogonal", 3)
    torch.testing.assert_close(p.T @ p, torch.eye(8, dtype=torch.float64))
    wide = label_projection(4, 8, "orthogonal", 3)  # more bits than classes: orthonormal rows
    torch.testing.assert_close(wide @ wide.T, torch.eye(4, dtype=torch.float64))
    assert torch.equal(label_projection(12, 8, "gaussian", 3), label_projection(12, 8, "gaussian", 3))
    cfg = {"dataset": {"name": "synthetic", **STREAM}, "model": {"name": "ridge", "bits": 8, "lam": 0.0},
           "optimizer": {"name": "adamw"}, "runner": {"name": "continual"}}
    validate_config(cfg)
    with pytest.raises(ConfigError, match="model .ridge.: model.lam"):
        build("model", cfg, image_dim=16, text_dim=16, num_classes=12)


def test_runs_in_the_runner_without_optimiser_and_beats_chance(tmp_path):
    cfg = {"dataset": {"name": "synthetic", **STREAM}, "model": {"name": "ridge", "bits": 16},
           "optimizer": {"name": "adamw"},
           "runner": {"name": "continual", "epochs": 5, "seed": 1, "progress": False, "tensorboard": False}}
    validate_config(cfg)
    res = run_config(copy.deepcopy(cfg), tmp_path / "a", quiet=True)
    again = run_config(copy.deepcopy(cfg), tmp_path / "b", quiet=True)
    assert res.map == again.map  # deterministic
    assert all(v["best_epoch"] is None for v in res.val)  # no epochs were trained
    for d in ("i2t", "t2i"):
        diag = [res.map[d][t][t] for t in range(3)]
        chance = [res.untrained[d][t] for t in range(3)]  # before any fit: every code equal
        assert min(a - b for a, b in zip(diag, chance)) > 0.12
        # old codes stay valid: a task's score after later tasks stays close to its first score
        assert res.summary[d]["bwt"] > -0.1
