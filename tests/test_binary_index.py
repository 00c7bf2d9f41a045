"""FAISS binary indexes over stored codes: exact distances vs brute force, codes of
different lengths, id mapping, save / load, hashed kinds, and the index / search CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.binary_index import (
    KINDS, MISSING_ID, BinaryIndex, build_faiss_index, export_store, factory_string, load_index_folder,
    pack_prefix,
    resolve_params, save_index_folder,
)
from common.calc_utils import hamming_distance
from common.code_store import CodeStore
from utils.errors import DataError, UserError

LENGTHS = {0: 12, 1: 16}  # task key -> stored code length
SIZES = {0: 150, 1: 200}


def clustered(rng, n, bits, centres):
    """Codes near a few centres (so there are near neighbours and many ties)."""
    c = centres[rng.integers(0, len(centres), n), :bits]
    return np.where(rng.random((n, bits)) < 0.1, -c, c).astype(np.int8)


@pytest.fixture
def data():
    """A store with a 12-bit task and a 16-bit task, and 25 16-bit queries."""
    rng = np.random.default_rng(0)
    centres = rng.choice([-1, 1], (6, 16)).astype(np.int8)
    s = CodeStore()
    for t, bits in LENGTHS.items():
        n = SIZES[t]
        s.add(t, clustered(rng, n, bits, centres), clustered(rng, n, bits, centres), rng.integers(0, 2, (n, 4)),
              [f"t{t}/img_{i:04d}.jpg" for i in range(n)])
    return s, clustered(rng, 25, 16, centres)  # queries have the model's current length


def brute_force(store, modality, queries):
    """Hamming distance of every query to every stored item, each task on its own
    prefix, items in (task, position) order: the evaluation's database order."""
    q = torch.as_tensor(queries).to(torch.int64)
    parts, keys = [], []
    for e in store.entries():
        db = e.codes(modality).to(torch.int64)
        parts.append((q[:, None, : e.bits] != db[None]).sum(-1))
        keys += [(e.task, p) for p in range(len(e))]
    return torch.cat(parts, dim=1).numpy(), keys


@pytest.mark.parametrize("modality", ["image", "text"])
@pytest.mark.parametrize("k", [1, 17, 350])
def test_flat_search_equals_brute_force(data, modality, k):
    store, queries = data
    index = BinaryIndex.build(store, modality, "flat")
    assert index.lengths() == [12, 16] and len(index) == 350
    dist, keys = brute_force(store, modality, queries)
    # the reference agrees with the metric module's distances on each task's prefix
    np.testing.assert_array_equal(dist, np.concatenate(
        [hamming_distance(queries[:, : e.bits], e.codes(modality).numpy()) for e in store.entries()], axis=1))
    for qi, hits in enumerate(index.search(queries, k)):
        assert len(hits) == k
        assert np.all(np.diff(hits.distance) >= 0)
        # the distance multiset equals the brute-force top k (ties may pick other members)
        np.testing.assert_array_equal(hits.distance, np.sort(dist[qi])[:k])
        for d, t, p, ident, b in zip(hits.distance, hits.task, hits.position, hits.ids, hits.bits):
            assert dist[qi, keys.index((t, p))] == d  # each item's distance is its true distance
            assert ident == store.get(t).ids[p]  # ids map back to (task, sample id)
            assert b == LENGTHS[t]
        assert len({(t, p) for t, p in zip(hits.task, hits.position)}) == k


def test_stable_ties_reproduce_the_evaluation_order(data):
    store, queries = data
    index = BinaryIndex.build(store, "image", "flat")
    dist, keys = brute_force(store, "image", queries)
    for qi, hits in enumerate(index.search(queries, 40, stable_ties=True)):
        order = np.argsort(dist[qi], kind="stable")[:40]  # ascending distance, ties by database index
        assert [(int(t), int(p)) for t, p in zip(hits.task, hits.position)] == [keys[j] for j in order]
    with pytest.raises(UserError, match="exact"):
        BinaryIndex.build(store, "image", "hash").search(queries, 5, stable_ties=True)


