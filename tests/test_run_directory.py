"""Run directories: nothing lost (no silent overwrite, a failing or killed --overwrite
run gives the old run back), nothing half-written (one writer, results.json last,
stale temporaries removed, full disk found up front or named in one line)."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import main
from runners import outputs, run_guard
from utils.errors import OutputError
import utils.io

from run_dir_checks import DEMO, SMALL, digest, one_line_error, train

ROOT = Path(main.__file__).parent


# ---------------------------------------------------------------------- no silent overwrite
def test_new_run_into_a_finished_run_is_refused_and_changes_nothing(run_copy, capsys):
    before = digest(run_copy)
    assert train(run_copy, overrides=["runner.epochs=2"]) == 2
    one_line_error(capsys, "holds a finished run; use --overwrite")
    assert digest(run_copy) == before


def test_new_run_into_an_unfinished_run_says_resume_or_overwrite(run_copy, capsys):
    results = json.loads((run_copy / "results.json").read_text())
    results["status"] = "running"
    (run_copy / "results.json").write_text(json.dumps(results))
    before = digest(run_copy)
    assert train(run_copy) == 2
    one_line_error(capsys, "holds an unfinished run; continue it with --resume or replace it with --overwrite")
    assert digest(run_copy) == before


def test_failing_overwrite_run_leaves_the_finished_run_intact(run_copy, capsys, monkeypatch):
    before = digest(run_copy)
    real = outputs.RunOutput.save_task

    def fail_after_task_2(self, t, *args, **kwargs):
        real(self, t, *args, **kwargs)
        if t == 1:
            raise OutputError(f"{self.root / 'codes.npz'}: cannot write (No space left on device)")

    monkeypatch.setattr(outputs.RunOutput, "save_task", fail_after_task_2)
    assert train(run_copy, "--overwrite", overrides=["runner.epochs=2"]) == 2
    one_line_error(capsys, "the run it was to replace is restored")
    assert digest(run_copy) == before
    assert not (run_copy / run_guard.ASIDE).exists()


def test_overwrite_replaces_only_once_the_new_run_has_finished(run_copy, monkeypatch):
    seen = []
    real = outputs.RunOutput.save_task

    def watch(self, t, *args, **kwargs):  # while the new run trains, the old one is kept aside
        seen.append(run_guard.run_status(self.root / run_guard.ASIDE))
        real(self, t, *args, **kwargs)

    monkeypatch.setattr(outputs.RunOutput, "save_task", watch)
    assert train(run_copy, "--overwrite", overrides=["runner.epochs=2"]) == 0
    assert seen and set(seen) == {"finished"}
    results = json.loads((run_copy / "results.json").read_text())
    assert results["status"] == "finished" and results["config"]["runner"]["epochs"] == 2
    assert not (run_copy / run_guard.ASIDE).exists()


def test_killed_overwrite_run_gives_the_old_run_back_on_next_start(run_copy, capsys):
    before = digest(run_copy)
    run_guard.set_aside(run_copy)  # what --overwrite does first; then the new run was killed mid-way
    (run_copy / "checkpoints").mkdir()
    (run_copy / "results.json").write_text(json.dumps({"status": "running"}))
    (run_copy / "train.log").write_text("partial")
    assert train(run_copy) == 2  # the finished run is back, so a run without --overwrite is refused
    one_line_error(capsys, "holds a finished run")
    assert digest(run_copy) == before and not (run_copy / run_guard.ASIDE).exists()


def test_kill_while_moving_aside_is_undone(run_copy):
    before = digest(run_copy)
    partial = run_copy / run_guard.ASIDE_PARTIAL
    partial.mkdir()
    os.rename(run_copy / "results.json", partial / "results.json")
    os.rename(run_copy / "checkpoints", partial / "checkpoints")
    assert run_guard.recover(run_copy)
    assert digest(run_copy) == before and not partial.exists()


def test_compare_refuses_to_replace_a_finished_run(finished_run, tmp_path, capsys):
    run_dir = tmp_path / "cmp" / "runs" / "DSPH_demo"
    shutil.copytree(finished_run, run_dir)
    before = digest(run_dir)
    argv = ["compare", "--config-file", DEMO, "--output-dir", str(tmp_path / "cmp"), "--set", *SMALL, "--quiet"]
    assert main.main(argv) == 2
    one_line_error(capsys, "DSPH_demo: holds a finished run; use --overwrite to replace it, or --reuse to keep it")
    assert main.main([*argv, "--reuse"]) == 0  # same config: reused, not rerun
    assert "reusing" in capsys.readouterr().out
    assert digest(run_dir) == before


# ---------------------------------------------------------------------- one writer
PAUSED_RUN = """
import sys, time
import main
from runners import outputs
real = outputs.RunOutput.save_task
def pause_after_task_2(self, t, *args, **kwargs):
    real(self, t, *args, **kwargs)
    if t == 1:
        print("paused", flush=True)
        time.sleep(300)
