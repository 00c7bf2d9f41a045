"""Replay and code distillation as models that wrap models: built from a nested
``base`` block (validated like a top-level block), wrapping DSPH and DCMHT through the
runner, forgetting less than the plain sequential base, and rebuilt from a checkpoint."""
import copy

import pytest
import torch

import main  # noqa: F401  (fills the registries)
from common.code_store import CodeStore
from dataset.synthetic import SyntheticDataset
from models.base import Batch, sign_codes
from runners.continual import ContinualRunner
from runners.experiment import load_run, run_config
from runners.config import build, validate_config
from utils.errors import ConfigError
from hash_model_checks import finish_task, task_steps

# Three tasks of disjoint single-label classes whose prototypes share 4 groups across
# the tasks: a sequential model that fits task 3 overwrites what tasks 1 and 2 taught.
STREAM = {"name": "synthetic", "num_classes": 12, "num_tasks": 3, "image_dim": 24, "text_dim": 24,
          "query_size": 24, "train_size": 90, "database_size": 120, "max_labels": 1, "cross_task_prob": 0.0,
          "noise": 0.4, "shared_semantics": 0.8, "num_groups": 4, "seed": 2}
RUNNER = {"name": "continual", "epochs": 12, "batch_size": 32, "seed": 3, "progress": False, "tensorboard": False,
          "forward_transfer": False, "task_agnostic": False, "num_threads": 1}
BASES = {
    "DSPH": {"name": "DSPH", "bits": 16},
    "DCMHT": {"name": "DCMHT", "bits": 16, "heads": 2},
}
STRATEGIES = {"replay": {"memory": 60}, "distill": {"weight": 10.0}}


def config(model, **runner):
    cfg = {"dataset": dict(STREAM), "model": model, "optimizer": {"name": "adamw", "lr": 3e-3},
           "runner": {**RUNNER, **runner}}
    validate_config(cfg)
    return cfg


def wrapped(strategy, base):
    return {"name": strategy, "base": copy.deepcopy(BASES[base]), **STRATEGIES[strategy]}


def mean_bwt(results):
    return 0.5 * (results.summary["i2t"]["bwt"] + results.summary["t2i"]["bwt"])


@pytest.fixture(scope="module")
def plain_dsph(tmp_path_factory):
    return run_config(config(copy.deepcopy(BASES["DSPH"])), tmp_path_factory.mktemp("dsph"), quiet=True)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_wrapped_dsph_forgets_less_than_plain_sequential(strategy, plain_dsph, tmp_path):
    res = run_config(config(wrapped(strategy, "DSPH")), tmp_path, quiet=True)
    assert res.method == strategy and res.bits == [16, 16, 16]
    assert mean_bwt(plain_dsph) < -0.1  # the stream makes plain fine-tuning forget
    assert mean_bwt(res) > mean_bwt(plain_dsph) + 0.05
    for d in ("i2t", "t2i"):  # the final model is better on the tasks seen, the newest included
        assert sum(res.map[d][2]) > sum(plain_dsph.map[d][2])
        assert res.map[d][2][2] > 0.6


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_strategies_wrap_dcmht_through_the_runner(strategy, tmp_path):
    plain = run_config(config(copy.deepcopy(BASES["DCMHT"]), epochs=3), tmp_path / "plain", quiet=True)
    res = run_config(config(wrapped(strategy, "DCMHT"), epochs=3), tmp_path / "wrapped", quiet=True)
    assert res.map["i2t"][0] == plain.map["i2t"][0]  # task 1: nothing to remember yet, same run
    assert res.map["i2t"][2] != plain.map["i2t"][2]  # later tasks: the strategy changes training
    run = load_run(tmp_path / "wrapped")
    assert type(run.model.base).__name__ == "DCMHT"
    if strategy == "replay":
        assert run.model.memory_task.tolist() == [0] * 20 + [1] * 20 + [2] * 20
    else:
        assert run.model.teacher_task == 2
        assert "distill" in res.val[1]["history"][0]  # the distillation term was trained from task 2 on