def test_pad_bits_never_count():
    """12-bit codes live in d = 16: pad bits set in a stored code or a query's bits past
    the prefix must not change a distance."""
    ones = np.ones((1, 12), dtype=np.int8)
    clean = CodeStore()
    clean.add(0, ones, ones, np.ones((1, 1)), ["x"])
    state = clean.state()
    for m in ("image", "text"):
        state[f"t1_{m}"] = state[f"t1_{m}"].copy()
        state[f"t1_{m}"][:, -1] |= 0x0F  # garbage in the 4 pad bits (MSB-first packing)
    s = CodeStore.from_state(state)
    index = BinaryIndex.build(s, "image", "flat")
    q = np.concatenate([np.ones((1, 12)), -np.ones((1, 4))], axis=1)  # 16-bit query, last 4 bits differ
    hits = index.search(q, 1)[0]
    assert hits.distance.tolist() == [0] and hits.ids == ["x"]
    assert pack_prefix(q, 12).tolist() == [[0xFF, 0x0F]]  # LSB first: pad bits are the high ones


def test_save_load_round_trip(data, tmp_path):
    store, queries = data
    indexes = export_store(store, "flat")
    manifest = save_index_folder(tmp_path / "ix", indexes, {"run_dir": "somewhere", "after_task": 2})
    assert manifest["kind"] == "flat" and manifest["lengths"] == [12, 16] and manifest["count"] == 350
    assert manifest["source"]["after_task"] == 2
    shards = manifest["modalities"]["image"]["shards"]
    assert [(s["bits"], s["d"], s["count"], s["tasks"]) for s in shards] == [(12, 16, 150, [1]), (16, 16, 200, [2])]
    assert manifest["modalities"]["image"]["serves"] == "text"
    assert json.loads((tmp_path / "ix" / "manifest.json").read_text()) == manifest
    loaded = load_index_folder(tmp_path / "ix")
    assert loaded.for_query("text").modality == "image" and loaded.for_query("image").modality == "text"
    for m in ("image", "text"):
        a = indexes[m].search(queries, 30, stable_ties=True)
        b = loaded.indexes[m].search(queries, 30, stable_ties=True)
        for x, y in zip(a, b):
            assert x.distance.tolist() == y.distance.tolist() and x.ids == y.ids
            assert x.task.tolist() == y.task.tolist() and x.position.tolist() == y.position.tolist()
    # a second save into the same folder replaces the index; a foreign folder is refused
    save_index_folder(tmp_path / "ix", export_store(store, "hash"), {})
    assert load_index_folder(tmp_path / "ix").manifest["kind"] == "hash"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        save_index_folder(tmp_path / "other", indexes, {})
    with pytest.raises(DataError, match="no index there"):
        load_index_folder(tmp_path / "missing")
    (tmp_path / "ix" / "text_16bits.index").write_bytes(b"garbage")
    with pytest.raises(DataError, match="text_16bits.index"):
        load_index_folder(tmp_path / "ix")


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "flat"])
def test_approximate_kinds_return_true_distances_no_padding(data, kind):
    store, queries = data
    index = BinaryIndex.build(store, "text", kind)
    flat = BinaryIndex.build(store, "text", "flat")
    dist, keys = brute_force(store, "text", queries)
    k = 30
    for qi, (hits, exact_hits) in enumerate(zip(index.search(queries, k), flat.search(queries, k))):
        assert len(hits) <= k and MISSING_ID not in hits.task.tolist()
        # a subset of the exhaustive top k, up to the tie group at its k-th distance
        kth = exact_hits.distance[-1]
        flat_items = {(t, p) for t, p in zip(exact_hits.task, exact_hits.position)}
        assert {(t, p) for t, p, d in zip(hits.task, hits.position, hits.distance) if d < kth} <= flat_items
        exact = np.sort(dist[qi])[: len(hits)]
        assert np.all(hits.distance >= exact)  # never better than exhaustive search
        for d, t, p in zip(hits.distance, hits.task, hits.position):
            assert dist[qi, keys.index((t, p))] == d
        assert len({(t, p) for t, p in zip(hits.task, hits.position)}) == len(hits)