outputs.RunOutput.save_task = pause_after_task_2
sys.exit(main.main(sys.argv[1:]))
"""


def test_second_writer_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_RUN, "--config-file", DEMO, "--output-dir", str(out),
                             "--set", *SMALL, "--quiet"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "paused", proc.stderr.read()
        before = digest(out)
        assert train(out, overrides=["runner.seed=12"]) == 2  # a second run while the first one trains
        one_line_error(capsys, f"in use by another run (pid {proc.pid} on ")
        assert digest(out) == before
    finally:
        proc.kill()  # SIGKILL: no clean-up, the lock file stays behind
        proc.wait()
    assert f"pid {proc.pid}" in (out / run_guard.LOCK).read_text()
    assert train(out, "--resume") == 0  # the dead holder's lock is taken over; tasks 3..5 run
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["status"] == "finished"
    assert resumed["map"] == json.loads((finished_run / "results.json").read_text())["map"]  # as uninterrupted
    assert not (out / run_guard.LOCK).exists() and not list(out.rglob("*.tmp"))


# ---------------------------------------------------------------------- nothing half-written
def test_results_json_is_written_after_the_resume_checkpoint(tmp_path, monkeypatch):
    order = []
    real = utils.io.atomic_write_bytes

    def record(path, data):
        order.append(Path(path).name)
        real(path, data)

    monkeypatch.setattr(utils.io, "atomic_write_bytes", record)
    monkeypatch.setattr(outputs, "atomic_write_json", lambda p, o: utils.io.atomic_write_text(p, json.dumps(o)))
    assert train(tmp_path / "run") == 0
    tasks = [i for i, name in enumerate(order) if name == "results.json"]
    assert len(tasks) == 5
    for end in tasks:  # every task ends with last.pt, then results.csv, then results.json
        assert order[end - 2: end + 1] == ["last.pt", "results.csv", "results.json"]


def test_kill_between_last_checkpoint_and_results_is_not_finished_and_resumes(run_copy):
    results = json.loads((run_copy / "results.json").read_text())
    results.update(status="running", completed_tasks=results["tasks"] - 1)
    (run_copy / "results.json").write_text(json.dumps(results))  # as if killed before the last write
    assert run_guard.run_status(run_copy) == "unfinished"
    assert train(run_copy, "--resume") == 0
    assert run_guard.run_status(run_copy) == "finished"


def test_stale_temporaries_are_removed_on_start(run_copy):
    stale = [run_copy / ".results.json.x1y2.tmp", run_copy / "checkpoints" / ".last.pt.a9b8.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    assert train(run_copy, "--resume") == 0
    assert not any(p.exists() for p in stale)


# ---------------------------------------------------------------------- disk and paths
def test_full_disk_is_found_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_guard.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9, free=4096))
    out = tmp_path / "run"
    assert train(out) == 2
    one_line_error(capsys, "MiB free, the run needs about")
    assert not (out / "results.json").exists() and not (out / "config.yaml").exists()


def test_a_later_write_failure_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = os.replace

    def full_at_task_2(src, dst, *a, **k):
        if Path(dst).name == "task_2.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(utils.io.os, "replace", full_at_task_2)
    assert train(out) == 2
    err = one_line_error(capsys, "task_2.pt: cannot write (No space left on device)")
    assert "continue with --resume" in err
    assert not list(out.rglob("*.tmp"))
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["next_task"] == 1
    monkeypatch.setattr(utils.io.os, "replace", real)
    assert train(out, "--resume") == 0 and run_guard.run_status(out) == "finished"


def test_output_path_that_is_a_file_or_under_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep me")
    assert train(f) == 2
    one_line_error(capsys, "is a file, not a directory")
    assert train(f / "run") == 2
    one_line_error(capsys, "cannot write the run directory")
    assert f.read_text() == "keep me"


# ---------------------------------------------------------------------- resume keys
def test_resume_ignores_display_only_keys_but_not_others(run_copy, capsys):
    # the finished run was made with --quiet (runner.progress false); resuming without it is fine
    assert main.main(["--config-file", DEMO, "--output-dir", str(run_copy), "--set", *SMALL, "--resume"]) == 0
    capsys.readouterr()
    assert train(run_copy, "--resume", overrides=["runner.progress=true"]) == 0
    capsys.readouterr()
    assert train(run_copy, "--resume", overrides=["runner.seed=2"]) == 2
    one_line_error(capsys, "different config (runner.seed: 1 then, 2 now)")
    assert outputs.DISPLAY_ONLY_KEYS == (("runner", "progress"),)


def test_resume_and_overwrite_together_are_refused(run_copy, capsys):
    before = digest(run_copy)
    assert train(run_copy, "--resume", "--overwrite") == 2
    one_line_error(capsys, "--resume and --overwrite: give one")
    assert digest(run_copy) == before
