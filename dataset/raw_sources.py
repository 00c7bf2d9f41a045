"""Readers of raw inputs for CLIP extraction: image paths, captions and multi-hot labels.

Two input formats give the same ``RawSamples``:

- the DCMHT / DSPH ``.mat`` layout: a folder with ``index.mat`` (image paths, a
  padded char array or a cell of strings), ``caption.mat`` (COCO: one cell of >= 5
  captions per image; MIRFlickr: one tag string per image) or ``caption.txt`` (NUS-WIDE:
  one line per image) and ``label.mat`` (N x C multi-hot). Alternative keys: ``imgs`` /
  ``FAll`` for paths, ``tags`` / ``YAll`` for captions, ``LAll`` / ``labels`` for labels.
  MATLAB v7.3 (HDF5, read with h5py and transposed back) and older files (scipy).
- a plain folder: images plus one ``.jsonl`` (one JSON object a line: ``image``,
  ``captions`` (list) or ``caption``, ``labels`` (names or column indices)) or ``.csv``
  (columns ``image``, ``captions`` or ``caption``, ``labels``; several values separated
  by ``|``). Label order: ``labels.txt`` beside the annotation file, else the named set /
  file given, else the sorted set of names found.

Stored image paths are often absolute paths of the machine that made the files; a
``PathRewrite`` (image root + prefix to strip) maps them onto the user's folder.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import h5py
import numpy as np
import scipy.io

from dataset.label_names import read_label_file, resolve_label_names, LABEL_SETS
from dataset.mat_io import mat_format, mat_keys, read_mat_array
from utils.errors import DataError, UserError

PathLike = Union[str, Path]

INDEX_KEYS = ("index", "imgs", "FAll")
CAPTION_KEYS = ("caption", "tags", "YAll")
LABEL_KEYS = ("category", "LAll", "labels")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class RawSamples:
    """N samples ready for extraction.

    ``ids``: the image path as stored in the source (stable across machines; the cache
    keeps it). ``paths``: the files to open after the path rewrite. ``captions``: one or
    more captions per sample. ``labels``: (N, C) uint8 multi-hot. ``source``: a
    description of where all this came from (format, files, keys, rewrite).
    """

    ids: Tuple[str, ...]
    paths: Tuple[str, ...]
    captions: Tuple[Tuple[str, ...], ...]
    labels: np.ndarray
    label_names: Tuple[str, ...]
    source: Dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        """sha256 over ids, captions, labels and label names: what the cache's rows mean.

        Image folders and path rewrites are left out, so the same data read from a
        moved image folder resumes the same cache.
        """
        h = hashlib.sha256()
        for name in self.label_names:
            h.update(name.encode("utf-8") + b"\x00")
        h.update(b"\x01")
        for sid, caps in zip(self.ids, self.captions):
            h.update(sid.encode("utf-8") + b"\x00")
            for cap in caps:
                h.update(cap.encode("utf-8") + b"\x00")
            h.update(b"\x01")
        h.update(np.ascontiguousarray(self.labels, dtype=np.uint8).tobytes())
        h.update(str(self.labels.shape).encode())
        return h.hexdigest()

    def head(self, n: int) -> "RawSamples":
        """The first ``n`` samples (``--limit``, for trial runs)."""
        return replace(
            self, ids=self.ids[:n], paths=self.paths[:n], captions=self.captions[:n], labels=self.labels[:n],
            source={**self.source, "limit": n},
        )

    def check_images(self) -> None:
        """DataError naming the first missing image (and how many are missing)."""
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise DataError(
                f"{len(missing)} of {len(self.paths)} images not found, first: {missing[0]} (stored as "
                f"{self.ids[self.paths.index(missing[0])]!r}); point image_root at your image folder and, "
                "if the stored paths carry another machine's prefix, set strip_prefix (default with "
                "image_root: the stored paths' common folder)"
            )


# ---------------------------------------------------------------------- path rewrite
@dataclass(frozen=True)
class PathRewrite:
    """Maps stored image paths onto files: ``image_root / (stored path - strip_prefix)``.

    Without ``image_root`` a stored path is used as is (a relative one is taken relative
    to the annotation files' folder). With it, ``strip_prefix`` (default ``auto``: the
    folder all stored paths share) is cut off each stored path and the rest is joined to
    ``image_root``. Backslashes of Windows-made files are read as ``/``.
    """

    image_root: Optional[str] = None
    strip_prefix: Optional[str] = None

    def apply(self, stored: Sequence[str], base_dir: Path) -> Tuple[str, ...]:
        norm = [s.replace("\\", "/") for s in stored]
        if self.image_root is None:
            if self.strip_prefix not in (None, "auto"):
                raise UserError("strip_prefix needs image_root (the folder the rest of each path is joined to)")
            return tuple(s if os.path.isabs(s) else str(base_dir / s) for s in norm)
        root = Path(self.image_root).expanduser()
        if not root.is_dir():
            raise DataError(f"image_root {root}: folder not found")
        prefix = self.strip_prefix
        if prefix in (None, "auto"):
            prefix = common_folder(norm)
        else:
            prefix = prefix.replace("\\", "/")
            bad = next((s for s in norm if not s.startswith(prefix)), None)
            if bad is not None:
                raise DataError(f"strip_prefix {prefix!r}: the stored path {bad!r} does not start with it")
        return tuple(str(root / s[len(prefix):].lstrip("/")) for s in norm)


def common_folder(paths: Sequence[str]) -> str:
    """The longest folder prefix (ending in ``/``) all ``paths`` share; '' if none."""
    if not paths:
        return ""
    first = paths[0]
    cut = first.rfind("/") + 1
    prefix = first[:cut]
    for p in paths[1:]:
        while prefix and not p.startswith(prefix):
            prefix = prefix[: prefix[:-1].rfind("/") + 1]
        if not prefix:
            break
    return prefix


# ---------------------------------------------------------------------- .mat strings
def _decode_chars(codes: np.ndarray) -> str:
    return "".join(chr(int(c)) for c in codes.ravel() if int(c) != 0)


def _h5_strings(fh: h5py.File, node: h5py.Dataset) -> Union[str, List]:
    """A v7.3 char array (-> str or list of row strings) or cell (-> nested lists)."""
    cls = node.attrs.get("MATLAB_class", b"")
    cls = cls.decode() if isinstance(cls, bytes) else str(cls)
    if node.attrs.get("MATLAB_empty", 0):
        return "" if cls == "char" else []
    data = node[()]
    if cls == "char":
        rows = np.atleast_2d(data).T  # HDF5 holds MATLAB's (rows, chars) transposed
        texts = [_decode_chars(r) for r in rows]
        return texts[0] if len(texts) == 1 else texts
    if cls == "cell":
        refs = np.atleast_2d(data).T  # back to MATLAB (rows, cols)
        return [[_h5_strings(fh, fh[ref]) for ref in row] for row in refs]
    raise DataError(f"{fh.filename}: key '{node.name.lstrip('/')}' holds MATLAB class '{cls}', expected text (char or cell)")


def _np_strings(obj) -> Union[str, List]:
    """scipy.io.loadmat output (str arrays / object arrays) -> str or nested lists."""
    if isinstance(obj, (str, np.str_)):
        return str(obj)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    arr = np.asarray(obj)
    if arr.dtype.kind == "U":
        if arr.size == 0:
            return ""
        if arr.ndim <= 1 and arr.size == 1:
            return str(arr.reshape(-1)[0])
        return [[str(x) for x in row] for row in np.atleast_2d(arr)] if arr.ndim == 2 else [str(x) for x in arr.ravel()]
    if arr.dtype == object:
        return [[_np_strings(x) for x in row] for row in np.atleast_2d(arr)] if arr.ndim == 2 else [
            _np_strings(x) for x in arr.ravel()
        ]
    raise DataError(f"expected text, found a {arr.dtype} array")


def _flatten(value) -> List[str]:
    if isinstance(value, str):
        return [value]
    out: List[str] = []
    for v in value:
        out.extend(_flatten(v))
    return out


def _per_sample(value, n_expected: Optional[int]) -> List[List[str]]:
    """One list of strings per sample from a top-level char matrix or cell array."""
    if isinstance(value, str):
        return [[value]]
    rows = value
    if rows and isinstance(rows[0], list):
        r, c = len(rows), len(rows[0])
        if r == 1 or c == 1:
            items = [x for row in rows for x in row]
            return [_flatten(x) for x in items]
        if n_expected is not None and c == n_expected and r != n_expected:
            rows = [list(col) for col in zip(*rows)]  # a (k, N) cell: one column per sample
        return [_flatten(row) for row in rows]
    return [_flatten(x) for x in rows]  # a char matrix: one string a row


def _pick_key(path: Path, keys: Sequence[str]) -> str:
    present = mat_keys(path)
    for key in keys:
        if key in present:
            return key
    raise DataError(f"{path}: none of the keys {', '.join(keys)} found; keys present: {', '.join(present) or '(none)'}")


def read_mat_strings(path: PathLike, keys: Sequence[str], n_expected: Optional[int] = None) -> Tuple[str, List[List[str]]]:
    """(key used, one list of stripped strings per sample) from a ``.mat`` text variable.

    Handles padded char matrices (MATLAB pads rows with spaces) and cell arrays (of
    strings or of cells of strings), in v7.3 (HDF5) and older files.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected a .mat file with key {' / '.join(keys)})")
    key = _pick_key(path, keys)
    try:
        if mat_format(path) == "v7.3":
            with h5py.File(path, "r") as fh:
                value = _h5_strings(fh, fh[key])
        else:
            value = _np_strings(scipy.io.loadmat(str(path), variable_names=[key])[key])
    except DataError as exc:
        raise DataError(f"{path}: key '{key}': {exc}") from None
    except Exception as exc:
        raise DataError(f"{path}: key '{key}' cannot be read as text ({type(exc).__name__}: {exc})") from None
    samples = _per_sample(value, n_expected)
    return key, [[s.strip().replace("\n", " ") for s in caps] for caps in samples]


