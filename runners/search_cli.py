"""The ``search`` command: query a run's binary index with one query or a batch, encoded
by the run's own hash model (``runners.retrieval.search``).

``python main.py search --run-dir RUN --query-modality text --feature-file F.npy --row 3 --k 10``
``python main.py search --run-dir RUN --query-modality image --from-dataset --task 2 --output hits.jsonl``
``python main.py search --run-dir RUN --query-modality text --queries Q.npy|Q.jsonl --output hits.csv``

``--task T`` encodes the queries as task T and searches only task T's stored codes
(the task-known protocol); without it queries are task-agnostic over every task.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from common.binary_index import check_search_params
from common.code_store import MODALITIES
from runners.query_inputs import (
    ClipQueryEncoder, QueryFeatures, concat_queries, open_image, read_feature_rows, read_jsonl_queries,
)
from runners.retrieval import (
    DEFAULT_INDEX, Catalog, SearchResult, SearchTarget, describe, open_target, precision_at, search, search_params,
)
from utils.errors import DataError, UserError
from utils.io import atomic_write_bytes


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", metavar="DIR",
                        help="the run whose hash model encodes the queries (default: the run the index was built from)")
    parser.add_argument("--index", metavar="DIR",
                        help=f"index folder written by 'python main.py index' (default: RUN/{DEFAULT_INDEX})")
    parser.add_argument("--query-modality", choices=MODALITIES,
                        help="modality of the queries: text queries search the image codes, image queries the text "
                             "codes (implied by --caption / --image)")
    src = parser.add_argument_group("the queries (one of)")
    one = src.add_mutually_exclusive_group(required=True)
    one.add_argument("--feature-file", metavar="FILE",
                     help="features of the query modality: .npy (N, D), .npz (key 'image' / 'text'), or an HDF5 "
                          "feature cache (.h5 / .hdf5); take row --row")
    one.add_argument("--queries", metavar="FILE",
                     help="a batch: every row of a .npy / .npz / .h5 feature file, or a .jsonl file with one "
                          "object per line holding 'features' (a list), 'caption' or 'image' (a path)")
    one.add_argument("--from-dataset", action="store_true",
                     help="queries from split --split of task --task of the run's own config dataset: row --row, "
                          "or every row of the split without --row")
    one.add_argument("--caption", metavar="TEXT", help="a caption, encoded with the CLIP model of the feature cache")
    one.add_argument("--image", metavar="FILE", help="an image file, encoded with the CLIP model of the feature cache")
    src.add_argument("--row", type=int, metavar="N", help="row of --feature-file / of the dataset split (0-based)")
    src.add_argument("--split", choices=("query", "database", "train", "val"), default="query",
                     help="--from-dataset: which split (default: query)")
    add_clip_arguments(src)
    parser.add_argument("--task", type=int, metavar="T",
                        help="encode the queries as task T (1-based) and search only task T's stored codes; with "
                             "--from-dataset also the task whose split holds the queries (default: task-agnostic "
                             "queries over every task's codes)")
    parser.add_argument("--agnostic", action="store_true",
                        help="encode task-agnostic even when --task is given (the search stays within task T)")
    parser.add_argument("--k", type=int, default=10, help="number of results per query (default 10)")
    parser.add_argument("--nflip", type=int, metavar="F", help="hash / multihash: bit flips probed, for this search")
    parser.add_argument("--nprobe", type=int, metavar="P", help="ivf: lists visited, for this search")
    parser.add_argument("--ef-search", type=int, metavar="E", help="hnsw: search beam width, for this search")
    parser.add_argument("--stable-ties", action="store_true",
                        help="flat index only: order equal distances by task then database position, exactly as "
                             "the evaluation ranks them")
    parser.add_argument("--json", action="store_true",
                        help="print JSON: one object for one query, one line per query (JSONL) for a batch")
    parser.add_argument("--output", metavar="FILE",
                        help="write the results of every query to FILE.jsonl (one line per query) or FILE.csv (one "
                             "row per hit), atomically")


def add_clip_arguments(group) -> None:
    """The flags of the CLIP model that encodes raw captions / images (search, serve)."""
    group.add_argument("--cache", metavar="FILE",
                       help="feature cache whose CLIP model encodes captions and images (default: the run's "
                            "clip_cache dataset path)")
    group.add_argument("--pretrained", metavar="WEIGHTS",
                       help="the CLIP weights file the cache was made with (checked against the cache's "
                            "fingerprint; not needed for a cache made with random weights)")
    group.add_argument("--model-config", metavar="FILE",
                       help="the open_clip model config JSON the cache was made with, if custom")
    group.add_argument("--device", default="cpu", help="device for the CLIP encoder: cpu (default), auto, cuda")


def _modality(args: argparse.Namespace) -> str:
    implied = "text" if args.caption is not None else "image" if args.image is not None else None
    if implied and args.query_modality and args.query_modality != implied:
        raise UserError(f"--query-modality {args.query_modality} contradicts "
                        f"{'--caption' if implied == 'text' else '--image'} (a {implied} query)")
    modality = args.query_modality or implied
    if modality is None and not (args.queries and args.queries.lower().endswith(".jsonl")):
        raise UserError("--query-modality: required (text or image) with --feature-file / --queries / --from-dataset")
    return modality


def _encoder(args: argparse.Namespace, target: SearchTarget, what: str) -> ClipQueryEncoder:
    cache = args.cache or target.feature_cache()
    if not cache:
        raise UserError(
            f"{what}: encoding a raw query needs the CLIP model of the run's feature cache: give --cache FILE.h5 "
            f"(made by 'python main.py extract') and --pretrained WEIGHTS, or pass features with --feature-file"
        )
    try:
        return ClipQueryEncoder.load(cache, args.pretrained, args.model_config, args.device)
    except UserError as exc:
        raise UserError(f"{what}: {exc}") from None


def _jsonl_queries(args: argparse.Namespace, target: SearchTarget, modality: Optional[str]) -> QueryFeatures:
    path = Path(args.queries)
    parts: List[QueryFeatures] = []
    encoder = None
    for no, obj in enumerate(read_jsonl_queries(path), 1):
        where = f"{path}:{no}"
        if "features" in obj:
            if modality is None:
                raise UserError(f"{where}: 'features' queries need --query-modality")
            try:
                feats = np.asarray(obj["features"], dtype=np.float32).reshape(1, -1)
            except (TypeError, ValueError):
                raise DataError(f"{where}: 'features' must be a list of numbers") from None
            parts.append(QueryFeatures(modality, feats, None, [{"source": where}]))
            continue
        encoder = encoder or _encoder(args, target, f"--queries {path}")
        if "caption" in obj:
            parts.append(encoder.captions([str(obj["caption"])]))
        else:
            parts.append(encoder.images([open_image(str(obj["image"]), where)], [obj["image"]]))
        if modality is not None and parts[-1].modality != modality:
            raise UserError(f"{where}: a {parts[-1].modality} query contradicts --query-modality {modality}")
    try:
        return concat_queries(parts)
    except UserError as exc:
        raise UserError(f"--queries {path}: {exc}") from None


def _dataset_queries(args: argparse.Namespace, target: SearchTarget, modality: str):
    """(queries, their multi-hot labels, the loaded stream) of a split of the run's dataset."""
    from runners.config import build

    if args.task is None:
        raise UserError("--from-dataset: give --task T (1-based) to pick the task whose split holds the queries")
    stream = build("dataset", target.run.config).load()
    if not 1 <= args.task <= len(stream):
        raise UserError(f"--task {args.task}: out of range; the run's dataset has tasks 1..{len(stream)}")
    fs = getattr(stream.tasks[args.task - 1], args.split)
    rows = np.arange(len(fs))
    if args.row is not None:
        if not 0 <= args.row < len(fs):
            raise UserError(f"--row {args.row}: out of range; task {args.task} {args.split} split has {len(fs)} rows "
                            f"(0..{len(fs) - 1})")
        rows = np.array([args.row])
    feats = (fs.image if modality == "image" else fs.text)[rows]
    layers = fs.image_layers if modality == "image" else fs.text_layers
    meta = [{"source": f"task {args.task} {args.split} split", "row": int(r),
             "id": fs.ids[r] if fs.ids else f"{args.split}:{r}"} for r in rows]
    queries = QueryFeatures(modality, feats.float().numpy(), None if layers is None else layers[rows].float().numpy(),
                            meta)
    return queries, fs.labels[rows].numpy(), stream


