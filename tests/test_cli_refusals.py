"""Input the command line used to accept silently or answer with a traceback: each is
now exit code 2, one line on stderr naming what was wrong, and nothing written."""
import os
from pathlib import Path

import pytest
import torch

import main
from dataset.feature_set import FeatureSet, Task, TaskStream
from utils.config import load_yaml, parse_override
from utils.errors import ConfigError, DataError

DEMO = "configs/DSPH/demo.yaml"
REPO = Path(main.__file__).parent


def refused(capsys, argv, expected, out_dir=None):
    code = main.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert expected in err, err
    if out_dir is not None:
        assert not Path(out_dir).exists() or not any(Path(out_dir).iterdir())
    return err


# ---------------------------------------------------------------------- config files
def test_a_key_or_block_written_twice_is_refused_with_both_lines(tmp_path):
    p = tmp_path / "twice.yaml"
    p.write_text((REPO / DEMO).read_text() + "model:\n  name: CASH\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: key 'model' written twice \(lines 7 and 2[0-9]\)"):
        load_yaml(p)
    p.write_text("runner:\n  name: continual\n  epochs: 3\n  epochs: 4\n")
    with pytest.raises(ConfigError, match=r"key 'epochs' written twice \(lines 3 and 4\)"):
        load_yaml(p)
    with pytest.raises(ConfigError, match="key 'a' written twice"):
        parse_override("model={a: 1, a: 2}")


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    p = tmp_path / "merge.yaml"
    p.write_text("base: &b\n  x: 1\n  y: 2\nrun:\n  <<: *b\n  x: 3\n")
    assert load_yaml(p)["run"] == {"x": 3, "y": 2}


def test_a_directory_or_a_device_as_config_file_is_named_as_such(tmp_path, capsys):
    refused(capsys, ["--config-file", str(tmp_path), "--output-dir", str(tmp_path / "o")], "is a directory; expected a YAML")
    refused(capsys, ["--config-file", os.devnull, "--output-dir", str(tmp_path / "o")], "not a regular file")


def test_two_config_file_flags_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main.main(["--config-file", DEMO, "--config-file", "configs/CASH/demo.yaml", "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "argument --config-file: given twice; give it once" in err
    assert not (tmp_path / "o").exists()


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main.main(["train", "--no-such-flag"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "see main.py train --help" in err


# ---------------------------------------------------------------------- values
def test_an_empty_output_dir_is_refused(capsys, tmp_path):
    refused(capsys, ["--config-file", DEMO, "--output-dir", ""], "--output-dir: empty")
    refused(capsys, ["compare", "--config-file", DEMO, "--output-dir", " "], "--output-dir: empty")


@pytest.mark.parametrize("override, expected", [
    ("optimizer.lr=-0.001", "optimizer (adamw): lr must be a finite number >= 0, got -0.001"),
    ("optimizer.lr=.nan", "optimizer (adamw): lr must be a finite number >= 0, got nan"),
    ("optimizer.weight_decay=-1", "optimizer (adamw): Invalid weight_decay value: -1"),
    ("scheduler.warmup=1.5", "scheduler (warmup_cosine): warmup must be a fraction in [0, 1)"),
])
def test_optimiser_values_torch_would_refuse_later_are_refused_first(override, expected, tmp_path, capsys):
    out = tmp_path / "o"
    refused(capsys, ["--config-file", DEMO, "--output-dir", str(out), "--set", override, "--quiet"], expected)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_evaluate_on_cuda_without_cuda_is_one_line(tmp_path, capsys):
    refused(capsys, ["evaluate", "--run-dir", str(tmp_path), "--device", "cuda"],
            "--device: 'cuda' requested but no CUDA device is available")
    refused(capsys, ["evaluate", "--run-dir", str(tmp_path), "--device", "tpu"], "--device: expected auto, cpu")


# ---------------------------------------------------------------------- empty splits
def _fs(n):
    return FeatureSet(torch.zeros(n, 4), torch.zeros(n, 3), torch.zeros(n, 2))


@pytest.mark.parametrize("split", ["train", "query", "database"])
def test_an_empty_split_names_the_split_and_task(split):
    sizes = {"train": 4, "val": 0, "query": 3, "database": 5}
    ok = Task(0, "first", **{k: _fs(v) for k, v in sizes.items()})
    sizes[split] = 0
    empty = Task(1, "second", **{k: _fs(v) for k, v in sizes.items()})
    with pytest.raises(DataError, match=f"task 2 \\(second\\): the {split} split is empty"):
        TaskStream("toy", (ok, empty))
    TaskStream("toy", (ok,))  # an empty val split is allowed: no epoch selection then


def test_an_empty_split_in_task_files_is_one_line(tmp_path, capsys):
    from test_datasets import write_tasks

    sizes = [{"train": 20, "test": 5, "database": 30}, {"train": 16, "test": 0, "database": 25}]
    write_tasks(tmp_path / "data", "coco", "v5", sizes)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: {{name: task_mat, root: {tmp_path / 'data'}}}\nmodel: {{name: DSPH, bits: 8}}\n"
                   "optimizer: {name: adamw}\nrunner: {name: continual, epochs: 1}\n")
    out = tmp_path / "o"
    err = refused(capsys, ["--config-file", str(cfg), "--output-dir", str(out), "--quiet"], "task 2 (", out_dir=out)
    assert "the query split is empty (0 samples)" in err
