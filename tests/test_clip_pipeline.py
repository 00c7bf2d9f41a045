"""CLIP feature pipeline: raw inputs (DCMHT / DSPH .mat, JSONL, CSV) -> extraction with a tiny
open_clip model -> HDF5 cache (deterministic, resumable, refusing what it cannot trust)
-> ``clip_cache`` task streams -> a training run; the same extraction under torchrun."""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch

from dataset import clip_cache as _registers  # noqa: F401  (registers "clip_cache")
from dataset.clip_cache import ClipCacheDataset, assign_tasks
from dataset.clip_extract import (
    ExtractOptions, ModelSpec, encode_texts, evenly_spaced, extract_features, load_clip, register_model_config,
    resolve_weights,
)
from runners.extract_cli import add_extract_arguments, run_extract
from dataset.feature_cache import partial_path, read_cache
from dataset.label_names import (COCO, NUSWIDE81, TASK_PRESETS, category_task_name, resolve_label_names,
                                 resolve_tasks)
from dataset.raw_sources import PathRewrite, common_folder, read_source
from utils.errors import ConfigError, DataError, UserError

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
NAMES = ["cat", "dog", "car", "tree"]
# Labels chosen to exercise the task rule with tasks [[cat, dog], [car, tree]]:
# most labels wins, a tie goes to the earlier task, no label -> dropped.
LABELS = [
    ["cat"], ["dog", "car"], ["car"], ["cat", "car", "tree"], ["tree"], ["dog"],
    [], ["cat", "dog"], ["car", "tree"], ["cat", "tree"], ["dog", "tree", "car"], ["cat", "dog", "car"],
]
EXPECTED_TASK = [0, 0, 1, 1, 1, 0, -1, 0, 1, 0, 1, 0]
N = len(LABELS)
REMOTE = "/data/remote/mir/"  # the prefix another machine wrote into index.mat
OPTS = dict(batch_size=3, workers=0, chunk_size=4, layers=2, progress=False)


def captions_of(i):
    caps = [f"a photo number {i} of a {' and a '.join(LABELS[i]) or 'scene'}", f"picture {i}"]
    return caps + ([f"third caption {i}"] if i % 3 == 0 else [])


def multi_hot():
    return np.array([[int(n in lab) for n in NAMES] for lab in LABELS], dtype=np.uint8)


def lead_module(name):
    """A module of the library, imported by name; an import error fails the test."""
    import importlib

    return importlib.import_module(name)


