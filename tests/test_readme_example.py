"""The README's 'Adding a method' example works as printed: registered from one file and
one import line, run from one config through the command line, it trains through the
same runner and beats its untrained self."""
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_method_example_trains_through_the_cli(tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = next(b for b in blocks if '@MODELS.register("LinearHash")' in b)
    assert "from models import linear_hash" in readme       # the one import line the README asks for
    (tmp_path / "linear_hash.py").write_text(example)
    config = tmp_path / "configs" / "LinearHash" / "demo.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(textwrap.dedent("""
        dataset: {name: synthetic, num_classes: 24, num_tasks: 2, image_dim: 32, text_dim: 24, query_size: 24,
                  train_size: 120, database_size: 160, max_labels: 2, noise: 0.3}
        model: {name: LinearHash, bits: 16}
        optimizer: {name: adamw, lr: 3.0e-2}
        runner: {name: continual, epochs: 20, batch_size: 32, tensorboard: false}
    """))
    # `import linear_hash` stands for the README's line in models/__init__.py (the
    # library's own files stay untouched by the test)
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}, {str(tmp_path)!r}]
        import main, linear_hash
        sys.exit(main.main(sys.argv[1:]))
    """)
    for name, extra in (("trained", []), ("untrained", ["--set", "runner.epochs=0"])):
        proc = subprocess.run([sys.executable, "-c", script, "--config-file", str(config), "--output-dir",
                               str(tmp_path / name), "--quiet", *extra],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    trained, untrained = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("trained", "untrained"))
    assert trained["method"] == "LinearHash"
    for d in ("i2t", "t2i"):
        assert trained["summary"][d]["acc"] > untrained["summary"][d]["acc"] + 0.15


def test_readme_python_api_block_runs_as_printed(tmp_path):
    """The README's Python API block, verbatim, from a folder holding the repository's
    configs/ and data/: it trains, reads, scores, indexes and searches."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
                 if b.startswith("# Python API"))
    for name in ("configs", "data"):
        (tmp_path / name).symlink_to(ROOT / name)
    script = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n" + block
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    results = json.loads((tmp_path / "outputs" / "api_demo" / "results.json").read_text())
    assert results["status"] == "finished" and results["method"] == "DSPH"
    lines = proc.stdout.strip().splitlines()
    assert abs(float(lines[0].split()[0]) - results["summary"]["i2t"]["acc"]) < 1e-9   # the ACC printed is the run's
    assert 0.0 < float(lines[1]) <= 1.0
    assert (tmp_path / "outputs" / "api_demo" / "index" / "manifest.json").is_file()
    assert lines[-1].startswith("['mfeat:") and lines[-1].count("mfeat:") == 5
