"""The compare command, on hand-made results.json files (no training)."""
import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

import main
import runners.compare as compare
import runners.compare_plots as compare_plots
from runners.compare import add_compare_arguments, reusable, run_compare
from runners.config import load_config
from runners.results import RunResults
from utils.io import atomic_write_json

REPO = Path(main.__file__).parent
DSPH = str(REPO / "configs/DSPH/demo.yaml")
DCMHT = str(REPO / "configs/DCMHT/demo.yaml")
SCAHN = str(REPO / "configs/SCAHN/demo.yaml")


def fake_results(method, config, T=3, bits=16, offset=0.0, scalable=None, status="finished", with_config=True):
    """A results.json as the runner writes it, with a known result matrix."""
    R = {d: [[None] * T for _ in range(T)] for d in ("i2t", "t2i")}
    for t in range(T):
        for j in range(t + 1):
            R["i2t"][t][j] = round(0.9 - 0.1 * (t - j) + offset, 6)
            R["t2i"][t][j] = round(0.8 - 0.1 * (t - j) + offset, 6)
    acc = {d: sum(R[d][T - 1]) / T for d in R}
    bwt = {d: (sum(R[d][T - 1][j] - R[d][j][j] for j in range(T - 1)) / (T - 1) if T > 1 else None) for d in R}
    out = {
        "status": status, "method": method, "dataset": "demo", "metric": "mAP@all", "mode": "continual",
        "tasks": T, "completed_tasks": T if status == "finished" else T - 1, "bits": [bits] * T, "map": R,
        "summary": {d: {"acc": acc[d], "bwt": bwt[d], "forgetting": None if bwt[d] is None else -bwt[d],
                        "avg_incremental": acc[d], "fwt": None} for d in R},
        "task_agnostic": {"i2t": [0.5 + offset] * T, "t2i": [0.4 + offset] * T},
        "timing": {"train_seconds": 12.5, "eval_seconds": 0.5},
    }
    if scalable:
        out["bit_scalable"] = scalable
    if with_config:
        out["config"] = config
    return out


def is_png(path):
    """A whole PNG file: signature, IHDR first, IEND last, and Pillow decodes it."""
    from PIL import Image

    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or data[-8:-4] != b"IEND":
        return False
    with Image.open(path) as im:
        im.load()
        return im.size[0] > 200 and im.size[1] > 100


def place(out_dir, name, results):
    atomic_write_json(Path(out_dir) / "runs" / name / "results.json", results)


def args_for(files, out, overrides=(), reuse=True, overwrite=False):
    parser = argparse.ArgumentParser()
    add_compare_arguments(parser)
    argv = ["--config-file", *files, "--output-dir", str(out), "--quiet"]
    if overrides:
        argv += ["--set", *overrides]
    if reuse:
        argv.append("--reuse")
    if overwrite:
        argv.append("--overwrite")
    return parser.parse_args(argv)


@pytest.fixture
def no_training(monkeypatch):
    """Record Experiment.run calls instead of training; returns the call list."""
    import runners.experiment as experiment

    calls = []

    def fake_run(self, output_dir, resume=False, quiet=False, overwrite=False):
        config = self.config
        calls.append({"config": config, "dir": Path(output_dir), "resume": resume, "overwrite": overwrite})
        res = fake_results(config["model"]["name"], config, offset=-0.2 + 0.01 * config["runner"]["seed"])
        res["seed"] = config["runner"]["seed"]
        atomic_write_json(Path(output_dir) / "results.json", res)
        return RunResults.from_dict(res)

    monkeypatch.setattr(experiment.Experiment, "run", fake_run)
    return calls