def test_nested_base_block_is_validated_with_its_dotted_path():
    for bad, message in (
        ({"name": "replay", "base": {"name": "DSPH", "bitz": 16}}, r"config: model\.base\.bitz: unknown key \(did you mean 'bits'\?\)"),
        ({"name": "distill", "base": {"name": "DSPx"}}, r"model\.base\.name: unknown model 'DSPx'"),
        ({"name": "replay", "base": {"bits": 16}}, r"model\.base\.name: required key missing"),
        ({"name": "replay", "base": {"name": "DSPH", "bits": "many"}}, r"model\.base\.bits: expected int"),
        ({"name": "replay", "base": {"name": "DSPH", "image_dim": 3}}, r"model\.base\.image_dim: set by the library"),
        ({"name": "replay", "base": 16}, r"model\.base: expected a block"),
        ({"name": "replay"}, r"model\.base: required key missing"),
    ):
        with pytest.raises(ConfigError, match=message):
            config(bad)
    # values are coerced inside the nested block, as at top level; a wrapper may wrap a wrapper
    cfg = config({"name": "distill", "base": {"name": "replay", "base": {"name": "DSPH", "dropout": "1e-1"}}})
    assert cfg["model"]["base"]["base"]["dropout"] == 0.1
    with pytest.raises(ConfigError, match=r"model\.base\.base\.nope: unknown key"):
        config({"name": "distill", "base": {"name": "replay", "base": {"name": "DSPH", "nope": 1}}})


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_checkpoint_structure_rebuilds_the_wrapper(strategy):
    cfg = config({"name": strategy, "base": {"name": "DSPH", "bits": 8}, **STRATEGIES[strategy]})
    dims = dict(image_dim=24, text_dim=24, num_classes=12)
    stream = SyntheticDataset(**{k: v for k, v in STREAM.items() if k != "name"}).load()
    model, store = build("model", cfg, **dims), CodeStore()
    for t in range(2):
        task_steps(model, stream.tasks[t], t, steps=3)
        finish_task(model, stream.tasks[t], t, store)
    task_steps(model, stream.tasks[2], 2, steps=2)  # the strategy term is active now
    again = build("model", cfg, **dims)
    again.build_structure(model.structure())
    again.load_state_dict(model.state_dict())
    model.eval(), again.eval()
    q = stream.tasks[0].query
    assert torch.equal(sign_codes(model.encode_image(q.image, 2)), sign_codes(again.encode_image(q.image, 2)))
    if strategy == "replay":
        assert again.memory_task.tolist() == [0] * 30 + [1] * 30  # equal shares of the memory
    else:
        assert again.teacher_task == 1 and not any(p.requires_grad for p in again.teacher.parameters())


def test_distill_reads_a_task_conditioned_student_under_the_teachers_task():
    # around PBEH (a prompt pool per task) the term compares old-task encodings: right
    # after the copy is taken, before any step on the new task, it is exactly zero
    cfg = config({"name": "distill", "weight": 1.0,
                  "base": {"name": "PBEH", "bits": 8, "hidden": 32, "heads": 2, "prompt_divisor": 30}})
    stream = SyntheticDataset(**{k: v for k, v in STREAM.items() if k != "name"}).load()
    model, store = build("model", cfg, image_dim=24, text_dim=24, num_classes=12), CodeStore()
    task_steps(model, stream.tasks[0], 0, steps=3)
    finish_task(model, stream.tasks[0], 0, store)
    model.begin_task(stream.tasks[1], 1)
    model.train()
    train = stream.tasks[1].train
    batch = Batch.rows(train, torch.arange(16))
    assert model.loss(batch, 1)["distill"].item() == 0.0
    # the new task's own pool differs from the old one: reading the student under task 2
    # would have given a positive term
    with torch.no_grad():
        new = model.base.encode_image(batch.image, 1)
        old = model.teacher.encode_image(batch.image, 0)
    assert float(torch.nn.functional.mse_loss(new, old)) > 0


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_the_wrapper_reports_its_bases_task_inference(strategy):
    """Task inference and ``codes_ignore_task`` come from the base: around PBEH the
    runner still reports which task each query was read under, and never reuses
    per-task codes as task-agnostic ones; around DSPH it may."""
    dims = dict(image_dim=24, text_dim=24, num_classes=12)
    stream = SyntheticDataset(**{k: v for k, v in STREAM.items() if k != "name"}).load()
    pbeh = {"name": "PBEH", "bits": 8, "hidden": 32, "heads": 2, "prompt_divisor": 30}
    model = build("model", config({"name": strategy, "base": pbeh, **STRATEGIES[strategy]}), **dims)
    store = CodeStore()
    for t in range(2):
        task_steps(model, stream.tasks[t], t, steps=2)
        finish_task(model, stream.tasks[t], t, store)
    q = stream.tasks[1].query.image
    with torch.no_grad():
        chosen = model.infer_tasks(q, "image")
    assert chosen is not None and torch.equal(chosen, model.base.infer_tasks(q, "image"))
    assert not model.codes_ignore_task
    dsph = build("model", config({"name": strategy, "base": {"name": "DSPH", "bits": 8}, **STRATEGIES[strategy]}),
                 **dims)
    assert dsph.codes_ignore_task and dsph.infer_tasks(q, "image") is None