def _read_queries(args: argparse.Namespace, target: SearchTarget, modality: Optional[str]):
    """(queries, their labels or None, the dataset stream if it was loaded)."""
    if args.from_dataset:
        return _dataset_queries(args, target, modality)
    if args.feature_file is not None:
        if args.row is None:
            raise UserError(f"--row: required with --feature-file {args.feature_file} (a batch: --queries)")
        return read_feature_rows(args.feature_file, modality, [args.row]), None, None
    if args.queries is not None:
        if args.queries.lower().endswith(".jsonl"):
            return _jsonl_queries(args, target, modality), None, None
        return read_feature_rows(args.queries, modality), None, None
    if args.caption is not None:
        return _encoder(args, target, "--caption").captions([args.caption]), None, None
    return _encoder(args, target, "--image").images([open_image(args.image, "--image")], [args.image]), None, None


def _params(args: argparse.Namespace, kind: str) -> Dict[str, int]:
    given = search_params(args.nflip, args.nprobe, args.ef_search)
    for key, value in given.items():
        try:
            check_search_params(kind, {key: value})
        except UserError as exc:
            raise UserError(f"--{key.replace('_', '-')} {value}: {exc}") from None
    return given


def run_search(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise UserError(f"--k: must be >= 1, got {args.k}")
    if args.output and Path(args.output).suffix.lower() not in (".jsonl", ".csv"):
        raise UserError(f"--output {args.output}: expected a .jsonl or .csv file name")
    modality = _modality(args)
    target = open_target(args.run_dir, args.index, catalog=False)
    if args.task is not None and not args.from_dataset:
        try:
            target.check_task(args.task)
        except UserError as exc:
            raise UserError(f"--{exc}") from None
    if modality is not None:
        target.folder.for_query(modality)  # an index without the codes this modality searches fails here
    queries, labels, stream = _read_queries(args, target, modality)
    if args.from_dataset:
        try:
            target.check_task(args.task)
        except UserError as exc:
            raise UserError(f"--{exc}") from None
    try:
        target.catalog = Catalog.from_config(target.run.config, stream)
    except (DataError, UserError, OSError):
        pass  # the dataset moved: label columns, no captions
    kind = target.folder.for_query(queries.modality).kind
    result = search(target, queries, args.k, task=args.task, agnostic=args.agnostic, params=_params(args, kind),
                    stable_ties=args.stable_ties)
    answers = [describe(target, result, i, (queries.meta or [{}] * len(queries))[i],
                        None if labels is None else labels[i]) for i in range(len(queries))]
    single = len(queries) == 1 and args.output is None and args.queries is None and not (
        args.from_dataset and args.row is None)
    if single:
        if args.json:
            print(json.dumps({**answers[0], "index": _index_info(target, result)}, indent=2))
        else:
            _print_one(answers[0], _index_info(target, result), result, args.k)
        return 0
    summary = _summary(target, result, labels, args.k)
    if args.output:
        _write(Path(args.output), answers)
        print(f"{summary}\nwritten: {args.output}")
    else:
        sys.stdout.write("".join(json.dumps(a) + "\n" for a in answers))
        print(summary, file=sys.stderr)
    return 0


def _index_info(target: SearchTarget, result: SearchResult) -> Dict[str, Any]:
    index = target.folder.for_query(result.modality)
    return {"path": str(target.folder.path), "kind": index.kind, "modality": index.modality, "count": len(index),
            "lengths": index.lengths()}


def _scope(result: SearchResult) -> str:
    enc = "task-agnostic" if result.encoded_as is None else f"encoded as task {result.encoded_as}"
    where = "every task's codes" if result.task is None else f"task {result.task}'s codes only"
    return f"{enc}, {where}"


def _summary(target: SearchTarget, result: SearchResult, labels: Optional[np.ndarray], k: int) -> str:
    line = (f"searched {len(result.hits)} {result.modality} queries ({_scope(result)}) in a {result.kind} index "
            f"of {result.index_modality} codes: k={k}, {int(result.hits.count.sum())} hits")
    if labels is not None:
        n = min(10, k)
        line += f"; precision@{n} {float(precision_at(target, result, labels, n).mean()):.4f} (a hit is relevant if it shares a label)"
    return line


def _write(path: Path, answers: List[Dict[str, Any]]) -> None:
    if path.suffix.lower() == ".jsonl":
        atomic_write_bytes(path, "".join(json.dumps(a) + "\n" for a in answers).encode("utf-8"))
        return
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["query", "query_source", "query_row", "query_id", "rank", "distance", "bits", "task", "position",
                "id", "labels", "caption", "relevant"])
    for qi, a in enumerate(answers):
        q = a["query"]
        for r in a["results"]:
            w.writerow([qi, q.get("source", ""), q.get("row", ""), q.get("id", ""), r["rank"], r["distance"],
                        r["bits"], r["task"], r["position"], r["id"], ";".join(map(str, r["labels"])),
                        r.get("caption", ""), "" if "relevant" not in r else int(r["relevant"])])
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def _print_one(answer: Dict[str, Any], info: Dict[str, Any], result: SearchResult, k: int) -> None:
    query, rows = answer["query"], answer["results"]
    where = query.get("source", "") + (f", row {query['row']}" if query.get("row") is not None else "")
    print(f"query: {query['modality']} ({where}" + (f", id {query['id']}" if "id" in query else "")
          + (f", caption {query['caption']!r}" if "caption" in query else "")
          + (f", labels {', '.join(map(str, query['labels'])) or '-'}" if "labels" in query else "")
          + f"), {query['bits']}-bit code {query['code']} ({_scope(result)})")
    print(f"index: {info['kind']}, {info['modality']} codes, {info['count']:,} items, lengths "
          + ", ".join(str(b) for b in info["lengths"]) + f" bits ({info['path']})")
    if rows:
        has_rel, has_cap = "relevant" in rows[0], any("caption" in r for r in rows)
        width = max(2, max(len(r["id"]) for r in rows))
        print(f"{'rank':>4}  {'dist':>4}  {'bits':>4}  {'task':>4}  {'position':>8}  {'id':<{width}}  labels"
              + ("  relevant" if has_rel else "") + ("  caption" if has_cap else ""))
        for r in rows:
            print(f"{r['rank']:>4}  {r['distance']:>4}  {r['bits']:>4}  {r['task']:>4}  {r['position']:>8}  "
                  f"{r['id']:<{width}}  {','.join(map(str, r['labels'])) or '-'}"
                  + (f"  {'yes' if r['relevant'] else 'no':<8}" if has_rel else "")
                  + (f"  {r.get('caption', '')}" if has_cap else ""))
    if len(rows) < k:
        print(f"({len(rows)} of {k} results: {_why_short(result, info)})")


def _why_short(result: SearchResult, info: Dict[str, Any]) -> str:
    if result.kind == "flat":
        scope = f"task {result.task} holds" if result.task is not None else "the index holds"
        return f"{scope} no more items"
    if result.kind in ("hash", "multihash"):
        return "the hashed index found no more within its probe radius; raise --nflip or use a flat index"
    flag = "--nprobe" if result.kind == "ivf" else "--ef-search"
    return f"the {result.kind} index returned no more; raise {flag} or use a flat index"