def test_reuses_finished_runs_and_writes_table_and_plots(tmp_path, no_training):
    out = tmp_path / "cmp"
    dsph, dcmht, scahn = (load_config(f, []) for f in (DSPH, DCMHT, SCAHN))
    place(out, "DSPH_demo", fake_results("DSPH", dsph))
    place(out, "DCMHT_demo", fake_results("DCMHT", dcmht, offset=0.05, with_config=False))
    place(out, "SCAHN_demo", fake_results("SCAHN", scahn, bits=32, offset=-0.1,
                                          scalable={"8": {"i2t": 0.3, "t2i": 0.2}, "16": {"i2t": 0.4, "t2i": 0.3},
                                                    "32": {"i2t": 0.45, "t2i": 0.35}}))
    # DCMHT's results.json has no config: the run's config.yaml is read instead
    (out / "runs" / "DCMHT_demo" / "config.yaml").write_text(
        __import__("runners.config", fromlist=["dump_config"]).dump_config(dcmht))
    assert run_compare(args_for([DSPH, DCMHT, SCAHN], out)) == 0
    assert no_training == []                         # everything reused

    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["method"] for r in rows] == ["DSPH", "DCMHT", "SCAHN"]
    dsph_row = rows[0]
    assert dsph_row["bits"] == "16" and rows[2]["bits"] == "32"
    assert [float(dsph_row[f"final_i2t_task_{j}"]) for j in (1, 2, 3)] == pytest.approx([0.7, 0.8, 0.9])
    assert float(dsph_row["acc_i2t"]) == pytest.approx(0.8)
    assert float(dsph_row["acc_t2i"]) == pytest.approx(0.7)
    assert float(dsph_row["bwt_i2t"]) == pytest.approx(-0.15)
    assert float(dsph_row["forgetting_t2i"]) == pytest.approx(0.15)
    assert float(rows[1]["agnostic_i2t"]) == pytest.approx(0.55)
    assert float(dsph_row["train_seconds"]) == 12.5 and dsph_row["reused"] == "True"
    assert dsph_row["acc_i2t_std"] == ""                       # one seed: no spread

    md = (out / "comparison.md").read_text()
    assert "| DCMHT | i2t | 0.7500 | 0.8500 | 0.9500 |" in md
    for name in ["result_matrices.png", "map_over_tasks.png", "final_row.png", "training_curves.png",
                 "code_length.png"]:
        assert is_png(out / name), name
        assert f"({name})" in md
    # hand-made results have no checkpoint to compute retrieval curves from: said, not drawn
    assert not (out / "pr_curve.png").exists() and "DSPH: no precision / recall curves" in md


def test_changed_config_runs_again_and_unfinished_resumes(tmp_path, no_training):
    out = tmp_path / "cmp"
    dsph = load_config(DSPH, [])
    place(out, "DSPH_demo", fake_results("DSPH", dsph))
    assert reusable(out / "runs" / "DSPH_demo", load_config(DSPH, ["runner.epochs=3"])) == "no"
    assert reusable(out / "runs" / "DSPH_demo", load_config(DSPH, ["runner.progress=false"])) == "finished"
    # a run with another config is there: refused unless --overwrite, before anything runs
    with pytest.raises(compare.OutputError, match="DSPH_demo: holds an unfinished run with another config; use --overwrite"):
        run_compare(args_for([DCMHT, DSPH], out, overrides=["runner.epochs=3"]))
    assert no_training == []
    run_compare(args_for([DSPH], out, overrides=["runner.epochs=3"], overwrite=True))
    assert len(no_training) == 1 and no_training[0]["config"]["runner"]["epochs"] == 3
    assert not no_training[0]["resume"] and no_training[0]["overwrite"]

    place(out, "DSPH_demo", fake_results("DSPH", dsph, status="running"))
    run_compare(args_for([DSPH], out))
    assert len(no_training) == 2 and no_training[1]["resume"]
    # without --reuse a run that is there is refused; with --overwrite it runs afresh
    with pytest.raises(compare.OutputError, match="or --reuse to keep it"):
        run_compare(args_for([DSPH], out, reuse=False))
    run_compare(args_for([DSPH], out, reuse=False, overwrite=True))
    assert len(no_training) == 3 and not no_training[2]["resume"] and no_training[2]["overwrite"]


def test_same_method_twice_gets_distinct_names_and_labels(tmp_path, no_training):
    out = tmp_path / "cmp"
    run_compare(args_for([DSPH, DSPH], out, reuse=False))
    assert [c["dir"].name for c in no_training] == ["DSPH_demo", "DSPH_demo_2"]
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert rows[0]["method"] != rows[1]["method"]
    assert not (out / "code_length.png").exists()      # no bit-scalable run


