"""Smoke test of benchmarks/bench_methods.py: a whole tiny continual run of one method
through the script, and its table (timings are not checked)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_run_prints_the_table():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_methods.py"), "--methods", "DSPH", "--scale", "0.02",
           "--threads", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| DSPH")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == "configs/DSPH/coco.yaml" and cells[2] == "64"  # the authors' defaults: 64 bits
    assert float(cells[5]) > 0 and 0.0 <= float(cells[-1]) <= 1.0  # train seconds, ACC
