"""Shared by the run-directory and safe-loading tests: a small demo run and the
checks every refusal must pass (exit 2, one line on stderr, nothing changed)."""
import hashlib
from pathlib import Path

import main
from runners import run_guard

DEMO = str(Path(__file__).resolve().parent.parent / "configs" / "DSPH" / "demo.yaml")
# The demo stream made small: a run takes a few seconds (and keeps its task checkpoints,
# which some checks corrupt on purpose).
SMALL = ["runner.epochs=1", "runner.tensorboard=false", "runner.num_threads=1", "runner.keep_task_checkpoints=true",
         "dataset.train_per_class=30", "dataset.query_per_class=10"]


def train(out, *extra, overrides=(), config=DEMO):
    """``main.py train`` on the small demo run into ``out``; returns the exit code."""
    return main.main(["--config-file", config, "--output-dir", str(out), "--set", *SMALL, *overrides, "--quiet", *extra])


def digest(root: Path) -> dict:
    """Every file under ``root`` (the lock aside) -> md5 of its bytes."""
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != run_guard.LOCK}


def one_line_error(capsys, expected: str = "") -> str:
    """The captured stderr, asserted to be one ``error: ...`` line containing ``expected``."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert expected in err, err
    return err
