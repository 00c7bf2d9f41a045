"""The command line: bad input ends with one clear line, a non-zero exit and no output."""
import subprocess
import sys
from pathlib import Path

import pytest

import main

DEMO = "configs/DSPH/demo.yaml"


def run_cli(args, tmp_path):
    return subprocess.run(
        [sys.executable, "main.py", *args], capture_output=True, text=True, cwd=Path(main.__file__).parent, timeout=300
    )


def test_help_lists_commands_and_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for word in ("train", "compare", "list"):
        assert word in out
    with pytest.raises(SystemExit):
        main.main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--config-file", "--output-dir", "--set", "--resume"):
        assert flag in out


def test_list_names_registered_things(capsys):
    assert main.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "DSPH" in out and "continual" in out and "adamw" in out


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config-file", "configs/NOPE/none.yaml"], "config file not found"),
        (["--config-file", DEMO, "--set", "model.name=DSPX"], "model.name: unknown model 'DSPX'"),
        (["--config-file", DEMO, "--set", "model.bitz=3"], "model.bitz: unknown key"),
        (["--config-file", DEMO, "--set", "model.bits=many"], "model.bits: expected int"),
        (["--config-file", DEMO, "--set", "runner.epochs"], "expected KEY=VALUE"),
        (["--config-file", DEMO, "--set", "dataset.root=/nonexistent/dir"], "/nonexistent/dir"),
        (["--config-file", DEMO, "--set", "model.bits=0"], "model.bits"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(args, expected, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code = main.main([*args, "--output-dir", str(out_dir), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert expected in err, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert not out_dir.exists()


def test_corrupt_data_file_is_refused(tmp_path, capsys):
    bad = tmp_path / "demo"
    bad.mkdir()
    src = Path("data/demo")
    for f in src.iterdir():
        (bad / f.name).write_bytes(b"\x00garbage" * 10)
    out_dir = tmp_path / "run"
    code = main.main(["--config-file", DEMO, "--set", f"dataset.root={bad}", "--output-dir", str(out_dir), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and str(bad) in err and len(err.splitlines()) == 1
    assert not out_dir.exists()


def test_no_traceback_in_a_real_process(tmp_path):
    proc = run_cli(["--config-file", DEMO, "--set", "optimizer.lr=fast", "--output-dir", str(tmp_path / "o")], tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "optimizer.lr: expected float, got str 'fast'" in proc.stderr


def test_every_set_flag_applies_in_order():
    """``--set`` may be repeated: each one's keys apply (an earlier one is not dropped),
    and a key given twice takes the later value; the same holds for ``compare``."""
    import argparse

    from runners.cli import add_train_arguments
    from runners.compare import add_compare_arguments
    from runners.config import read_config

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["--config-file", DEMO, "--set", "runner.num_threads=1", "runner.epochs=3",
                              "--set", "model.bits=32", "--set", "runner.epochs=4"])
    assert args.overrides == ["runner.num_threads=1", "runner.epochs=3", "model.bits=32", "runner.epochs=4"]
    cfg = read_config(args.config_file, args.overrides)
    assert (cfg["runner"]["num_threads"], cfg["runner"]["epochs"], cfg["model"]["bits"]) == (1, 4, 32)

    parser = argparse.ArgumentParser()
    add_compare_arguments(parser)
    args = parser.parse_args(["--config-file", DEMO, "--set", "runner.epochs=1", "--set", "model.bits=8",
                              "--seeds", "1", "2", "--seeds", "3"])
    assert args.overrides == ["runner.epochs=1", "model.bits=8"] and args.seeds == [1, 2, 3]
