"""The ``index`` and ``search`` commands: export a run's stored codes to FAISS binary
indexes, and query them with one image or text encoded by the run's own hash model.

``python main.py index --run-dir RUN [--kind flat|hash|multihash|ivf|hnsw] [--output DIR]``
``python main.py search --run-dir RUN --query-modality text --feature-file F.npy --row 3 --k 10``

The query is encoded task-agnostic (``task_index=None``) unless ``--task`` is given; a
query longer than a stored code is compared on its prefix (``common.binary_index``).
FAISS results are for serving; reported mAP comes from ``common.calc_utils``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from common.binary_index import (
    KINDS, Hits, IndexFolder, export_store, load_index_folder, read_manifest,
    save_index_folder, store_fingerprint,
)
from common.code_store import MODALITIES
from utils.errors import DataError, UserError

DEFAULT_INDEX = "index"  # the index folder inside a run directory


# ====================================================================== index
def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, metavar="DIR",
                        help="a run directory written by 'python main.py train' (checkpoints/last.pt, codes.npz)")
    parser.add_argument("--kind", choices=KINDS, default="flat",
                        help="flat: exact exhaustive popcount (default); hash / multihash: hash tables on code "
                             "substrings, approximate, for large collections; ivf / hnsw: approximate, see "
                             "notes/index_search.md for measured speed and recall")
    parser.add_argument("--output", metavar="DIR",
                        help=f"index folder to write (default: RUN/{DEFAULT_INDEX}); a previous index there is replaced")
    parser.add_argument("--after-task", type=int, metavar="T",
                        help="index the codes stored up to task T (1-based) and search with the model after T "
                             "(default: the last finished task)")
    parser.add_argument("--modalities", nargs="+", choices=MODALITIES, default=list(MODALITIES),
                        help="which stored codes to index: image codes serve text queries, text codes serve image "
                             "queries (default: both)")
    g = parser.add_argument_group("index parameters (default: chosen from the number of codes; see the manifest)")
    g.add_argument("--hash-bits", type=int, metavar="B", help="hash / multihash: bits per hash table (default ~log2 N)")
    g.add_argument("--nhash", type=int, metavar="M", help="multihash: number of tables (default bits // B)")
    g.add_argument("--nflip", type=int, metavar="F",
                   help="hash / multihash: bit flips probed per table at search time (default 2 / 1)")
    g.add_argument("--nlist", type=int, metavar="N", help="ivf: number of inverted lists (default ~sqrt N)")
    g.add_argument("--nprobe", type=int, metavar="P", help="ivf: lists visited at search time (default 8)")
    g.add_argument("--hnsw-m", type=int, metavar="M", help="hnsw: neighbours per node (default 16)")
    g.add_argument("--ef-search", type=int, metavar="E", help="hnsw: search beam width (default 64)")


def _index_params(args: argparse.Namespace) -> Dict[str, Optional[int]]:
    return {k: getattr(args, k, None) for k in ("hash_bits", "nhash", "nflip", "nlist", "nprobe", "hnsw_m", "ef_search")}


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _load_run(run_dir: str | Path, after_task: Optional[int]):
    from runners.experiment import load_run

    root = Path(run_dir)
    if not root.is_dir():
        raise DataError(f"{root}: run directory not found (train one with 'python main.py --config-file FILE')")
    if after_task is not None and after_task < 1:
        raise UserError(f"--after-task: must be >= 1, got {after_task}")
    return load_run(root, task=after_task, device="cpu")


def run_index(args: argparse.Namespace) -> int:
    run = _load_run(args.run_dir, args.after_task)
    out = Path(args.output) if args.output else Path(args.run_dir) / DEFAULT_INDEX
    given = {k: v for k, v in _index_params(args).items() if v is not None}
    indexes = export_store(run.store, args.kind, given, modalities=list(dict.fromkeys(args.modalities)))
    source = {
        "run_dir": str(Path(args.run_dir).resolve()),
        "after_task": run.task,
        "method": run.config["model"]["name"],
        "dataset": run.config["dataset"]["name"],
        "model_bits": int(run.model.bits),
        "store_fingerprint": store_fingerprint(run.store),
        "per_task": [{"task": e.task + 1, "bits": e.bits, "count": len(e)} for e in run.store.entries()],
    }
    manifest = save_index_folder(out, indexes, source)
    total = sum(s["bytes"] for m in manifest["modalities"].values() for s in m["shards"])
    first = next(iter(manifest["modalities"].values()))["shards"]
    print(f"wrote {out}: {manifest['kind']} index of {' + '.join(manifest['modalities'])} codes, "
          f"{manifest['count']:,} items after task {run.task} ("
          + ", ".join(f"{s['bits']} bits: {s['count']:,}" for s in first) + f"), {_human_bytes(total)}")
    for s in first:
        if s["params"]:
            print(f"  {s['bits']}-bit shard parameters: " + ", ".join(f"{k}={v}" for k, v in s["params"].items()))
    q = "text" if "image" in manifest["modalities"] else "image"
    print(f"search it: python main.py search --run-dir {args.run_dir}"
          + (f" --index {out}" if args.output else "")
          + f" --query-modality {q} --from-dataset --task 1 --row 0 --k 10")
    return 0


# ====================================================================== search
def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", metavar="DIR",
                        help="the run whose hash model encodes the query (default: the run the index was built from)")
    parser.add_argument("--index", metavar="DIR",
                        help=f"index folder written by 'python main.py index' (default: RUN/{DEFAULT_INDEX})")
    parser.add_argument("--query-modality", choices=MODALITIES,
                        help="modality of the query: text queries search the image codes, image queries the text "
                             "codes (implied by --caption / --image)")
    src = parser.add_argument_group("the query (one of)")
    one = src.add_mutually_exclusive_group(required=True)
    one.add_argument("--feature-file", metavar="FILE",
                     help="features of the query modality: .npy (N, D), .npz (key 'image' / 'text'), or an HDF5 "
                          "feature cache (.h5 / .hdf5); take row --row")
    one.add_argument("--from-dataset", action="store_true",
                     help="take row --row of split --split of task --task of the run's own config dataset")
    one.add_argument("--caption", metavar="TEXT", help="a caption, encoded with the CLIP model of the feature cache")
    one.add_argument("--image", metavar="FILE", help="an image file, encoded with the CLIP model of the feature cache")
    src.add_argument("--row", type=int, metavar="N", help="row of --feature-file / of the dataset split (0-based)")
    src.add_argument("--split", choices=("query", "database", "train", "val"), default="query",
                     help="--from-dataset: which split (default: query)")
    src.add_argument("--cache", metavar="FILE",
                     help="--caption / --image: the feature cache whose CLIP model encodes the query (default: the "
                          "run's clip_cache dataset path)")
    src.add_argument("--pretrained", metavar="WEIGHTS",
                     help="--caption / --image: the CLIP weights file the cache was made with (checked against the "
                          "cache's fingerprint; not needed for a cache made with random weights)")
    src.add_argument("--model-config", metavar="FILE",
                     help="--caption / --image: the open_clip model config JSON the cache was made with, if custom")
    parser.add_argument("--device", default="cpu", help="device for the query encoders: cpu (default), auto, cuda")
    parser.add_argument("--task", type=int, metavar="T",
                        help="encode the query as task T (1-based) and, with --from-dataset, take it from task T "
                             "(default: task-agnostic encoding)")
    parser.add_argument("--agnostic", action="store_true",
                        help="encode task-agnostic even when --task picks the dataset task")
    parser.add_argument("--k", type=int, default=10, help="number of results (default 10)")
    parser.add_argument("--nflip", type=int, metavar="F", help="hash / multihash: override the bit flips probed")
    parser.add_argument("--nprobe", type=int, metavar="P", help="ivf: override the lists visited")
    parser.add_argument("--ef-search", type=int, metavar="E", help="hnsw: override the search beam width")
    parser.add_argument("--stable-ties", action="store_true",
                        help="flat index only: order equal distances by task then database position, exactly as "
                             "the evaluation ranks them (one extra range search per query)")
    parser.add_argument("--json", action="store_true", help="print the query and the results as JSON")


def _check_row(row: Optional[int], n: int, what: str) -> int:
    if row is None:
        raise UserError(f"--row: required with {what}")
    if not 0 <= row < n:
        raise UserError(f"--row {row}: out of range; {what} has {n} rows (0..{n - 1})")
    return int(row)


def read_feature_row(path: str | Path, modality: str, row: Optional[int]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Row ``row`` of the ``modality`` features in ``path`` (.npy, .npz or an HDF5
    feature cache) and its per-layer features when the file has them."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: feature file not found")
    suffix = path.suffix.lower()
    layers = None
    try:
        if suffix == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if arr.ndim != 2:
                raise DataError(f"{path}: expected a 2-D (N, D) feature array, got shape {arr.shape}")
            r = _check_row(row, arr.shape[0], str(path))
            return np.asarray(arr[r], dtype=np.float32), None
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                keys = list(data.files)
                if modality in keys:
                    key = modality
                elif len(keys) == 1:
                    key = keys[0]
                else:
                    raise DataError(f"{path}: no '{modality}' array (keys: {', '.join(keys)}); expected key '{modality}'")
                arr = data[key]
                if arr.ndim != 2:
                    raise DataError(f"{path}: '{key}' must be a 2-D (N, D) array, got shape {arr.shape}")
                r = _check_row(row, arr.shape[0], f"{path} '{key}'")
                if f"{modality}_layers" in keys:
                    layers = np.asarray(data[f"{modality}_layers"][r], dtype=np.float32)
                return np.asarray(arr[r], dtype=np.float32), layers
        if suffix in (".h5", ".hdf5"):
            return _read_cache_row(path, modality, row)
    except (DataError, UserError):
        raise
    except Exception as exc:  # a truncated or foreign file
        raise DataError(f"{path}: cannot read features ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
    raise UserError(f"{path}: unsupported feature file type '{suffix}'; expected .npy, .npz, .h5 or .hdf5")


def _read_cache_row(path: Path, modality: str, row: Optional[int]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """A row of a feature cache written by 'main.py extract' (``dataset.feature_cache``):
    its ``image`` / ``text`` dataset and, when stored, the per-layer features."""
    import h5py

    from dataset.feature_cache import read_fingerprint

    _, done, _ = read_fingerprint(path)  # checks the format; rows [0, done) are final
    with h5py.File(path, "r") as f:
        ds = f[modality]
        r = _check_row(row, min(done, ds.shape[0]), f"{path} '{modality}'")
        layers = None
        if f"{modality}_layers" in f:
            layers = np.asarray(f[f"{modality}_layers"][r], dtype=np.float32)
        return np.asarray(ds[r], dtype=np.float32), layers


def _default_cache(run) -> Optional[str]:
    """The feature cache a run was trained on (a ``clip_cache`` dataset's path)."""
    block = run.config.get("dataset", {})
    return block.get("path") if block.get("name") == "clip_cache" else None


def encode_raw_query(args: argparse.Namespace, modality: str, run) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """CLIP features (and per-layer features when the cache has them) of ``--caption`` /
    ``--image``, from the CLIP model that made the feature cache, rebuilt from local
    weights (``--pretrained``, checked against the cache's fingerprint) so the query
    lives in the space the run was trained on. Encoded in fp32 on ``--device``."""
    what = "--caption" if modality == "text" else "--image"
    cache = args.cache or _default_cache(run)
    if not cache:
        raise UserError(
            f"{what}: encoding a raw query needs the CLIP model of the run's feature cache: give --cache FILE.h5 "
            f"(made by 'python main.py extract') and --pretrained WEIGHTS, or pass features with --feature-file"
        )
    from dataset.clip_extract import (
        ModelSpec, encode_images, encode_texts, layer_indices, load_clip, model_fingerprint, pick_device,
        register_model_config,
    )
    from dataset.feature_cache import fingerprint_difference, read_fingerprint

    if not Path(cache).is_file():
        raise DataError(f"{cache}: feature cache not found (--cache)")
    fp, _, _ = read_fingerprint(cache)
    model_name = register_model_config(args.model_config, str(fp.get("model", ""))) if args.model_config else fp.get("model")
    pretrained = args.pretrained or ("none" if fp.get("weights") == "none" else None)
    if pretrained is None:
        sha = str(fp.get("checkpoint_sha256") or "?")[:12]
        raise UserError(f"{what}: {cache} was made with CLIP {model_name} from a weights file (sha256 {sha}...); "
                        f"give the same file with --pretrained PATH")
    spec = ModelSpec(model=str(model_name), pretrained=pretrained, model_config=args.model_config,
                     init_seed=int(fp.get("init_seed") or 0), preprocess_tag=fp.get("preprocess_tag"),
                     image_resize=fp.get("image_resize"))
    mine = {k: v for k, v in model_fingerprint(spec).items() if k != "open_clip_version"}
    stored = {k: fp.get(k) for k in mine}
    if stored != mine:
        raise UserError(f"--pretrained: not the CLIP model of {cache} ({fingerprint_difference(stored, mine)})")
    device = pick_device(args.device)
    clip = load_clip(spec, device)
    indices = layer_indices(clip.model, int(fp.get("layers") or 0))
    with torch.no_grad():
        if modality == "text":
            tokens = clip.tokenizer([args.caption]).to(device)
            feats, layers = encode_texts(clip.model, tokens, indices.get("text"))
        else:
            image = _open_image(args.image)
            feats, layers = encode_images(clip.model, clip.preprocess(image)[None].to(device), indices.get("image"))
    return feats[0].float().cpu().numpy(), None if layers is None else layers[0].float().cpu().numpy()


def _open_image(path: str):
    from PIL import Image

    if not Path(path).is_file():
        raise DataError(f"{path}: image file not found (--image)")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:
        raise DataError(f"{path}: cannot read the image ({type(exc).__name__}: {' '.join(str(exc).split())[:100]})") from None


def _dataset_row(run, split: str, task: Optional[int], row: Optional[int], modality: str):
    """(features, layers, sample id, labels) of a row of the run's own config dataset."""
    from runners.config import build

    if task is None:
        raise UserError("--from-dataset: give --task T (1-based) to pick the task whose split holds the row")
    stream = build("dataset", run.config).load()
    if not 1 <= task <= len(stream):
        raise UserError(f"--task {task}: out of range; the run's dataset has tasks 1..{len(stream)}")
    fs = getattr(stream.tasks[task - 1], split)
    r = _check_row(row, len(fs), f"task {task} {split} split")
    feats = (fs.image if modality == "image" else fs.text)[r]
    layers = fs.image_layers if modality == "image" else fs.text_layers
    ident = fs.ids[r] if fs.ids else f"{split}:{r}"
    labels = [int(c) for c in torch.nonzero(fs.labels[r] > 0).flatten().tolist()]
    return feats.float().numpy(), None if layers is None else layers[r].float().numpy(), ident, labels


@torch.no_grad()
def encode_query(model, modality: str, features: np.ndarray, layers: Optional[np.ndarray],
                 task_index: Optional[int]) -> torch.Tensor:
    """The {-1,+1} code (1, bits) of one query feature vector with the run's model."""
    from models.base import sign_codes

    expected = model.image_dim if modality == "image" else model.text_dim
    vec = np.array(features, dtype=np.float32).reshape(-1)  # a copy: rows of a memory map are read-only
    if vec.shape[0] != expected:
        other = "text" if modality == "image" else "image"
        hint = f" (the model's {other} features have {model.text_dim if modality == 'image' else model.image_dim})"
        raise UserError(f"query features have {vec.shape[0]} dims; the run's model expects {expected} for "
                        f"{modality}{hint}: check --query-modality")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.from_numpy(vec).to(device)[None, :]
    lay = None if layers is None else torch.from_numpy(np.array(layers, dtype=np.float32)).to(device)[None]
    model.eval()
    encode = model.encode_image if modality == "image" else model.encode_text
    return sign_codes(encode(x, task_index, lay)).cpu()


def _resolve_paths(args: argparse.Namespace) -> Tuple[Path, Path]:
    if args.run_dir is None and args.index is None:
        raise UserError("search: give --run-dir RUN (and optionally --index DIR) or --index DIR")
    index_dir = Path(args.index) if args.index else Path(args.run_dir) / DEFAULT_INDEX
    if args.run_dir is not None:
        if not Path(args.run_dir).is_dir():
            raise DataError(f"{args.run_dir}: run directory not found (train one with 'python main.py --config-file FILE')")
        return Path(args.run_dir), index_dir
    source = read_manifest(index_dir).get("source", {})
    if not source.get("run_dir"):
        raise UserError(f"{index_dir}: the manifest names no run; give --run-dir")
    return Path(source["run_dir"]), index_dir


def _query_modality(args: argparse.Namespace) -> str:
    implied = "text" if args.caption is not None else "image" if args.image is not None else None
    if implied and args.query_modality and args.query_modality != implied:
        raise UserError(f"--query-modality {args.query_modality} contradicts "
                        f"{'--caption' if implied == 'text' else '--image'} (a {implied} query)")
    modality = args.query_modality or implied
    if modality is None:
        raise UserError("--query-modality: required (text or image) with --feature-file / --from-dataset")
    return modality


def run_search(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise UserError(f"--k: must be >= 1, got {args.k}")
    modality = _query_modality(args)
    run_dir, index_dir = _resolve_paths(args)
    manifest = read_manifest(index_dir)
    source = manifest.get("source", {})
    run = _load_run(run_dir, source.get("after_task"))
    if source.get("store_fingerprint") and source["store_fingerprint"] != store_fingerprint(run.store):
        raise DataError(
            f"{index_dir}: built from other stored codes than those of {run_dir} after task {run.task}; "
            f"rebuild it with 'python main.py index --run-dir {run_dir}'"
        )
    folder: IndexFolder = load_index_folder(index_dir)
    index = folder.for_query(modality)
    overrides = {"nflip": args.nflip, "nprobe": args.nprobe, "ef_search": args.ef_search}
    if any(v is not None for v in overrides.values()):
        index.set_search_params(overrides)

    if args.task is not None and not args.from_dataset and not 1 <= args.task <= run.task:
        raise UserError(f"--task {args.task}: the model was trained on tasks 1..{run.task}")
    query: Dict[str, Any] = {"modality": modality}
    layers = None
    if args.from_dataset:
        feats, layers, ident, labels = _dataset_row(run, args.split, args.task, args.row, modality)
        query.update(source=f"task {args.task} {args.split} split", row=args.row, id=ident, labels=labels)
        if args.task > run.task and not args.agnostic:
            raise UserError(f"--task {args.task}: the model was trained on tasks 1..{run.task}; "
                            f"add --agnostic to encode the row task-agnostic")
    elif args.feature_file is not None:
        feats, layers = read_feature_row(args.feature_file, modality, args.row)
        query.update(source=str(args.feature_file), row=args.row)
    else:
        feats, layers = encode_raw_query(args, modality, run)
        query.update(source="caption" if modality == "text" else str(args.image))
        if args.caption is not None:
            query["caption"] = args.caption
    task_index = None if (args.task is None or args.agnostic) else args.task - 1
    code = encode_query(run.model, modality, feats, layers, task_index)
    query.update(task=None if task_index is None else task_index + 1, bits=int(code.shape[1]),
                 code="".join("1" if b > 0 else "0" for b in code[0].tolist()))
    hits: Hits = index.search(code, args.k, stable_ties=args.stable_ties)[0]
    rows = hits.rows()
    q_labels = set(query.get("labels", []))
    for r in rows:
        entry = run.store.get(r["task"] - 1)
        r["labels"] = [int(c) for c in np.flatnonzero(entry.labels[r["position"]])]
        if "labels" in query:
            r["relevant"] = bool(q_labels & set(r["labels"]))
    info = {"path": str(index_dir), "kind": index.kind, "modality": index.modality, "count": len(index),
            "lengths": index.lengths()}
    if args.json:
        print(json.dumps({"query": query, "index": info, "results": rows}, indent=2))
        return 0
    _print_results(query, info, rows, args.k)
    return 0


def _print_results(query: Dict[str, Any], info: Dict[str, Any], rows: List[Dict[str, Any]], k: int) -> None:
    where = query["source"] + (f", row {query['row']}" if query.get("row") is not None else "")
    enc = "task-agnostic" if query["task"] is None else f"as task {query['task']}"
    print(f"query: {query['modality']} ({where}" + (f", id {query['id']}" if "id" in query else "")
          + f"), {query['bits']}-bit code {query['code']} ({enc})")
    print(f"index: {info['kind']}, {info['modality']} codes, {info['count']:,} items, lengths "
          + ", ".join(str(b) for b in info["lengths"]) + f" bits ({info['path']})")
    if not rows:
        print("no results (a hashed index finds nothing within its probe radius; try --nflip or a flat index)")
        return
    has_rel = "relevant" in rows[0]
    width = max(2, max(len(r["id"]) for r in rows))
    print(f"{'rank':>4}  {'dist':>4}  {'bits':>4}  {'task':>4}  {'position':>8}  {'id':<{width}}  labels"
          + ("  relevant" if has_rel else ""))
    for r in rows:
        print(f"{r['rank']:>4}  {r['distance']:>4}  {r['bits']:>4}  {r['task']:>4}  {r['position']:>8}  "
              f"{r['id']:<{width}}  {','.join(map(str, r['labels'])) or '-'}"
              + (f"  {'yes' if r['relevant'] else 'no'}" if has_rel else ""))
    if len(rows) < k:
        print(f"({len(rows)} of {k} results: the hashed index found no more within its probe radius)")