def test_hash_padding_is_dropped(data):
    """A hash table on all the bits probed without flips finds only exact matches: FAISS
    pads the rest with id -1 / distance 2147483647; the index drops those entries."""
    store, queries = data
    index = BinaryIndex.build(store, "image", "hash", {"hash_bits": 16, "nflip": 0})
    shard = index.shards[-1]
    raw_d, raw_i = shard.index.search(pack_prefix(queries, 16), 50)
    assert (raw_i == MISSING_ID).any() and (raw_d == 2147483647).any()
    dist, keys = brute_force(store, "image", queries)
    for qi, hits in enumerate(index.search(queries, 50)):
        assert MISSING_ID not in hits.position.tolist() and len(hits) < 50
        # each shard hashes all its real bits (the 12-bit one 12), so exactly the exact matches come back
        assert hits.distance.tolist() == [0] * len(hits)
        assert {(int(t), int(p)) for t, p in zip(hits.task, hits.position)} == {
            keys[j] for j in np.flatnonzero(dist[qi] == 0)
        }


def test_multihash_finds_everything_within_its_guaranteed_radius(data):
    """Multi-index hashing with m tables probed within f flips finds every code within
    Hamming distance m * (f + 1) - 1 (pigeonhole)."""
    store, queries = data
    index = BinaryIndex.build(store, "image", "multihash", {"hash_bits": 4, "nflip": 0})
    radius = {s.bits: s.params["nhash"] * 1 - 1 for s in index.shards}
    assert radius == {12: 2, 16: 3}
    dist, keys = brute_force(store, "image", queries)
    hits = index.search(queries, 350)
    for qi, h in enumerate(hits):
        found = {(int(t), int(p)) for t, p in zip(h.task, h.position)}
        must = {keys[j] for j in range(len(keys)) if dist[qi, j] <= radius[LENGTHS[keys[j][0]]]}
        assert must <= found


def test_bad_input_refused(data):
    store, queries = data
    index = BinaryIndex.build(store, "image", "flat")
    with pytest.raises(UserError, match="at least as long"):
        index.search(np.ones((1, 14)), 5)  # shorter than the 16-bit codes
    with pytest.raises(UserError, match="k must be >= 1"):
        index.search(queries, 0)
    with pytest.raises(UserError, match="kind"):
        BinaryIndex.build(store, "image", "lsh")
    with pytest.raises(UserError, match="nprobe: not a parameter of a hash index"):
        BinaryIndex.build(store, "image", "hash", {"nprobe": 3})
    with pytest.raises(UserError, match="nflip is not a search parameter of a flat index"):
        index.search(queries, 3, params={"nflip": 1})
    with pytest.raises(UserError, match="task 3 is not in the index"):
        index.search(queries, 3, task=2)
    with pytest.raises(UserError, match="hash_bits 17: longer than the stored codes"):
        BinaryIndex.build(store, "image", "hash", {"hash_bits": 17})
    with pytest.raises(UserError, match="nhash 3: 3 tables"):
        BinaryIndex.build(store, "image", "multihash", {"hash_bits": 6, "nhash": 3})
    with pytest.raises(DataError, match="empty"):
        BinaryIndex.build(CodeStore(), "image", "flat")
    assert resolve_params("multihash", 10**6, 64, {}) == {"hash_bits": 20, "nhash": 3, "nflip": 1}
    ix = build_faiss_index("flat", np.zeros((3, 2), np.uint8), 16, {})
    assert ix.ntotal == 3
    assert [factory_string(k, resolve_params(k, 10**4, 16)) for k in KINDS] == [
        "BFlat", "BHash14", "BHash2x8", "BIVF100", "BHNSW16"]


@pytest.mark.parametrize("kind", KINDS)
def test_task_filter_and_per_call_parameters(data, kind):
    """A task filter returns only that task's items, and for the exact index exactly the
    brute-force ranking of that task's codes alone; per-call search parameters change
    one call and leave the index's own untouched."""
    store, queries = data
    index = BinaryIndex.build(store, "text", kind)
    dist, keys = brute_force(store, "text", queries)
    for task in (0, 1):
        res = index.search(queries, 12, task=task, stable_ties=kind == "flat")
        assert res.distance.shape == (len(queries), 12)
        assert set(res.task[res.count[:, None] > np.arange(12)].tolist()) == {task}
        cols = [j for j, (t, _) in enumerate(keys) if t == task]
        for qi, hits in enumerate(res):
            for d, p in zip(hits.distance, hits.position):
                assert dist[qi, keys.index((task, int(p)))] == d
            if kind == "flat":
                order = np.argsort(dist[qi, cols], kind="stable")[:12]
                assert hits.position.tolist() == [keys[cols[j]][1] for j in order]
    if kind in ("hash", "multihash"):
        before = [s.index.nflip for s in index.shards]
        wide = index.search(queries, 50, params={"nflip": 3})
        assert [s.index.nflip for s in index.shards] == before
        assert wide.count.sum() >= index.search(queries, 50).count.sum()


