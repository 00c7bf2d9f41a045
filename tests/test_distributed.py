"""Data-parallel training with torchrun on 2 CPU processes (gloo): exact shard
gathering, and a run whose results match a single process within a tolerance."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

import main
from common.code_store import CodeStore
from utils.distributed import DistContext, gather_rows, shard_bounds, sync_rows

ROOT = Path(main.__file__).parent
CONFIG = {
    "dataset": {"name": "synthetic", "num_classes": 24, "num_tasks": 2, "image_dim": 32, "text_dim": 24,
                "query_size": 24, "train_size": 120, "database_size": 161, "max_labels": 2, "noise": 0.3, "seed": 3},
    "model": {"name": "DSPH", "bits": 16},
    "optimizer": {"name": "adamw", "lr": 1.0e-2},
    "runner": {"name": "continual", "epochs": 10, "batch_size": 32, "seed": 7, "tensorboard": False, "num_threads": 1},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_bounds_cover_every_row_once():
    for n in (0, 1, 7, 64):
        for world in (1, 2, 3):
            spans = [shard_bounds(n, DistContext(r, world)) for r in range(world)]
            rows = [i for lo, hi in spans for i in range(lo, hi)]
            assert rows == list(range(n))


def _gather_worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ctx = DistContext(rank, world)
    full = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3)
    lo, hi = shard_bounds(7, ctx)
    gathered = gather_rows(full[lo:hi].clone(), 7, ctx)
    buf = torch.zeros(10, 2)
    idx = torch.tensor([9, 2, 5])
    mine = idx.tensor_split(world)[rank]
    buf[mine] = (rank + 1) * 1.0  # each rank writes only its share of the batch rows
    sync_rows(buf, idx, ctx)
    out[rank] = (gathered.tolist(), buf.tolist())
    dist.destroy_process_group()


def test_gather_is_exact_with_uneven_shards():
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_gather_worker, args=(2, free_port(), out), nprocs=2, join=True)
    full = torch.arange(21, dtype=torch.float32).reshape(7, 3).tolist()
    for rank in (0, 1):
        gathered, buf = out[rank]
        assert gathered == full  # 4 + 3 rows: the padding row is dropped, nothing doubles
        assert buf[9] == [1.0, 1.0] and buf[2] == [1.0, 1.0] and buf[5] == [2.0, 2.0]
    assert out[0][1] == out[1][1]


def test_torchrun_two_processes_matches_one(tmp_path):
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
         f"--master-port={free_port()}", "main.py", "--config-file", str(cfg_file),
         "--output-dir", str(tmp_path / "two"), "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("summary") == 1  # rank 0 alone reports
    one = subprocess.run(
        [sys.executable, "main.py", "--config-file", str(cfg_file), "--output-dir", str(tmp_path / "one"), "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    assert r2["status"] == "finished" and r2["bits"] == r1["bits"]
    for d in ("i2t", "t2i"):
        m = r2["map"][d]
        assert m[0][1] is None and all(0 <= v <= 1 for row in m for v in row if v is not None)
        assert r2["summary"][d]["acc"] == pytest.approx(r1["summary"][d]["acc"], abs=0.1)
    s2, s1 = CodeStore.load(tmp_path / "two" / "codes.npz"), CodeStore.load(tmp_path / "one" / "codes.npz")
    assert s2.bits() == s1.bits()
    for t in s1.tasks():  # every database item encoded exactly once, none padded in
        assert s2.get(t).image.shape == s1.get(t).image.shape == (161, 2)
        assert np.array_equal(s2.get(t).labels, s1.get(t).labels)
    assert not list((tmp_path / "two").glob("**/*rank*"))  # nothing written by rank 1
