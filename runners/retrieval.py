"""Search as one library call: a run's hash model encodes a batch of queries and the
run's binary index returns each query's top k, optionally within one task's stored
codes; arrays out (``SearchResult``). The ``search`` and ``serve`` commands and the
tests all call ``search``; they only read queries in and format answers out.

With a task T the query is encoded as task T (as the evaluation encodes task T's
queries; a joint run encodes every task as its single task) and only task T's stored
codes are searched: the task-known protocol. Without one, the query is encoded
task-agnostic and searches the union of every task's codes. FAISS results are for
serving; reported mAP comes from ``common.calc_utils``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from common.binary_index import IndexFolder, Neighbours, load_index_folder, read_manifest, store_fingerprint
from runners.query_inputs import QueryFeatures
from utils.errors import DataError, UserError

DEFAULT_INDEX = "index"  # the index folder inside a run directory


@dataclass
class Catalog:
    """What the run's dataset knows about stored items beyond their codes: label names
    (one per label column; empty if the dataset has none) and captions by sample id
    (a CLIP feature cache's; empty otherwise). Display only."""

    label_names: Tuple[str, ...] = ()
    captions: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Dict[str, Any], stream=None) -> "Catalog":
        """Read from the run's config dataset (``stream``: that dataset, if loaded)."""
        from runners.config import build

        stream = stream if stream is not None else build("dataset", config).load()
        captions: Dict[str, str] = {}
        block = config.get("dataset", {})
        if block.get("name") == "clip_cache":  # captions live in the cache only
            from dataset.feature_cache import read_cache

            cache = read_cache(block["path"], captions=True)
            captions = dict(zip(cache.ids, cache.captions))
        return cls(tuple(stream.label_names), captions)

    def label_list(self, multi_hot: np.ndarray) -> List[Any]:
        """The labels of one multi-hot row: names where known, else column numbers."""
        cols = np.flatnonzero(np.asarray(multi_hot) > 0)
        return [self.label_names[c] if self.label_names else int(c) for c in cols]


@dataclass
class SearchTarget:
    """A trained run and an index folder built from its stored codes, loaded once."""

    run: Any  # runners.experiment.TrainedRun
    folder: IndexFolder
    catalog: Catalog

    @property
    def joint(self) -> bool:
        return self.run.results.mode == "joint"

    def feature_cache(self) -> Optional[str]:
        """The CLIP feature cache the run was trained on (a ``clip_cache`` dataset's path)."""
        block = self.run.config.get("dataset", {})
        return block.get("path") if block.get("name") == "clip_cache" else None

    def check_task(self, task: Optional[int]) -> None:
        """``task`` (1-based) must be one the model finished and the index holds."""
        if task is None:
            return
        indexed = sorted({int(s) for m in self.folder.manifest["modalities"].values() for x in m["shards"]
                          for s in x["tasks"]})
        if task not in indexed:
            raise UserError(f"task {task}: not a task of this run's index (tasks "
                            f"{', '.join(map(str, indexed))}, after task {self.run.task})")

    def info(self) -> Dict[str, Any]:
        """Method, dataset, model code length, and per modality the index kind, size
        and code length / count per task (1-based)."""
        m = self.folder.manifest
        return {
            "method": self.run.config["model"]["name"], "dataset": self.run.config["dataset"]["name"],
            "after_task": self.run.task, "model_bits": int(self.run.model.bits),
            "dims": {"image": int(self.run.model.image_dim), "text": int(self.run.model.text_dim)},
            "kind": m["kind"], "count": m["count"], "index": str(self.folder.path),
            "label_names": list(self.catalog.label_names),
            "indexes": {
                mod: {"serves": "text" if mod == "image" else "image", "count": len(ix), "lengths": ix.lengths(),
                      "tasks": [{"task": t + 1, **v} for t, v in ix.task_sizes().items()]}
                for mod, ix in self.folder.indexes.items()
            },
        }


def resolve_paths(run_dir: Optional[str | Path], index_dir: Optional[str | Path]) -> Tuple[Path, Path]:
    """(run directory, index folder): the index defaults to RUN/index, the run to the
    one the index's manifest names."""
    if run_dir is None and index_dir is None:
        raise UserError("give --run-dir RUN (and optionally --index DIR) or --index DIR")
    index = Path(index_dir) if index_dir else Path(run_dir) / DEFAULT_INDEX
    if run_dir is not None:
        if not Path(run_dir).is_dir():
            raise DataError(f"{run_dir}: run directory not found (train one with 'python main.py --config-file FILE')")
        return Path(run_dir), index
    source = read_manifest(index).get("source", {})
    if not source.get("run_dir"):
        raise UserError(f"{index}: the manifest names no run; give --run-dir")
    return Path(source["run_dir"]), index


def open_target(run_dir: Optional[str | Path] = None, index_dir: Optional[str | Path] = None,
                catalog: bool = True) -> SearchTarget:
    """Load the run (model after the task the index was built at) and its index; an
    index built from other codes than the run's is refused. ``catalog``: also read
    label names / captions from the run's dataset (skipped, with none, if it cannot
    be read)."""
    from runners.experiment import load_run

    run_path, index_path = resolve_paths(run_dir, index_dir)
    manifest = read_manifest(index_path)
    source = manifest.get("source", {})
    run = load_run(run_path, task=source.get("after_task"), device="cpu")
    if source.get("store_fingerprint") and source["store_fingerprint"] != store_fingerprint(run.store):
        raise DataError(
            f"{index_path}: built from other stored codes than those of {run_path} after task {run.task}; "
            f"rebuild it with 'python main.py index --run-dir {run_path}'"
        )
    cat = Catalog()
    if catalog:
        try:
            cat = Catalog.from_config(run.config)
        except (DataError, UserError, OSError):
            cat = Catalog()  # the dataset moved: results show label columns, no captions
    return SearchTarget(run, load_index_folder(index_path), cat)


