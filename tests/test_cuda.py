"""The CUDA path, for every registered model: whole runs, codes against the CPU's, no
host synchronisation inside a training step, mixed precision with the metric
unchanged, fused optimisers on the device.

Every test here needs a CUDA device and is skipped without one (the project's CI has
none); ``benchmarks/device_check.sh`` runs this file first on a lent GPU machine.
Numbers are compared across devices with tolerances, never bit for bit: CUDA kernels
round in other orders than the CPU's.
"""
from __future__ import annotations

import pytest
import torch

from common.register import MODELS
from conftest import TINY_STREAM, build_model, tiny_config
from models.base import HashModel
from runners.config import build_block
from runners.continual import OptimSpec
from runners.evaluation import encode_codes
from runners.experiment import run_config
from test_model_contract import trained

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NAMES = MODELS.names()
ACC_TOLERANCE = 0.1   # seeded runs on two devices drift apart; 0.1 of mAP is far below what a broken path loses


def accs(results):
    return {d: results.figure(d, "acc") for d in ("i2t", "t2i")}


@pytest.mark.parametrize("name", NAMES)
def test_a_whole_run_on_cuda_scores_like_the_same_run_on_the_cpu(name, tmp_path):
    cpu = run_config(tiny_config(name, device="cpu"), tmp_path / "cpu_run", quiet=True)
    cuda = run_config(tiny_config(name, device="cuda"), tmp_path / "gpu_run", quiet=True)
    for d, value in accs(cuda).items():
        assert abs(value - accs(cpu)[d]) <= ACC_TOLERANCE, (d, value, accs(cpu)[d])
    assert (tmp_path / "gpu_run" / "codes.npz").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_codes_encoded_on_cuda_are_the_cpu_codes(name, tiny_stream):
    """A model trained on the CPU and moved to the GPU writes the same bits, up to the
    rare entry whose pre-sign value is within rounding of 0."""
    model = trained(name, tiny_stream, tasks=2, epochs=1)
    fs = tiny_stream.tasks[1].database
    on_cpu = encode_codes(model, fs, 1)
    on_cuda = encode_codes(model.to("cuda"), fs.to("cuda"), 1)
    for m in on_cpu:
        agree = (on_cuda[m].cpu() == on_cpu[m]).float().mean().item()
        assert agree >= 0.99, (m, agree)


def cuda_step(name: str, amp: str, stream):
    """(run one step, model): the runner's own ``train_step`` on task 1 of ``stream``
    on the GPU, after one untimed step (which creates the optimiser state)."""
    cfg = tiny_config(name, device="cuda", amp=amp)
    runner = build_block("runner", cfg["runner"], "runner")
    model: HashModel = build_model(name, stream)
    task = stream.tasks[0].to("cuda")
    model.begin_task(task, 0)
    model.to("cuda")
    model.begin_epoch(task, 0, 0)
    model.train()
    opt = runner.task_optim(model, 0, len(task.train), OptimSpec(cfg["optimizer"], cfg.get("scheduler")))
    batches = runner.batches(len(task.train), torch.Generator().manual_seed(0), task.train.image.device)

    def step(i: int):
        return runner.train_step(model, model, task.train, batches[i % len(batches)], 0, opt)
    step(0)
    torch.cuda.synchronize()
    return step, model


@pytest.mark.parametrize("amp", ["off", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_a_training_step_on_cuda_never_waits_for_the_host(name, amp, tiny_stream):
    """Forward, backward, clipping, the optimisers and the schedule run without one
    device-to-host read (``.item()``, ``float()``, boolean indexing, a CPU copy): torch
    raises on any synchronising call in this mode. fp16 is left out: its loss scaler
    reads the overflow flag every step by design."""
    if not any(p.requires_grad for p in build_model(name, tiny_stream).parameters()):
        pytest.skip(f"{name} has no trainable parameters (closed form: fit() runs once per task)")
    step, model = cuda_step(name, amp, tiny_stream)
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(i) for i in range(1, 4)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(v).all() for ls in losses for v in ls.values())
    assert all(v.device.type == "cuda" for v in losses[-1].values())


def test_the_default_optimisers_are_fused_on_cuda(tiny_stream):
    _, model = cuda_step("DSPH", "off", tiny_stream)
    cfg = tiny_config("DSPH", device="cuda")
    runner = build_block("runner", cfg["runner"], "runner")
    opt = runner.task_optim(model, 0, TINY_STREAM["train_size"], OptimSpec(cfg["optimizer"], cfg.get("scheduler")))
    assert opt.optimizers and all(o.defaults.get("fused") for o in opt.optimizers)


@pytest.mark.parametrize("name", ["DSPH", "CASH", "SCAHN"])
def test_mixed_precision_on_cuda_leaves_the_metric_unchanged(name, tmp_path):
    """``runner.amp: bf16`` and ``fp16`` (with its loss scaler) train to the figures of
    the fp32 run on the same device, within the cross-device tolerance."""
    base = accs(run_config(tiny_config(name, device="cuda"), tmp_path / "off", quiet=True))
    for amp in ("bf16", "fp16"):
        mixed = accs(run_config(tiny_config(name, device="cuda", amp=amp), tmp_path / amp, quiet=True))
        for d in base:
            assert abs(mixed[d] - base[d]) <= ACC_TOLERANCE, (amp, d, mixed[d], base[d])
