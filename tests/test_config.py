"""Config loading, overrides and validation: every error names the dotted key."""
from pathlib import Path

import pytest

import main  # noqa: F401  (fills the registries)
from utils.config import apply_overrides, load_config, parse_override, validate_config
from utils.errors import ConfigError

DEMO = Path("configs/DSPH/demo.yaml")


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


@pytest.mark.parametrize("path", sorted(Path("configs").glob("*/*.yaml")), ids=str)
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    assert path.parent.name == cfg["model"]["name"]  # configs/<METHOD>/... holds that method
