"""Training throughput per method, with the machine's own dense-matmul rate as anchor and
the library's loop at an earlier commit run side by side as the naive reference.

For each method the model, optimiser, schedule, batch size and grad clip come from
``configs/<METHOD>/coco.yaml`` (the authors' defaults); the data is task 1 of the
synthetic ``coco_balanced`` stream (MS-COCO balanced sizes of the CASH / PBEH protocol:
2402 train pairs, 80 labels, 512-d image and text features). Training steps walk a
seeded permutation of that train split, as the runner does. Printed per method:

- naive / new steps/s and their ratio, new samples/s;
- GFLOP per step: the model's forward + backward counted once with
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention);
- achieved GFLOP/s = GFLOP per step x steps/s, and the dense fp32 matmul GFLOP/s of the
  same process right after (``--matmul`` size, one thread count for both; the best of
  ``torch.mm`` and, on a CPU, oneDNN's linear: MKL, which ``torch.mm`` calls in fp32,
  is not the fastest kernel on every CPU), and their ratio;
  the same ratio per second of process CPU time (CPU ms/step), which a loaded shared
  machine distorts far less than wall time.

The naive reference is honest by construction: ``git archive <--reference-commit>``
(default 4a05054, the last commit before the speed work; history ships with the
repository) is unpacked into a temporary directory, and a worker process whose import
path starts there runs that commit's models and optimisers with that commit's per-step
loop (``loop_step``: the optimisers as that commit's ``runners/optim.py`` built them,
i.e. torch's default single-tensor AdamW on CPU, ``torch.isfinite(total)`` and
``float(v)`` of every loss term after every step). The "new" worker imports this
checkout and runs the runner's own ``train_step`` (or, in a checkout whose runner has
none, the same loop without the per-step host reads). Both workers are
fresh processes of the same Python with the same thread count, alternating per method
(``--rounds``, the faster measurement of each kept), so a ratio is measured under the
same machine load; each times at least ``--steps`` steps and ``--min-seconds`` seconds,
so a 5 ms step is timed a thousand times, not twenty. The directory is removed
afterwards. ``--no-reference`` skips it (e.g. outside a git checkout).

``--amp bf16`` runs the new worker under ``runner.amp: bf16`` (on a CPU with AMX or
AVX512-BF16 the matmuls run in bf16); its anchor is then the bf16 matmul, measured in
the same process next to the fp32 one. The naive reference always runs in fp32.
``--compile`` runs it under ``runner.compile: true`` (torch.compile, inductor) through the
runner's own ``training_module``; the compilation happens in the warm-up steps, whose
wall time is printed after the table.

    python benchmarks/bench_train.py                          # all six methods, 1 thread
    python benchmarks/bench_train.py --methods CASH PBEH --steps 20
    python benchmarks/bench_train.py --quick --methods DSPH   # tiny sizes, a smoke test
    python benchmarks/bench_train.py --compile --methods SCAHN DCMHT
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("CASH", "PBEH", "CAGMH", "SCAHN", "DCMHT", "DSPH")
REFERENCE_COMMIT = "4a05054"
RESULT_TAG = "BENCH_RESULT "
# --quick: a tiny stream and small layers, to check that the script runs end to end.
QUICK_SCALE = 0.05
QUICK_MODEL = {"hidden": 64, "num_tokens": 4, "token_dim": 16}
QUICK_BATCH = 16


# ====================================================================== worker side
def loop_step(model, batch, optimizers, scheduler, grad_clip, sums: Dict[str, Any], per_step_sync: bool) -> None:
    """One training step. ``per_step_sync`` True is the step of ``runners/continual.py``
    at the reference commit: ``torch.isfinite(total)`` and ``float(v)`` of every loss
    term after every step. False is the same arithmetic with the losses summed on the
    device (the caller checks them once, at the end): the step built from public pieces
    where the runner offers none of its own."""
    import torch

    losses = model(batch, 0)
    total = losses["loss"]
    if per_step_sync and not torch.isfinite(total):
        raise FloatingPointError(f"loss is {total.item()} (not finite)")
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    total.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], grad_clip)
    for opt in optimizers:
        opt.step()
    if scheduler is not None:
        scheduler.step()
    for k, v in losses.items():
        if per_step_sync:
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        else:
            sums[k] = sums[k] + v.detach() if k in sums else v.detach().clone()


def _config_module():
    """Where config loading lives in the imported tree: runners.config now, utils.config
    in the reference revision."""
    try:
        import runners.config as config
    except ImportError:
        import utils.config as config
    return config


def method_config(root: Path, method: str, quick: bool) -> Dict[str, Any]:
    from common.register import MODELS
    from utils.config import signature_params

    load_config = _config_module().load_config

    cfg = copy.deepcopy(load_config(root / "configs" / method / "coco.yaml"))
    cfg["dataset"] = {"name": "synthetic", "preset": "coco_balanced", "seed": 0,
                      "scale": QUICK_SCALE if quick else 1.0, "val_fraction": 0.1}
    if quick:
        known = signature_params(MODELS.get(cfg["model"]["name"]))
        cfg["model"].update({k: v for k, v in QUICK_MODEL.items() if k in known})
        cfg["runner"]["batch_size"] = QUICK_BATCH
    return cfg


def matmul_kernels(device, a, b) -> Dict[str, Any]:
    """The dense kernels the anchor tries, by name: ``torch.mm`` everywhere and, on a CPU
    whose torch has oneDNN, oneDNN's linear (``a @ b.T``, the same FLOPs). torch's fp32
    ``mm`` calls MKL, which on some CPUs (AMD Zen 4) runs 10-35 % below oneDNN on the
    same shapes, so one library's rate would understate the hardware's limit."""
    import torch

    kernels: Dict[str, Any] = {"torch.mm": lambda: a @ b}
    linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if device.type == "cpu" else None
    if linear is not None and torch.backends.mkldnn.is_available():
        def onednn():
            return linear(a, b, None, "none", [], "")
        try:
            onednn()
        except RuntimeError:  # no such kernel for this dtype / CPU
            pass
        else:
            kernels["oneDNN linear"] = onednn
    return kernels


def matmul_gflops(n: int, device, seconds: float = 1.0, dtype: str = "fp32") -> Dict[str, float]:
    """Best rate of ``n x n`` by ``n x n`` matmuls (``dtype`` fp32 or bf16) over about
    ``seconds`` per kernel of ``matmul_kernels``, per second of wall time and per second
    of this process's CPU time (robust on a shared machine)."""
    import torch

    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device).to(kind) for _ in range(2))
    best = {"wall": 0.0, "cpu": 0.0}
    for kernel in matmul_kernels(device, a, b).values():
        spent = 0.0
        for _ in range(2):
            kernel()  # warm-up
        while spent < seconds:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            kernel()
            _sync(device)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            spent += dt
            best["wall"] = max(best["wall"], 2 * n ** 3 / dt / 1e9)
            if dc > 0:
                best["cpu"] = max(best["cpu"], 2 * n ** 3 / dc / 1e9)
    return best


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(args: argparse.Namespace) -> Dict[str, Any]:
    """Model (set up for task 1), optimisers, schedule and batches of one method, built
    from ``--root``'s code as that code's runner would build them."""
    root = Path(args.root).resolve()
    sys.path.insert(0, str(root))
    import torch

    torch.set_num_threads(args.threads)
    import main  # noqa: F401  (fills the registries)
    import models
    from models.base import Batch
    from runners.optim import build_optimizers
    from utils.seed import resolve_device, seed_everything, task_seed

    if Path(models.__file__).resolve().parents[1] != root:
        raise SystemExit(f"worker imported models from {models.__file__}, not from {root}")
    build = _config_module().build
    cfg = method_config(root, args.method, args.quick)
    runner_cfg = cfg["runner"]
    device = resolve_device(args.device, key="--device")
    stream = build("dataset", cfg).load()
    task = stream.tasks[0].to(device)
    seed = int(runner_cfg.get("seed", 1))
    seed_everything(seed)
    model = build("model", cfg, image_dim=stream.image_dim, text_dim=stream.text_dim,
                  num_classes=stream.num_classes)
    torch.manual_seed(task_seed(seed, 0))
    model.begin_task(task, 0)
    model.to(device)
    model.begin_epoch(task, 0, 0)
    model.train()
    batch_size = int(runner_cfg.get("batch_size", 64))
    n = len(task.train)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    epochs = int(runner_cfg.get("epochs", 20))
    optimizers, scheduler = build_optimizers(
        model.param_groups(0), cfg["optimizer"], cfg.get("scheduler"),
        total_steps=epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch)
    gen = torch.Generator().manual_seed(task_seed(seed, 0))
    chunks = [c for c in torch.randperm(n, generator=gen).to(device).split(batch_size) if len(c) == batch_size]
    fs = task.train

    def batch_at(i: int) -> Batch:
        idx = chunks[i % len(chunks)]
        return Batch(image=fs.image[idx], text=fs.text[idx], labels=fs.labels[idx], index=idx,
                     image_layers=None if fs.image_layers is None else fs.image_layers[idx],
                     text_layers=None if fs.text_layers is None else fs.text_layers[idx])

    return {"model": model, "batch_at": batch_at, "chunks": chunks, "optimizers": optimizers,
            "scheduler": scheduler, "grad_clip": runner_cfg.get("grad_clip"), "device": device,
            "batch_size": batch_size, "train": n, "task": task, "config": cfg}


