"""The HashModel contract, checked for every registered model with the settings of its
``configs/<NAME>/demo.yaml``: a new method is covered here without new test code.

Each model is trained for a few steps through the runner's own ``train_epoch`` on a
tiny two-task synthetic stream, then checked: codes of a sample never depend on its
batch-mates or on the other modality, every trainable parameter gets a gradient and
an optimiser, ``structure`` / ``build_structure`` rebuild a checkpoint exactly, a model
declaring ``codes_ignore_task`` encodes alike under every task, the
same seed gives the same codes and another seed other codes, a step's gradients are
bit-identical from call to call on two threads (on 512-d features), and a run
interrupted in its second task and resumed ends with the numbers of an uninterrupted one.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.code_store import CodeStore
from common.register import MODELS
from models.base import Batch
from conftest import TINY_STREAM, build_model, tiny_config
from hash_model_checks import assert_every_parameter_gets_gradient
from runners import continual
from runners.continual import ContinualRunner, OptimSpec
from runners.evaluation import encode_codes
from runners.experiment import run_config
from runners.outputs import RunOutput

NAMES = MODELS.names()


def trained(name: str, stream, seed: int = 0, tasks: int = 1, epochs: int = 2):
    """Model ``name`` trained ``epochs`` epochs on each of the first ``tasks`` tasks, as the
    runner trains (hooks, optimisers of the model's groups, seeded batches)."""
    cfg = tiny_config(name)
    runner = ContinualRunner(batch_size=16, seed=seed, epochs=epochs, progress=False, tensorboard=False)
    optim = OptimSpec(cfg["optimizer"], cfg.get("scheduler"))
    output = RunOutput(Path("never-written"), cfg, tensorboard=False, quiet=True)  # no prepare(): writes nothing
    model = build_model(name, stream, seed)
    store = CodeStore()
    for t in range(tasks):
        task = stream.tasks[t]
        torch.manual_seed(seed + t)
        model.begin_task(task, t)
        model.fit(task, t)
        runner.fit_task(model, task, t, optim, output, t)   # raises on a non-finite loss
        codes = encode_codes(model, task.database, t)
        store.add(t, codes["image"], codes["text"], task.database.labels)
        model.end_task(task, t, store)
    model.eval()
    return model


def encoded(model, fs, task_index=0):
    with torch.no_grad():
        return {"image": model.encode_image(fs.image, task_index, fs.image_layers),
                "text": model.encode_text(fs.text, task_index, fs.text_layers)}


@pytest.mark.parametrize("name", NAMES)
def test_codes_are_batch_independent_and_need_one_modality(name, tiny_stream):
    model = trained(name, tiny_stream)
    fs = tiny_stream.tasks[0].query
    full = encoded(model, fs)
    for modality, encode in (("image", model.encode_image), ("text", model.encode_text)):
        data, layers = getattr(fs, modality), getattr(fs, f"{modality}_layers")
        assert full[modality].shape == (len(fs), model.bits)
        with torch.no_grad():
            for i in (0, len(fs) // 2, len(fs) - 1):   # alone, with no other sample and no other modality
                alone = encode(data[i:i + 1], 0, None if layers is None else layers[i:i + 1])
                torch.testing.assert_close(alone[0], full[modality][i], atol=1e-5, rtol=0)
            rev = encode(data.flip(0), 0, None if layers is None else layers.flip(0))
        torch.testing.assert_close(rev.flip(0), full[modality], atol=1e-5, rtol=0)
        # task-agnostic encoding obeys the same rule
        with torch.no_grad():
            agn = encode(data, None, layers)
            one = encode(data[:1], None, None if layers is None else layers[:1])
        torch.testing.assert_close(one[0], agn[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_every_trainable_parameter_has_an_optimiser_and_a_gradient(name, tiny_stream):
    model = build_model(name, tiny_stream)
    if not assert_every_parameter_gets_gradient(model, tiny_stream.tasks[0]):
        pytest.skip(f"{name} has no trainable parameters (a closed-form model: the runner only calls fit)")


@pytest.mark.parametrize("name", NAMES)
def test_structure_round_trip_rebuilds_the_model_exactly(name, tiny_stream):
    model = trained(name, tiny_stream, tasks=2, epochs=1)
    again = build_model(name, tiny_stream, seed=99)
    again.build_structure(json.loads(json.dumps(model.structure())))   # structure is JSON-able
    again.load_state_dict(model.state_dict())                           # strict: same shapes, same keys
    again.eval()
    assert again.bits == model.bits
    for t in (0, 1, None):
        a, b = encoded(model, tiny_stream.tasks[1].query, t), encoded(again, tiny_stream.tasks[1].query, t)
        for m in a:
            assert torch.equal(a[m], b[m]), (m, t)


@pytest.mark.parametrize("name", NAMES)
def test_a_model_that_declares_its_codes_ignore_the_task_encodes_alike_under_every_task(name, tiny_stream):
    """``codes_ignore_task`` lets the runner reuse per-task query codes as the
    task-agnostic ones, so it must hold exactly: every task index and None give the
    same codes, after two tasks."""
    model = trained(name, tiny_stream, tasks=2, epochs=1)
    if not model.codes_ignore_task:
        pytest.skip(f"{name}'s codes may depend on the task")
    assert model.infer_tasks(tiny_stream.tasks[1].query.image, "image") is None
    fs = tiny_stream.tasks[1].query
    reference = encoded(model, fs, None)
    for t in (0, 1):
        for m, codes in encoded(model, fs, t).items():
            assert torch.equal(codes, reference[m]), (m, t)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_codes_other_seed_other_codes(name, tiny_stream):
    fs = tiny_stream.tasks[0].query
    a = encoded(trained(name, tiny_stream, seed=3), fs)
    b = encoded(trained(name, tiny_stream, seed=3), fs)
    c = encoded(trained(name, tiny_stream, seed=4), fs)
    for m in a:
        assert torch.equal(a[m], b[m]), m
    assert any(not torch.equal(a[m], c[m]) for m in a)


@pytest.fixture(scope="module")
def wide_stream():
    """The tiny stream with CLIP-wide (512-d) features: big enough that torch splits a
    step's operators over threads, which the tiny stream's are not."""
    from common.register import DATASETS

    kwargs = {k: v for k, v in TINY_STREAM.items() if k != "name"}
    kwargs.update(image_dim=512, text_dim=512, train_size=64, database_size=96)
    return DATASETS.get("synthetic")(**kwargs).load()


@pytest.mark.parametrize("name", NAMES)
def test_gradients_are_bit_identical_on_two_threads(name, wide_stream):
    """One batch's loss and gradients, computed three times on two torch threads, are
    bit-identical: no operator of a step sums in a thread-dependent order, so a seeded
    run gives the same numbers at any thread count, not only at one."""
    task = wide_stream.tasks[0]
    model = build_model(name, wide_stream)
    model.begin_task(task, 0)
    model.fit(task, 0)
    model.begin_epoch(task, 0, 0)
    model.train()
    if not any(p.requires_grad for p in model.parameters()):
        pytest.skip(f"{name} has no trainable parameters")
    batch = Batch.rows(task.train, torch.arange(len(task.train)))
    torch.set_num_threads(2)  # the autouse fixture puts back one thread afterwards
    runs = []
    for _ in range(3):
        torch.manual_seed(0)   # the same dropout masks each time
        model.zero_grad(set_to_none=True)
        loss = model(batch, 0)["loss"]
        loss.backward()
        runs.append({"loss": loss.detach(), **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}})
    for other in runs[1:]:
        assert [k for k in runs[0] if not torch.equal(runs[0][k], other[k])] == []


@pytest.mark.parametrize("name", NAMES)
def test_resume_after_interruption_equals_uninterrupted(name, tmp_path, monkeypatch):
    whole = run_config(tiny_config(name), tmp_path / "whole", quiet=True)
    real = continual.ContinualRunner._evaluate_after
    raised = []

    def interrupt_in_task_2(self, model, tasks, t, *args):
        if t == 1 and not raised:
            raised.append(t)
            raise KeyboardInterrupt
        return real(self, model, tasks, t, *args)

    monkeypatch.setattr(continual.ContinualRunner, "_evaluate_after", interrupt_in_task_2)
    with pytest.raises(KeyboardInterrupt):
        run_config(tiny_config(name), tmp_path / "resumed", quiet=True)
    resumed = run_config(tiny_config(name), tmp_path / "resumed", resume=True, quiet=True)
    assert raised and resumed.completed_tasks == 2
    assert resumed.map == whole.map
    assert resumed.task_agnostic == whole.task_agnostic
    assert resumed.summary == whole.summary
    a, b = CodeStore.load(tmp_path / "whole" / "codes.npz"), CodeStore.load(tmp_path / "resumed" / "codes.npz")
    for t in a.tasks():
        assert torch.equal(a.get(t).codes("image"), b.get(t).codes("image"))


@pytest.mark.parametrize("name", NAMES)
def test_trains_under_bf16_autocast_with_fp32_state(name, tmp_path):
    """``runner.amp: bf16`` (CPU autocast here) runs every method through both tasks: what a
    model writes into its own buffers during training (code banks, train-set buffers)
    keeps its full precision, and so do the weights (no bf16 / fp16 tensor in the checkpoint)."""
    res = run_config(tiny_config(name, amp="bf16"), tmp_path / "bf16", quiet=True)
    assert res.completed_tasks == 2
    state = torch.load(tmp_path / "bf16" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    tensors = [v for v in state["model"].values() if torch.is_tensor(v) and v.is_floating_point()]
    assert tensors and all(v.dtype in (torch.float32, torch.float64) for v in tensors)
