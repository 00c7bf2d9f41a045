"""The README's 'Adding a method' example works as printed: registered from one file,
it trains through the same runner and beats its untrained self."""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_method_example_trains(tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = next(b for b in blocks if '@MODELS.register("LinearHash")' in b)
    (tmp_path / "linear_hash.py").write_text(example)
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(tmp_path)!r}]
        import main, linear_hash
        from runners.experiment import run_config
        cfg = {{
            "dataset": {{"name": "synthetic", "num_classes": 24, "num_tasks": 2, "image_dim": 32, "text_dim": 24,
                        "query_size": 24, "train_size": 120, "database_size": 160, "max_labels": 2, "noise": 0.3}},
            "model": {{"name": "LinearHash", "bits": 16}},
            "optimizer": {{"name": "adamw", "lr": 3.0e-2}},
            "runner": {{"name": "continual", "epochs": 20, "batch_size": 32, "progress": False, "tensorboard": False}},
        }}
        trained = run_config(cfg, {str(tmp_path / "trained")!r}, quiet=True)
        cfg["runner"]["epochs"] = 0
        untrained = run_config(cfg, {str(tmp_path / "untrained")!r}, quiet=True)
        for d in ("i2t", "t2i"):
            print(d, trained.figure(d, "acc"), untrained.figure(d, "acc"))
            assert trained.figure(d, "acc") > untrained.figure(d, "acc") + 0.15
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
