"""Metric input checks: codes, labels, database segments and arguments, one line per error.

Arrays and tensors are checked where they live (no copy to NumPy), so a CUDA input is
refused or accepted without leaving its device.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import numpy as np

from utils.errors import DataError

TIES = ("index", "average")


class MetricInputError(DataError, ValueError):
    """Bad metric input (shape, value, argument); one line saying what was expected."""


def torch_module():
    """The torch module if it is already imported (no input can be a tensor otherwise)."""
    return sys.modules.get("torch")


def is_tensor(x: Any) -> bool:
    torch = torch_module()
    return torch is not None and isinstance(x, torch.Tensor)


def to_numpy(x: Any) -> np.ndarray:
    return x.cpu().numpy() if is_tensor(x) else np.asarray(x)


def _shape(x: Any) -> Tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def _as_array(name: str, x: Any) -> Any:
    """A tensor stays a tensor (detached; bfloat16, which NumPy lacks, becomes float32)."""
    if is_tensor(x):
        x = x.detach()
        return x.float() if x.dtype == torch_module().bfloat16 else x
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise MetricInputError(f"{name}: expected an array or tensor, got {type(x).__name__} ({exc})") from None


def _check_values(name: str, x: Any, allowed: Tuple[int, int], hint: str) -> None:
    """Raise unless every entry of ``x`` is one of ``allowed`` (works for arrays and tensors)."""
    a, b = allowed
    if x.dtype == np.bool_ or (is_tensor(x) and x.dtype == torch_module().bool):
        if (a, b) == (0, 1):
            return
        raise MetricInputError(f"{name}: boolean values; expected {{{a},{b}}} codes{hint}")
    ok = ((x == a) | (x == b)).all()
    if not bool(ok):
        bad = x[~((x == a) | (x == b))]
        sample = bad.flatten()[:3].tolist() if is_tensor(bad) else bad.ravel()[:3].tolist()
        raise MetricInputError(f"{name}: expected only {{{a},{b}}} values, found e.g. {sample}{hint}")


def check_codes(name: str, x: Any) -> Any:
    x = _as_array(name, x)
    if x.ndim != 2:
        raise MetricInputError(f"{name}: expected a 2-D (n, bits) array of {{-1,+1}} codes, got shape {_shape(x)}")
    if x.shape[1] < 1:
        raise MetricInputError(f"{name}: codes have 0 bits")
    _check_values(name, x, (-1, 1), " (map {0,1} codes with 2*b-1)")
    return x


def _check_labels(name: str, x: Any, rows: int, codes_name: str) -> Any:
    x = _as_array(name, x)
    if x.ndim != 2:
        raise MetricInputError(
            f"{name}: expected 2-D multi-hot labels (n, classes), got shape {_shape(x)}"
            + (" (one-hot encode class ids first)" if x.ndim == 1 else "")
        )
    if x.shape[0] != rows:
        raise MetricInputError(f"{name}: {x.shape[0]} label rows for {rows} rows of {codes_name}")
    _check_values(name, x, (0, 1), "")
    return x


@dataclass
class Inputs:
    """Validated inputs: query codes/labels and the database as segments (global order)."""

    qcodes: Any
    qlabels: Any
    segments: List[Tuple[Any, Any]]  # (codes (n_s, L_s), labels (n_s, C)) in database order

    @property
    def num_queries(self) -> int:
        return int(self.qcodes.shape[0])

    @property
    def bits(self) -> int:
        return int(self.qcodes.shape[1])

    @property
    def num_items(self) -> int:
        return sum(int(c.shape[0]) for c, _ in self.segments)

    def arrays(self) -> List[Any]:
        return [self.qcodes, self.qlabels] + [a for seg in self.segments for a in seg]


def prepare(query_codes: Any, db_codes: Any, query_labels: Any, db_labels: Any) -> Inputs:
    """Validate shapes and values; a single database array becomes one segment."""
    q = check_codes("query_codes", query_codes)
    ql = _check_labels("query_labels", query_labels, int(q.shape[0]), "query_codes")
    if q.shape[0] == 0:
        raise MetricInputError("query_codes: no queries (0 rows)")
    if isinstance(db_codes, (list, tuple)):
        if not isinstance(db_labels, (list, tuple)):
            raise MetricInputError(
                f"db_labels: db_codes is a list of {len(db_codes)} segments, so db_labels must be a list too"
            )
        if len(db_labels) != len(db_codes):
            raise MetricInputError(f"db_labels: {len(db_labels)} label arrays for {len(db_codes)} code segments")
        if len(db_codes) == 0:
            raise MetricInputError("db_codes: an empty list of segments")
        names = [f"db_codes[{s}]" for s in range(len(db_codes))]
        lnames = [f"db_labels[{s}]" for s in range(len(db_codes))]
        pairs = list(zip(db_codes, db_labels))
        single = False
    else:
        if isinstance(db_labels, (list, tuple)):
            raise MetricInputError("db_labels: a list of label arrays needs db_codes as a list of segments too")
        names, lnames, pairs, single = ["db_codes"], ["db_labels"], [(db_codes, db_labels)], True
    segments = []
    for name, lname, (c, lab) in zip(names, lnames, pairs):
        c = check_codes(name, c)
        lab = _check_labels(lname, lab, int(c.shape[0]), name)
        if single and c.shape[1] != q.shape[1]:
            raise MetricInputError(
                f"db_codes: {c.shape[1]} bits but query_codes has {q.shape[1]}; "
                "pass a list of segments for truncated matching"
            )
        if c.shape[1] > q.shape[1]:
            raise MetricInputError(
                f"{name}: {c.shape[1]}-bit codes are longer than the {q.shape[1]}-bit queries "
                "(a segment is matched on a prefix of the query)"
            )
        if lab.shape[1] != ql.shape[1]:
            raise MetricInputError(f"{lname}: {lab.shape[1]} label columns but query_labels has {ql.shape[1]}")
        segments.append((c, lab))
    if sum(int(c.shape[0]) for c, _ in segments) == 0:
        raise MetricInputError(f"{names[0] if single else 'db_codes'}: empty database (0 rows)")
    return Inputs(q, ql, segments)


def check_k(name: str, k: Any, allow_none: bool = True) -> Optional[int]:
    if k is None and allow_none:
        return None
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or int(k) < 1:
        raise MetricInputError(f"{name}: expected a positive integer{' or None' if allow_none else ''}, got {k!r}")
    return int(k)


def check_ns(ns: Any) -> List[int]:
    try:
        values = [ns] if isinstance(ns, (int, np.integer)) else list(ns)
    except TypeError:
        raise MetricInputError(f"ns: expected a list of positive integers, got {ns!r}") from None
    if not values:
        raise MetricInputError("ns: expected at least one N")
    return [check_k("ns", n, allow_none=False) for n in values]


def check_ties(ties: str) -> str:
    if ties not in TIES:
        raise MetricInputError(f"ties: expected one of {TIES}, got {ties!r}")
    return ties
