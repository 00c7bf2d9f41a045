"""The continual runner end to end on small synthetic streams: outputs, determinism,
resume, joint training, and that DSPH learns (beats its untrained self and chance)."""
import copy
import json

import numpy as np
import pytest
import torch

import main  # noqa: F401  (fills the registries)
from common.register import DATASETS
from common.code_store import CodeStore
from runners import continual
from runners.experiment import format_results, load_run, run_config
from runners.evaluation import encode_codes, score_against_store
from runners.outputs import RunOutput
from utils.errors import DataError
from runners.config import validate_config

BASE = {
    "dataset": {"name": "synthetic", "num_classes": 24, "num_tasks": 3, "image_dim": 32, "text_dim": 24,
                "query_size": 24, "train_size": 120, "database_size": 160, "max_labels": 2, "noise": 0.3,
                "seed": 3},
    "model": {"name": "DSPH", "bits": 16},
    "optimizer": {"name": "adamw", "lr": 1.0e-2},
    "scheduler": {"name": "warmup_cosine", "warmup": 0.1},
    "runner": {"name": "continual", "epochs": 10, "batch_size": 32, "seed": 7, "progress": False, "tensorboard": False},
}


def cfg(**runner):
    c = copy.deepcopy(BASE)
    c["runner"].update(runner)
    validate_config(c)
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    return out, run_config(cfg(keep_task_checkpoints=True), out, quiet=True)


def stored_after_each_task(monkeypatch):
    """Snapshots of the code store as the runner saves it after every task."""
    snapshots = []
    real = RunOutput.save_task

    def save_task(self, t, model, store, *args, **kwargs):
        snapshots.append(CodeStore.from_state(copy.deepcopy(store.state())))
        return real(self, t, model, store, *args, **kwargs)

    monkeypatch.setattr(RunOutput, "save_task", save_task)
    return snapshots


def test_outputs_and_results_shape(trained):
    out, res = trained
    for name in ("config.yaml", "train.log", "results.json", "results.csv", "codes.npz",
                 "checkpoints/last.pt", "checkpoints/task_1.pt", "checkpoints/task_3.pt"):
        assert (out / name).exists(), name
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["status"] == "finished" and on_disk["method"] == "DSPH" and on_disk["tasks"] == 3
    assert on_disk["metric"] == "mAP@all" and on_disk["bits"] == [16, 16, 16]
    for d in ("i2t", "t2i"):
        m = on_disk["map"][d]
        for t in range(3):
            for j in range(3):
                assert (m[t][j] is None) == (j > t)
                if j <= t:
                    assert 0.0 <= m[t][j] <= 1.0
        assert len(on_disk["task_agnostic"][d]) == 3
        assert set(on_disk["summary"][d]) >= {"acc", "bwt", "forgetting", "avg_incremental", "fwt"}
        assert on_disk["summary"][d]["acc"] == pytest.approx(np.mean(m[2]), abs=1e-6)
    assert on_disk["timing"]["train_seconds"] > 0
    rows = (out / "results.csv").read_text().strip().splitlines()
    assert rows[0].startswith("direction,after_task,bits,task_1,task_2,task_3,average,task_agnostic")
    assert len(rows) == 1 + 2 * 3
    store = CodeStore.load(out / "codes.npz")
    assert store.tasks() == [0, 1, 2] and set(store.bits().values()) == {16}
    assert "task 3" in format_results(res)


def test_only_the_resume_checkpoint_by_default(tmp_path):
    run_config(cfg(epochs=1), tmp_path / "run", quiet=True)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["last.pt"]
    with pytest.raises(DataError, match="keep_task_checkpoints"):
        load_run(tmp_path / "run", task=1)