def make_step(args: argparse.Namespace, setup: Dict[str, Any]):
    """``(step(i, sums), description)``: the reference loop for the reference worker; for
    the new worker the runner's own ``train_step`` (with the runner's ``task_optim``)
    where this checkout's runner has one, else ``loop_step`` without per-step syncs."""
    model, batch_at, chunks = setup["model"], setup["batch_at"], setup["chunks"]
    if args.worker == "reference":
        def step(i: int, sums: Dict[str, Any]) -> None:
            loop_step(model, batch_at(i), setup["optimizers"], setup["scheduler"], setup["grad_clip"], sums, True)
        return step, "the reference loop (per-step isfinite + float of every loss term)"
    from runners import continual

    build = _config_module().build
    if hasattr(continual.ContinualRunner, "train_step") and hasattr(continual.ContinualRunner, "task_optim"):
        cfg = setup["config"]
        runner_cfg = dict(cfg["runner"], amp=args.amp, **({"compile": True} if args.compile else {}))
        runner = build("runner", dict(cfg, runner=runner_cfg))
        opt = runner.task_optim(model, 0, setup["train"],
                                continual.OptimSpec(optimizer=cfg["optimizer"], scheduler=cfg.get("scheduler")))
        train = setup["task"].train
        module = runner.training_module(model) if args.compile else model

        def step(i: int, sums: Dict[str, Any]) -> None:
            losses = runner.train_step(module, model, train, chunks[i % len(chunks)], 0, opt)
            for k, v in losses.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
        return step, "the runner's train_step (runners.continual)"

    if args.compile:
        raise SystemExit("--compile needs a checkout whose runner has train_step and training_module")

    def step(i: int, sums: Dict[str, Any]) -> None:
        loop_step(model, batch_at(i), setup["optimizers"], setup["scheduler"], setup["grad_clip"], sums, False)
    return step, "public pieces (runners.optim + model.loss, losses summed on the device)"


