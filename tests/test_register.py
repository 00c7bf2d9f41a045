"""The registries: registration, lookup, errors, and that importing main fills them."""
import pytest

from common.register import Registry, RegistryError


def test_register_get_names():
    reg = Registry("thing")

    @reg.register("b")
    class B:
        pass

    @reg.register("a")
    def make_a():
        return "a"

    assert reg.get("b") is B
    assert reg.get("a")() == "a"
    assert reg.names() == ["a", "b"]
    assert "a" in reg and "c" not in reg and len(reg) == 2


def test_unknown_name_lists_known_and_closest():
    reg = Registry("model")
    reg.register("CASH")(object)
    reg.register("PBEH")(object)
    with pytest.raises(RegistryError) as err:
        reg.get("CASHH")
    msg = str(err.value)
    assert "unknown model 'CASHH'" in msg and "CASH, PBEH" in msg and "did you mean 'CASH'" in msg


def test_duplicate_is_an_error():
    reg = Registry("model")
    reg.register("X")(object)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("X")(dict)


def test_import_main_fills_every_registry_and_runs_nothing(capsys):
    import main  # noqa: F401
    from common.register import DATASETS, MODELS, OPTIMIZERS, RUNNERS, SCHEDULERS

    assert "DSPH" in MODELS
    assert "continual" in RUNNERS
    assert {"adamw", "adam", "sgd"} <= set(OPTIMIZERS.names())
    assert {"constant", "warmup_cosine", "exponential"} <= set(SCHEDULERS.names())
    assert not set(OPTIMIZERS.names()) & set(SCHEDULERS.names())
    assert {"demo", "synthetic", "task_mat"} <= set(DATASETS.names())
    assert capsys.readouterr().out == ""
