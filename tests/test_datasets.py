"""Data loaders: CASH / PBEH task .mat files (both schemes, both MATLAB formats), the
bundled demo digits and the synthetic generator, plus the invariants every stream keeps."""
from __future__ import annotations

import importlib.util
import inspect
import typing
from pathlib import Path
from typing import Dict, List

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse
import torch

import dataset  # noqa: F401  (fills DATASETS)
from common.register import DATASETS
from dataset.demo import DEMO_FILE, DemoDigits
from dataset.feature_set import FeatureSet, TaskStream
from dataset.mat_io import mat_format, read_mat_array, write_mat_array
from dataset.splits import task_classes_from_labels
from dataset.synthetic import PRESETS, SyntheticDataset, synthetic_like
from dataset.task_mat import TaskMatDataset, file_name, key_name, write_task_mat
from utils.errors import DataError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- helpers
def write_mat(path: Path, key: str, arr: np.ndarray, fmt: str) -> None:
    """Write ``arr`` (N x D) as MATLAB would: v7.3 = HDF5 with the axes reversed on disk."""
    if fmt == "v7.3":
        with h5py.File(path, "w", userblock_size=512) as fh:
            ds = fh.create_dataset(key, data=np.ascontiguousarray(arr.T))
            ds.attrs["MATLAB_class"] = np.bytes_("double" if arr.dtype == np.float64 else "single")
        with open(path, "r+b") as fh:  # MATLAB's text header lives in the user block
            fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .")
    else:
        scipy.io.savemat(str(path), {key: arr})