def test_stored_codes_are_written_once(trained, tmp_path, monkeypatch):
    """Task 1's database codes at the end are those stored after task 1, although the
    model changed since: the model encodes the task-1 database differently now."""
    out, res = trained
    snapshots = stored_after_each_task(monkeypatch)
    again = run_config(cfg(), tmp_path / "again", quiet=True)
    assert again.map == res.map
    first, final = snapshots[0], CodeStore.load(tmp_path / "again" / "codes.npz")
    for m in ("image", "text"):
        assert np.array_equal(final.get(0).codes(m).numpy(), first.get(0).codes(m).numpy())
    stream = DATASETS.get("synthetic")(**{k: v for k, v in BASE["dataset"].items() if k != "name"}).load()
    now = encode_codes(load_run(out).model, stream.tasks[0].database, 0)
    assert not torch.equal(now["image"], first.get(0).codes("image"))
    assert load_run(out, task=1).store.tasks() == [0]


def test_trained_beats_untrained_and_chance(trained, tmp_path):
    _, res = trained
    untrained = run_config(cfg(epochs=0), tmp_path / "untrained", quiet=True)
    for d in ("i2t", "t2i"):
        assert res.figure(d, "acc") > untrained.figure(d, "acc") + 0.1, d
        # forward transfer is exactly zero when nothing is trained
        assert untrained.figure(d, "fwt") == pytest.approx(0.0, abs=1e-9)
    # chance: the fraction of relevant database items for a random ranking
    stream = DATASETS.get("synthetic")(**{k: v for k, v in BASE["dataset"].items() if k != "name"}).load()
    last = stream.tasks[-1]
    density = float(((last.query.labels @ last.database.labels.t()) > 0).float().mean())
    assert res.map["i2t"][2][2] > density + 0.2


def test_same_seed_same_numbers_and_codes(trained, tmp_path):
    out, res = trained
    again = run_config(cfg(keep_task_checkpoints=True), tmp_path / "again", quiet=True)
    assert again.map == res.map and again.task_agnostic == res.task_agnostic
    a, b = CodeStore.load(out / "codes.npz"), CodeStore.load(tmp_path / "again" / "codes.npz")
    assert all(np.array_equal(a.get(t).image, b.get(t).image) for t in a.tasks())
    other = run_config(cfg(seed=8), tmp_path / "other", quiet=True)
    assert other.map != res.map


def test_resume_after_interruption_equals_uninterrupted(trained, tmp_path, monkeypatch):
    _, res = trained
    real = continual.ContinualRunner._evaluate_after
    state = {"raised": False}

    def interrupt_in_task_2(self, model, tasks, t, *args):
        if t == 1 and not state["raised"]:
            state["raised"] = True
            raise KeyboardInterrupt
        return real(self, model, tasks, t, *args)

    monkeypatch.setattr(continual.ContinualRunner, "_evaluate_after", interrupt_in_task_2)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_config(cfg(keep_task_checkpoints=True), out, quiet=True)
    partial = json.loads((out / "results.json").read_text())
    assert partial["status"] == "running" and partial["completed_tasks"] == 1
    resumed = run_config(cfg(keep_task_checkpoints=True), out, resume=True, quiet=True)
    assert resumed.map == res.map
    assert resumed.summary == res.summary
    assert resumed.task_agnostic == res.task_agnostic


def test_resume_refuses_a_different_config(trained):
    out, _ = trained
    from utils.errors import ConfigError

    with pytest.raises(ConfigError, match="different config"):
        run_config(cfg(epochs=3), out, resume=True, quiet=True)


def test_task_agnostic_scores_reuse_the_query_codes_of_a_model_that_ignores_the_task(trained, tmp_path, monkeypatch):
    """DSPH declares ``codes_ignore_task``: each evaluation encodes every query set once
    (the task-agnostic scores and the final curves reuse those codes) and the results
    equal a run that encodes the queries again task-agnostically."""
    _, res = trained
    from models.dsph import DSPH

    rows = []
    real = DSPH.encode_image

    def encode_image(self, image, task_index=None, layers=None):
        rows.append(int(image.shape[0]))
        return real(self, image, task_index, layers)

    monkeypatch.setattr(DSPH, "encode_image", encode_image)
    reused = run_config(cfg(forward_transfer=False), tmp_path / "reused", quiet=True)
    reused_rows = list(rows)
    monkeypatch.setattr(DSPH, "codes_ignore_task", False)
    rows.clear()
    again = run_config(cfg(forward_transfer=False), tmp_path / "again", quiet=True)
    q = BASE["dataset"]["query_size"]
    # encoding again: the concatenated queries of tasks 0..t once per task; the final
    # curves reuse the last of those in both runs
    assert sum(rows) - sum(reused_rows) == q * (1 + 2 + 3)
    assert 2 * q not in reused_rows and 3 * q not in reused_rows
    assert rows.count(2 * q) == rows.count(3 * q) == 1
    assert reused.map == again.map == res.map
    assert reused.task_agnostic == again.task_agnostic == res.task_agnostic and reused.curves == again.curves


