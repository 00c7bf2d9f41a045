"""The CLIP feature cache: one HDF5 file per dataset + model, written in resumable chunks.

Layout (N samples, C labels, L layers)::

    image        (N, D)  float32  L2-normalised image embeddings
    text         (N, D)  float32  L2-normalised text embeddings (caption policy applied)
    labels       (N, C)  uint8    multi-hot
    label_names  (C,)    str
    ids          (N,)    str      image path as stored in the source
    captions     (N,)    str      the sample's captions joined by a newline
    image_layers (N, L, Wv) float16   optional per-layer features (tower width)
    text_layers  (N, L, Wt) float16
    attrs: format, version, done (rows written), complete, fingerprint (JSON), meta (JSON)

While extracting, the file is ``<output>.partial``; rows [0, done) are final. Each chunk
is written, then ``done`` moves and the file is flushed, so an interrupted run resumes at
``done``. When all rows are in, ``complete`` is set and the file is renamed to
``<output>``: a finished cache is never a half-written one. Per-layer features are
stored as float16 to halve their size (they are 4 x 768 values per image for ViT-B).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import h5py
import numpy as np

from utils.errors import DataError

FORMAT = "ccmh-clip-features"
VERSION = 1
H5_CHUNK_ROWS = 256
_STR = h5py.string_dtype("utf-8")


def partial_path(path: str | os.PathLike) -> Path:
    """Where an unfinished extraction into ``path`` lives."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