def count_library_operators() -> None:
    """FLOP formulas for this library's own torch operators, which FlopCounterMode sees as
    one call each and does not look into: SCAHN's softplus row sums
    (``ccmh::product_softplus_row_sums``) multiply ``X`` (N, K) by ``H^T`` (K, M), 2 N K M
    FLOPs (its backward is plain matmuls, counted as such). The selective scan's operators
    are elementwise work, not counted, as before. A checkout without them (the naive
    reference) registers nothing."""
    import torch
    from torch.utils.flop_counter import register_flop_formula

    try:
        op = torch.ops.ccmh.product_softplus_row_sums
    except (AttributeError, RuntimeError):
        return

    @register_flop_formula(op)
    def _row_sums_flops(x_shape, h_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * x_shape[0] * x_shape[1] * h_shape[0]


def run_worker(args: argparse.Namespace) -> None:
    """Measure one method in this process (``--root``'s code) and print one result line."""
    setup = prepare(args)
    count_library_operators()
    model, batch_at, device = setup["model"], setup["batch_at"], setup["device"]
    batch_size, n = setup["batch_size"], setup["train"]
    step, kind = make_step(args, setup)
    if args.worker == "new" and args.amp != "off":
        kind += f" under runner.amp: {args.amp}"
    if args.worker == "new" and args.compile:
        kind += " under runner.compile: true"

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:  # the arithmetic is counted once, in fp32 (autocast does not change it)
        model(batch_at(0), 0)["loss"].backward()
    flops = counter.get_total_flops()
    model.zero_grad(set_to_none=True)

    sums: Dict[str, Any] = {}
    warm0 = time.perf_counter()
    for i in range(args.warmup):
        step(i, sums)
    _sync(device)
    warmup_seconds = time.perf_counter() - warm0
    cpu0, t0 = time.process_time(), time.perf_counter()
    timed = 0
    while timed < args.steps or time.perf_counter() - t0 < args.min_seconds:  # enough steps, and long enough
        step(args.warmup + timed, sums)
        timed += 1
        if timed % 10 == 0:
            _sync(device)
    _sync(device)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    finite = all(math.isfinite(float(v)) for v in sums.values())
    if not finite:
        raise SystemExit(f"{args.method}: a loss became non-finite during the benchmark")
    result = {
        "method": args.method, "worker": args.worker, "step": kind, "device": str(device),
        "batch": batch_size, "train": n, "steps": timed, "seconds": wall, "cpu_seconds": cpu,
        "flops": flops, "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "matmul": matmul_gflops(args.matmul, device),
        "matmul_bf16": matmul_gflops(args.matmul, device, dtype="bf16"),
        "amp": args.amp if args.worker == "new" else "off",
        "compile": bool(args.compile) and args.worker == "new", "warmup_seconds": warmup_seconds,
    }
    print(RESULT_TAG + json.dumps(result), flush=True)


# ====================================================================== driver side
def unpack_commit(commit: str, into: Path) -> Path:
    """The tree of ``commit`` of this repository as plain files under ``into``."""
    try:
        data = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit],
                              check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise SystemExit(f"error: --reference-commit {commit}: git archive failed "
                         f"({detail.decode(errors='replace').strip() or exc}); use --no-reference "
                         "outside a git checkout") from None
    import io

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def measure(worker: str, root: Path, method: str, args: argparse.Namespace) -> Dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--root", str(root),
           "--method", method, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--device", args.device, "--matmul", str(args.matmul),
           "--amp", args.amp, "--min-seconds", str(args.min_seconds)]
    if args.quick:
        cmd.append("--quick")
    if args.compile and worker == "new":
        cmd.append("--compile")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH="")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(root))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SystemExit(f"error: {method} ({worker}) failed:\n  " + "\n  ".join(tail))
    return json.loads(lines[-1][len(RESULT_TAG):])