def test_joint_mode_reencodes_every_database(tmp_path, monkeypatch):
    snapshots = stored_after_each_task(monkeypatch)
    res = run_config(cfg(mode="joint", epochs=4), tmp_path / "joint", quiet=True)
    assert res.mode == "joint" and res.untrained is None
    run = load_run(tmp_path / "joint")
    stream = DATASETS.get("synthetic")(**{k: v for k, v in BASE["dataset"].items() if k != "name"}).load()
    # the stored codes of task 1 are the final model's encoding of its database, not
    # the ones stored after the first step
    fresh = encode_codes(run.model, stream.tasks[0].database, 0)
    final = CodeStore.load(tmp_path / "joint" / "codes.npz")
    assert torch.equal(final.get(0).codes("image"), fresh["image"].cpu())
    assert not torch.equal(snapshots[0].get(0).codes("image"), fresh["image"].cpu())


def test_loaded_model_reproduces_the_last_row(trained):
    out, res = trained
    run = load_run(out)
    stream = DATASETS.get("synthetic")(**{k: v for k, v in BASE["dataset"].items() if k != "name"}).load()
    for j in range(3):
        s = score_against_store(run.model, stream.tasks[j].query, j, run.store, [j])
        assert s["t2i"] == pytest.approx(res.map["t2i"][2][j], abs=1e-6)


def test_evaluate_command_reproduces_the_final_row(trained, tmp_path, capsys):
    out, res = trained
    report_file = tmp_path / "eval.json"
    assert main.main(["evaluate", "--run-dir", str(out), "--output", str(report_file), "--precision-at", "10"]) == 0
    report = json.loads(report_file.read_text())
    assert report["after_task"] == 3 and report["metric"] == "mAP@all"
    for j in range(3):
        for d in ("i2t", "t2i"):
            assert report["per_task"][j][d]["map"] == pytest.approx(res.map[d][2][j], abs=1e-6)
            assert 0 <= report["per_task"][j][d]["precision_at"]["10"] <= 1
    for d in ("i2t", "t2i"):
        assert report["task_agnostic"][d]["map"] == pytest.approx(res.task_agnostic[d][2], abs=1e-6)
    # tie-aware scores differ from index order only through ties, and stay in [0, 1]
    assert main.main(["evaluate", "--run-dir", str(out), "--ties", "average", "--task", "1"]) == 0
    assert "after task 1" in capsys.readouterr().out


