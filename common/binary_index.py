"""Servable FAISS binary indexes over a run's stored database codes.

A run keeps every task's database codes with the length in force when the task ended
(``CodeStore``), so one run can hold codes of several lengths. FAISS binary indexes
need ``d`` (bits) to be a multiple of 8 and one ``d`` per index. The choices made here:

- One FAISS index ("shard") per distinct stored code length ``L``, holding every task
  stored with that length, in task order then database position.
- ``d = 8 * ceil(L / 8)``: the last byte of a code is padded with zero bits, in the
  stored codes *and* in the query, so the pad bits never add to a Hamming distance: the
  distance is the one over the ``L`` real bits.
- Bit layout inside the FAISS files: FAISS reads the bits of a byte least significant
  first (its hash tables take "the first b bits" that way), while ``CodeStore`` packs
  most significant first. The index therefore repacks codes LSB first
  (``np.packbits(..., bitorder="little")``) and packs queries the same way: a fixed
  permutation of bit positions, so every Hamming distance is unchanged, and the hash
  tables read the code's leading (most significant) bits first and its pad bits last,
  never a table of pad bits. Whoever queries a saved ``.index`` file directly must pack
  queries with ``pack_prefix``.
- A query (the model's current length, >= every stored length) is compared with a
  shard on its first ``L`` bits: the prefix truncation the evaluation uses
  (``runners.evaluation`` / ``common.calc_utils``). Codes keep the most significant
  bit first, so a prefix is meaningful.
- Each shard returns its top k; the lists are merged by distance (ties by task, then
  database position: the database order the evaluation uses), then cut to k.
- Hash / MultiHash indexes pad a short result list with id -1 and distance
  2147483647; those entries are dropped, so a query may get fewer than k results.

FAISS does not promise any order inside a group of equal distances, and the hashed
kinds are approximate: these indexes are for serving search. Reported mAP always comes
from ``common.calc_utils`` with its documented tie order. ``stable_ties=True`` (flat
only) re-reads the tie group at the k-th distance with a range search so the top k
equal the evaluation's stable ranking exactly.

An index folder holds ``manifest.json`` (kind, lengths, counts, modalities, the run it
came from and a fingerprint of the stored codes), one ``<modality>_<L>bits.index`` file
per modality and length, and ``ids.npz`` (per length: store task key, database
position and sample id of every item). Task numbers in the API and in ``ids.npz`` are
the ``CodeStore`` keys (0-based, as the runner stores them); the manifest and the CLI
print them 1-based, as results.json rows and ``--task`` count them.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

from common.code_store import MODALITIES, CodeStore
from utils.errors import DataError, ParameterError, UserError
from utils.io import atomic_write_bytes, atomic_write_json

KINDS = ("flat", "hash", "multihash", "ivf", "hnsw")
MISSING_ID = -1
MISSING_DISTANCE = 2147483647  # what Hash / MultiHash put in unfilled result slots
FORMAT = "continual-hashing-binary-index"
VERSION = 1
MANIFEST = "manifest.json"
ID_MAP = "ids.npz"
# Search-time parameters of each kind (everything else is fixed when the index is built).
SEARCH_PARAMS = {"flat": (), "hash": ("nflip",), "multihash": ("nflip",), "ivf": ("nprobe",), "hnsw": ("ef_search",)}
BUILD_PARAMS = {
    "flat": (), "hash": ("hash_bits", "nflip"), "multihash": ("hash_bits", "nhash", "nflip"),
    "ivf": ("nlist", "nprobe"), "hnsw": ("hnsw_m", "ef_search"),
}


def faiss_module():
    """The ``faiss`` module, imported on first use: only index, search and serve need it,
    and it comes with the optional ``index`` extra (``serve`` and ``dev`` include it)."""
    try:
        import faiss
    except ImportError:
        raise UserError("index, search and serve need FAISS, which is not installed: "
                        "pip install 'ccmh[index]' ('ccmh[serve]' for serve)") from None
    return faiss


def padded_bits(bits: int) -> int:
    """The FAISS dimension for ``bits``-bit codes: the next multiple of 8."""
    if bits < 1:
        raise ValueError(f"code length must be >= 1, got {bits}")
    return 8 * math.ceil(bits / 8)


def pack_prefix(codes: torch.Tensor | np.ndarray, bits: int) -> np.ndarray:
    """The first ``bits`` bits of {-1,+1} (or {0,1}) codes (N, B >= bits), packed in the
    index layout (LSB first, see the module doc) into (N, ceil(bits / 8)) uint8 with
    zero pad bits: a FAISS query."""
    arr = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"query codes must be (N, bits), got shape {arr.shape}")
    if arr.shape[1] < bits:
        raise UserError(
            f"the query code has {arr.shape[1]} bits but the index holds {bits}-bit codes; "
            f"a query must be at least as long as the codes it searches (its prefix is compared)"
        )
    return np.ascontiguousarray(np.packbits(arr[:, :bits] > 0, axis=1, bitorder="little"))


def index_layout(packed: np.ndarray, bits: int) -> np.ndarray:
    """``CodeStore`` packed codes (MSB first) -> the index layout (LSB first) with every
    pad bit zero, whatever the stored pad bits held."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim != 2 or packed.shape[1] != padded_bits(bits) // 8:
        raise DataError(f"packed codes of shape {packed.shape}; {bits}-bit codes need {padded_bits(bits) // 8} bytes per row")
    unpacked = np.unpackbits(packed, axis=1, count=bits)
    return np.ascontiguousarray(np.packbits(unpacked, axis=1, bitorder="little"))


