"""Where search queries come from: feature files (.npy / .npz / HDF5 feature cache),
JSONL query files, and raw captions / images encoded by the CLIP model that made the
run's feature cache (``ClipQueryEncoder``, loaded once, so a service encodes many).

Every reader returns ``QueryFeatures`` (features of one modality, optionally their
per-layer features); the search itself is ``runners.retrieval.search``.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from utils.errors import DataError, UserError


@dataclass
class QueryFeatures:
    """Q query feature vectors of one modality: ``features`` (Q, D) float32 and, when
    the source has them, per-layer features ``layers`` (Q, L, D); ``meta`` one dict per
    query (its source, row, caption...)."""

    modality: str
    features: np.ndarray
    layers: Optional[np.ndarray] = None
    meta: Optional[List[Dict[str, Any]]] = None

    def __len__(self) -> int:
        return int(self.features.shape[0])


def _pick_rows(n: int, rows: Optional[Sequence[int]], what: str) -> np.ndarray:
    if rows is None:
        return np.arange(n)
    idx = np.asarray(list(rows), dtype=np.int64)
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:
        raise UserError(f"--row {int(bad[0])}: out of range; {what} has {n} rows (0..{n - 1})")
    return idx


def _cut(arr, layers, rows, path: Path, key: str, modality: str, n: Optional[int] = None) -> QueryFeatures:
    """Rows ``rows`` of ``arr`` (a NumPy array, memory map or HDF5 dataset whose first
    ``n`` rows count), read in increasing order once each, returned in ``rows`` order."""
    if len(arr.shape) != 2:
        raise DataError(f"{path}: '{key}' must be a 2-D (N, D) feature array, got shape {tuple(arr.shape)}")
    idx = _pick_rows(arr.shape[0] if n is None else n, rows, f"{path} '{key}'")
    if not len(idx):
        raise DataError(f"{path}: '{key}' holds no rows")
    uniq, inverse = np.unique(idx, return_inverse=True)
    feats = np.asarray(arr[uniq], dtype=np.float32)[inverse]
    lay = None if layers is None else np.asarray(layers[uniq], dtype=np.float32)[inverse]
    return QueryFeatures(modality, feats, lay, [{"source": str(path), "row": int(r)} for r in idx])


def read_feature_rows(path: str | Path, modality: str, rows: Optional[Sequence[int]] = None) -> QueryFeatures:
    """Rows ``rows`` (default: all) of the ``modality`` features in ``path`` (.npy,
    .npz with key ``image`` / ``text`` or a single array, or an HDF5 feature cache
    written by 'main.py extract', whose finished rows only count)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: feature file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return _cut(np.load(path, mmap_mode="r", allow_pickle=False), None, rows, path, "array", modality)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                keys = list(data.files)
                key = modality if modality in keys else keys[0] if len(keys) == 1 else None
                if key is None:
                    raise DataError(f"{path}: no '{modality}' array (keys: {', '.join(keys)}); expected key '{modality}'")
                layers = data[f"{modality}_layers"] if f"{modality}_layers" in keys else None
                return _cut(data[key], layers, rows, path, key, modality)
        if suffix in (".h5", ".hdf5"):
            import h5py

            from dataset.feature_cache import read_fingerprint

            _, done, _ = read_fingerprint(path)  # checks the format; rows [0, done) are final
            with h5py.File(path, "r") as f:
                ds = f[modality]
                layers = f[f"{modality}_layers"] if f"{modality}_layers" in f else None
                return _cut(ds, layers, rows, path, modality, modality, n=min(done, ds.shape[0]))
    except (DataError, UserError):
        raise
    except Exception as exc:  # a truncated or foreign file
        raise DataError(f"{path}: cannot read features ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
    raise UserError(f"{path}: unsupported feature file type '{suffix}'; expected .npy, .npz, .h5 or .hdf5")


def read_jsonl_queries(path: str | Path) -> List[Dict[str, Any]]:
    """The lines of a JSONL query file: each an object with exactly one of
    ``features`` (a list of numbers), ``caption`` (text) or ``image`` (a file path)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: query file not found")
    out: List[Dict[str, Any]] = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{no}: not a JSON object ({exc})") from None
        given = [k for k in ("features", "caption", "image") if isinstance(obj, dict) and k in obj]
        if len(given) != 1:
            raise DataError(f"{path}:{no}: expected an object with exactly one of 'features', 'caption', 'image'")
        out.append(obj)
    if not out:
        raise DataError(f"{path}: holds no queries")
    return out


def open_image(data: bytes | str | Path, what: str):
    """An RGB PIL image from a file path or encoded bytes; one-line DataError if it
    does not decode."""
    from PIL import Image

    if not isinstance(data, bytes) and not Path(data).is_file():
        raise DataError(f"{data}: image file not found ({what})")
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            return im.convert("RGB")
    except Exception as exc:
        raise DataError(f"{what}: cannot decode the image ({type(exc).__name__}: {' '.join(str(exc).split())[:100]})") from None


class ClipQueryEncoder:
    """The CLIP model that made a feature cache, rebuilt from local weights and checked
    against the cache's fingerprint, so raw queries land in the space the run was
    trained on. ``load`` does the work; encoding is fp32, batched."""

    def __init__(self, clip, layer_index: Dict[str, List[int]], device: torch.device) -> None:
        self.clip = clip
        self.layer_index = layer_index
        self.device = device

    @classmethod
    def load(cls, cache: str | Path, pretrained: Optional[str] = None, model_config: Optional[str] = None,
             device: str = "cpu") -> "ClipQueryEncoder":
        from dataset.clip_extract import (
            ModelSpec, layer_indices, load_clip, model_fingerprint, pick_device, register_model_config,
        )
        from dataset.feature_cache import fingerprint_difference, read_fingerprint

        if not Path(cache).is_file():
            raise DataError(f"{cache}: feature cache not found (--cache)")
        fp, _, _ = read_fingerprint(cache)
        model_name = register_model_config(model_config, str(fp.get("model", ""))) if model_config else fp.get("model")
        weights = pretrained or ("none" if fp.get("weights") == "none" else None)
        if weights is None:
            sha = str(fp.get("checkpoint_sha256") or "?")[:12]
            raise UserError(f"{cache} was made with CLIP {model_name} from a weights file (sha256 {sha}...); "
                            f"give the same file with --pretrained PATH")
        spec = ModelSpec(model=str(model_name), pretrained=weights, model_config=model_config,
                         init_seed=int(fp.get("init_seed") or 0), preprocess_tag=fp.get("preprocess_tag"),
                         image_resize=fp.get("image_resize"))
        mine = {k: v for k, v in model_fingerprint(spec).items() if k != "open_clip_version"}
        stored = {k: fp.get(k) for k in mine}
        if stored != mine:
            raise UserError(f"--pretrained: not the CLIP model of {cache} ({fingerprint_difference(stored, mine)})")
        dev = pick_device(device)
        clip = load_clip(spec, dev)  # random weights (weights: none) are on purpose: no notice about them
        return cls(clip, layer_indices(clip.model, int(fp.get("layers") or 0)), dev)

    @torch.no_grad()
    def captions(self, texts: Sequence[str]) -> QueryFeatures:
        from dataset.clip_extract import encode_texts

        tokens = self.clip.tokenizer(list(texts)).to(self.device)
        feats, layers = encode_texts(self.clip.model, tokens, self.layer_index.get("text"))
        return QueryFeatures("text", feats.float().cpu().numpy(),
                             None if layers is None else layers.float().cpu().numpy(),
                             [{"source": "caption", "caption": t} for t in texts])

    @torch.no_grad()
    def images(self, images: Sequence[Any], names: Sequence[str]) -> QueryFeatures:
        """``images``: PIL images (see ``open_image``); ``names`` say where each came from."""
        from dataset.clip_extract import encode_images

        batch = torch.stack([self.clip.preprocess(im) for im in images]).to(self.device)
        feats, layers = encode_images(self.clip.model, batch, self.layer_index.get("image"))
        return QueryFeatures("image", feats.float().cpu().numpy(),
                             None if layers is None else layers.float().cpu().numpy(),
                             [{"source": str(n)} for n in names])


def concat_queries(parts: Sequence[QueryFeatures]) -> QueryFeatures:
    """One batch of several same-modality parts, in order."""
    mods = {p.modality for p in parts}
    if len(mods) != 1:
        raise UserError(f"one batch holds queries of one modality; got {', '.join(sorted(mods))}")
    has_layers = all(p.layers is not None for p in parts)
    return QueryFeatures(
        parts[0].modality, np.concatenate([p.features for p in parts]),
        np.concatenate([p.layers for p in parts]) if has_layers else None,
        [m for p in parts for m in (p.meta or [{}] * len(p))],
    )