def test_a_non_finite_loss_stops_with_one_line_and_keeps_finished_tasks(tmp_path, monkeypatch, capsys):
    from models.dsph import DSPH

    real = DSPH.loss

    def nan_in_task_2(self, batch, task_index):
        out = real(self, batch, task_index)
        if task_index == 1:
            out = {**out, "proxy": out["proxy"] * float("nan")}
            out["loss"] = out["loss"] + out["proxy"]
        return out

    monkeypatch.setattr(DSPH, "loss", nan_in_task_2)
    config = tmp_path / "c.yaml"
    config.write_text(__import__("runners.config", fromlist=["dump_config"]).dump_config(cfg(epochs=2)))
    code = main.main(["--config-file", str(config), "--output-dir", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "task 2 epoch 1: loss term 'proxy' is not finite (nan)" in err[0] and "tasks 1..1 are checkpointed" in err[0]
    partial = json.loads((tmp_path / "run" / "results.json").read_text())
    assert partial["status"] == "running" and partial["completed_tasks"] == 1
    monkeypatch.setattr(DSPH, "loss", real)
    resumed = run_config(cfg(epochs=2), tmp_path / "run", resume=True, quiet=True)
    alone = run_config(cfg(epochs=2), tmp_path / "alone", quiet=True)
    assert resumed.map == alone.map


def test_runs_in_one_process_do_not_leak_threads_or_rng(tmp_path):
    """Two configs in one process, in both orders, give the numbers each gives first."""
    from conftest import tiny_config

    torch.set_num_threads(2)   # the conftest fixture restores its own setting afterwards
    a, b = tiny_config("DSPH", num_threads=1), tiny_config("DCMHT")
    ab = [run_config(copy.deepcopy(c), tmp_path / f"ab{i}", quiet=True).map for i, c in enumerate((a, b))]
    assert torch.get_num_threads() == 2
    ba = [run_config(copy.deepcopy(c), tmp_path / f"ba{i}", quiet=True).map for i, c in enumerate((b, a))]
    assert ab == ba[::-1]


@pytest.mark.parametrize("name", ["CASH", "PBEH", "CAGMH", "SCAHN", "DCMHT", "DSPH"])
def test_compiled_training_step_gives_the_same_run(tmp_path, name):
    """runner.compile traces the training forward with torch.compile ("eager" backend
    here: the same graph capture and guards as inductor, without code generation), for
    every method, CAGMH's and SCAHN's numba kernels included (they run eagerly)."""
    from conftest import tiny_config

    torch._dynamo.reset()  # a fresh trace: earlier tests' compiled code is not reused
    compiled = run_config(tiny_config(name, compile="eager"), tmp_path / "compiled", quiet=True)
    plain = run_config(tiny_config(name), tmp_path / "plain", quiet=True)
    assert compiled.map == plain.map


def test_bf16_autocast_trains_and_fp16_needs_cuda(tmp_path):
    from conftest import tiny_config
    from utils.errors import UserError

    untrained = run_config(tiny_config("DSPH", epochs=0), tmp_path / "untrained", quiet=True)
    bf16 = run_config(tiny_config("DSPH", amp="bf16", epochs=4), tmp_path / "bf16", quiet=True)
    for d in ("i2t", "t2i"):
        assert bf16.figure(d, "acc") > untrained.figure(d, "acc")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="runner.amp: fp16 needs a CUDA device"):
            run_config(tiny_config("DSPH", amp="fp16", device="cpu"), tmp_path / "fp16", quiet=True)


def test_results_record_where_they_came_from(trained):
    out, res = trained
    env = json.loads((out / "results.json").read_text())["environment"]
    assert env["torch"] == torch.__version__ and env["numpy"] == np.__version__
    assert env["device"] == "cpu" and env["python"] and env["torch_threads"] >= 1
    assert (env["git_commit"] is None) == (env["git_dirty"] is None)


def test_evaluate_defaults_to_the_runs_metric_and_prints_every_asked_figure(tmp_path, capsys):
    out = tmp_path / "run"
    res = run_config(cfg(epochs=2, topk=20), out, quiet=True)
    capsys.readouterr()
    assert main.main(["evaluate", "--run-dir", str(out), "--pr-curve", "--precision-at", "5"]) == 0
    text = capsys.readouterr().out
    assert "mAP@20" in text and "agnostic precision@N: @5" in text and "precision / recall by Hamming radius" in text
    # the same rounding as the run's own log: round to 6 decimals, print 4
    assert f"task 1 {round(res.map['i2t'][2][0], 6):.4f}" in text
    assert main.main(["evaluate", "--run-dir", str(out), "--topk", "all"]) == 0
    assert "mAP@all" in capsys.readouterr().out
    assert main.main(["evaluate", "--run-dir", str(out), "--topk", "0"]) == 2
    assert "--topk: must be >= 1" in capsys.readouterr().err
