"""Smoke test of benchmarks/bench_train.py: it runs end to end on tiny sizes and prints
its table (the columns and one row per method; timings are not checked)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_train.py"


def load_script():
    """benchmarks/bench_train.py as a module (it is a script, not a package member)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def has_reference_commit() -> bool:
    probe = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", "4a05054^{commit}"], capture_output=True)
    return probe.returncode == 0


def test_quick_run_prints_the_table():
    cmd = [sys.executable, str(SCRIPT), "--quick", "--methods", "DSPH", "--steps", "1", "--warmup", "0",
           "--matmul", "64", "--rounds", "1"]
    with_reference = has_reference_commit()
    if not with_reference:
        cmd.append("--no-reference")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(ln for ln in lines if ln.startswith("| method"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == [
        "method", "batch", "params M", "GFLOP/step naive / new", "naive steps/s", "new steps/s", "speed-up",
        "CPU ms/step naive / new", "CPU speed-up", "new samples/s", "achieved GFLOP/s", "matmul GFLOP/s fp32 / bf16",
        "achieved / matmul", "same per CPU second",
    ]
    rows = [ln for ln in lines if ln.startswith("| DSPH")]
    assert len(rows) == 1
    cells = dict(zip(columns, (c.strip() for c in rows[0].strip("|").split("|"))))
    assert cells["batch"] == "16"
    assert float(cells["new steps/s"]) > 0 and float(cells["matmul GFLOP/s fp32 / bf16"].split("/")[0]) > 0
    assert float(cells["GFLOP/step naive / new"].split("/")[1]) > 0
    if with_reference:
        assert float(cells["naive steps/s"]) > 0 and cells["speed-up"].endswith("x")
        assert "naive = the loop of commit 4a05054" in proc.stdout


def test_unknown_method_is_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--methods", "NOPE"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "--methods: unknown NOPE" in proc.stderr


def test_compile_without_warm_up_is_refused():
    """--compile times steps after the warm-up, where the compilation happens."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--compile", "--warmup", "0"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "--compile needs --warmup >= 1" in proc.stderr


def test_a_reference_tree_that_is_not_this_project_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--methods", "DSPH", "--reference-tree", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and f"--reference-tree {tmp_path}: not an unpacked tree of this project" in proc.stderr


def test_best_of_rounds_keeps_the_faster_measurement_and_the_best_anchors():
    bench = load_script()
    slow = {"steps": 10, "cpu_seconds": 2.0, "seconds": 2.1, "matmul": {"wall": 90.0, "cpu": 95.0},
            "matmul_bf16": {"wall": 400.0, "cpu": 300.0}}
    fast = {"steps": 20, "cpu_seconds": 3.0, "seconds": 3.2, "matmul": {"wall": 80.0, "cpu": 99.0},
            "matmul_bf16": {"wall": 900.0, "cpu": 200.0}}
    for kept in (bench.best(slow, fast), bench.best(fast, slow)):
        assert kept["steps"] == 20 and kept["cpu_seconds"] == 3.0      # 0.15 s per step beats 0.2
        assert kept["matmul"] == {"wall": 90.0, "cpu": 99.0}
        assert kept["matmul_bf16"] == {"wall": 900.0, "cpu": 300.0}
    assert bench.best(None, slow) is slow


def test_every_anchor_kernel_is_a_dense_product_of_the_same_size():
    """The anchor's kernels do the arithmetic they are credited with: torch.mm is
    ``a @ b`` and oneDNN's linear (where present) ``a @ b.T``, both n x n x n."""
    import torch

    bench = load_script()
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(48, 48, generator=gen), torch.randn(48, 48, generator=gen)
    kernels = bench.matmul_kernels(torch.device("cpu"), a, b)
    assert "torch.mm" in kernels
    expected = {"torch.mm": a @ b, "oneDNN linear": a @ b.t()}
    for name, kernel in kernels.items():
        torch.testing.assert_close(kernel(), expected[name], rtol=1e-4, atol=1e-4)