def test_single_task_runs_have_no_bwt(tmp_path, no_training):
    out = tmp_path / "cmp"
    place(out, "DSPH_demo", fake_results("DSPH", load_config(DSPH, []), T=1))
    run_compare(args_for([DSPH], out))
    row = next(csv.DictReader((out / "comparison.csv").open()))
    assert row["bwt_i2t"] == "" and row["acc_i2t"] != ""
    assert "| DSPH | demo | 16 | 1 | 0.9000 | 0.8000 | - | - | - | - |" in (out / "comparison.md").read_text()


def test_cli_wiring_and_bad_config_refused_before_running(tmp_path, no_training, capsys):
    out = tmp_path / "cmp"
    place(out, "DSPH_demo", fake_results("DSPH", load_config(DSPH, [])))
    assert main.main(["compare", "--config-file", DSPH, "--output-dir", str(out), "--reuse", "--quiet"]) == 0
    assert (out / "comparison.md").is_file()
    code = main.main(["compare", "--config-file", DSPH, str(tmp_path / "missing.yaml"), "--output-dir", str(out)])
    assert code == 2 and "config file not found" in capsys.readouterr().err
    assert no_training == []                           # nothing ran: configs are checked first


def test_corrupt_results_json_is_not_reused(tmp_path):
    d = tmp_path / "runs" / "X"
    d.mkdir(parents=True)
    (d / "results.json").write_text("{not json")
    assert reusable(d, load_config(DSPH, [])) == "no"
    with pytest.raises(compare.DataError, match="results.json"):
        compare.load_results(d)


