"""Encoding feature sets into codes and scoring queries against stored codes.

Shared by the continual runner, the checkpoint evaluator and the search command, so
every path encodes and scores the same way.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from common.calc_utils import calc_map_k, calc_pr_curve, calc_precision_at_n
from common.code_store import CodeStore, StoredCodes
from dataset.feature_set import FeatureSet
from models.base import HashModel, sign_codes
from utils.distributed import DistContext, gather_rows, shard_bounds

SINGLE = DistContext()

DIRECTIONS = ("i2t", "t2i")


@torch.no_grad()
def encode_features(
    model: HashModel, features: FeatureSet, modality: str, task_index: Optional[int], batch_size: int = 4096,
    dist: DistContext = SINGLE,
) -> torch.Tensor:
    """Continuous codes (N, bits) of one modality of ``features``, in eval mode, in chunks.
    Under data parallelism each rank encodes a contiguous shard and the shards are
    gathered back in order, so every rank holds all N rows exactly once."""
    was_training = model.training
    model.eval()
    data = features.image if modality == "image" else features.text
    layers = features.image_layers if modality == "image" else features.text_layers
    encode = model.encode_image if modality == "image" else model.encode_text
    lo, hi = shard_bounds(len(features), dist)
    out = []
    for start in range(lo, hi, batch_size):
        sl = slice(start, min(start + batch_size, hi))
        out.append(encode(data[sl], task_index, None if layers is None else layers[sl]))
    model.train(was_training)
    local = torch.cat(out) if out else torch.empty(0, model.bits, device=data.device)
    return gather_rows(local, len(features), dist)


def encode_codes(
    model: HashModel, features: FeatureSet, task_index: Optional[int], batch_size: int = 4096,
    dist: DistContext = SINGLE,
) -> Dict[str, torch.Tensor]:
    """{-1,+1} int8 codes of both modalities: ``{"image": ..., "text": ...}``."""
    return {
        m: sign_codes(encode_features(model, features, m, task_index, batch_size, dist)) for m in ("image", "text")
    }


@torch.no_grad()
def task_inference_accuracy(
    model: HashModel, features: FeatureSet, true_tasks: torch.Tensor, batch_size: int = 4096,
) -> Optional[Dict[str, float]]:
    """Share of samples whose task the model infers correctly, per modality
    (``{"image": ..., "text": ...}``), or None for a model that does not infer tasks."""
    was_training = model.training
    model.eval()
    out: Dict[str, float] = {}
    truth = true_tasks.cpu()
    try:
        for modality in ("image", "text"):
            data = features.image if modality == "image" else features.text
            hits = 0
            for start in range(0, len(features), batch_size):
                guess = model.infer_tasks(data[start:start + batch_size], modality)
                if guess is None:
                    return None
                hits += int((guess.cpu() == truth[start:start + batch_size]).sum())
            out[modality] = hits / max(1, len(features))
    finally:
        model.train(was_training)
    return out


def direction_inputs(
    query_codes: Dict[str, torch.Tensor], entries: Sequence[StoredCodes]
) -> Dict[str, Tuple[torch.Tensor, Any, Any]]:
    """Per direction, (query codes, database codes, database labels) for the metric
    calls: image queries against stored text codes (i2t) and the reverse (t2i). One
    segment of the query's length is passed whole; several, or a shorter one, as lists
    (prefix truncation)."""
    labels = [torch.from_numpy(e.labels) for e in entries]
    out = {}
    for direction, q_mod, db_mod in (("i2t", "image", "text"), ("t2i", "text", "image")):
        segments = [e.codes(db_mod) for e in entries]
        q = query_codes[q_mod].detach().cpu()
        if len(segments) == 1 and segments[0].shape[1] == q.shape[1]:
            out[direction] = (q, segments[0], labels[0])
        else:
            out[direction] = (q, segments, labels)
    return out


def score_directions(
    query_codes: Dict[str, torch.Tensor],
    query_labels: torch.Tensor,
    entries: Sequence[StoredCodes],
    topk: Optional[int] = None,
) -> Dict[str, float]:
    """mAP of image queries against stored text codes (i2t) and text queries against
    stored image codes (t2i), over the union of ``entries`` with prefix truncation."""
    q_labels = query_labels.detach().cpu()
    return {d: float(calc_map_k(q, db, q_labels, dl, k=topk))
            for d, (q, db, dl) in direction_inputs(query_codes, entries).items()}


# N of the top-N precision curve a run records (those up to the database size are kept)
CURVE_NS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def retrieval_curves(
    query_codes: Dict[str, torch.Tensor], query_labels: torch.Tensor, entries: Sequence[StoredCodes],
) -> Dict[str, Dict[str, Any]]:
    """Per direction, precision / recall by Hamming radius and the top-N precision
    curve of these queries against ``entries`` (ranking and ties as ``calc_map_k``):
    ``{"i2t": {"pr_curve": {radius, precision, recall}, "precision_at": {"n": [...],
    "precision": [...]}}, "t2i": ...}``, numbers rounded to 6 decimals."""
    size = sum(len(e) for e in entries)
    ns = [n for n in CURVE_NS if n <= size] or [size]
    q_labels = query_labels.detach().cpu()
    out: Dict[str, Dict[str, Any]] = {}
    for d, (q, db, dl) in direction_inputs(query_codes, entries).items():
        pr = calc_pr_curve(q, db, q_labels, dl)
        top = calc_precision_at_n(q, db, q_labels, dl, ns=ns)
        out[d] = {
            "pr_curve": {"radius": [int(r) for r in pr["radius"]],
                         "precision": [round(float(v), 6) for v in pr["precision"]],
                         "recall": [round(float(v), 6) for v in pr["recall"]]},
            "precision_at": {"n": list(ns), "precision": [round(top[n], 6) for n in ns]},
        }
    return out


def score_against_store(
    model: HashModel,
    queries: FeatureSet,
    query_task: Optional[int],
    store: CodeStore,
    db_tasks: Sequence[int],
    topk: Optional[int] = None,
    batch_size: int = 4096,
    dist: DistContext = SINGLE,
) -> Dict[str, float]:
    """Encode ``queries`` (as task ``query_task``; None = task-agnostic) and score them
    against the stored codes of ``db_tasks``."""
    codes = encode_codes(model, queries, query_task, batch_size, dist)
    return score_directions(codes, queries.labels, store.entries(db_tasks), topk)


def score_bit_prefixes(
    query_codes: Dict[str, torch.Tensor],
    query_labels: torch.Tensor,
    entries: Sequence[StoredCodes],
    order: torch.Tensor,
    lengths: Sequence[int],
    topk: Optional[int] = None,
) -> Dict[str, Dict[str, float]]:
    """mAP when every code keeps only the bits ``order[:b]`` for each b in ``lengths``
    (bit-scalable evaluation: the same model, shorter codes, no retraining)."""
    out: Dict[str, Dict[str, float]] = {}
    full = {m: [e.codes(m) for e in entries] for m in ("image", "text")}
    labels = torch.cat([torch.from_numpy(e.labels) for e in entries])
    for b in lengths:
        cols = order[:b].cpu()
        q = {m: c.detach().cpu()[:, cols] for m, c in query_codes.items()}
        db = {m: torch.cat([s[:, cols] for s in segs]) for m, segs in full.items()}
        out[str(b)] = {
            "i2t": float(calc_map_k(q["image"], db["text"], query_labels.cpu(), labels, k=topk)),
            "t2i": float(calc_map_k(q["text"], db["image"], query_labels.cpu(), labels, k=topk)),
        }
    return out