# ---------------------------------------------------------------------- end to end (CLI)
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-task PBEH run whose code grows 12 -> 16 bits: stored codes of two lengths,
    one of them not a multiple of 8, made by the real runner."""
    import dataset  # noqa: F401  (registers the datasets)
    import models  # noqa: F401
    from runners.experiment import run_config

    root = tmp_path_factory.mktemp("run")
    config = {
        "dataset": {"name": "synthetic", "num_classes": 4, "num_tasks": 2, "image_dim": 32, "text_dim": 32,
                    "query_size": 8, "train_size": 40, "database_size": 60, "seed": 0},
        "model": {"name": "PBEH", "bits": 12, "extend_bits": 4, "extend_threshold": 0.0, "width": 16, "hidden": 32,
                  "heads": 2, "prompt_divisor": 20},
        "optimizer": {"name": "adamw", "lr": 1.0e-3},
        "runner": {"name": "continual", "epochs": 1, "batch_size": 16, "seed": 1, "device": "cpu",
                   "tensorboard": False, "progress": False},
    }
    run_config(config, root / "run", quiet=True)
    np.save(root / "q.npy", np.random.default_rng(3).standard_normal((5, 32)).astype(np.float32))
    return root


def _cli(args, capsys):
    import main

    code = main.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _expected_ranking(run, modality, code, k):
    """(task key, position, distance) of the evaluation's stable top k for one code."""
    stored = "image" if modality == "text" else "text"
    dist, keys = brute_force(run.store, stored, code.numpy())
    order = np.argsort(dist[0], kind="stable")[:k]
    return [(keys[j][0], keys[j][1], int(dist[0][j])) for j in order]


def encode_query(model, modality, features, task_index):
    """The {-1,+1} code (1, bits) of one feature vector, through the library's encoder."""
    from runners.query_inputs import QueryFeatures
    from runners.retrieval import encode_queries

    return torch.from_numpy(encode_queries(model, QueryFeatures(modality, np.asarray(features)[None]), task_index))