@dataclass
class CacheContent:
    """A finished cache read back into memory (NumPy arrays)."""

    path: Path
    image: np.ndarray
    text: np.ndarray
    labels: np.ndarray
    label_names: Tuple[str, ...]
    ids: Tuple[str, ...]
    fingerprint: Dict[str, object]
    meta: Dict[str, object]
    image_layers: Optional[np.ndarray] = None
    text_layers: Optional[np.ndarray] = None
    captions: Tuple[str, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return int(self.image.shape[0])


def _open(path: Path, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except Exception as exc:
        text = " ".join(str(exc).split())[:160]
        raise DataError(
            f"{path}: cannot read as a feature cache (damaged or not HDF5: {text}); delete it and run "
            "'python main.py extract' again"
        ) from None


def _json_attr(fh: h5py.File, name: str, path: Path) -> Dict[str, object]:
    raw = fh.attrs.get(name)
    try:
        value = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except Exception:
        raise DataError(f"{path}: attribute '{name}' missing or not JSON; not a cache written by 'main.py extract'") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: attribute '{name}' is not a JSON object")
    return value


def _check_format(fh: h5py.File, path: Path) -> None:
    fmt = fh.attrs.get("format")
    fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
    if fmt != FORMAT:
        raise DataError(f"{path}: not a CLIP feature cache (format attribute {fmt!r}, expected {FORMAT!r})")
    version = int(fh.attrs.get("version", -1))
    if version != VERSION:
        raise DataError(f"{path}: cache format version {version}, this library reads version {VERSION}; extract again")


def _strings(ds: h5py.Dataset) -> Tuple[str, ...]:
    return tuple(s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in ds[()])


def read_fingerprint(path: str | os.PathLike) -> Tuple[Dict[str, object], int, bool]:
    """(fingerprint, rows done, complete) of a cache or partial cache, without reading arrays."""
    path = Path(path)
    with _open(path, "r") as fh:
        _check_format(fh, path)
        return _json_attr(fh, "fingerprint", path), int(fh.attrs.get("done", 0)), bool(fh.attrs.get("complete", False))


def read_cache(path: str | os.PathLike, layers: bool = False, captions: bool = False) -> CacheContent:
    """A finished cache; ``layers`` / ``captions`` also read those (large) arrays.

    Raises DataError (one line) for a missing, unfinished, damaged or inconsistent file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        part = partial_path(path)
        if part.is_file():
            try:
                _, done, _ = read_fingerprint(part)
                state = f"holds {done} finished rows"
            except DataError:
                state = "is damaged"
            raise DataError(
                f"{path}: extraction not finished ({part.name} {state}); run the same 'python main.py extract' "
                "command again to continue it"
            )
        raise DataError(f"{path}: feature cache not found; make it with the extract command (dataset.clip_extract.extract_features)")
    with _open(path, "r") as fh:
        _check_format(fh, path)
        fingerprint = _json_attr(fh, "fingerprint", path)
        meta = _json_attr(fh, "meta", path)
        needed = ["image", "text", "labels", "label_names", "ids"] + (["captions"] if captions else [])
        missing = [k for k in needed if k not in fh]
        if missing:
            raise DataError(f"{path}: dataset(s) {', '.join(missing)} missing; the cache is damaged, extract again")
        n = int(fh["image"].shape[0])
        done, complete = int(fh.attrs.get("done", 0)), bool(fh.attrs.get("complete", False))
        if not complete or done != n:
            raise DataError(f"{path}: unfinished cache ({done} of {n} rows); run the extract command again to finish it")
        try:
            image = np.asarray(fh["image"][()], dtype=np.float32)
            text = np.asarray(fh["text"][()], dtype=np.float32)
            labels = np.asarray(fh["labels"][()], dtype=np.uint8)
            label_names = _strings(fh["label_names"])
            ids = _strings(fh["ids"])
            caps = _strings(fh["captions"]) if captions else ()
            image_layers = text_layers = None
            if layers:
                if "image_layers" not in fh or "text_layers" not in fh:
                    raise DataError(
                        f"{path}: no per-layer features in this cache; extract with layers=N to store them"
                    )
                image_layers = np.asarray(fh["image_layers"][()], dtype=np.float32)
                text_layers = np.asarray(fh["text_layers"][()], dtype=np.float32)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{path}: cannot read the arrays ({type(exc).__name__}: {exc}); the cache is damaged") from None
    if text.shape[0] != n or labels.shape[0] != n or len(ids) != n:
        raise DataError(
            f"{path}: row counts differ (image {n}, text {text.shape[0]}, labels {labels.shape[0]}, ids {len(ids)})"
        )
    if labels.ndim != 2 or len(label_names) != labels.shape[1]:
        raise DataError(f"{path}: {len(label_names)} label names for labels of shape {labels.shape}")
    for name, arr in (("image", image), ("text", text)):
        if not np.isfinite(arr).all():
            raise DataError(f"{path}: '{name}' holds NaN or infinite values")
    return CacheContent(
        path=path, image=image, text=text, labels=labels, label_names=label_names, ids=ids,
        fingerprint=fingerprint, meta=meta, image_layers=image_layers, text_layers=text_layers, captions=caps,
    )


def fingerprint_difference(stored: Dict[str, object], wanted: Dict[str, object]) -> str:
    """'key: stored X, asked Y; ...' for the keys that differ (values shortened)."""
    def short(v: object) -> str:
        s = json.dumps(v) if not isinstance(v, str) else v
        return s if len(s) <= 40 else s[:16] + "..." + s[-8:]

    keys = sorted(set(stored) | set(wanted))
    return "; ".join(
        f"{k}: cache {short(stored.get(k))}, this run {short(wanted.get(k))}"
        for k in keys if stored.get(k) != wanted.get(k)
    )


class CacheWriter:
    """Writes a cache chunk by chunk into ``<output>.partial``; ``finish`` renames it.

    ``open`` creates the partial file (with labels, names, ids and captions, which are
    known up front) or reopens an existing one after checking that its fingerprint is
    the one asked for; ``done`` says where to continue.
    """

    def __init__(self, fh: h5py.File, final: Path, partial: Path) -> None:
        self._fh = fh
        self.final = final
        self.partial = partial

    @property
    def done(self) -> int:
        return int(self._fh.attrs["done"])

    @property
    def total(self) -> int:
        return int(self._fh["image"].shape[0])

    @property
    def chunk_size(self) -> int:
        """Rows per chunk, fixed when the file was created (a resume keeps it)."""
        return int(self._fh.attrs["chunk_size"])

    @classmethod
    def open(
        cls,
        output: str | os.PathLike,
        fingerprint: Dict[str, object],
        meta: Dict[str, object],
        dims: Dict[str, Tuple[int, ...]],
        labels: np.ndarray,
        label_names: Sequence[str],
        ids: Sequence[str],
        captions: Sequence[Sequence[str]],
        chunk_size: int,
    ) -> "CacheWriter":
        """``dims``: ``image`` (D,), ``text`` (D,), optionally ``image_layers`` (L, Wv) and
        ``text_layers`` (L, Wt)."""
        final = Path(output)
        partial = partial_path(final)
        if partial.is_file():
            fh = _open(partial, "r+")
            try:
                _check_format(fh, partial)
                stored = _json_attr(fh, "fingerprint", partial)
                if stored != fingerprint:
                    raise DataError(
                        f"{partial}: an unfinished extraction with other settings ({fingerprint_difference(stored, fingerprint)}); "
                        "use another output file, or overwrite to start this one afresh"
                    )
                if "chunk_size" not in fh.attrs:
                    raise DataError(f"{partial}: attribute 'chunk_size' missing; overwrite to start afresh")
                for name, shape in dims.items():
                    if name not in fh or tuple(fh[name].shape[1:]) != tuple(shape):
                        raise DataError(f"{partial}: dataset '{name}' missing or of another shape; overwrite to start afresh")
            except BaseException:
                fh.close()
                raise
            return cls(fh, final, partial)
        final.parent.mkdir(parents=True, exist_ok=True)
        n = len(ids)
        fh = h5py.File(partial, "w")
        try:
            fh.attrs["format"] = FORMAT
            fh.attrs["version"] = VERSION
            fh.attrs["fingerprint"] = json.dumps(fingerprint, sort_keys=True)
            fh.attrs["meta"] = json.dumps(meta, sort_keys=True)
            fh.attrs["done"] = 0
            fh.attrs["complete"] = False
            fh.attrs["chunk_size"] = int(chunk_size)
            rows = max(1, min(H5_CHUNK_ROWS, n))
            fh.create_dataset("image", shape=(n, *dims["image"]), dtype="f4", chunks=(rows, *dims["image"]))
            fh.create_dataset("text", shape=(n, *dims["text"]), dtype="f4", chunks=(rows, *dims["text"]))
            for name in ("image_layers", "text_layers"):
                if name in dims:
                    fh.create_dataset(name, shape=(n, *dims[name]), dtype="f2", chunks=(rows, *dims[name]))
            fh.create_dataset("labels", data=np.ascontiguousarray(labels, dtype=np.uint8))
            fh.create_dataset("label_names", data=list(label_names), dtype=_STR)
            fh.create_dataset("ids", data=list(ids), dtype=_STR)
            fh.create_dataset("captions", data=["\n".join(c) for c in captions], dtype=_STR)
            fh.flush()
        except BaseException:
            fh.close()
            partial.unlink(missing_ok=True)
            raise
        return cls(fh, final, partial)

    def write(self, start: int, arrays: Dict[str, np.ndarray]) -> None:
        """Rows ``[start, start + len)`` of every array; ``start`` must equal ``done``."""
        if start != self.done:
            raise RuntimeError(f"cache chunk written out of order: start {start}, done {self.done}")
        n = len(arrays["image"])
        for name, arr in arrays.items():
            self._fh[name][start:start + n] = arr
        self._fh.attrs["done"] = start + n
        self._fh.flush()

    def set_meta(self, meta: Dict[str, object]) -> None:
        self._fh.attrs["meta"] = json.dumps(meta, sort_keys=True)

    def finish(self) -> Path:
        """Mark complete, close and rename to the final path."""
        if self.done != self.total:
            raise RuntimeError(f"finish() with {self.done} of {self.total} rows written")
        self._fh.attrs["complete"] = True
        self._fh.flush()
        self._fh.close()
        os.replace(self.partial, self.final)
        return self.final

    def close(self) -> None:
        """Close without finishing (the partial file stays for a later resume)."""
        try:
            self._fh.close()
        except Exception:
            pass
