"""Checkpoints hold only tensors, numbers, strings, lists and dicts and are read with
``weights_only=True``: a checkpoint carrying a Python object is refused and nothing in
it runs; a checkpoint of the wrong kind or a corrupt one is named in one line."""
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import main
from runners.outputs import checkpoint_payload, read_checkpoint
from utils.errors import DataError

from run_dir_checks import DEMO, SMALL, one_line_error



class WritesAFile:
    """Unpickling this calls ``open(marker, "w")``: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@dataclass
class Settings:
    lr: float


def test_saved_checkpoints_load_with_weights_only_and_hold_only_plain_types(finished_run):
    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, (bool, int, float, str, torch.Tensor))

    for name in ("last.pt", "task_1.pt", "task_5.pt"):
        ckpt = torch.load(finished_run / "checkpoints" / name, weights_only=True)
        assert plain(ckpt), name
    assert read_checkpoint(finished_run / "checkpoints" / "last.pt", "resume")["kind"] == "resume"
    assert read_checkpoint(finished_run / "checkpoints" / "task_2.pt", "task")["task"] == 2


@pytest.mark.parametrize("command", ["evaluate", "resume"])
def test_a_checkpoint_carrying_a_pickled_object_is_refused_and_nothing_runs(run_copy, tmp_path, capsys, command):
    marker = tmp_path / "was_executed"
    last = run_copy / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["model"] = {"weight": WritesAFile(marker)}
    torch.save(ckpt, last)
    argv = (["evaluate", "--run-dir", str(run_copy)] if command == "evaluate" else
            ["--config-file", DEMO, "--output-dir", str(run_copy), "--set", *SMALL, "--quiet", "--resume"])
    assert main.main(argv) == 2
    err = one_line_error(capsys)
    assert "last.pt: refused" in err and "could run code" in err
    assert not marker.exists()
    # the same file read the unsafe way would have run the object's code: the test is real
    torch.load(last, weights_only=False)
    assert marker.exists()


def test_a_checkpoint_of_the_wrong_kind_is_named(run_copy, capsys):
    shutil.copy(run_copy / "checkpoints" / "task_2.pt", run_copy / "checkpoints" / "last.pt")
    assert main.main(["evaluate", "--run-dir", str(run_copy)]) == 2
    assert "last.pt: expected the resume checkpoint (last.pt), found a task checkpoint" in one_line_error(capsys)
    torch.save(torch.zeros(3), run_copy / "checkpoints" / "last.pt")
    assert main.main(["--config-file", DEMO, "--output-dir", str(run_copy), "--set", *SMALL, "--quiet",
                      "--resume"]) == 2
    assert "last.pt: expected a checkpoint of this library, found a Tensor" in one_line_error(capsys)


def test_a_corrupt_task_checkpoint_is_reported_with_its_own_name(run_copy, capsys):
    path = run_copy / "checkpoints" / "task_2.pt"
    path.write_bytes(path.read_bytes()[:100])
    assert main.main(["evaluate", "--run-dir", str(run_copy), "--task", "2"]) == 2
    err = one_line_error(capsys)
    assert "task_2.pt: cannot read the checkpoint" in err and "last.pt" not in err
    assert main.main(["evaluate", "--run-dir", str(run_copy), "--task", "3"]) == 0  # the others are fine
    capsys.readouterr()


def test_checkpoint_payload_converts_numpy_and_refuses_objects():
    out = checkpoint_payload({"a": np.arange(3, dtype=np.uint8), "ids": np.array(["x", "y"]), "n": np.float32(0.5),
                              "nested": [{"t": torch.ones(2)}, (1, "s", None)]})
    assert torch.equal(out["a"], torch.tensor([0, 1, 2], dtype=torch.uint8))
    assert out["ids"] == ["x", "y"] and type(out["n"]) is float and out["nested"][1] == (1, "s", None)
    with pytest.raises(TypeError, match=r"checkpoint\.results\.opt: a Settings cannot be checkpointed"):
        checkpoint_payload({"results": {"opt": Settings(0.1)}})
    with pytest.raises(TypeError, match="dtype object"):
        checkpoint_payload({"x": np.array([object()])})


def test_read_checkpoint_refuses_a_foreign_file(tmp_path):
    p = tmp_path / "x.pt"
    p.write_text("not a checkpoint")
    with pytest.raises(DataError, match="x.pt: cannot read the checkpoint"):
        read_checkpoint(p, "resume")


def test_rng_states_survive_a_safe_checkpoint():
    """What a runner needs to resume exactly (torch, NumPy and Python RNG states) goes
    through ``checkpoint_payload`` and ``weights_only=True`` and restores the same draws."""
    import io
    import random

    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    buf = io.BytesIO()
    torch.save(checkpoint_payload({"runner_state": states}), buf)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    back = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["runner_state"]
    torch.set_rng_state(back["torch"])
    name, keys, pos, has_gauss, cached = back["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    random.setstate((back["python"][0], tuple(back["python"][1]), back["python"][2]))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_string_subclasses_are_saved_as_plain_strings():
    """torch.__version__ is a str subclass that weights_only=True would refuse to load."""
    import io

    buf = io.BytesIO()
    torch.save(checkpoint_payload({"torch": torch.__version__}), buf)
    back = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert back == {"torch": str(torch.__version__)} and type(back["torch"]) is str