# ---------------------------------------------------------------------- the DCMHT / DSPH .mat layout
def read_seed004(
    folder: PathLike, rewrite: PathRewrite = PathRewrite(), label_names: Optional[str] = None
) -> RawSamples:
    """``index.mat`` + ``caption.mat`` | ``caption.txt`` + ``label.mat`` in ``folder``."""
    folder = Path(folder).expanduser()
    index_file, label_file = folder / "index.mat", folder / "label.mat"
    for f in (index_file, label_file):
        if not f.is_file():
            raise DataError(f"{f}: file not found; a folder in the DCMHT / DSPH .mat layout holds index.mat, caption.mat (or caption.txt) and label.mat")
    label_key = _pick_key(label_file, LABEL_KEYS)
    labels = read_mat_array(label_file, label_key)
    if labels.ndim != 2:
        raise DataError(f"{label_file}: key '{label_key}' has shape {labels.shape}, expected (N, C) multi-hot")
    if not np.isin(labels, (0, 1)).all():
        raise DataError(f"{label_file}: key '{label_key}' holds values other than 0 / 1, expected multi-hot labels")
    n = labels.shape[0]
    index_key, index = read_mat_strings(index_file, INDEX_KEYS, n)
    stored = [s[0] if s else "" for s in index]
    if any(len(s) != 1 for s in index):
        raise DataError(f"{index_file}: key '{index_key}' must hold one image path per sample")
    cap_mat, cap_txt = folder / "caption.mat", folder / "caption.txt"
    if cap_mat.is_file():
        cap_key, captions = read_mat_strings(cap_mat, CAPTION_KEYS, n)
        cap_source = f"{cap_mat.name}:{cap_key}"
        cap_file = cap_mat
    elif cap_txt.is_file():
        lines = cap_txt.read_text(encoding="utf-8", errors="replace").splitlines()
        if lines and lines[-1].strip() == "" and len(lines) == n + 1:
            lines = lines[:-1]
        captions = [[line.strip()] for line in lines]
        cap_source, cap_file = cap_txt.name, cap_txt
    else:
        raise DataError(f"{folder}: neither caption.mat nor caption.txt found (one caption entry per image)")
    for f, count in ((index_file, len(stored)), (cap_file, len(captions))):
        if count != n:
            raise DataError(f"sample counts differ: {label_file} has {n} rows, {f} has {count} entries")
    empty = [i for i, caps in enumerate(captions) if not caps]
    for i in empty:
        captions[i] = [""]  # an image without tags: encoded as the empty text, like the public code does
    names, how = resolve_label_names(label_names, labels.shape[1], str(label_file))
    return RawSamples(
        ids=tuple(stored),
        paths=rewrite.apply(stored, folder),
        captions=tuple(tuple(c) for c in captions),
        labels=np.ascontiguousarray(labels, dtype=np.uint8),
        label_names=names,
        source={
            "format": "seed004", "folder": str(folder), "index": f"{index_file.name}:{index_key}",
            "captions": cap_source, "labels": f"{label_file.name}:{label_key}",
            "mat_format": mat_format(label_file), "label_names": how,
            "image_root": rewrite.image_root, "strip_prefix": rewrite.strip_prefix,
            "images_without_captions": len(empty),
        },
    )