def store_fingerprint(store: CodeStore) -> str:
    """A sha256 over every stored task's length, codes and ids: an index records it so
    a search can tell that the run changed after the index was built."""
    h = hashlib.sha256()
    for e in store.entries():
        h.update(f"task={e.task};bits={e.bits};n={len(e)};".encode())
        h.update(np.ascontiguousarray(e.image).tobytes())
        h.update(np.ascontiguousarray(e.text).tobytes())
        h.update("\x00".join(e.ids).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------- FAISS indexes
def default_params(kind: str, n: int, bits: int) -> Dict[str, int]:
    """Build / search parameters for ``n`` codes of ``bits`` real bits.

    hash: one table on the leading ``hash_bits`` ~ log2(n) bits (at most 24), probed
    within ``nflip`` = 2 bit flips. multihash (multi-index hashing): ``nhash`` >= 2
    disjoint tables of ``hash_bits`` ~ log2(n) bits tiling the real bits, ``nflip`` = 1:
    every item within Hamming distance nhash * (nflip + 1) - 1 of the query is found.
    ivf: nlist ~ sqrt(n) lists (>= 39 codes each), nprobe 8. hnsw: M 16, efSearch 64.
    """
    if kind not in KINDS:
        raise UserError(f"index kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    logn = max(1, math.ceil(math.log2(max(n, 2))))
    if kind == "flat":
        return {}
    if kind == "hash":
        return {"hash_bits": min(bits, 24, logn), "nflip": 2}
    if kind == "multihash":
        b = max(1, min(24, logn, bits // 2))  # at least two tables: otherwise it is a plain hash
        return {"hash_bits": b, "nhash": max(1, bits // b), "nflip": 1}
    if kind == "ivf":
        # sqrt(n) lists, but at least 39 codes per list (FAISS's k-means minimum).
        nlist = max(1, min(int(round(math.sqrt(n))), n // 39))
        return {"nlist": nlist, "nprobe": min(nlist, 8)}
    return {"hnsw_m": 16, "ef_search": 64}


def resolve_params(kind: str, n: int, bits: int, given: Optional[Dict[str, Any]] = None) -> Dict[str, int]:
    """``default_params`` overridden by the non-None entries of ``given``, checked and
    fitted to ``bits`` (a shard with shorter codes than the requested hash width hashes
    all its real bits; ``BinaryIndex.build`` refuses a width longer than every code)."""
    params = default_params(kind, n, bits)
    allowed = BUILD_PARAMS[kind]
    given = {k: v for k, v in (given or {}).items() if v is not None}
    for key, value in given.items():
        if key not in allowed:
            raise ParameterError(key, f": not a parameter of a {kind} index "
                                      f"(its parameters: {', '.join(allowed) or 'none'})")
        params[key] = int(value)
    for key, value in params.items():
        low = 0 if key == "nflip" else 1
        if value < low:
            raise ParameterError(key, f": must be >= {low}, got {value}")
    if kind in ("hash", "multihash"):
        params["hash_bits"] = min(params["hash_bits"], bits, 64)
        if kind == "multihash":
            if "nhash" in given and params["nhash"] * params["hash_bits"] > bits:
                raise ParameterError("nhash", f" {params['nhash']}: {params['nhash']} tables of {params['hash_bits']} "
                                     f"bits need {params['nhash'] * params['hash_bits']} bits; the stored codes have {bits}")
            if "nhash" not in given:
                params["nhash"] = max(1, bits // params["hash_bits"])  # tables tile the real bits
    if kind == "ivf":
        params["nlist"] = max(1, min(params["nlist"], n))
        params["nprobe"] = min(params["nprobe"], params["nlist"])
    return params


# FAISS ``index_binary_factory`` descriptions, filled from the build parameters.
FACTORY = {
    "flat": "BFlat", "hash": "BHash{hash_bits}", "multihash": "BHash{nhash}x{hash_bits}",
    "ivf": "BIVF{nlist}", "hnsw": "BHNSW{hnsw_m}",
}


def factory_string(kind: str, params: Dict[str, int]) -> str:
    """The ``faiss.index_binary_factory`` description of a ``kind`` index with ``params``."""
    if kind not in FACTORY:
        raise UserError(f"index kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    return FACTORY[kind].format(**params)


def build_faiss_index(kind: str, packed: np.ndarray, d: int, params: Dict[str, int]):
    """A FAISS binary index of ``kind`` over ``packed`` (N, d / 8) codes, made by
    ``index_binary_factory`` and trained if the kind needs it; ids are the row numbers
    0..N-1. Search-time parameters are not stored in it: they go with each search."""
    faiss = faiss_module()
    index = faiss.index_binary_factory(d, factory_string(kind, params))
    if not index.is_trained:
        # IVF: k-means on at most 256 codes per list (FAISS's sample), with a fixed seed
        # so the same codes give the same index.
        index.cp.seed = 1234
        index.train(packed)
    if packed.shape[0]:
        index.add(packed)
    return index


def check_search_params(kind: str, params: Optional[Dict[str, Any]]) -> Dict[str, int]:
    """The non-None search-time parameters of ``params``, refused when not one of
    ``kind``'s (``SEARCH_PARAMS``) or negative."""
    out: Dict[str, int] = {}
    for key, value in (params or {}).items():
        if value is None:
            continue
        if key not in SEARCH_PARAMS[kind]:
            raise UserError(f"{key} is not a search parameter of a {kind} index "
                            f"(its search parameters: {', '.join(SEARCH_PARAMS[kind]) or 'none'})")
        if int(value) < (0 if key == "nflip" else 1):
            raise UserError(f"{key} must be >= {0 if key == 'nflip' else 1}, got {value}")
        out[key] = int(value)
    return out


def _faiss_parameters(kind: str, params: Dict[str, int], sel):
    """A FAISS ``SearchParameters`` object for one call (None for the hash kinds, which
    FAISS gives no such object)."""
    faiss = faiss_module()
    makers = {
        "flat": lambda: faiss.SearchParameters(sel=sel) if sel is not None else None,
        "ivf": lambda: faiss.SearchParametersIVF(nprobe=params["nprobe"]),
        "hnsw": lambda: faiss.SearchParametersHNSW(efSearch=params["ef_search"], sel=sel),
        "hash": lambda: None,
        "multihash": lambda: None,
    }
    return makers[kind]()


# Kinds whose FAISS search honours an IDSelector; the others are searched deeper and
# filtered (see ``Shard.search``).
SELECTABLE = ("flat", "hnsw")


def serialized_bytes(index) -> bytes:
    return faiss_module().serialize_index_binary(index).tobytes()


# ---------------------------------------------------------------------- one modality
@dataclass
class Shard:
    """The codes of one length: a FAISS index and, per FAISS id, where the item is from
    (tasks in ascending order, each task's items contiguous)."""

    bits: int
    index: Any
    tasks: np.ndarray      # (n,) int64 CodeStore task keys
    positions: np.ndarray  # (n,) int64 row in that task's database
    ids: np.ndarray        # (n,) str sample ids (the database position when a task has none)
    params: Dict[str, int] = field(default_factory=dict)
    # FAISS hash indexes take nflip only as an attribute: a per-call value is set and
    # restored under this lock, so concurrent searches never see another call's value.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.tasks.shape[0])

    @property
    def d(self) -> int:
        return padded_bits(self.bits)

    def span(self, task: Optional[int]) -> tuple:
        """The FAISS id range [lo, hi) of store task key ``task`` (all ids for None)."""
        if task is None:
            return 0, len(self)
        return int(np.searchsorted(self.tasks, task, "left")), int(np.searchsorted(self.tasks, task, "right"))

    def search(self, kind: str, q: np.ndarray, k: int, params: Dict[str, int], lo: int, hi: int,
               stable_ties: bool) -> tuple:
        """(D, I) arrays (Q, k) of packed queries ``q`` over ids [lo, hi), local ids,
        -1 where nothing was found. Kinds without IDSelector support are searched
        deeper (doubling) until every query has k hits in range or the whole shard was
        read; ``stable_ties`` (flat) re-reads the tie group at the k-th distance."""
        whole = lo == 0 and hi == len(self)
        sel = None if whole or kind not in SELECTABLE else faiss_module().IDSelectorRange(lo, hi)
        values = {**self.params, **params}
        sp = _faiss_parameters(kind, values, sel)
        depth = k if whole or sel is not None else min(len(self), k * -(-len(self) // (hi - lo)))
        while True:
            D, I = self._faiss_search(kind, q, depth, values, sp)
            I = np.where(D == MISSING_DISTANCE, MISSING_ID, I).astype(np.int64)
            if not whole and sel is None:
                inside = (I >= lo) & (I < hi)
                order = np.argsort(~inside, axis=1, kind="stable")[:, :k]
                D = np.take_along_axis(np.where(inside, D, MISSING_DISTANCE), order, 1)
                I = np.take_along_axis(np.where(inside, I, MISSING_ID), order, 1)
                if depth < len(self) and np.any(I[:, -1] < 0):
                    depth = min(len(self), 2 * depth)
                    continue
            break
        D = D.astype(np.int64)
        if stable_ties:
            for i in range(q.shape[0]):
                if I[i, -1] >= 0:
                    D[i], I[i] = _stable_top(self.index, q[i : i + 1], int(D[i, -1]), k, sp)
        return D, I

    def _faiss_search(self, kind: str, q: np.ndarray, k: int, values: Dict[str, int], sp) -> tuple:
        return faiss_search(self.index, kind, q, k, values, sp=sp, lock=self.lock)


def faiss_search(index, kind: str, q: np.ndarray, k: int, params: Dict[str, int], sp=None,
                 lock: Optional[threading.Lock] = None) -> tuple:
    """(D, I) of one FAISS search of a ``kind`` index with this call's search-time
    ``params`` (``sp``: a ready FAISS ``SearchParameters``, else made from ``params``).
    The hash kinds have no FAISS parameter object: their nflip is set for the call and
    restored, under ``lock`` when the index is shared between threads."""
    if kind in ("hash", "multihash"):
        with lock or threading.Lock():
            before = index.nflip
            index.nflip = int(params.get("nflip", before))
            try:
                return index.search(q, k)
            finally:
                index.nflip = before
    return index.search(q, k, params=sp if sp is not None else _faiss_parameters(kind, params, None))


@dataclass
class Neighbours:
    """Top-k results of a batch of Q queries, best first, as (Q, k) arrays: Hamming
    distance (over ``bits``, the length of the stored code matched), store task key,
    database position, FAISS shard length and sample id; -1 (id "") where a query got
    fewer than k (``count`` per query)."""

    distance: np.ndarray
    task: np.ndarray
    position: np.ndarray
    bits: np.ndarray
    ids: np.ndarray
    count: np.ndarray

    def __len__(self) -> int:
        return int(self.distance.shape[0])

    def __getitem__(self, i: int) -> Hits:
        n = int(self.count[i])
        return Hits(self.distance[i, :n], self.task[i, :n], self.position[i, :n], self.bits[i, :n],
                    [str(x) for x in self.ids[i, :n]])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def rows(self, i: int) -> List[Dict[str, Any]]:
        """The hits of query ``i`` as plain dicts (task 1-based, as the CLI prints it)."""
        return [
            {"rank": r + 1, "distance": int(self.distance[i, r]), "bits": int(self.bits[i, r]),
             "task": int(self.task[i, r]) + 1, "position": int(self.position[i, r]), "id": str(self.ids[i, r])}
            for r in range(int(self.count[i]))
        ]


@dataclass(frozen=True)
class Hits:
    """A view of one query's row of ``Neighbours``: its ``len`` found hits, best first."""

    distance: np.ndarray
    task: np.ndarray
    position: np.ndarray
    bits: np.ndarray
    ids: List[str]

    def __len__(self) -> int:
        return int(self.distance.shape[0])


class BinaryIndex:
    """One modality's stored codes (image codes serve text queries and vice versa) as
    FAISS binary indexes, one shard per distinct code length (see the module doc)."""

    def __init__(self, modality: str, kind: str, shards: Sequence[Shard]) -> None:
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        self.modality = modality
        self.kind = kind
        self.shards = sorted(shards, key=lambda s: s.bits)

    @classmethod
    def build(
        cls, store: CodeStore, modality: str, kind: str = "flat", params: Optional[Dict[str, Any]] = None,
        tasks: Optional[Iterable[int]] = None,
    ) -> "BinaryIndex":
        """Index the ``modality`` codes of ``tasks`` (default: all) of ``store``;
        ``params`` overrides ``default_params`` (chosen per shard from its size)."""
        if kind not in KINDS:
            raise UserError(f"index kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        entries = store.entries(tasks)
        if not entries:
            raise DataError("the code store is empty: no finished task to index")
        longest = max(e.bits for e in entries)
        width = (params or {}).get("hash_bits")
        if kind in ("hash", "multihash") and width is not None and width > min(longest, 64):
            raise ParameterError("hash_bits", f" {width}: longer than the stored codes ({longest} bits at most; "
                                              f"give at most {min(longest, 64)})")
        shards = []
        for bits in sorted({e.bits for e in entries}):
            group = [e for e in entries if e.bits == bits]
            packed = np.concatenate([index_layout(getattr(e, modality), bits) for e in group])
            p = resolve_params(kind, packed.shape[0], bits, params)
            shards.append(Shard(
                bits=bits,
                index=build_faiss_index(kind, packed, padded_bits(bits), p),
                tasks=np.concatenate([np.full(len(e), e.task, dtype=np.int64) for e in group]),
                positions=np.concatenate([np.arange(len(e), dtype=np.int64) for e in group]),
                ids=np.array([i for e in group for i in (e.ids or [str(r) for r in range(len(e))])], dtype=str),
                params=p,
            ))
        return cls(modality, kind, shards)

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def lengths(self) -> List[int]:
        return [s.bits for s in self.shards]

    def task_sizes(self) -> Dict[int, Dict[str, int]]:
        """{store task key: {"bits": length, "count": items}} of every indexed task."""
        out: Dict[int, Dict[str, int]] = {}
        for shard in self.shards:
            keys, counts = np.unique(shard.tasks, return_counts=True)
            out.update({int(t): {"bits": shard.bits, "count": int(c)} for t, c in zip(keys, counts)})
        return dict(sorted(out.items()))

    def search(
        self, queries: torch.Tensor | np.ndarray, k: int, task: Optional[int] = None,
        params: Optional[Dict[str, Any]] = None, stable_ties: bool = False,
    ) -> Neighbours:
        """Top ``k`` stored items for each query code (Q, B) in {-1,+1}; B must be at
        least every stored length. ``task``: only that store task key's codes.
        ``params``: search-time parameters for this call (nflip / nprobe / ef_search;
        default: the index's own). ``stable_ties`` (flat only): equal distances in task
        / position order, exactly as the evaluation ranks them."""
        if k < 1:
            raise UserError(f"k must be >= 1, got {k}")
        if stable_ties and self.kind != "flat":
            raise UserError(f"stable tie order needs an exact (flat) index; this one is {self.kind}")
        values = check_search_params(self.kind, params)
        q_all = queries.detach().cpu().numpy() if isinstance(queries, torch.Tensor) else np.asarray(queries)
        if q_all.ndim == 1:
            q_all = q_all[None, :]
        if task is not None and task not in self.task_sizes():
            raise UserError(f"task {int(task) + 1} is not in the index (its tasks: "
                            f"{', '.join(str(t + 1) for t in self.task_sizes())})")
        parts = []
        for shard in self.shards:
            lo, hi = shard.span(task)
            if hi > lo:
                D, I = shard.search(self.kind, pack_prefix(q_all, shard.bits), min(k, hi - lo), values, lo, hi,
                                    stable_ties)
                parts.append((shard, D, I))
        return _merge(parts, k, q_all.shape[0])


def _merge(parts: List[tuple], k: int, nq: int) -> Neighbours:
    """The shards' hits merged per query by distance, then task, then position (the
    database order the evaluation uses), cut to k; all as arrays."""
    far = np.iinfo(np.int64).max
    cols = {name: [] for name in ("distance", "task", "position", "bits", "ids")}
    for shard, D, I in parts:
        found = I >= 0
        local = np.where(found, I, 0)
        cols["distance"].append(np.where(found, D, far))
        cols["task"].append(np.where(found, shard.tasks[local], -1))
        cols["position"].append(np.where(found, shard.positions[local], -1))
        cols["bits"].append(np.where(found, shard.bits, -1))
        cols["ids"].append(np.where(found, shard.ids[local], ""))
    if not parts:
        empty = np.full((nq, 0), -1, np.int64)
        return Neighbours(empty, empty, empty, empty, np.full((nq, 0), "", dtype=str), np.zeros(nq, np.int64))
    arrays = {name: np.concatenate(v, axis=1) for name, v in cols.items()}
    order = np.lexsort((arrays["position"], arrays["task"], arrays["distance"]), axis=-1)[:, :k]
    arrays = {name: np.take_along_axis(a, order, 1) for name, a in arrays.items()}
    count = (arrays["distance"] != far).sum(axis=1)
    arrays["distance"] = np.where(arrays["distance"] == far, -1, arrays["distance"])
    return Neighbours(count=count, **arrays)


def _stable_top(index, q: np.ndarray, kth: int, k: int, sp) -> tuple:
    """Exact top k of one query with ties in id (= task, position) order: every item
    at the k-th distance ``kth`` is fetched by a range search (radius is exclusive in
    FAISS), under the same id selector as the search."""
    lims, Dr, Ir = index.range_search(q, kth + 1, params=sp)
    dist = np.asarray(Dr[lims[0] : lims[1]]).astype(np.int64)
    local = np.asarray(Ir[lims[0] : lims[1]]).astype(np.int64)
    order = np.lexsort((local, dist))[:k]
    return dist[order], local[order]


# ---------------------------------------------------------------------- index folders
@dataclass
class IndexFolder:
    """A loaded index folder: its manifest and one ``BinaryIndex`` per stored modality."""

    path: Path
    manifest: Dict[str, Any]
    indexes: Dict[str, BinaryIndex]

    def for_query(self, query_modality: str) -> BinaryIndex:
        """The index a query of ``query_modality`` searches (the other modality's codes)."""
        if query_modality not in MODALITIES:
            raise ParameterError("query_modality", f": expected image or text, got {query_modality!r}")
        stored = "image" if query_modality == "text" else "text"
        if stored not in self.indexes:
            raise DataError(
                f"{self.path}: holds {', '.join(sorted(self.indexes))} codes only; a {query_modality} query needs "
                f"the {stored} codes (rebuild with --modalities image text)"
            )
        return self.indexes[stored]


def export_store(
    store: CodeStore, kind: str = "flat", params: Optional[Dict[str, Any]] = None,
    modalities: Sequence[str] = MODALITIES,
) -> Dict[str, BinaryIndex]:
    """One ``BinaryIndex`` per modality over every stored task."""
    return {m: BinaryIndex.build(store, m, kind, params) for m in modalities}


def _file_name(modality: str, bits: int) -> str:
    return f"{modality}_{bits}bits.index"


def save_index_folder(
    folder: str | Path, indexes: Dict[str, BinaryIndex], source: Optional[Dict[str, Any]] = None
) -> Dict[str, Any]:
    """Write ``indexes`` (same kind, same items) and their id map into ``folder``, each
    file atomically, the manifest last; returns the manifest. A folder that holds
    files but no manifest of ours is refused; a previous index there is replaced."""
    folder = Path(folder)
    if not indexes:
        raise ValueError("nothing to save: no index given")
    kinds = {ix.kind for ix in indexes.values()}
    if len(kinds) != 1:
        raise ValueError(f"indexes of one folder share a kind, got {sorted(kinds)}")
    first = next(iter(indexes.values()))
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder; pick another --output")
    if folder.is_dir() and any(folder.iterdir()):
        if not (folder / MANIFEST).is_file():
            raise UserError(f"{folder}: folder is not empty and holds no {MANIFEST}; pick another --output")
        for old in list(folder.glob("*.index")) + [folder / ID_MAP, folder / MANIFEST]:
            if old.exists():
                old.unlink()
    folder.mkdir(parents=True, exist_ok=True)

    id_arrays: Dict[str, np.ndarray] = {}
    for shard in first.shards:
        id_arrays[f"b{shard.bits}_task"] = shard.tasks
        id_arrays[f"b{shard.bits}_position"] = shard.positions
        id_arrays[f"b{shard.bits}_id"] = shard.ids
    buf = io.BytesIO()
    np.savez_compressed(buf, **id_arrays)
    atomic_write_bytes(folder / ID_MAP, buf.getvalue())

    modalities: Dict[str, Any] = {}
    for modality, ix in indexes.items():
        if ix.lengths() != first.lengths() or len(ix) != len(first):
            raise ValueError("the modalities' indexes must hold the same items")
        shards = []
        for shard in ix.shards:
            data = serialized_bytes(shard.index)
            atomic_write_bytes(folder / _file_name(modality, shard.bits), data)
            shards.append({
                "bits": shard.bits, "d": shard.d, "count": len(shard), "file": _file_name(modality, shard.bits),
                "bytes": len(data), "tasks": sorted(int(t) + 1 for t in np.unique(shard.tasks)),
                "factory": factory_string(ix.kind, shard.params), "params": dict(shard.params),
            })
        modalities[modality] = {"serves": "text" if modality == "image" else "image", "shards": shards}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "kind": first.kind,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "count": len(first),
        "lengths": first.lengths(),
        "modalities": modalities,
        "id_map": ID_MAP,
        "task_numbering": "1-based (task 1 = the first task, as in results.json and --task)",
        "padding": "d = 8 * ceil(bits / 8); pad bits are zero in stored and query codes, so distances are over the real bits",
        "bit_order": "codes packed least significant bit first (np.packbits(..., bitorder='little')) so FAISS hash "
                     "tables read the leading bits; pack queries with common.binary_index.pack_prefix",
        "source": source or {},
    }
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | Path) -> Dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise DataError(f"{folder}: no index there (expected {MANIFEST}); build one with 'python main.py index --run-dir RUN'")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable index manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not an index manifest of this library (format {FORMAT!r} expected)")
    if int(manifest.get("version", 0)) > VERSION:
        raise DataError(f"{path}: index format version {manifest.get('version')} is newer than this library reads ({VERSION})")
    return manifest


def load_index_folder(folder: str | Path, modalities: Optional[Sequence[str]] = None) -> IndexFolder:
    """Read an index folder written by ``save_index_folder`` (all its modalities, or
    only ``modalities``)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    faiss = faiss_module()
    try:
        with np.load(folder / manifest.get("id_map", ID_MAP), allow_pickle=False) as data:
            id_map = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder / ID_MAP}: cannot read the id map ({exc})") from None
    indexes: Dict[str, BinaryIndex] = {}
    for modality, spec in manifest["modalities"].items():
        if modalities is not None and modality not in modalities:
            continue
        shards = []
        for s in spec["shards"]:
            path = folder / s["file"]
            if not path.is_file():
                raise DataError(f"{path}: index file listed in {MANIFEST} is missing; rebuild the index")
            try:
                index = faiss.read_index_binary(str(path))
            except RuntimeError as exc:
                raise DataError(f"{path}: not a readable FAISS binary index ({str(exc).splitlines()[0][:120]})") from None
            b = int(s["bits"])
            try:
                tasks, positions, ids = id_map[f"b{b}_task"], id_map[f"b{b}_position"], id_map[f"b{b}_id"]
            except KeyError:
                raise DataError(f"{folder / ID_MAP}: no id map for the {b}-bit codes; rebuild the index") from None
            if index.ntotal != len(tasks) or index.d != padded_bits(b):
                raise DataError(f"{path}: holds {index.ntotal} codes of d={index.d}; the id map expects "
                                f"{len(tasks)} of d={padded_bits(b)}; rebuild the index")
            shards.append(Shard(b, index, tasks.astype(np.int64), positions.astype(np.int64), ids.astype(str),
                                {k: int(v) for k, v in s.get("params", {}).items()}))
        indexes[modality] = BinaryIndex(modality, manifest["kind"], shards)
    return IndexFolder(folder, manifest, indexes)