@torch.no_grad()
def encode_queries(model, queries: QueryFeatures, task_index: Optional[int], batch_size: int = 4096) -> np.ndarray:
    """{-1,+1} int8 codes (Q, bits) of a query batch with the run's model; features
    of the wrong dimension or holding NaN / inf are refused (naming the rows)."""
    from models.base import sign_codes

    mod = queries.modality
    expected = model.image_dim if mod == "image" else model.text_dim
    feats = np.asarray(queries.features, dtype=np.float32)
    if feats.ndim != 2 or feats.shape[1] != expected:
        other = "text" if mod == "image" else "image"
        got = feats.shape[1] if feats.ndim == 2 else f"shape {feats.shape}"
        raise UserError(f"query features have {got} dims; the run's model expects {expected} for {mod} "
                        f"(its {other} features have {model.text_dim if mod == 'image' else model.image_dim}): "
                        f"check the query modality")
    bad = np.flatnonzero(~np.isfinite(feats).all(axis=1))
    if bad.size:
        raise DataError(f"query row(s) {', '.join(map(str, bad[:5].tolist()))}{' ...' if bad.size > 5 else ''} "
                        f"hold NaN or infinite features")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    encode = model.encode_image if mod == "image" else model.encode_text
    out = []
    for lo in range(0, feats.shape[0], batch_size):
        x = torch.from_numpy(np.ascontiguousarray(feats[lo : lo + batch_size])).to(device)
        lay = None if queries.layers is None else torch.from_numpy(
            np.ascontiguousarray(queries.layers[lo : lo + batch_size], dtype=np.float32)).to(device)
        out.append(sign_codes(encode(x, task_index, lay)).cpu())
    return torch.cat(out).numpy().astype(np.int8)


@dataclass
class SearchResult:
    """A searched batch: the query codes (Q, bits) and the neighbours (Q, k arrays);
    ``task`` the task filter, ``encoded_as`` the task the queries were encoded as
    (1-based; None = the union / task-agnostic)."""

    modality: str
    task: Optional[int]
    encoded_as: Optional[int]
    codes: np.ndarray
    hits: Neighbours
    index_modality: str
    kind: str


def search(
    target: SearchTarget, queries: QueryFeatures, k: int, task: Optional[int] = None, agnostic: bool = False,
    params: Optional[Dict[str, Any]] = None, stable_ties: bool = False,
) -> SearchResult:
    """Top ``k`` stored items of the other modality for each query of ``queries``.
    ``task`` (1-based): encode as that task and search only its codes; ``agnostic``:
    encode task-agnostic even then. ``params``: per-call search parameters of the
    index kind (nflip / nprobe / ef_search). ``stable_ties`` (flat index): ties in
    the evaluation's (task, position) order."""
    if k < 1:
        raise UserError(f"k must be >= 1, got {k}")
    target.check_task(task)
    index = target.folder.for_query(queries.modality)
    encoded_as = None if task is None or agnostic else (1 if target.joint else task)
    codes = encode_queries(target.run.model, queries, None if encoded_as is None else encoded_as - 1)
    hits = index.search(codes, k, task=None if task is None else task - 1, params=params, stable_ties=stable_ties)
    return SearchResult(queries.modality, task, encoded_as, codes, hits, index.modality, index.kind)


def describe(target: SearchTarget, result: SearchResult, i: int, meta: Optional[Dict[str, Any]] = None,
             query_labels: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """Query ``i`` of ``result`` and its hits as plain JSON-ready dicts: label names,
    captions where the dataset has them, and relevance when the query's labels are
    known (a shared label)."""
    code = result.codes[i]
    query: Dict[str, Any] = {"modality": result.modality, **(meta or {}), "task": result.task,
                             "encoded_as": result.encoded_as, "bits": int(code.shape[0]),
                             "code": "".join("1" if b > 0 else "0" for b in code.tolist())}
    if query_labels is not None:
        query["labels"] = target.catalog.label_list(query_labels)
    rows = result.hits.rows(i)
    for r in rows:
        stored = target.run.store.get(r["task"] - 1).labels[r["position"]]
        r["labels"] = target.catalog.label_list(stored)
        if r["id"] in target.catalog.captions:
            r["caption"] = target.catalog.captions[r["id"]]
        if query_labels is not None:
            r["relevant"] = bool(np.any((np.asarray(query_labels) > 0) & (stored > 0)))
    return {"query": query, "results": rows}


def precision_at(target: SearchTarget, result: SearchResult, query_labels: np.ndarray, n: int) -> np.ndarray:
    """Per query, the fraction of its first ``n`` hits that share a label with it
    (hits beyond those found count as misses): precision@n as the evaluation counts it."""
    found = np.arange(result.hits.distance.shape[1])[None, :] < result.hits.count[:, None]
    rel = np.zeros(result.hits.distance.shape, dtype=bool)
    for t in np.unique(result.hits.task[found]):
        db = target.run.store.get(int(t)).labels
        mask = found & (result.hits.task == t)
        qi, col = np.nonzero(mask)
        rel[qi, col] = np.logical_and(np.asarray(query_labels)[qi] > 0, db[result.hits.position[qi, col]] > 0).any(axis=1)
    return rel[:, :n].sum(axis=1) / float(n)


def search_params(nflip: Optional[int] = None, nprobe: Optional[int] = None,
                  ef_search: Optional[int] = None) -> Dict[str, int]:
    """The given per-call search parameters as the dict ``search`` takes."""
    return {k: v for k, v in (("nflip", nflip), ("nprobe", nprobe), ("ef_search", ef_search)) if v is not None}