def test_seeds_give_mean_std_and_paired_intervals(tmp_path, no_training):
    out = tmp_path / "cmp"
    args = args_for([DSPH, DCMHT], out, reuse=False)
    args.seeds, args.reference = [1, 2, 3], DCMHT
    assert run_compare(args) == 0
    assert sorted(str(c["dir"].relative_to(out)) for c in no_training) == [
        f"runs/{m}_demo/seed_{s}" for m in ("DCMHT", "DSPH") for s in (1, 2, 3)]
    assert [c["config"]["runner"]["seed"] for c in no_training] == [1, 2, 3, 1, 2, 3]
    rows = {r["method"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    # fake ACC i2t = 0.8 - 0.2 + 0.01 * seed: mean 0.62, sample std 0.01
    assert float(rows["DSPH"]["acc_i2t"]) == pytest.approx(0.62)
    assert float(rows["DSPH"]["acc_i2t_std"]) == pytest.approx(0.01)
    assert rows["DSPH"]["seeds"] == "1 2 3"
    assert len(list(csv.DictReader((out / "runs.csv").open()))) == 6
    paired = list(csv.DictReader((out / "paired.csv").open()))
    assert {p["method"] for p in paired} == {"DSPH"} and {p["reference"] for p in paired} == {"DCMHT"}
    acc = next(p for p in paired if p["figure"] == "acc_i2t")
    assert float(acc["difference"]) == pytest.approx(0.0, abs=1e-9) and acc["seeds"] == "3"
    md = (out / "comparison.md").read_text()
    assert "0.6200 ± 0.0100" in md and "Paired differences to DCMHT" in md


def test_seed_statistics_against_hand_values():
    from runners.seed_stats import paired_difference, spread

    s = spread([0.5, 0.7, None, 0.9])
    assert (s.mean, s.n) == (pytest.approx(0.7), 3) and s.std == pytest.approx(0.2)
    assert spread([0.3]).std is None and spread([]).mean is None
    d = paired_difference({1: 0.6, 2: 0.7, 3: 0.8, 4: 0.5}, {1: 0.5, 2: 0.5, 3: 0.6})
    # differences 0.1, 0.2, 0.2 (seed 4 unpaired): mean 0.1667, sd 0.0577, t(0.975, 2) = 4.3027
    assert d.n == 3 and d.mean == pytest.approx(1 / 6)
    half = 4.302652729911275 * (0.05773502691896258 / 3 ** 0.5)
    assert (d.low, d.high) == (pytest.approx(1 / 6 - half), pytest.approx(1 / 6 + half))
    assert d.significant
    assert not paired_difference({1: 0.5, 2: 0.7}, {1: 0.6, 2: 0.6}).significant


def test_bad_seed_and_reference_arguments(tmp_path, no_training, capsys):
    out = tmp_path / "cmp"
    assert main.main(["compare", "--config-file", DSPH, "--output-dir", str(out), "--seeds", "1", "1"]) == 2
    assert "--seeds: each seed once" in capsys.readouterr().err
    assert main.main(["compare", "--config-file", DSPH, "--output-dir", str(out), "--reference", "nope"]) == 2
    assert "--reference 'nope': not one of the compared configs" in capsys.readouterr().err
    assert main.main(["compare", "--config-file", DSPH, "--output-dir", str(out), "--jobs", "0"]) == 2


def test_parallel_jobs_give_the_serial_numbers_in_any_order(tmp_path):
    """Real (tiny) runs of configs that set runner.num_threads: --jobs 2 equals --jobs 1,
    and the config order changes nothing."""
    from conftest import tiny_config
    from runners.config import dump_config

    files = []
    for name in ("DSPH", "DCMHT"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(dump_config(tiny_config(name, epochs=1, num_threads=1)))
        files.append(str(path))
    maps = {}
    for tag, order, jobs in (("serial", files, 1), ("parallel", files[::-1], 2)):
        args = args_for(order, tmp_path / tag, reuse=False)
        args.jobs, args.seeds = jobs, [1, 2]
        assert run_compare(args) == 0
        for run in csv.DictReader((tmp_path / tag / "runs.csv").read_text().splitlines()):
            maps[(tag, run["method"], run["seed"])] = json.loads(
                (Path(run["run_dir"]) / "results.json").read_text())["map"]
    for (tag, method, seed), m in maps.items():
        assert m == maps[("serial", method, seed)], (tag, method, seed)
    assert len(maps) == 8
    # every figure of a real comparison, from what the runs recorded
    md = (tmp_path / "serial" / "comparison.md").read_text()
    for name in compare_plots.FIGURE_FILES:
        if name != "code_length.png":   # no bit-scalable run here
            assert is_png(tmp_path / "serial" / name), name
            assert f"({name})" in md, name
    assert "no precision / recall curves" not in md


def test_recorded_curves_equal_those_computed_from_the_checkpoint(tmp_path):
    """The runner records precision / recall by radius and precision@N after the last
    task; compare's fallback for older runs computes the same from the checkpoint."""
    from conftest import tiny_config
    from runners.experiment import curves_from_checkpoint, run_config

    results = run_config(tiny_config("DSPH", epochs=1), tmp_path / "run", quiet=True)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())["curves"]
    assert on_disk == results.curves == curves_from_checkpoint(tmp_path / "run")
    for d in ("i2t", "t2i"):
        pr, top = on_disk[d]["pr_curve"], on_disk[d]["precision_at"]
        assert pr["radius"] == list(range(results.bits[-1] + 1))
        assert pr["recall"][-1] == 1.0 and pr["recall"] == sorted(pr["recall"])   # radius = bits retrieves all
        assert all(0.0 <= v <= 1.0 for v in pr["precision"] + top["precision"])
        assert top["n"][0] == 1 and top["n"] == sorted(top["n"])
    older = json.loads((tmp_path / "run" / "results.json").read_text())
    del older["curves"]                                   # a results.json from before curves were recorded
    back = RunResults.from_dict(older)
    assert back.curves is None and "curves" not in back.to_dict() and back.finished


def test_task_average_curve_is_the_mean_of_each_row_of_R(tmp_path, no_training):
    """A_t (map_over_tasks.png) = mean of R[t][0..t]; with seeds, the mean and sample std
    over seeds point by point (the band)."""
    runs = []
    for seed, offset in ((1, 0.0), (2, 0.03), (3, 0.09)):
        res = fake_results("DSPH", load_config(DSPH, []), T=3, offset=offset)
        res["summary"] = {}          # no stored per-step averages: computed from R itself
        runs.append(RunResults.from_dict(res))
    for r in runs:
        for d in ("i2t", "t2i"):
            R = r.map[d]
            expected = [sum(R[t][: t + 1]) / (t + 1) for t in range(3)]
            assert compare_plots.task_average_curve(r, d) == pytest.approx(expected, abs=1e-12)
    # i2t rows of the fake R: [0.9], [0.8, 0.9], [0.7, 0.8, 0.9] (+ offset)
    assert compare_plots.task_average_curve(runs[0], "i2t") == pytest.approx([0.9, 0.85, 0.8])
    mean, std = compare_plots.mean_band([compare_plots.task_average_curve(r, "i2t") for r in runs])
    assert mean == pytest.approx([0.94, 0.89, 0.84])
    assert std == pytest.approx([0.04582575694955841] * 3)      # sample std of 0, 0.03, 0.09
    assert compare_plots.mean_band([[0.5, 0.6]]) == ([0.5, 0.6], [None, None])


def test_a_new_comparison_removes_only_its_own_stale_figures(tmp_path, no_training):
    """PNGs an earlier comparison.md showed and this comparison no longer draws go;
    a user's file, and a figure linked elsewhere, stay."""
    out = tmp_path / "cmp"
    out.mkdir()
    for name in ("heatmap_DSPH_demo_i2t.png", "code_length.png", "mine.png", "result_matrices.png"):
        (out / name).write_bytes(b"old")
    (out / "plots").mkdir()
    (out / "plots" / "deep.png").write_bytes(b"old")
    (out / "comparison.md").write_text("# Comparison\n![a](heatmap_DSPH_demo_i2t.png)\n![b](code_length.png)\n"
                                       "![c](result_matrices.png)\n![d](plots/deep.png)\n")
    place(out, "DSPH_demo", fake_results("DSPH", load_config(DSPH, [])))
    assert run_compare(args_for([DSPH], out)) == 0
    assert not (out / "heatmap_DSPH_demo_i2t.png").exists()
    assert not (out / "code_length.png").exists()              # no bit-scalable run this time
    assert (out / "mine.png").read_bytes() == b"old"            # never shown by compare: the user's
    assert (out / "plots" / "deep.png").read_bytes() == b"old"  # only bare names in the folder itself
    assert is_png(out / "result_matrices.png")                  # redrawn


def test_plots_label_tasks_by_their_categories():
    r = RunResults(tasks=3, task_names=["person, bicycle, car +13", "task_2", "all"])
    assert compare_plots.task_label(r, 0) == "task 1\nperson, bicycle,\ncar +13"
    assert compare_plots.task_label(r, 1) == "task 2" and compare_plots.task_label(r, 2) == "task 3"
    assert compare_plots.task_label(RunResults(tasks=1), 0) == "task 1"


def test_parallel_workers_share_the_threads_unless_the_config_sets_them(tmp_path):
    """--jobs N gives each worker max(1, T // N) of the parent's T threads; a config's
    runner.num_threads wins over that share."""
    import torch

    from conftest import tiny_config
    from runners.compare import worker_threads
    from runners.config import dump_config

    assert [worker_threads(8, n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    assert worker_threads(1, 4) == 1
    files = []
    for tag, extra in (("shared", {}), ("fixed", {"num_threads": 3})):
        path = tmp_path / f"{tag}.yaml"
        path.write_text(dump_config(tiny_config("DSPH", epochs=1, **extra)))
        files.append(str(path))
    args = args_for(files, tmp_path / "cmp", reuse=False)
    args.jobs = 2
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        assert run_compare(args) == 0
    finally:
        torch.set_num_threads(before)
    used = {Path(run["config"]).stem: json.loads((Path(run["run_dir"]) / "results.json").read_text())
            ["environment"]["torch_threads"]
            for run in csv.DictReader((tmp_path / "cmp" / "runs.csv").read_text().splitlines())}
    assert used == {"shared": 2, "fixed": 3}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux only")
def test_workers_stop_when_the_compare_process_is_killed(tmp_path):
    """``kill -9`` of a ``compare --jobs 2`` leaves no worker training on for nobody."""
    from conftest import tiny_config
    from runners.config import dump_config

    files = []
    for name in ("DSPH", "DCMHT"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(dump_config(tiny_config(name, epochs=100_000, num_threads=1)))
        files.append(str(path))
    root = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([sys.executable, str(root / "main.py"), "compare", "--config-file", *files,
                               "--output-dir", str(tmp_path / "out"), "--jobs", "2"],
                              cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> List[int]:
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent.pid:
                pids.append(int(stat.parent.name))
        return pids

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z"

    workers: List[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(workers) < 3:   # the resource tracker and two workers
            workers = children()
            time.sleep(0.2)
        assert len(workers) >= 2, "compare never started its workers"
        time.sleep(2)   # the workers are inside their runs now
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(p) for p in workers):
            time.sleep(0.2)
        assert not any(alive(p) for p in workers)
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