def write_tasks(root: Path, scheme: str, fmt: str, sizes: List[Dict[str, int]], dims=(12, 7), classes=6,
                seed=0) -> List[Dict[str, Dict[str, np.ndarray]]]:
    """Task files for ``sizes`` (one dict split -> N per task); returns the arrays written.

    Task t's samples carry labels from columns {2t, 2t+1}; ``fmt="mixed"`` alternates formats.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    i = 0
    for t, per_split in enumerate(sizes):
        arrays: Dict[str, Dict[str, np.ndarray]] = {}
        for split, n in per_split.items():
            lab = np.zeros((n, classes))
            lab[np.arange(n), 2 * t + rng.integers(0, 2, n)] = 1
            data = {
                "image": rng.standard_normal((n, dims[0])).astype(np.float32),
                "text": rng.standard_normal((n, dims[1])).astype(np.float32),
                "label": lab,
            }
            for kind, arr in data.items():
                f = fmt if fmt != "mixed" else ("v7.3", "v5")[i % 2]
                i += 1
                write_mat(root / file_name(scheme, split, t, kind), key_name(scheme, split, t, kind), arr, f)
            arrays[split] = data
        out.append(arrays)
    return out


SIZES = [{"train": 20, "test": 5, "database": 30}, {"train": 16, "test": 4, "database": 25},
         {"train": 10, "test": 3, "database": 12}]


def ids_of(fs) -> set:
    return set(fs.ids)


def check_stream(stream: TaskStream) -> None:
    """Invariants every loader promises (FeatureSet / Task / TaskStream level)."""
    owned: set = set()
    for task in stream.tasks:
        for split in ("query", "train", "val", "database"):
            fs = getattr(task, split)
            assert fs.image.dtype == fs.text.dtype == fs.labels.dtype == torch.float32
            assert fs.labels.shape[1] == stream.num_classes
            assert set(torch.unique(fs.labels).tolist()) <= {0.0, 1.0}
            assert len(fs.ids) == len(fs) and len(set(fs.ids)) == len(fs)
            assert torch.isfinite(fs.image).all() and torch.isfinite(fs.text).all()
            if split != "val":
                assert len(fs) > 0
        assert not ids_of(task.train) & ids_of(task.val), "val must be removed from train"
        assert not ids_of(task.query) & (ids_of(task.train) | ids_of(task.val) | ids_of(task.database))
        assert not owned & set(task.classes), "a label column belongs to one task at most"
        owned |= set(task.classes)


# ---------------------------------------------------------------------- mat_io
def test_v73_arrays_are_read_transposed_and_v5_as_is(tmp_path):
    arr = np.arange(15, dtype=np.float32).reshape(5, 3)  # N=5, D=3
    write_mat(tmp_path / "a.mat", "x", arr, "v7.3")
    write_mat(tmp_path / "b.mat", "x", arr, "v5")
    with h5py.File(tmp_path / "a.mat", "r") as fh:
        assert fh["x"].shape == (3, 5)  # on disk: MATLAB's column-major layout
    assert mat_format(tmp_path / "a.mat") == "v7.3" and mat_format(tmp_path / "b.mat") == "v5"
    np.testing.assert_array_equal(read_mat_array(tmp_path / "a.mat", "x"), arr)
    np.testing.assert_array_equal(read_mat_array(tmp_path / "b.mat", "x"), arr)


def test_sparse_matrices_are_densified(tmp_path):
    dense = np.array([[0, 1, 0], [1, 0, 1], [0, 0, 0], [1, 1, 0]], dtype=np.float64)
    scipy.io.savemat(str(tmp_path / "s5.mat"), {"lab": scipy.sparse.csc_matrix(dense)})
    np.testing.assert_array_equal(read_mat_array(tmp_path / "s5.mat", "lab"), dense)
    csc = scipy.sparse.csc_matrix(dense)  # MATLAB v7.3 sparse: a group with data / ir / jc
    with h5py.File(tmp_path / "s73.mat", "w") as fh:
        g = fh.create_group("lab")
        g.attrs["MATLAB_sparse"] = np.uint64(dense.shape[0])
        g["data"], g["ir"], g["jc"] = csc.data, csc.indices.astype(np.uint64), csc.indptr.astype(np.uint64)
    np.testing.assert_array_equal(read_mat_array(tmp_path / "s73.mat", "lab"), dense)


def test_written_v73_files_read_back_and_load_as_matlab_does(tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(4, 3)
    write_mat_array(tmp_path / "w.mat", "x", arr)
    assert mat_format(tmp_path / "w.mat") == "v7.3"
    assert (tmp_path / "w.mat").read_bytes().startswith(b"MATLAB 7.3 MAT-file")
    with h5py.File(tmp_path / "w.mat", "r") as fh:  # what an h5py loader that transposes sees
        assert fh["x"].shape == (3, 4) and fh["x"].attrs["MATLAB_class"] == b"single"
        np.testing.assert_array_equal(np.swapaxes(fh["x"][()], 0, 1), arr)
    np.testing.assert_array_equal(read_mat_array(tmp_path / "w.mat", "x"), arr)
    with pytest.raises(ValueError, match="2-D numeric"):
        write_mat_array(tmp_path / "bad.mat", "x", np.zeros(3))


def test_write_task_mat_round_trips_a_stream(tmp_path):
    stream = SyntheticDataset(num_classes=6, num_tasks=2, query_size=5, train_size=12, database_size=20,
                              image_dim=8, text_dim=4, seed=3, val_size=2).load()
    written = write_task_mat(stream, tmp_path / "files", scheme="coco")
    assert len(written) == 18 and all(p.is_file() for p in written)
    back = TaskMatDataset(root=str(tmp_path / "files"), val_size=0).load()
    assert len(back) == 2
    for orig, read in zip(stream.tasks, back.tasks):
        train = FeatureSet.concat([orig.train, orig.val])   # train and val share the train file
        np.testing.assert_array_equal(read.train.image.numpy(), train.image.numpy())
        np.testing.assert_array_equal(read.train.labels.numpy(), train.labels.numpy())
        np.testing.assert_array_equal(read.query.text.numpy(), orig.query.text.numpy())
        np.testing.assert_array_equal(read.database.image.numpy(), orig.database.image.numpy())
    with pytest.raises(ValueError, match="scheme"):
        write_task_mat(stream, tmp_path / "other", scheme="flickr")


# ---------------------------------------------------------------------- task_mat
@pytest.mark.parametrize("scheme", ["coco", "nuswide"])
@pytest.mark.parametrize("fmt", ["v7.3", "v5", "mixed"])
def test_task_mat_reads_both_schemes_and_formats(tmp_path, scheme, fmt):
    written = write_tasks(tmp_path, scheme, fmt, SIZES)
    stream = TaskMatDataset(root=str(tmp_path), val_size=3, seed=1).load()
    check_stream(stream)
    assert len(stream) == 3 and stream.meta["scheme"] == scheme
    assert (stream.image_dim, stream.text_dim, stream.num_classes) == (12, 7, 6)
    for t, task in enumerate(stream.tasks):
        src = written[t]
        assert task.sizes() == {"query": SIZES[t]["test"], "train": SIZES[t]["train"] - 3, "val": 3,
                                "database": SIZES[t]["database"]}
        np.testing.assert_array_equal(task.query.image.numpy(), src["test"]["image"])
        np.testing.assert_array_equal(task.database.text.numpy(), src["database"]["text"])
        np.testing.assert_array_equal(task.query.labels.numpy(), src["test"]["label"])
        # train + val together are exactly the train file, rows found through their ids
        for part in (task.train, task.val):
            rows = [int(i.rsplit(":", 1)[1]) for i in part.ids]
            np.testing.assert_array_equal(part.image.numpy(), src["train"]["image"][rows])
            np.testing.assert_array_equal(part.labels.numpy(), src["train"]["label"][rows])
        assert len(ids_of(task.train) | ids_of(task.val)) == SIZES[t]["train"]
        assert task.classes == (2 * t, 2 * t + 1)


def test_task_mat_task_count_limit_subsample_and_normalize(tmp_path):
    write_tasks(tmp_path, "nuswide", "v5", SIZES)
    two = TaskMatDataset(root=str(tmp_path), scheme="nuswide", num_tasks=2, val_fraction=0.0).load()
    assert len(two) == 2 and len(two.tasks[0].val) == 0
    assert [t.name for t in two.tasks] == ["task_1", "task_2"]  # defined by files: numbered from 1 as in the log
    capped = TaskMatDataset(root=str(tmp_path), max_query=2, max_database=10, max_train=8, val_fraction=0.25,
                            normalize="l2", label_names=list("abcdef")).load()
    assert capped.tasks[0].sizes() == {"query": 2, "train": 6, "val": 2, "database": 10}
    assert capped.label_names == tuple("abcdef")
    torch.testing.assert_close(capped.tasks[1].query.image.norm(dim=1), torch.ones(2))
    again = TaskMatDataset(root=str(tmp_path), max_query=2, max_database=10, max_train=8, val_fraction=0.25,
                           normalize="l2").load()
    assert again.tasks[0].val.ids == capped.tasks[0].val.ids  # seeded
    other = TaskMatDataset(root=str(tmp_path), val_fraction=0.25, seed=7).load()
    first = TaskMatDataset(root=str(tmp_path), val_fraction=0.25, seed=0).load()
    assert other.tasks[0].val.ids != first.tasks[0].val.ids


def test_task_mat_errors_name_the_file_or_key(tmp_path):
    with pytest.raises(DataError, match=r"nowhere.*not found.*\{train,test,database\}_\{t\}.*CASH / PBEH"):
        TaskMatDataset(root=str(tmp_path / "nowhere")).load()
    with pytest.raises(DataError, match="no task feature files found"):
        TaskMatDataset(root=str(tmp_path)).load()

    write_tasks(tmp_path / "coco", "coco", "v7.3", SIZES[:2])
    with pytest.raises(DataError, match=r"subfolder .*coco"):
        TaskMatDataset(root=str(tmp_path)).load()

    (tmp_path / "coco" / "database_1_text.mat").unlink()
    with pytest.raises(DataError, match=r"database_1_text\.mat"):
        TaskMatDataset(root=str(tmp_path / "coco")).load()
    with pytest.raises(DataError, match=r"train_2_image\.mat"):
        TaskMatDataset(root=str(tmp_path / "coco"), num_tasks=3).load()

    d = tmp_path / "keys"
    write_tasks(d, "coco", "v7.3", SIZES[:1])
    write_mat(d / "train_0_label.mat", "train_0_label", np.zeros((20, 6)), "v7.3")  # COCO calls it _lab
    with pytest.raises(DataError, match=r"train_0_label\.mat: key 'train_0_lab' not found"):
        TaskMatDataset(root=str(d)).load()
    write_mat(d / "train_0_label.mat", "wrong", np.zeros((20, 6)), "v5")
    with pytest.raises(DataError, match=r"train_0_label\.mat: key 'train_0_lab' not found; keys present: wrong"):
        TaskMatDataset(root=str(d)).load()

    (d / "train_0_label.mat").write_bytes(b"this is not a mat file at all" * 10)
    with pytest.raises(DataError, match=r"train_0_label\.mat: cannot read.*train_0_lab"):
        TaskMatDataset(root=str(d)).load()
    good = d / "test_0_image.mat"
    (d / "train_0_label.mat").write_bytes(good.read_bytes()[:700])  # a truncated HDF5 file
    with pytest.raises(DataError, match=r"train_0_label\.mat"):
        TaskMatDataset(root=str(d)).load()


def test_task_mat_inconsistent_files(tmp_path):
    write_tasks(tmp_path, "nuswide", "v7.3", SIZES[:2])
    write_mat(tmp_path / "test_task_1_text.mat", "test_task_1_text", np.zeros((3, 7), np.float32), "v7.3")
    with pytest.raises(DataError, match=r"row counts differ: .*test_task_1_image\.mat has 4.*test_task_1_text\.mat has 3"):
        TaskMatDataset(root=str(tmp_path)).load()
    write_mat(tmp_path / "test_task_1_text.mat", "test_task_1_text", np.zeros((4, 9), np.float32), "v7.3")
    with pytest.raises(DataError, match=r"text feature dimensions differ: .*train_task_0_text\.mat has 7.*test_task_1_text\.mat has 9"):
        TaskMatDataset(root=str(tmp_path)).load()
    write_mat(tmp_path / "test_task_1_text.mat", "test_task_1_text", np.zeros((4, 7), np.float32), "v7.3")
    write_mat(tmp_path / "test_task_1_label.mat", "test_task_1_label", np.full((4, 6), 2.0), "v5")
    with pytest.raises(DataError, match=r"test_task_1_label\.mat: key 'test_task_1_label' holds the value 2"):
        TaskMatDataset(root=str(tmp_path)).load()
    write_mat(tmp_path / "test_task_1_label.mat", "test_task_1_label", np.zeros((4, 6)), "v5")
    with pytest.raises(DataError, match=r"label_names has 2 names but .* has 6 label columns"):
        TaskMatDataset(root=str(tmp_path), label_names=["a", "b"]).load()
    write_tasks(tmp_path, "coco", "v5", SIZES[:1])
    with pytest.raises(DataError, match="both naming schemes"):
        TaskMatDataset(root=str(tmp_path)).load()
    assert len(TaskMatDataset(root=str(tmp_path), scheme="coco").load()) == 1


def test_task_classes_rules():
    t0 = torch.zeros(10, 4)
    t0[:, 0] = 1
    t0[:2, 2] = 1  # column 2 leaks into task 0 (20 % of its samples)
    t1 = torch.zeros(5, 4)
    t1[:, 2] = 1  # ... but is task 1's own class (100 %)
    t1[:3, 1] = 1
    assert task_classes_from_labels([t0, t1], "dominant") == [(0,), (1, 2)]
    assert task_classes_from_labels([t0, t1], "first_seen") == [(0, 2), (1,)]  # column 3: nobody's


def test_constructors_are_cheap_and_validate():
    TaskMatDataset(root="/does/not/exist")  # no file access before load()
    DemoDigits(root="/does/not/exist")
    for bad in (dict(val_fraction=1.5), dict(val_fraction=0.1, val_size=3), dict(num_tasks=0),
                dict(max_query=0), dict(scheme="coco2")):
        with pytest.raises(ValueError):
            TaskMatDataset(root="x", **bad)
    for bad in (dict(num_tasks=3), dict(query_per_class=200), dict(train_per_class=190),
                dict(class_order=[0, 1, 2])):
        with pytest.raises(ValueError):
            DemoDigits(**bad)


@pytest.mark.parametrize("name", ["task_mat", "demo", "synthetic"])
def test_registered_kwargs_are_annotated(name):
    cls = DATASETS.get(name)
    hints = typing.get_type_hints(cls.__init__)
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    assert params and all(p in hints for p in params)
    assert hints["seed"] is int
    assert "val_fraction" in params and "val_size" in params


def test_config_layer_checks_dataset_kwargs():
    from utils import config
    from utils.errors import ConfigError
    assert config.check_kwargs(TaskMatDataset, {"root": "x", "val_fraction": "1e-1"}, "dataset")["val_fraction"] == 0.1
    with pytest.raises(ConfigError, match="dataset.num_tasks"):
        config.check_kwargs(TaskMatDataset, {"root": "x", "num_tasks": "3"}, "dataset")
    with pytest.raises(ConfigError, match="dataset.preset"):
        config.check_kwargs(SyntheticDataset, {"preset": "coco"}, "dataset")


# ---------------------------------------------------------------------- demo
def test_demo_stream_sizes_and_splits():
    stream = DATASETS.get("demo")().load()
    check_stream(stream)
    assert len(stream) == 5 and (stream.image_dim, stream.text_dim, stream.num_classes) == (240, 76, 10)
    for t, task in enumerate(stream.tasks):
        assert task.sizes() == {"query": 40, "train": 180, "val": 20, "database": 360}
        assert task.classes == (2 * t, 2 * t + 1)
        assert ids_of(task.train) | ids_of(task.val) <= ids_of(task.database)
        for split in ("query", "train", "val", "database"):
            fs = getattr(task, split)
            assert torch.equal(fs.labels.sum(1), torch.ones(len(fs)))
            assert set(fs.labels.argmax(1).tolist()) == {2 * t, 2 * t + 1}
            torch.testing.assert_close(fs.image.norm(dim=1), torch.ones(len(fs)))
    seen = set().union(*(ids_of(t.query) | ids_of(t.database) for t in stream.tasks))
    assert len(seen) == 2000  # every sample used once as query or database item


def test_demo_options_seed_and_raw_values():
    a, b = DemoDigits(seed=0).load(), DemoDigits(seed=0).load()
    assert torch.equal(a.tasks[2].train.image, b.tasks[2].train.image)
    c = DemoDigits(seed=1).load()
    assert a.tasks[0].query.ids != c.tasks[0].query.ids
    ten = DemoDigits(num_tasks=10, query_per_class=50, train_per_class=150, val_size=10,
                     class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0], normalize="none").load()
    assert len(ten) == 10 and ten.tasks[0].classes == (9,)
    assert ten.tasks[0].sizes() == {"query": 50, "train": 140, "val": 10, "database": 150}
    pix = ten.tasks[0].database.image
    assert torch.equal(pix, pix.round()) and pix.min() >= 0 and pix.max() <= 6  # raw pixel averages


def test_demo_missing_or_corrupt_file(tmp_path):
    with pytest.raises(DataError, match=rf"{DEMO_FILE}: demo data file not found.*python data/make_demo.py"):
        DemoDigits(root=str(tmp_path)).load()
    (tmp_path / DEMO_FILE).write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DataError, match=rf"{DEMO_FILE}: cannot read.*python data/make_demo.py"):
        DemoDigits(root=str(tmp_path)).load()
    np.savez(tmp_path / DEMO_FILE, image=np.zeros((2000, 4)), text=np.zeros((2000, 3)))
    with pytest.raises(DataError, match=r"key 'labels' missing.*make_demo.py"):
        DemoDigits(root=str(tmp_path)).load()


def test_bundled_file_is_small_and_make_demo_rebuilds_it_from_uci_text_files(tmp_path):
    bundled = REPO / "data" / "demo" / DEMO_FILE
    assert bundled.stat().st_size < 2_000_000
    with np.load(bundled) as content:
        image, text, labels = content["image"], content["text"], content["labels"]
        assert "CC BY 4.0" in str(content["credit"])
    # the original UCI layout: whitespace-separated text files, 200 rows per digit in order
    assert np.array_equal(labels, np.repeat(np.arange(10), 200))
    np.savetxt(tmp_path / "mfeat-pix", image.astype(np.float64), fmt="%d")
    np.savetxt(tmp_path / "mfeat-fou", text.astype(np.float64), fmt="%.9g")
    spec = importlib.util.spec_from_file_location("make_demo", REPO / "data" / "make_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "rebuilt.npz"
    out.write_bytes(module.build(tmp_path))
    with np.load(out) as rebuilt:
        np.testing.assert_array_equal(rebuilt["image"], image)
        np.testing.assert_array_equal(rebuilt["text"], text)
        np.testing.assert_array_equal(rebuilt["labels"], labels)


# ---------------------------------------------------------------------- synthetic
SMALL = dict(num_classes=12, num_tasks=3, image_dim=24, text_dim=16, query_size=30, train_size=60, database_size=90)


def test_synthetic_deterministic_by_seed():
    a, b = SyntheticDataset(**SMALL, seed=3).load(), SyntheticDataset(**SMALL, seed=3).load()
    c = SyntheticDataset(**SMALL, seed=4).load()
    check_stream(a)
    for ta, tb, tc in zip(a.tasks, b.tasks, c.tasks):
        for split in ("query", "train", "val", "database"):
            fa, fb = getattr(ta, split), getattr(tb, split)
            assert torch.equal(fa.image, fb.image) and torch.equal(fa.text, fb.text)
            assert torch.equal(fa.labels, fb.labels) and fa.ids == fb.ids
        assert not torch.equal(ta.query.image, tc.query.image)
    # a split depends on its own key only: a bigger query set leaves the database alone
    bigger = SyntheticDataset(**{**SMALL, "query_size": 50}, seed=3).load()
    assert torch.equal(bigger.tasks[1].database.image, a.tasks[1].database.image)


def test_synthetic_shapes_labels_and_modalities():
    s = SyntheticDataset(**SMALL, max_labels=2, cross_task_prob=0.0, val_fraction=0.2).load()
    assert (s.image_dim, s.text_dim, s.num_classes) == (24, 16, 12)
    for t, task in enumerate(s.tasks):
        assert task.sizes() == {"query": 30, "train": 48, "val": 12, "database": 90}
        assert task.classes == tuple(range(4 * t, 4 * t + 4))
        assert ids_of(task.train) | ids_of(task.val) <= ids_of(task.database)
        lab = task.database.labels
        assert ((lab.sum(1) >= 1) & (lab.sum(1) <= 2)).all()
        outside = [c for c in range(12) if c not in task.classes]
        assert lab[:, outside].sum() == 0  # no cross-task labels when cross_task_prob = 0
        torch.testing.assert_close(task.query.text.norm(dim=1), torch.ones(30))
    cross = SyntheticDataset(**SMALL, cross_task_prob=1.0).load()
    lab = cross.tasks[2].query.labels
    assert (lab[:, :8].sum(1) >= 1).all() and (lab[:, 8:].sum(1) >= 1).all()
    assert cross.tasks[0].query.labels[:, 4:].sum() == 0  # task 1 has no earlier task


def test_synthetic_modality_gap_and_learnable_structure():
    base = dict(num_classes=8, num_tasks=2, image_dim=32, text_dim=32, query_size=60, train_size=300,
                database_size=300, val_size=0)
    gap = lambda s: (s.tasks[0].database.image.mean(0) - s.tasks[0].database.text.mean(0)).norm().item()  # noqa: E731
    assert gap(SyntheticDataset(**base, modality_gap=1.0).load()) > gap(SyntheticDataset(**base, modality_gap=0.0).load()) + 0.3
    s = SyntheticDataset(**base, noise=0.5).load()
    task = s.tasks[0]
    w = torch.linalg.lstsq(task.train.image, task.train.text).solution  # a linear image -> text map
    sim = (task.query.image @ w) @ task.database.text.T
    rel = (task.query.labels @ task.database.labels.T > 0).float()
    top = sim.topk(10, dim=1).indices
    precision = torch.gather(rel, 1, top).mean().item()
    assert precision > rel.mean().item() + 0.25  # the features carry the labels across modalities


def test_synthetic_imbalance_lists_and_presets():
    s = SyntheticDataset(**{**SMALL, "num_tasks": 4}, imbalance=4.0).load()
    db = [len(t.database) for t in s.tasks]
    assert db == sorted(db, reverse=True) and db[0] == 90 and db[-1] == round(90 / 4)
    q = [len(t.query) for t in s.tasks]
    assert q[0] / q[-1] == pytest.approx(4.0, rel=0.1)
    listed = SyntheticDataset(num_classes=6, num_tasks=2, image_dim=8, text_dim=8, query_sizes=[5, 9],
                              train_sizes=[10, 4], database_sizes=[20, 6], val_size=1).load()
    assert [t.sizes() for t in listed.tasks] == [{"query": 5, "train": 9, "val": 1, "database": 20},
                                                 {"query": 9, "train": 3, "val": 1, "database": 6}]
    coco = synthetic_like("coco_balanced", image_dim=8, text_dim=8, val_size=0).load()
    spec = PRESETS["coco_balanced"]
    assert coco.num_classes == 80 and [len(t.classes) for t in coco.tasks] == [16] * 5
    assert [len(t.query) for t in coco.tasks] == spec["query"]
    assert [len(t.train) for t in coco.tasks] == spec["train"]
    assert [len(t.database) for t in coco.tasks] == spec["database"]
    nus = SyntheticDataset(preset="nus_imbalanced", scale=0.05, image_dim=8, text_dim=8).load()
    assert [len(t.classes) for t in nus.tasks] == [16, 16, 16, 16, 17]
    assert [len(t.query) for t in nus.tasks] == [round(n * 0.05) for n in PRESETS["nus_imbalanced"]["query"]]
    for bad in (dict(preset="coco_balanced", num_classes=10), dict(train_size=50, database_size=40),
                dict(num_tasks=3, query_sizes=[1, 2]), dict(query_size=5, query_sizes=[1] * 5), dict(imbalance=0.5)):
        with pytest.raises(ValueError):
            SyntheticDataset(**bad)


def test_synthetic_defaults_draw_as_before_the_realistic_parameters():
    # values drawn by the generator before alignment / class_skew / ... existed
    s = SyntheticDataset(num_classes=6, num_tasks=2, image_dim=8, text_dim=8, query_size=5, train_size=10,
                         database_size=12, seed=9).load()
    db = s.tasks[1].database
    expected = [0.3066813349723816, -0.1734098494052887, 0.22896169126033783, 0.5604279637336731,
                -0.61577308177948, 0.1384918987751007, -0.09032750874757767, 0.3207134008407593]
    torch.testing.assert_close(db.image[0], torch.tensor(expected))
    assert db.labels.sum(0).tolist() == [0.0, 0.0, 0.0, 5.0, 8.0, 9.0]
    assert float(db.text.sum()) == pytest.approx(8.735921859741211, abs=1e-5)


def _paired_unpaired(fs):
    return float((fs.image * fs.text).sum(1).mean()), float((fs.image @ fs.text.T).mean())


def test_clip_like_preset_properties():
    from common.calc_utils import calc_map_k
    from models.base import sign_codes
    from models.ridge import RidgeHash

    s = SyntheticDataset(preset="coco_clip_like_small").load()
    assert (s.image_dim, s.text_dim, s.num_classes, len(s)) == (512, 512, 80, 5)
    assert [t.sizes() for t in s.tasks] == [{"query": 150, "train": 540, "val": 60, "database": 1650}] * 5
    db = s.tasks[0].database
    torch.testing.assert_close(db.image.norm(dim=1), torch.ones(1650))
    paired, unpaired = _paired_unpaired(db)
    assert paired > unpaired + 0.15  # aligned modalities: the pair agrees more than random pairs
    labels = torch.cat([t.database.labels for t in s.tasks])
    assert 1.8 < float(labels.sum(1).mean()) < 2.4  # multi-label
    freq = labels.mean(0)
    assert float(freq.max() / freq.median()) > 5  # long tail
    first = s.tasks[0].database.labels[:, list(s.tasks[0].classes)]
    co = (first.T @ first).fill_diagonal_(0)
    same_group = (torch.arange(16)[:, None] % 12 == torch.arange(16)[None, :] % 12).float().fill_diagonal_(0)
    assert float((co * same_group).sum() / same_group.sum()) > 2 * float((co * (1 - same_group)).sum() / (1 - same_group).sum())
    # a linear model is far from perfect but far above chance
    task = s.tasks[1]
    model = RidgeHash(512, 512, 80, bits=16)
    model.fit(task, 1)
    q, d = task.query, task.database
    ridge = calc_map_k(sign_codes(model.encode_image(q.image)), sign_codes(model.encode_text(d.text)), q.labels, d.labels, k=1000)
    g = torch.Generator().manual_seed(0)
    chance = calc_map_k(torch.randint(0, 2, (150, 16), generator=g) * 2 - 1, torch.randint(0, 2, (1650, 16), generator=g) * 2 - 1,
                        q.labels, d.labels, k=1000)
    assert chance + 0.15 < ridge < 0.8
    # unaligned modalities: the paired cosine is no higher than the unpaired one
    small = dict(num_classes=8, num_tasks=2, image_dim=64, text_dim=64, query_size=10, train_size=10, database_size=200)
    p0, u0 = _paired_unpaired(SyntheticDataset(**small, alignment=0.0).load().tasks[0].database)
    p1, u1 = _paired_unpaired(SyntheticDataset(**small, alignment=0.9).load().tasks[0].database)
    assert abs(p0 - u0) < 0.05 and p1 > u1 + 0.2
    for bad in (dict(alignment=0.5, image_dim=8, text_dim=4), dict(alignment=1.5), dict(mean_labels=5.0),
                dict(class_skew=-1.0), dict(preset="coco_clip_like", num_classes=8)):
        with pytest.raises(ValueError):
            SyntheticDataset(**bad)
