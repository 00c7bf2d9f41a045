"""Reading numeric arrays out of MATLAB ``.mat`` files, both kinds, with one-line errors.

MATLAB v7.3 files are HDF5: h5py reads them, and because MATLAB stores arrays
column-major, an N x D MATLAB matrix appears as D x N; we swap the axes back (all
axes reversed, which for 2-D is the transpose). Older files (v4 - v7) go through
``scipy.io.loadmat``, which already returns the MATLAB shape (no transpose).
Sparse matrices are densified in both kinds. ``write_mat_array`` writes the v7.3 kind
(what the CASH / PBEH authors ship), so a generated stream can be handed to code that
reads only such files.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Union

import h5py
import numpy as np
import scipy.io
import scipy.sparse

from utils.errors import DataError

PathLike = Union[str, Path]


def mat_format(path: PathLike) -> str:
    """``"v7.3"`` for an HDF5-based file, ``"v5"`` otherwise (v4 - v7, read by scipy)."""
    return "v7.3" if h5py.is_hdf5(str(path)) else "v5"


def mat_keys(path: PathLike) -> List[str]:
    """The variable names stored in ``path`` (MATLAB's internal ``#refs#`` etc. left out)."""
    path = Path(path)
    try:
        if mat_format(path) == "v7.3":
            with h5py.File(path, "r") as fh:
                return sorted(k for k in fh.keys() if not k.startswith("#"))
        return sorted(name for name, _, _ in scipy.io.whosmat(str(path)))
    except Exception as exc:  # any parse failure: a corrupt or foreign file
        raise DataError(f"{path}: cannot read as a MATLAB .mat file ({_short(exc)})") from None


def read_mat_array(path: PathLike, key: str) -> np.ndarray:
    """The numeric array stored under ``key`` in ``path``, in MATLAB's orientation (N x D).

    Raises DataError (one line naming the file and key) when the file is missing, cannot
    be parsed, lacks the key, or holds something that is not a numeric array there.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected a .mat file holding key '{key}')")
    if mat_format(path) == "v7.3":
        return _read_hdf5(path, key)
    return _read_v5(path, key)


def _read_hdf5(path: Path, key: str) -> np.ndarray:
    try:
        fh = h5py.File(path, "r")
    except Exception as exc:
        raise DataError(f"{path}: cannot open as a MATLAB v7.3 (HDF5) file ({_short(exc)}); expected key '{key}'") from None
    with fh:
        if key not in fh:
            present = ", ".join(sorted(k for k in fh.keys() if not k.startswith("#"))) or "(none)"
            raise DataError(f"{path}: key '{key}' not found; keys present: {present}")
        node = fh[key]
        try:
            if isinstance(node, h5py.Group) and "MATLAB_sparse" in node.attrs:
                return _hdf5_sparse(node)
            if not isinstance(node, h5py.Dataset) or node.dtype.kind not in "biuf":
                kind = "a group" if isinstance(node, h5py.Group) else f"dtype {node.dtype}"
                raise DataError(f"{path}: key '{key}' is {kind}, expected a numeric matrix")
            arr = node[()]
        except DataError:
            raise
        except Exception as exc:  # truncated / damaged chunks
            raise DataError(f"{path}: key '{key}' cannot be read ({_short(exc)})") from None
    arr = np.asarray(arr)
    # MATLAB writes column-major: reverse the axes to get its (N, D) orientation back.
    return np.ascontiguousarray(arr.transpose()) if arr.ndim >= 2 else arr


def write_mat_array(path: PathLike, key: str, arr: np.ndarray) -> None:
    """Write the 2-D numeric ``arr`` (N x D) under ``key`` as a MATLAB v7.3 file: HDF5
    with MATLAB's 512-byte text header and the array stored column-major (D x N on disk),
    which both ``read_mat_array`` and h5py-based loaders that transpose read back as N x D."""
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.dtype.kind not in "biuf":
        raise ValueError(f"{key}: expected a 2-D numeric matrix, got shape {arr.shape} of {arr.dtype}")
    path = Path(path)
    with h5py.File(path, "w", userblock_size=512) as fh:
        node = fh.create_dataset(key, data=np.ascontiguousarray(arr.transpose()))
        # MATLAB's class names are numpy's for integers; floats are single / double.
        matlab_class = {"float32": "single", "float64": "double", "bool": "logical"}.get(arr.dtype.name, arr.dtype.name)
        node.attrs["MATLAB_class"] = np.bytes_(matlab_class)
    header = b"MATLAB 7.3 MAT-file, written by ccmh, HDF5 schema 1.00 ."
    with open(path, "r+b") as fh:
        fh.write(header.ljust(116))


def _hdf5_sparse(group: h5py.Group) -> np.ndarray:
    """A MATLAB v7.3 sparse matrix (CSC: data, ir, jc; attribute = number of rows)."""
    rows = int(np.asarray(group.attrs["MATLAB_sparse"]).item())
    jc = np.asarray(group["jc"][()], dtype=np.int64)
    ir = np.asarray(group["ir"][()], dtype=np.int64) if "ir" in group else np.zeros(0, np.int64)
    data = np.asarray(group["data"][()]) if "data" in group else np.zeros(0)
    cols = len(jc) - 1
    return scipy.sparse.csc_matrix((data, ir, jc), shape=(rows, cols)).toarray()


def _read_v5(path: Path, key: str) -> np.ndarray:
    try:
        content = scipy.io.loadmat(str(path), variable_names=[key])
    except Exception as exc:
        raise DataError(
            f"{path}: cannot read as a MATLAB .mat file (v7.3/HDF5 or v4-v7) ({_short(exc)}); expected key '{key}'"
        ) from None
    if key not in content:
        present = ", ".join(mat_keys(path)) or "(none)"
        raise DataError(f"{path}: key '{key}' not found; keys present: {present}")
    arr = content[key]
    if scipy.sparse.issparse(arr):
        arr = arr.toarray()
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path}: key '{key}' holds {arr.dtype} data, expected a numeric matrix")
    return arr


def _short(exc: BaseException) -> str:
    """An exception as one short line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
