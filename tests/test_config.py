"""Config loading, overrides and validation: every error names the dotted key."""
from pathlib import Path

import pytest

import main  # noqa: F401  (fills the registries)
from runners.config import load_config, validate_config
from utils.config import apply_overrides, load_yaml_tree, parse_override
from utils.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs/DSPH/demo.yaml"


def test_demo_config_loads_and_coerces():
    cfg = load_config(DEMO, ["runner.epochs=0", "model.bits=32", "optimizer.lr=1e-4"])
    assert cfg["runner"]["epochs"] == 0
    assert cfg["model"]["bits"] == 32
    assert isinstance(cfg["optimizer"]["lr"], float) and cfg["optimizer"]["lr"] == 1e-4


def test_override_parsing():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    for bad in ("runner.epochs", "=3", "a..b=1", "a.b c=1"):
        with pytest.raises(ConfigError, match="--set"):
            parse_override(bad)
    with pytest.raises(ConfigError, match="is a value, not a block"):
        apply_overrides({"runner": {"epochs": 3}}, ["runner.epochs.x=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.prompt_lenght=3", "model.prompt_lenght: unknown key"),
        ("model.bits=abc", "model.bits: expected int, got str 'abc'"),
        ("model.bits=3.5", "model.bits: expected int"),
        ("runner.epochs=true", "runner.epochs: expected int, got bool"),
        ("runner.mode=sideways", "runner.mode: expected one of 'continual', 'joint'"),
        ("model.name=NOPE", "model.name: unknown model 'NOPE'; known:"),
        ("optimizer.name=adamww", "did you mean 'adamw'"),
        ("model.image_dim=5", "model.image_dim: set by the library"),
        ("trainer.epochs=1", "trainer: unknown block"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    assert message in str(err.value)
    assert str(DEMO) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_required_key_and_block(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("dataset: {name: task_mat}\nmodel: {name: DSPH}\noptimizer: {name: adamw}\nrunner: {name: continual}\n")
    with pytest.raises(ConfigError, match=r"dataset\.root: required key missing"):
        load_config(p)
    p.write_text("model: {name: DSPH}\noptimizer: {name: adamw}\nrunner: {name: continual}\n")
    with pytest.raises(ConfigError, match="dataset: required block missing"):
        load_config(p)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("model: {name: DSPH\n  bits: [\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_config(p)


def test_validate_is_idempotent():
    cfg = load_config(DEMO)
    again = dict(cfg)
    validate_config(again)
    assert again == cfg


SHIPPED = sorted((REPO / "configs").glob("*/*.yaml"))


def test_configs_are_found_from_any_working_directory():
    assert len(SHIPPED) >= 30


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert path.parent.name == cfg["model"]["name"]  # configs/<METHOD>/... holds that method


def test_base_inheritance_merges_blocks_and_replaces_another_class(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "dataset: {name: demo, root: data/demo}\nmodel: {name: DSPH, bits: 16, dropout: 0.1}\n"
        "optimizer: {name: adamw, lr: 1.0e-3}\nrunner: {name: continual, epochs: 3}\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nmodel: {bits: 32}\nrunner: {epochs: 5}\n")
    (tmp_path / "other.yaml").write_text("_base_: child.yaml\noptimizer: {name: sgd, momentum: 0.9}\n")
    child = load_config(tmp_path / "child.yaml")
    assert child["model"] == {"name": "DSPH", "bits": 32, "dropout": 0.1}
    assert child["runner"]["epochs"] == 5 and child["dataset"]["root"] == "data/demo"
    other = load_config(tmp_path / "other.yaml")
    assert other["optimizer"] == {"name": "sgd", "momentum": 0.9}  # another class: adamw's lr is not inherited
    assert other["model"]["bits"] == 32


def test_replace_key_drops_the_inherited_block(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "dataset: {name: synthetic, preset: coco_clip_like_small, scale: 0.25}\n"
        "model: {name: DSPH, bits: 16, dropout: 0.1, extra: {_replace_: true, a: 0}}\n")
    (tmp_path / "merged.yaml").write_text("_base_: base.yaml\ndataset: {preset: coco_clip_like}\n")
    (tmp_path / "replaced.yaml").write_text(
        "_base_: base.yaml\ndataset: {_replace_: true, name: synthetic, preset: coco_clip_like}\n"
        "model: {bits: 32, extra: {_replace_: false, a: 1}}\n")
    merged = load_yaml_tree(tmp_path / "merged.yaml")
    assert merged["dataset"] == {"name": "synthetic", "preset": "coco_clip_like", "scale": 0.25}
    replaced = load_yaml_tree(tmp_path / "replaced.yaml")
    assert replaced["dataset"] == {"name": "synthetic", "preset": "coco_clip_like"}  # no inherited scale
    assert replaced["model"] == {"name": "DSPH", "bits": 32, "dropout": 0.1, "extra": {"a": 1}}
    assert load_yaml_tree(tmp_path / "base.yaml")["model"]["extra"] == {"a": 0}  # dropped without a base too
    (tmp_path / "bad.yaml").write_text("_base_: base.yaml\ndataset: {_replace_: yes please}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: dataset._replace_: expected true or false, got 'yes please'"):
        load_yaml_tree(tmp_path / "bad.yaml")
    (tmp_path / "top.yaml").write_text("_base_: base.yaml\n_replace_: true\n")
    with pytest.raises(ConfigError, match=r"top.yaml: _replace_ belongs inside a block"):
        load_yaml_tree(tmp_path / "top.yaml")


def test_base_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("_base_: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"c.yaml: _base_: .*missing.yaml: base config not found"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("_base_: [1, 2]\n")
    with pytest.raises(ConfigError, match="expected a file name or a list"):
        load_config(tmp_path / "d.yaml")


def test_benchmark_configs_inherit_the_authors_defaults():
    coco, nus = load_config(REPO / "configs/CASH/coco.yaml"), load_config(REPO / "configs/CASH/nuswide_imbalanced.yaml")
    assert nus["dataset"] == {**coco["dataset"], "root": "data/nuswide_imbalanced", "scheme": "nuswide"}
    assert {k: v for k, v in nus.items() if k != "dataset"} == {k: v for k, v in coco.items() if k != "dataset"}


@pytest.mark.parametrize(
    "override, message",
    [
        ("scheduler.name=adamw", "scheduler.name: unknown scheduler 'adamw'"),
        ("optimizer.name=exponential", "optimizer.name: unknown optimizer 'exponential'"),
        ("optimizer.lr=-0.1", "optimizer (adamw): lr must be a finite number >= 0, got -0.1"),
        ("optimizer.impl=turbo", "optimizer.impl: expected one of 'auto', 'fused', 'foreach', 'single'"),
        ("runner.num_threads=-1", "runner.num_threads must be a positive integer"),
    ],
)
def test_scheduler_optimizer_and_runner_values(override, message, tmp_path):
    from runners.experiment import run_config

    with pytest.raises(ConfigError) as err:
        cfg = load_config(DEMO, [override])
        run_config(cfg, tmp_path / "run", quiet=True)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_models_own_optimiser_block_is_validated():
    import torch

    from runners.optim import build_optimizers

    p = torch.nn.Parameter(torch.zeros(3))
    groups = [{"params": [p]}, {"params": [torch.nn.Parameter(torch.zeros(2))], "optimizer": {"name": "sgd", "momentun": 0.9}}]
    with pytest.raises(ConfigError, match=r"model.param_groups\[1\].optimizer.momentun: unknown key \(did you mean 'momentum'\?\)"):
        build_optimizers(groups, {"name": "adamw", "lr": 1e-3})
    groups[1]["optimizer"] = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    opts, _ = build_optimizers(groups, {"name": "adamw", "lr": 1e-3})
    assert [type(o).__name__ for o in opts] == ["AdamW", "SGD"] and opts[1].param_groups[0]["momentum"] == 0.9


def test_optimiser_kernels_agree():
    """fused / foreach / single AdamW: foreach is bit-identical to single, fused within float32 rounding."""
    import torch

    from runners.optim import adamw

    def run(impl):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(64, 32))
        opt = adamw([{"params": [w]}], lr=1e-2, impl=impl)
        for step in range(5):
            w.grad = torch.sin(w.detach() * (step + 1))
            opt.step()
        return w.detach()

    single = run("single")
    assert torch.equal(run("foreach"), single)
    torch.testing.assert_close(run("fused"), single, atol=1e-6, rtol=0)