def test_index_and_search_cli(tiny_run, capsys):
    from runners.experiment import load_run

    run_dir = tiny_run / "run"
    run = load_run(run_dir)
    assert run.store.bits() == {0: 12, 1: 16} and run.model.bits == 16
    code, out, err = _cli(["index", "--run-dir", run_dir], capsys)
    assert code == 0, err
    assert "120 items" in out and "12 bits: 60" in out and "16 bits: 60" in out
    manifest = json.loads((run_dir / "index" / "manifest.json").read_text())
    assert manifest["lengths"] == [12, 16] and manifest["source"]["after_task"] == 2
    assert manifest["source"]["method"] == "PBEH"

    code, out, err = _cli(["search", "--run-dir", run_dir, "--query-modality", "text", "--feature-file",
                           tiny_run / "q.npy", "--row", "2", "--k", "7", "--json", "--stable-ties"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["index"]["modality"] == "image" and len(result["results"]) == 7
    # the same query encoded by hand (task-agnostic), ranked by brute force with prefix truncation
    feats = np.load(tiny_run / "q.npy")
    code16 = encode_query(run.model, "text", feats[2], None)
    assert result["query"]["code"] == "".join("1" if b > 0 else "0" for b in code16[0].tolist())
    assert result["query"]["bits"] == 16 and result["query"]["task"] is None
    assert [(r["task"] - 1, r["position"], r["distance"]) for r in result["results"]] == \
        _expected_ranking(run, "text", code16, 7)
    for r in result["results"]:
        assert r["id"] == run.store.get(r["task"] - 1).ids[r["position"]]
        assert r["bits"] == (12 if r["task"] == 1 else 16)

    # a dataset row, encoded as task 2, plain text output; a hashed index of the same run
    code, out, err = _cli(["search", "--run-dir", run_dir, "--query-modality", "image", "--from-dataset",
                           "--task", "2", "--row", "0", "--k", "3"], capsys)
    assert code == 0, err
    assert "syn:t1:query:0" in out and "as task 2" in out and "relevant" in out
    assert len([ln for ln in out.splitlines() if ln.strip()[:2] in ("1 ", "2 ", "3 ")]) == 3
    code, out, err = _cli(["index", "--run-dir", run_dir, "--kind", "multihash", "--output", tiny_run / "mih"], capsys)
    assert code == 0, err
    code, out, err = _cli(["search", "--run-dir", run_dir, "--index", tiny_run / "mih", "--query-modality", "text",
                           "--feature-file", tiny_run / "q.npy", "--row", "2", "--k", "120", "--nflip", "2",
                           "--json"], capsys)
    assert code == 0, err
    rows = json.loads(out)["results"]
    exact = {(t, p): d for t, p, d in _expected_ranking(run, "text", code16, 120)}
    assert rows and all(exact[(r["task"] - 1, r["position"])] == r["distance"] for r in rows)


def _tiny_clip_cache(tmp_path, n=10):
    """A feature cache whose fingerprint names a tiny random-weight CLIP (32-d)."""
    from dataset.clip_extract import ModelSpec, model_fingerprint, register_model_config
    from dataset.feature_cache import CacheWriter

    cfg = tmp_path / "tiny_clip_idx.json"
    cfg.write_text(json.dumps({
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}))
    spec = ModelSpec(model=register_model_config(str(cfg), ""), pretrained="none", model_config=str(cfg))
    fp = {"source_sha256": "0" * 64, "num_samples": n, "caption_policy": "mean", "layers": 0, "precision": "fp32",
          **model_fingerprint(spec)}
    rng = np.random.default_rng(0)
    writer = CacheWriter.open(tmp_path / "cache.h5", fp, {}, {"image": (32,), "text": (32,)},
                              rng.integers(0, 2, (n, 4)), [f"c{i}" for i in range(4)], [f"im{i}.jpg" for i in range(n)],
                              [["a caption"]] * n, chunk_size=n)
    writer.write(0, {"image": rng.standard_normal((n, 32)).astype(np.float32),
                     "text": rng.standard_normal((n, 32)).astype(np.float32)})
    writer.finish()
    return tmp_path / "cache.h5", cfg, spec


def test_search_with_a_caption_an_image_and_a_cache_row(tiny_run, capsys, tmp_path):
    """Raw queries go through the cache's CLIP model, then the run's hash model."""
    from PIL import Image

    from dataset.clip_extract import encode_texts, load_clip
    from runners.experiment import load_run

    cache, cfg, spec = _tiny_clip_cache(tmp_path)
    run_dir = tiny_run / "run"
    if not (run_dir / "index").exists():
        assert _cli(["index", "--run-dir", run_dir], capsys)[0] == 0
    run = load_run(run_dir)
    code, out, err = _cli(["search", "--run-dir", run_dir, "--caption", "a small dog", "--cache", cache,
                           "--model-config", cfg, "--k", "5", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert "No pretrained weights" not in err  # a random-weight cache is random on purpose
    clip = load_clip(spec, torch.device("cpu"))
    with torch.no_grad():
        feats, _ = encode_texts(clip.model, clip.tokenizer(["a small dog"]), None)
    expected = encode_query(run.model, "text", feats[0].numpy(), None)
    assert result["query"]["code"] == "".join("1" if b > 0 else "0" for b in expected[0].tolist())
    # without --stable-ties FAISS may pick other members of a tie: compare distances
    assert [r["distance"] for r in result["results"]] == [x[2] for x in _expected_ranking(run, "text", expected, 5)]

    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    code, out, err = _cli(["search", "--run-dir", run_dir, "--image", tmp_path / "red.png", "--cache", cache,
                           "--model-config", cfg, "--k", "4"], capsys)
    assert code == 0, err
    assert "image (" in out and "text codes" in out

    code, out, err = _cli(["search", "--run-dir", run_dir, "--query-modality", "image", "--feature-file", cache,
                           "--row", "3", "--k", "4", "--json"], capsys)
    assert code == 0, err
    assert len(json.loads(out)["results"]) == 4


@pytest.mark.parametrize(
    "args, expected",
    [
        (["search", "--run-dir", "{run}/nope", "--query-modality", "text", "--feature-file", "{run}/q.npy", "--row", "0"],
         "run directory not found"),
        (["search", "--run-dir", "{run}/run", "--index", "{run}/noindex", "--query-modality", "text",
          "--feature-file", "{run}/q.npy", "--row", "0"], "no index there"),
        (["search", "--run-dir", "{run}/run", "--query-modality", "text", "--feature-file", "{run}/q.npy",
          "--row", "99"], "--row 99: out of range"),
        (["search", "--run-dir", "{run}/run", "--query-modality", "text", "--feature-file", "{run}/q24.npy",
          "--row", "0"], "expects 32 for text"),
        (["search", "--run-dir", "{run}/run", "--index", "{run}/imgonly", "--query-modality", "image",
          "--feature-file", "{run}/q.npy", "--row", "0"], "holds image codes only"),
        (["search", "--run-dir", "{run}/run", "--query-modality", "image", "--caption", "a dog"], "contradicts"),
        (["search", "--run-dir", "{run}/run", "--caption", "a dog"], "CLIP model"),
        (["search", "--run-dir", "{run}/run", "--query-modality", "text", "--from-dataset", "--task", "3",
          "--row", "0"], "--task 3: out of range"),
        (["search", "--run-dir", "{run}/run", "--query-modality", "text", "--feature-file", "{run}/q.npy",
          "--row", "0", "--nprobe", "3"], "--nprobe"),
        (["index", "--run-dir", "{run}/nope"], "run directory not found"),
        (["index", "--run-dir", "{run}/run", "--kind", "flat", "--nflip", "2", "--output", "{run}/ix2"], "--nflip"),
        (["index", "--run-dir", "{run}/run", "--after-task", "5"], "task 5"),
    ],
)
def test_cli_errors_are_one_line(tiny_run, capsys, args, expected):
    np.save(tiny_run / "q24.npy", np.zeros((5, 24), np.float32))
    if not (tiny_run / "run" / "index").exists():
        assert _cli(["index", "--run-dir", tiny_run / "run"], capsys)[0] == 0
    if not (tiny_run / "imgonly").exists():
        assert _cli(["index", "--run-dir", tiny_run / "run", "--modalities", "image", "--output",
                     tiny_run / "imgonly"], capsys)[0] == 0
    code, out, err = _cli([a.replace("{run}", str(tiny_run)) for a in args], capsys)
    assert code == 2
    err = err.strip()
    assert expected in err, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ")


def test_stale_index_refused(tiny_run, capsys, tmp_path):
    """An index built from other codes than the run's is refused, not silently served."""
    store = CodeStore()
    store.add(0, np.ones((3, 16)), np.ones((3, 16)), np.ones((3, 1)))
    save_index_folder(tmp_path / "ix", export_store(store),
                      {"run_dir": str(tiny_run / "run"), "store_fingerprint": "0" * 64})
    code, out, err = _cli(["search", "--index", tmp_path / "ix", "--query-modality", "text",
                           "--feature-file", tiny_run / "q.npy", "--row", "0"], capsys)
    assert code == 2 and "rebuild it" in err


def test_without_faiss_index_search_serve_say_which_extra(tiny_run, capsys, monkeypatch, tmp_path):
    """FAISS is the optional ``index`` extra: without it, index / search / serve end with
    one line naming the extra, and nothing is written."""
    from runners.serve import set_search_threads

    if not (tiny_run / "run" / "index").exists():
        assert _cli(["index", "--run-dir", tiny_run / "run"], capsys)[0] == 0
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    for args in (["index", "--run-dir", tiny_run / "run", "--output", tmp_path / "ix"],
                 ["search", "--run-dir", tiny_run / "run", "--query-modality", "text",
                  "--feature-file", tiny_run / "q.npy", "--row", "0"]):
        code, out, err = _cli(args, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith("error: ") and "pip install 'ccmh[index]'" in err
    assert not (tmp_path / "ix").exists()
    with pytest.raises(UserError, match=r"ccmh\[serve\]"):
        set_search_threads(1)


def test_training_and_the_command_line_import_without_faiss():
    """Only index / search / serve need FAISS: the command line loads and lists without it."""
    code = ("import sys; sys.modules['faiss'] = None; import runners.cli; "
            "sys.exit(runners.cli.main(['list']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr
    assert "models:" in proc.stdout and "DSPH" in proc.stdout