# ---------------------------------------------------------------------- JSONL / CSV folder
def _split_field(value) -> List:
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        return [v.strip() for v in value.split("|") if v.strip()]
    return [value]


def _records_jsonl(path: Path) -> List[Dict]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object with image, captions, labels")
            out.append({"_line": lineno, **rec})
    return out


def _records_csv(path: Path) -> List[Dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "image" not in reader.fieldnames:
            raise DataError(f"{path}: expected a header row with columns image, captions (or caption), labels")
        return [{"_line": i + 2, **row} for i, row in enumerate(reader)]


def annotation_file(source: PathLike) -> Path:
    """The ``.jsonl`` / ``.csv`` file of a folder source (or ``source`` itself)."""
    source = Path(source).expanduser()
    if source.is_file():
        if source.suffix.lower() not in (".jsonl", ".csv"):
            raise DataError(f"{source}: expected a .jsonl or .csv annotation file")
        return source
    if not source.is_dir():
        raise DataError(f"{source}: not found (expected a folder in the DCMHT / DSPH .mat layout, or a folder with a .jsonl / .csv file)")
    found = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jsonl", ".csv") and p.is_file())
    if not found:
        raise DataError(
            f"{source}: no index.mat (the DCMHT / DSPH .mat layout) and no .jsonl / .csv annotation file found"
        )
    if len(found) > 1:
        raise DataError(f"{source}: several annotation files ({', '.join(p.name for p in found)}); give one of them as the source")
    return found[0]


def read_folder(
    source: PathLike, rewrite: PathRewrite = PathRewrite(), label_names: Optional[str] = None
) -> RawSamples:
    """Images + a JSONL or CSV annotation file (see the module docstring)."""
    ann = annotation_file(source)
    records = _records_jsonl(ann) if ann.suffix.lower() == ".jsonl" else _records_csv(ann)
    if not records:
        raise DataError(f"{ann}: no samples")
    stored, captions, label_lists = [], [], []
    for rec in records:
        where = f"{ann}:{rec['_line']}"
        image = rec.get("image", rec.get("path"))
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{where}: 'image' must be the image path (relative to {ann.parent} or absolute)")
        caps = _split_field(rec.get("captions")) or _split_field(rec.get("caption"))
        if not caps or not all(isinstance(c, str) for c in caps):
            raise DataError(f"{where}: expected 'captions' (a list of strings) or 'caption' (a string)")
        stored.append(image.strip())
        captions.append(tuple(c.strip().replace("\n", " ") for c in caps))
        label_lists.append(_split_field(rec.get("labels")))

    names_file = ann.parent / "labels.txt"
    if label_names not in (None, "", "auto"):
        if label_names in LABEL_SETS:
            names, how = LABEL_SETS[label_names], f"preset {label_names}"
        else:
            names, how = read_label_file(label_names), f"file {Path(label_names).name}"
    elif names_file.is_file():
        names, how = read_label_file(names_file), "labels.txt"
    else:
        if any(isinstance(v, int) for lab in label_lists for v in lab):
            raise DataError(
                f"{ann}: labels given as column indices need a label list: add labels.txt beside it or give label_names"
            )
        names = tuple(sorted({str(v) for lab in label_lists for v in lab}))
        how = "sorted names found"
        if not names:
            raise DataError(f"{ann}: no labels found (each sample needs 'labels': a list of names)")
    col = {name: i for i, name in enumerate(names)}
    labels = np.zeros((len(records), len(names)), dtype=np.uint8)
    for i, (rec, lab) in enumerate(zip(records, label_lists)):
        for v in lab:
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise DataError(f"{ann}:{rec['_line']}: label {v!r} is neither a name nor a column index")
            if isinstance(v, int):
                if not 0 <= v < len(names):
                    raise DataError(f"{ann}:{rec['_line']}: label index {v} out of range (0..{len(names) - 1})")
                labels[i, v] = 1
            elif v in col:
                labels[i, col[v]] = 1
            else:
                raise DataError(f"{ann}:{rec['_line']}: unknown label {v!r} (label names from {how})")
    return RawSamples(
        ids=tuple(stored),
        paths=rewrite.apply(stored, ann.parent),
        captions=tuple(captions),
        labels=labels,
        label_names=tuple(names),
        source={
            "format": ann.suffix.lower().lstrip("."), "file": str(ann), "label_names": how,
            "image_root": rewrite.image_root, "strip_prefix": rewrite.strip_prefix,
        },
    )


def read_source(
    source: PathLike, rewrite: PathRewrite = PathRewrite(), label_names: Optional[str] = None
) -> RawSamples:
    """Detects the format: a folder with ``index.mat`` is the DCMHT / DSPH layout, else a JSONL / CSV source."""
    path = Path(source).expanduser()
    if path.is_dir() and (path / "index.mat").is_file():
        return read_seed004(path, rewrite, label_names)
    return read_folder(path, rewrite, label_names)