# ---------------------------------------------------------------------- writing inputs
def write_v73(path, index, captions, labels):
    """A MATLAB v7.3 file as MATLAB writes it: HDF5, arrays transposed, text as uint16
    char arrays, cells as object references into #refs#."""
    with h5py.File(path, "w", userblock_size=512) as fh:
        refs = fh.create_group("#refs#")
        counter = iter(range(10**6))

        def char(text, group):
            codes = np.array([[ord(c)] for c in text], dtype=np.uint16)  # MATLAB 1 x L -> HDF5 (L, 1)
            ds = group.create_dataset(f"r{next(counter)}", data=codes)
            ds.attrs["MATLAB_class"] = np.bytes_("char")
            return ds.ref

        def cell(items):
            ds = refs.create_dataset(f"c{next(counter)}", data=np.array([items], dtype=h5py.ref_dtype))
            ds.attrs["MATLAB_class"] = np.bytes_("cell")
            return ds.ref

        width = max(len(s) for s in index)
        padded = np.array([[ord(c) for c in s.ljust(width)] for s in index], dtype=np.uint16)
        ds = fh.create_dataset("index", data=padded.T)  # MATLAB (N, L) char matrix -> HDF5 (L, N)
        ds.attrs["MATLAB_class"] = np.bytes_("char")
        top = [cell([char(c, refs) for c in caps]) for caps in captions]
        ds = fh.create_dataset("caption", data=np.array([top], dtype=h5py.ref_dtype))  # MATLAB (N, 1) -> (1, N)
        ds.attrs["MATLAB_class"] = np.bytes_("cell")
        ds = fh.create_dataset("category", data=labels.T.astype(np.float64))
        ds.attrs["MATLAB_class"] = np.bytes_("double")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("clip")
    (root / "tiny_clip.json").write_text(json.dumps(TINY))
    folder = root / "folder"
    (folder / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(N):
        Image.fromarray(rng.integers(0, 255, (40 + i, 48, 3), dtype=np.uint8)).save(folder / "img" / f"{i}.jpg")
    (folder / "labels.txt").write_text("\n".join(NAMES) + "\n")
    with open(folder / "annotations.jsonl", "w") as fh:
        for i in range(N):
            fh.write(json.dumps({"image": f"img/{i}.jpg", "captions": captions_of(i), "labels": LABELS[i]}) + "\n")
    csvdir = root / "csvsrc"
    csvdir.mkdir()
    lines = ["image,captions,labels"] + [
        f"{folder / 'img' / f'{i}.jpg'},{'|'.join(captions_of(i))},{'|'.join(LABELS[i])}" for i in range(N)
    ]
    (csvdir / "ann.csv").write_text("\n".join(lines) + "\n")
    stored = [f"{REMOTE}img/{i}.jpg" for i in range(N)]
    v5 = root / "seed_v5"
    v5.mkdir()
    scipy.io.savemat(v5 / "index.mat", {"index": stored})
    cells = np.empty((N,), dtype=object)
    for i in range(N):
        inner = np.empty((len(captions_of(i)),), dtype=object)
        inner[:] = captions_of(i)
        cells[i] = inner
    scipy.io.savemat(v5 / "caption.mat", {"caption": cells})
    scipy.io.savemat(v5 / "label.mat", {"LAll": multi_hot().astype(np.float64)})
    v73 = root / "seed_v73"
    v73.mkdir()
    write_v73(v73 / "index.mat", stored, [captions_of(i) for i in range(N)], multi_hot())
    for name in ("caption.mat", "label.mat"):
        (v73 / name).symlink_to(v73 / "index.mat")  # one HDF5 file holds all three keys
    nus = root / "nus"
    nus.mkdir()
    scipy.io.savemat(nus / "index.mat", {"imgs": stored})
    (nus / "caption.txt").write_text("\n".join(captions_of(i)[0] for i in range(N)) + "\n")
    scipy.io.savemat(nus / "label.mat", {"labels": multi_hot().astype(np.float64)})
    register_model_config(str(root / "tiny_clip.json"), "tiny_clip")
    return root


def spec(work, pretrained="none"):
    return ModelSpec(model="tiny_clip", pretrained=pretrained, model_config=str(work / "tiny_clip.json"))


@pytest.fixture(scope="module")
def cache_a(work):
    """The JSONL source extracted once, uninterrupted (4-row chunks, 3-image batches, 2 layers)."""
    samples = read_source(work / "folder")
    out = work / "a.h5"
    result = extract_features(samples, spec(work), out, ExtractOptions(**OPTS))
    assert result.status == "complete" and result.path == out
    return out


# ---------------------------------------------------------------------- readers
def test_all_input_formats_give_the_same_samples(work):
    ref = read_source(work / "folder")
    assert ref.label_names == tuple(NAMES) and ref.source["label_names"] == "labels.txt"
    assert ref.labels.tolist() == multi_hot().tolist()
    assert [list(c) for c in ref.captions] == [captions_of(i) for i in range(N)]
    files = [str(work / "folder" / "img" / f"{i}.jpg") for i in range(N)]
    assert list(ref.paths) == files
    csv = read_source(work / "csvsrc" / "ann.csv", label_names=str(work / "folder" / "labels.txt"))
    assert csv.captions == ref.captions and (csv.labels == ref.labels).all() and list(csv.paths) == files
    names_file = str(work / "folder" / "labels.txt")
    for folder, rewrite in (
        ("seed_v5", PathRewrite(str(work / "folder"), REMOTE)),  # explicit prefix
        ("seed_v73", PathRewrite(str(work / "folder" / "img"))),  # auto: the stored paths' common folder
    ):
        s = read_source(work / folder, rewrite, names_file)
        assert s.source["format"] == "seed004"
        assert s.ids == tuple(f"{REMOTE}img/{i}.jpg" for i in range(N))  # ids keep the stored path
        assert list(s.paths) == files, folder
        assert s.captions == ref.captions, folder
        assert (s.labels == ref.labels).all() and s.label_names == ref.label_names
    assert read_source(work / "seed_v73", PathRewrite(str(work / "folder" / "img")), names_file).source["mat_format"] == "v7.3"
    nus = read_source(work / "nus", PathRewrite(str(work / "folder"), REMOTE), names_file)
    assert [list(c) for c in nus.captions] == [[captions_of(i)[0]] for i in range(N)]
    assert nus.source["labels"] == "label.mat:labels" and nus.source["index"] == "index.mat:imgs"


def test_path_rewrite_and_missing_images(work):
    assert common_folder(["/a/b/c/1.jpg", "/a/b/d/2.jpg"]) == "/a/b/"
    assert common_folder(["x.jpg", "y.jpg"]) == ""
    with pytest.raises(DataError, match="does not start with it"):
        read_source(work / "seed_v5", PathRewrite(str(work / "folder"), "/elsewhere/"))
    unmapped = read_source(work / "seed_v5", label_names=str(work / "folder" / "labels.txt"))
    with pytest.raises(DataError, match=r"12 of 12 images not found.*point image_root at"):
        unmapped.check_images()
    with pytest.raises(DataError, match="3 label columns|label names"):
        resolve_label_names(str(work / "folder" / "labels.txt"), 3, "label.mat")
    assert resolve_label_names(None, 80, "x")[0] == COCO


def test_label_presets_cover_their_label_sets():
    for name, tasks in TASK_PRESETS.items():
        base = COCO if name.startswith("coco") else NUSWIDE81
        cols = resolve_tasks(name, base)
        assert sorted(c for t in cols for c in t) == list(range(len(base)))
    assert resolve_tasks("coco_imbalanced", COCO)[0] == tuple(range(16))
    assert resolve_tasks([["dog", 3], ["car"]], NAMES) == [(1, 3), (2,)]
    with pytest.raises(ValueError, match="did you mean 'cat'"):
        resolve_tasks([["cta"]], NAMES)
    with pytest.raises(ValueError, match="already in tasks"):
        resolve_tasks([["cat"], ["cat"]], NAMES)


# ---------------------------------------------------------------------- extraction
def test_extraction_shapes_policy_and_determinism(work, cache_a):
    a = read_cache(cache_a, layers=True, captions=True)
    assert a.image.shape == (N, 32) and a.text.shape == (N, 32) and a.labels.shape == (N, 4)
    assert a.image_layers.shape == (N, 2, 64) and a.text_layers.shape == (N, 2, 64)
    assert np.allclose(np.linalg.norm(a.image, axis=1), 1, atol=1e-5)
    assert np.allclose(np.linalg.norm(a.text, axis=1), 1, atol=1e-5)
    assert a.ids == tuple(f"img/{i}.jpg" for i in range(N)) and a.label_names == tuple(NAMES)
    assert a.captions[3] == "\n".join(captions_of(3))
    assert a.meta["layer_indices"] == {"image": [0, 1], "text": [0, 1]}
    assert a.fingerprint["weights"] == "none" and a.meta["caption_policy"] == "mean"
    # the mean policy, recomputed caption by caption: mean of normalised embeddings, re-normalised
    clip = load_clip(spec(work), torch.device("cpu"))
    with torch.no_grad():
        per_cap, _ = encode_texts(clip.model, clip.tokenizer(captions_of(3)), None)
    expect = torch.nn.functional.normalize(per_cap.mean(0), dim=0).numpy()
    assert np.allclose(a.text[3], expect, atol=1e-5)
    assert evenly_spaced(12, 4) == [2, 5, 8, 11] and evenly_spaced(2, 2) == [0, 1]
    # cutting the padding after the last end-of-text token changes nothing (causal mask)
    tok = clip.tokenizer(["a cat", "a much longer caption that runs past the tiny context length", ""])
    with torch.no_grad():
        full, full_l = encode_texts(clip.model, tok, [0, 1], trim=False)
        cut, cut_l = encode_texts(clip.model, tok, [0, 1], trim=True)
        short, _ = encode_texts(clip.model, tok[:1], None)
    assert torch.allclose(full, cut, atol=1e-5) and torch.allclose(full_l, cut_l, atol=1e-4)
    assert torch.allclose(short[0], full[0], atol=1e-5)
    # the same command again (here with image-decoding workers) gives the same cache
    samples = read_source(work / "folder")
    b_path = work / "b.h5"
    extract_features(samples, spec(work), b_path, ExtractOptions(**{**OPTS, "workers": 2}))
    b = read_cache(b_path, layers=True)
    for k in ("image", "text", "labels", "image_layers", "text_layers"):
        assert np.array_equal(getattr(a, k), getattr(b, k)), k
    assert a.fingerprint == b.fingerprint
    # "first" uses the first caption only
    first = work / "first.h5"
    extract_features(samples, spec(work), first, ExtractOptions(**{**OPTS, "caption_policy": "first", "layers": 0}))
    f = read_cache(first)
    assert np.array_equal(f.image, a.image)
    with torch.no_grad():
        one, _ = encode_texts(clip.model, clip.tokenizer([captions_of(3)[0]]), None)
    assert np.allclose(f.text[3], one[0].numpy(), atol=1e-5) and not np.allclose(f.text[3], a.text[3], atol=1e-3)


def test_interrupted_extraction_resumes_to_the_same_cache(work, cache_a):
    samples = read_source(work / "folder")
    out = work / "resumed.h5"
    first = extract_features(samples, spec(work), out, ExtractOptions(**OPTS), stop_after_chunks=1)
    assert first.status == "partial" and first.done == 4
    assert not out.exists() and partial_path(out).is_file()
    with pytest.raises(DataError, match="extraction not finished.*4 finished rows"):
        read_cache(out)
    second = extract_features(samples, spec(work), out, ExtractOptions(**OPTS), stop_after_chunks=1)
    assert second.status == "partial" and second.done == 8 and second.extracted == 4
    third = extract_features(samples, spec(work), out, ExtractOptions(**OPTS))
    assert third.status == "complete" and third.extracted == 4 and not partial_path(out).exists()
    a, r = read_cache(cache_a, layers=True), read_cache(out, layers=True)
    for k in ("image", "text", "image_layers", "text_layers"):
        assert np.array_equal(getattr(a, k), getattr(r, k)), k
    again = extract_features(samples, spec(work), out, ExtractOptions(**OPTS))
    assert again.status == "up-to-date" and again.extracted == 0


def test_crash_mid_extraction_resumes_after_the_last_chunk(work, cache_a, tmp_path):
    """A real failure (an undecodable image in the second chunk) leaves the first chunk on
    disk; once the image is fixed the same command finishes with the uninterrupted result."""
    import shutil

    folder = tmp_path / "folder"
    shutil.copytree(work / "folder", folder)
    good = (folder / "img" / "6.jpg").read_bytes()
    (folder / "img" / "6.jpg").write_bytes(b"garbage, not a JPEG")
    out = tmp_path / "crash.h5"
    with pytest.raises(DataError, match=r"6\.jpg: cannot read the image"):
        extract_features(read_source(folder), spec(work), out, ExtractOptions(**{**OPTS, "workers": 1}))
    assert not out.exists()
    with h5py.File(partial_path(out), "r") as fh:
        assert int(fh.attrs["done"]) == 4
    (folder / "img" / "6.jpg").write_bytes(good)
    result = extract_features(read_source(folder), spec(work), out, ExtractOptions(**OPTS))
    assert result.status == "complete" and result.extracted == N - 4
    a, r = read_cache(cache_a, layers=True), read_cache(out, layers=True)
    for k in ("image", "text", "image_layers", "text_layers"):
        assert np.array_equal(getattr(a, k), getattr(r, k)), k


def test_other_input_formats_extract_to_the_same_features(work, cache_a):
    samples = read_source(work / "seed_v73", PathRewrite(str(work / "folder" / "img")), str(work / "folder" / "labels.txt"))
    out = work / "v73.h5"
    extract_features(samples, spec(work), out, ExtractOptions(**OPTS))
    a, s = read_cache(cache_a), read_cache(out)
    assert np.array_equal(a.image, s.image) and np.array_equal(a.text, s.text) and np.array_equal(a.labels, s.labels)
    assert s.ids[0] == f"{REMOTE}img/0.jpg"


def test_hub_names_are_refused_and_local_files_load(work, cache_a, tmp_path):
    for name in ("openai", "laion2b_s34b_b79k"):
        with pytest.raises(UserError, match="never downloads.*pretrained=/path/to/file"):
            resolve_weights(ModelSpec("ViT-B-32", name))
    with pytest.raises(UserError, match="Hugging Face Hub"):
        resolve_weights(ModelSpec("ViT-B-32", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"))
    with pytest.raises(UserError, match="Hugging Face Hub"):
        resolve_weights(ModelSpec("hf-hub:laion/x", "none"))
    with pytest.raises(DataError, match="file not found"):
        resolve_weights(ModelSpec("ViT-B-32", str(tmp_path / "missing.pt")))
    # a state dict file with the same weights as the seeded random model gives the same features
    clip = load_clip(spec(work), torch.device("cpu"))
    ckpt = tmp_path / "tiny.pt"
    torch.save(clip.model.state_dict(), ckpt)
    samples = read_source(work / "folder")
    out = tmp_path / "from_file.h5"
    extract_features(samples, spec(work, str(ckpt)), out, ExtractOptions(**{**OPTS, "layers": 0}))
    f, a = read_cache(out), read_cache(cache_a)
    assert np.array_equal(f.image, a.image) and np.array_equal(f.text, a.text)
    assert f.fingerprint["weights"] == "file" and len(f.fingerprint["checkpoint_sha256"]) == 64
    assert f.meta["checkpoint"] == "tiny.pt"
    # a local-dir: folder (open_clip_config.json + weights), as open_clip's hub repos are laid out
    folder = tmp_path / "tiny_dir"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": {}}))
    torch.save(clip.model.state_dict(), folder / "open_clip_pytorch_model.bin")
    local = ModelSpec("tiny_clip", f"local-dir:{folder}")
    assert resolve_weights(local)["weights"].endswith("open_clip_pytorch_model.bin")
    out2 = tmp_path / "from_dir.h5"
    extract_features(samples, local, out2, ExtractOptions(**{**OPTS, "layers": 0}))
    d = read_cache(out2)
    assert np.array_equal(d.image, a.image) and d.fingerprint["weights"] == "local-dir"
    squash = load_clip(ModelSpec("tiny_clip", "none", image_resize="squash"), torch.device("cpu"))
    assert squash.info["preprocess"]["resize_mode"] == "squash"
    # through the command line: a hub tag is one clear error, nothing downloaded
    parser = argparse.ArgumentParser()
    add_extract_arguments(parser)
    args = parser.parse_args([
        "--source", str(work / "folder"), "--model-config", str(work / "tiny_clip.json"), "--pretrained", "openai",
        "--output", str(tmp_path / "x.h5"), "--quiet",
    ])
    with pytest.raises(UserError, match="local"):
        run_extract(args)
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_openai_torchscript_checkpoint_is_recognised(work, tmp_path):
    """OpenAI's ViT-B-32.pt is a TorchScript archive; it is built from its own state dict."""
    import open_clip

    cfg = {**TINY, "quick_gelu": True,
           "vision_cfg": {**TINY["vision_cfg"], "head_width": 64}, "text_cfg": {**TINY["text_cfg"], "heads": 1}}
    (tmp_path / "tiny_oa.json").write_text(json.dumps(cfg))
    register_model_config(str(tmp_path / "tiny_oa.json"), "")
    model = open_clip.create_model("tiny_oa", pretrained=None).eval()
    mask = model.attn_mask  # OpenAI's archives keep the mask as a plain attribute, not in the state dict
    del model._buffers["attn_mask"]
    model.attn_mask = mask
    torch.jit.save(torch.jit.script(model), tmp_path / "oa.pt")
    s = ModelSpec("tiny_oa", str(tmp_path / "oa.pt"))
    assert resolve_weights(s)["kind"] == "torchscript"
    clip = load_clip(s, torch.device("cpu"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, want = clip.model.encode_image(x), model.encode_image(x)
    # OpenAI's builder rounds the weights through fp16, hence the tolerance
    assert torch.nn.functional.cosine_similarity(got, want).min() > 0.999


def test_mismatched_and_corrupt_caches_are_refused(work, cache_a, tmp_path):
    samples = read_source(work / "folder")
    with pytest.raises(DataError, match="other settings.*caption_policy: cache mean, this run first"):
        extract_features(samples, spec(work), cache_a, ExtractOptions(**{**OPTS, "caption_policy": "first"}))
    with pytest.raises(DataError, match="source_sha256"):
        extract_features(samples.head(6), spec(work), cache_a, ExtractOptions(**OPTS))
    # an unfinished extraction is not continued with another model / checkpoint
    out = tmp_path / "p.h5"
    extract_features(samples, spec(work), out, ExtractOptions(**OPTS), stop_after_chunks=1)
    other = ModelSpec("tiny_clip", "none", str(work / "tiny_clip.json"), init_seed=5)
    with pytest.raises(DataError, match=r"p\.h5\.partial: an unfinished extraction with other settings.*init_seed"):
        extract_features(samples, other, out, ExtractOptions(**OPTS))
    done = extract_features(samples, other, out, ExtractOptions(**{**OPTS, "overwrite": True}))
    assert done.status == "complete"
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(DataError) as err:
        read_cache(bad)
    assert "cannot read as a feature cache" in str(err.value) and "\n" not in str(err.value)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as fh:
        fh["image"] = np.zeros((2, 2))
    with pytest.raises(DataError, match="not a CLIP feature cache"):
        read_cache(foreign)
    with pytest.raises(DataError, match="feature cache not found"):
        read_cache(tmp_path / "nothing.h5")
    with pytest.raises(DataError, match="no per-layer features"):
        read_cache(work / "first.h5" if (work / "first.h5").exists() else out, layers=True)


# ---------------------------------------------------------------------- streams
def test_single_task_split(cache_a):
    ds = ClipCacheDataset(str(cache_a), query_size=3, train_size=6, val_size=1, seed=1814)
    stream = ds.load()
    assert len(stream) == 1 and stream.label_names == tuple(NAMES)
    t = stream.tasks[0]
    assert t.sizes() == {"query": 3, "train": 5, "val": 1, "database": 9}
    perm = np.random.RandomState(1814).permutation(N)
    ids = lambda fs: [int(i.split("/")[1].split(".")[0]) for i in fs.ids]  # noqa: E731
    assert ids(t.query) == perm[:3].tolist()
    assert ids(t.database) == perm[3:].tolist()  # retrieval = everything except the query
    assert sorted(ids(t.train) + ids(t.val)) == sorted(perm[3:9].tolist())  # val carved out of train
    assert not set(ids(t.val)) & set(ids(t.train))
    again = ClipCacheDataset(str(cache_a), query_size=3, train_size=6, val_size=1).load().tasks[0]
    assert again.query.ids == t.query.ids and again.val.ids == t.val.ids
    other = ClipCacheDataset(str(cache_a), query_size=3, train_size=6, val_size=1, seed=7).load().tasks[0]
    assert other.query.ids != t.query.ids
    with pytest.raises(DataError, match="fewer than query_size"):
        ClipCacheDataset(str(cache_a), query_size=5, train_size=10).load()
    layered = ClipCacheDataset(str(cache_a), query_size=3, train_size=6, layers=True).load()
    assert layered.tasks[0].train.image_layers.shape[1:] == (2, 64)


def test_random_weights_build_without_open_clips_notice(work, caplog):
    """``pretrained: none`` is random on purpose: open_clip's "No pretrained weights
    loaded" notice is dropped inside load_clip, and only there; other records pass."""
    import logging

    import open_clip

    with caplog.at_level(logging.WARNING):
        load_clip(spec(work), torch.device("cpu"))
        assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
        logging.warning("another warning")
        open_clip.create_model("tiny_clip", pretrained=None)  # outside load_clip the notice is left alone
    messages = [r.getMessage() for r in caplog.records]
    assert "another warning" in messages
    assert any(m.startswith("No pretrained weights loaded for model 'tiny_clip'") for m in messages)


def test_category_task_names():
    cols = resolve_tasks("coco_balanced", COCO)[0]
    assert category_task_name(cols, COCO) == f"{COCO[cols[0]]}, {COCO[cols[1]]}, {COCO[cols[2]]} +{len(cols) - 3}"
    assert category_task_name((1, 2), COCO) == "bicycle, car"
    assert category_task_name((0, 1, 2, 3, 4), ()) == "cats 0-4"      # labels without names: by column
    assert category_task_name((0, 3, 7), ["", "", "", "", "", "", "", ""]) == "cats 0,3,7"


def test_category_stream_assignment_rule(cache_a):
    assert assign_tasks(multi_hot(), [(0, 1), (2, 3)]).tolist() == EXPECTED_TASK
    ds = ClipCacheDataset(str(cache_a), tasks=[["cat", "dog"], ["car", "tree"]], task_query=2, task_train=0.75, val_size=1)
    stream = ds.load()
    assert [t.classes for t in stream.tasks] == [(0, 1), (2, 3)]
    assert [t.name for t in stream.tasks] == ["cat, dog", "car, tree"]  # named by their categories
    assert stream.describe()[0].startswith("task 1 (cat, dog): ")
    assert stream.meta["dropped"] == 1 and stream.meta["assignment"].startswith("most_labels")
    for t in stream.tasks:
        members = {i for i, e in enumerate(EXPECTED_TASK) if e == t.index}
        got = {int(i.split("/")[1].split(".")[0]) for fs in (t.query, t.database) for i in fs.ids}
        assert got == members  # query + database = exactly the task's samples
        assert not set(t.query.ids) & set(t.database.ids)
        assert set(t.train.ids) | set(t.val.ids) <= set(t.database.ids)  # train inside the database
        assert len(t.query) == 2
    assert stream.tasks[0].sizes() == {"query": 2, "train": 2, "val": 1, "database": 4}
    with pytest.raises(ConfigError, match="dataset.tasks\\[1\\]: unknown category 'tre'.*did you mean 'tree'"):
        ClipCacheDataset(str(cache_a), tasks=[["cat"], ["tre"]]).load()
    with pytest.raises(ConfigError, match="unknown category 'bicycle'"):
        ClipCacheDataset(str(cache_a), tasks="coco_balanced").load()  # a COCO preset on a 4-label cache
    with pytest.raises(ValueError, match="unknown preset"):
        ClipCacheDataset(str(cache_a), tasks="coco_balance")
    with pytest.raises(ValueError, match="2 values for 1 tasks|values for"):
        ClipCacheDataset(str(cache_a), tasks=[["cat"]], task_query=[1, 2])


def test_config_block_validates(cache_a):
    lead_module("main")  # fills every registry
    from runners.config import validate_config

    cfg = {
        "dataset": {"name": "clip_cache", "path": str(cache_a), "tasks": [["cat", "dog"], ["car", 3]],
                    "task_query": 2, "task_train": [0.75, 0.5], "seed": 3},
        "model": {"name": "DSPH", "bits": 8},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "runner": {"name": "continual", "epochs": 1},
    }
    validate_config(cfg)
    with pytest.raises(ConfigError, match="dataset.task_qeury: unknown key"):
        validate_config({**cfg, "dataset": {**cfg["dataset"], "task_qeury": 2}})


@pytest.mark.parametrize("model, layers", [({"name": "DSPH", "bits": 8}, False),
                                           ({"name": "SCAHN", "bits": 8, "stages": 2, "hidden": 16,
                                             "stage_source": "layers"}, True)])
def test_cache_trains_a_method_end_to_end(cache_a, tmp_path, model, layers):
    experiment = lead_module("runners.experiment")
    lead_module(f"models.{model['name'].lower()}")
    cfg = {
        "dataset": {"name": "clip_cache", "path": str(cache_a), "tasks": [["cat", "dog"], ["car", "tree"]],
                    "task_query": 2, "task_train": 1.0, "val_size": 1, "layers": layers},
        "model": model,
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "runner": {"name": "continual", "epochs": 2, "batch_size": 4, "device": "cpu", "tensorboard": False,
                   "progress": False, "scalable_bits": [8]},
    }
    results = experiment.run_config(cfg, tmp_path / "run", quiet=True)
    assert results.tasks == 2
    for d in ("i2t", "t2i"):
        row = results.row(d, 1)
        assert all(v is not None and 0.0 <= v <= 1.0 for v in row)
    assert (tmp_path / "run" / "results.json").is_file()


# ---------------------------------------------------------------------- torchrun
def torchrun_extract(args):
    """``torchrun --nproc-per-node=2 main.py extract ARGS`` (gloo on CPU), one thread per rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", f"--master-port={port}",
         "main.py", "extract", *args],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240,
    )


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def test_torchrun_extraction_equals_one_process(work, tmp_path):
    """Two ranks share each chunk's batches and write the one cache a single process writes
    (bit for bit); a bad image on rank 1 stops both ranks after the last whole chunk, rank 0
    reports it once, and the same command continues from there; a mismatched cache found on
    rank 0 stops both ranks before any work."""
    folder = tmp_path / "folder"
    shutil.copytree(work / "folder", folder)
    cli = ["--source", str(folder), "--model-config", str(work / "tiny_clip.json"), "--pretrained", "none",
           "--batch-size", "3", "--chunk-size", "5", "--layers", "2", "--workers", "0"]
    # chunks [0, 5) [5, 10) [10, 12) hold batches 3 + 2 | 3 + 2 | 2: rank 1 encodes the short batch of the
    # first two chunks (uneven shards) and nothing of the last (an empty shard)
    good = (folder / "img" / "9.jpg").read_bytes()
    (folder / "img" / "9.jpg").write_bytes(b"garbage, not a JPEG")  # in rank 1's batch of chunk 2
    out = tmp_path / "two" / "feat.h5"
    crash = torchrun_extract(cli + ["--output", str(out)])
    assert crash.returncode != 0
    assert len(error_lines(crash)) == 1 and r"9.jpg: cannot read the image" in error_lines(crash)[0], crash.stderr[-3000:]
    assert not out.exists()
    with h5py.File(partial_path(out), "r") as fh:
        assert int(fh.attrs["done"]) == 5  # chunk 1 written, nothing of chunk 2
    (folder / "img" / "9.jpg").write_bytes(good)
    run = torchrun_extract(cli + ["--output", str(out)])
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("resuming") == 1 and run.stderr.count("12 samples, 4 labels") == 1  # rank 0 alone logs
    assert run.stdout.count(f"{out}: 12 of 12 samples, 7 extracted") == 1  # and reports
    assert sorted(p.name for p in out.parent.iterdir()) == ["feat.h5"]  # one cache, no partial, nothing per rank
    # the same command in one process (through the same CLI)
    parser = argparse.ArgumentParser()
    add_extract_arguments(parser)
    ref = tmp_path / "one" / "feat.h5"
    assert run_extract(parser.parse_args(cli + ["--output", str(ref), "--quiet"])) == 0
    one, two = read_cache(ref, layers=True, captions=True), read_cache(out, layers=True, captions=True)
    for k in ("image", "text", "image_layers", "text_layers", "labels"):
        assert getattr(one, k).dtype == getattr(two, k).dtype and np.array_equal(getattr(one, k), getattr(two, k)), k
    assert (one.ids, one.label_names, one.captions) == (two.ids, two.label_names, two.captions)
    assert one.fingerprint == two.fingerprint
    assert {**one.meta, "created": None} == {**two.meta, "created": None}  # no field records the process count
    # an error found on rank 0 before any collective work: every rank stops, one message, the file untouched
    before = out.stat().st_mtime_ns
    bad = torchrun_extract(cli + ["--output", str(out), "--caption-policy", "first", "--quiet"])
    assert bad.returncode != 0 and len(error_lines(bad)) == 1, bad.stderr[-3000:]
    assert "other settings (caption_policy: cache mean, this run first)" in error_lines(bad)[0]
    assert out.stat().st_mtime_ns == before and sorted(p.name for p in out.parent.iterdir()) == ["feat.h5"]