def best(kept: Optional[Dict[str, Any]], new: Dict[str, Any]) -> Dict[str, Any]:
    """Of two measurements of one worker, the faster one (fewer CPU seconds per step):
    on a shared machine the least disturbed round is the closest to the code's own speed,
    as with timeit's minimum. The matmul anchors keep their best rates over the rounds."""
    if kept is None:
        return new
    faster = new if new["cpu_seconds"] / new["steps"] < kept["cpu_seconds"] / kept["steps"] else kept
    out = dict(faster)
    for key in ("matmul", "matmul_bf16"):
        if key in kept and key in new:
            out[key] = {k: max(kept[key][k], new[key][k]) for k in kept[key]}
    return out


def table(rows: List[Dict[str, Any]]) -> List[str]:
    """One markdown row per method. The anchor of ``achieved / matmul`` is the matmul in
    the new worker's precision: fp32, or bf16 under ``--amp bf16``."""
    out = ["| method | batch | params M | GFLOP/step naive / new | naive steps/s | new steps/s | speed-up "
           "| CPU ms/step naive / new | CPU speed-up | new samples/s | achieved GFLOP/s "
           "| matmul GFLOP/s fp32 / bf16 | achieved / matmul | same per CPU second |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        new, ref = r["new"], r.get("reference")
        anchor = new["matmul_bf16"] if new.get("amp") == "bf16" else new["matmul"]
        sps = new["steps"] / new["seconds"]
        gf = new["flops"] / 1e9
        achieved = gf * sps
        ref_sps = ref["steps"] / ref["seconds"] if ref else None
        cpu_new = 1e3 * new["cpu_seconds"] / new["steps"]
        cpu_ref = 1e3 * ref["cpu_seconds"] / ref["steps"] if ref else None
        out.append(" | ".join([
            f"| {r['method']}", str(new["batch"]), f"{new['params'] / 1e6:.2f}",
            ("-" if ref is None else f"{ref['flops'] / 1e9:.3f}") + f" / {gf:.3f}",
            "-" if ref is None else f"{ref_sps:.2f}", f"{sps:.2f}",
            "-" if ref is None else f"{sps / ref_sps:.2f}x",
            ("-" if ref is None else f"{cpu_ref:.1f}") + f" / {cpu_new:.1f}",
            "-" if ref is None else f"{cpu_ref / cpu_new:.2f}x", f"{sps * new['batch']:.0f}",
            f"{achieved:.1f}", f"{new['matmul']['wall']:.1f} / {new['matmul_bf16']['wall']:.1f}",
            f"{achieved / anchor['wall']:.2f}",
            "-" if not anchor["cpu"] else f"{gf / (cpu_new / 1e3) / anchor['cpu']:.2f} |",
        ]))
    return out


def run_driver(args: argparse.Namespace) -> None:
    tmp: Optional[Path] = None       # an unpacked reference this run made, removed at the end
    ref_root: Optional[Path] = None  # where the reference worker imports from
    try:
        if args.reference_tree:
            ref_root = Path(args.reference_tree).resolve()
            if not (ref_root / "runners" / "optim.py").is_file():
                raise SystemExit(f"error: --reference-tree {args.reference_tree}: not an unpacked tree of this "
                                 "project (no runners/optim.py in it)")
        elif not args.no_reference:
            tmp = ref_root = Path(tempfile.mkdtemp(prefix="bench_train_ref_"))
            unpack_commit(args.reference_commit, tmp)
        rows = []
        for method in args.methods:
            row: Dict[str, Any] = {"method": method}
            for _ in range(args.rounds):  # naive and new alternate, so both see the same load
                if ref_root is not None:
                    row["reference"] = best(row.get("reference"), measure("reference", ref_root, method, args))
                row["new"] = best(row.get("new"), measure("new", ROOT, method, args))
            rows.append(row)
            print(f"{method}: done", file=sys.stderr, flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    first = rows[0]["new"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {first['device']}, {args.threads} thread(s), at least {args.steps} timed steps and "
          f"{args.min_seconds:g} s after {args.warmup} warm-up, best of {args.rounds} alternating round(s), "
          f"synthetic coco_balanced task 1 ({first['train']} train pairs)"
          + (" --quick" if args.quick else "") + f", load average {load:.2f}")
    print(f"naive = the loop of commit {args.reference_commit}" if ref_root is not None else "naive: not run (--no-reference)")
    print(f"new = {first['step']}; matmul = {args.matmul}^3 fp32 and bf16, the best of torch.mm and (CPU) "
          f"oneDNN's linear, the anchor in the new worker's precision ({'bf16' if args.amp == 'bf16' else 'fp32'}); "
          "CPU = process time of the timed steps")
    for line in table(rows):
        print(line)
    if args.compile:
        print("compilation (wall s of the new worker's warm-up steps): "
              + ", ".join(f"{r['method']} {r['new']['warmup_seconds']:.1f}" for r in rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method (default 20, --quick 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (default 2)")
    parser.add_argument("--min-seconds", type=float, default=None,
                        help="time steps for at least this long too (default 5, --quick 0): fast methods get many steps")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating naive / new measurements per method; the faster of each is kept (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of every worker (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--matmul", type=int, default=None, help="anchor matmul size (default 1024, --quick 256)")
    parser.add_argument("--quick", action="store_true", help="tiny stream, layers and batches (a smoke test)")
    parser.add_argument("--reference-commit", default=REFERENCE_COMMIT,
                        help=f"commit whose loop is the naive reference (default {REFERENCE_COMMIT})")
    parser.add_argument("--reference-tree", default=None,
                        help="that commit's tree already unpacked here (git archive REF | tar -x -C DIR), for a copy "
                             "of the checkout without git history, e.g. one sent to a GPU machine")
    parser.add_argument("--no-reference", action="store_true", help="skip the naive reference")
    parser.add_argument("--amp", choices=("off", "bf16"), default="off",
                        help="runner.amp of the new worker (default off; the naive reference always runs fp32)")
    parser.add_argument("--compile", action="store_true",
                        help="runner.compile: true (torch.compile, inductor) for the new worker; needs --warmup >= 1")
    parser.add_argument("--json", default=None, help="also write the raw measurements to this file")
    parser.add_argument("--worker", choices=("reference", "new"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.quick else 20
    if args.matmul is None:
        args.matmul = 256 if args.quick else 1024
    if args.min_seconds is None:
        args.min_seconds = 0.0 if args.quick else 5.0
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if args.steps < 1 or args.warmup < 0 or args.threads < 1 or args.matmul < 1 or args.rounds < 1:
        parser.error("--steps, --threads, --matmul and --rounds must be >= 1 and --warmup >= 0")
    if args.min_seconds < 0:
        parser.error("--min-seconds must be >= 0")
    if args.compile and args.warmup < 1:
        parser.error("--compile needs --warmup >= 1 (the first steps compile; they are not timed)")
    return args


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.worker:
        run_worker(ARGS)
    else:
        run_driver(ARGS)
