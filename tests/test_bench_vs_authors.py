"""benchmarks/bench_vs_authors.py without the authors' code: it refuses a folder that
holds neither their checkout nor a git copy, and reads their result CSV correctly (the
full comparison needs their repository and is run by hand, see the README)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_vs_authors.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_vs_authors", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_folder_without_the_authors_code_is_refused(tmp_path):
    for target, message in ((tmp_path / "missing", "no such folder"), (tmp_path, "neither a folder with the authors' main.py")):
        proc = subprocess.run([sys.executable, str(SCRIPT), "--authors", str(target)], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_authors_csv_is_read_as_their_code_writes_it(tmp_path):
    """Their save_result_dict: a key line, then the T x (T + 3) matrix via np.savetxt."""
    folder = tmp_path / "csv_result" / "bench"
    folder.mkdir(parents=True)
    i2t = np.zeros((2, 5))
    i2t[0, 0], i2t[1, :2] = 0.5, (0.4, 0.6)
    t2i = i2t * 0.5
    with open(folder / "run.csv", "w") as fh:
        for key, matrix in (("I2T", i2t), ("T2I", t2i)):
            fh.write(key + "\n")
            np.savetxt(fh, matrix, delimiter=",", fmt="%f")
    scores = load_script().authors_scores(tmp_path)
    assert abs(scores["i2t"] - 0.5) < 1e-9 and abs(scores["t2i"] - 0.25) < 1e-9
