"""Retrieval and continual metrics against brute-force references (exact rationals).

The references sort every query's database with a plain Python sort on
(distance, index) and apply the AP / precision formulas term by term in
``fractions.Fraction``, so they carry no rounding at all; the library must agree to
1e-12 (float64 rounding of the same sums).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import itertools
import math
import subprocess
import sys
import threading
import types
from fractions import Fraction

import numpy as np
import pytest
import torch

from common.calc_utils import (
    MetricInputError,
    calc_map_k,
    calc_pr_curve,
    calc_precision_at_n,
    calc_topn_precision,
    continual_summary,
    hamming_distance,
)
from common.metrics import cpu, dispatch, numba_engine
from common.metrics.queries import AveragePrecision, DistanceCounts, RelevantInTop
from common.metrics.validation import prepare
from utils.errors import DataError

TOL = 1e-12
# Both CPU engines are checked against the references: the numba kernel (what "auto"
# runs when numba is installed) and the NumPy fallback.
HAS_NUMBA = importlib.util.find_spec("numba") is not None
CPU_BACKENDS = ["numba", "numpy"] if HAS_NUMBA else ["numpy"]
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")


# ----------------------------------------------------------------------------- references
def _ref_rankings(qc, segments, ql):
    """Per query: list of (distance, global index, relevant) over the database, unsorted.

    ``segments`` is a list of (codes, labels); segment s is compared on the first L_s
    query bits, and the global index runs over the concatenation.
    """
    out = []
    for i in range(len(qc)):
        items, g = [], 0
        for codes, labels in segments:
            L = codes.shape[1]
            for c, lab in zip(codes, labels):
                dist = int(sum(1 for a, b in zip(qc[i][:L], c) if a != b))
                rel = bool(any(x and y for x, y in zip(ql[i], lab)))
                items.append((dist, g, rel))
                g += 1
        out.append(items)
    return out


def _ref_ap(rels, R=None):
    """AP of a ranked 0/1 list (Fraction): (1/R) sum over relevant ranks of P@rank."""
    total, hits = Fraction(0), 0
    for rank, rel in enumerate(rels, start=1):
        if rel:
            hits += 1
            total += Fraction(hits, rank)
    R = hits if R is None else R
    return total / R if R else Fraction(0)


def ref_map(qc, segments, ql, k=None):
    aps = []
    for items in _ref_rankings(qc, segments, ql):
        ranked = [rel for _, _, rel in sorted(items, key=lambda t: (t[0], t[1]))]
        aps.append(_ref_ap(ranked if k is None else ranked[:k]))
    return sum(aps) / len(aps), aps


def ref_precision(qc, segments, ql, n):
    vals = []
    for items in _ref_rankings(qc, segments, ql):
        ranked = [rel for _, _, rel in sorted(items, key=lambda t: (t[0], t[1]))]
        m = min(n, len(ranked))
        vals.append(Fraction(sum(ranked[:m]), m))
    return sum(vals) / len(vals)


def _tie_orders(items):
    """Every ranking that sorts by distance, with any order inside each tie group."""
    groups = [list(g) for _, g in itertools.groupby(sorted(items), key=lambda t: t[0])]
    for perms in itertools.product(*(itertools.permutations(g) for g in groups)):
        yield [rel for group in perms for _, _, rel in group]


def ref_average(qc, segments, ql, k=None, n=None):
    """Expected AP@k (or precision@n) over all tie orders, exactly, by enumeration."""
    vals = []
    for items in _ref_rankings(qc, segments, ql):
        orders = list(_tie_orders(items))
        if n is not None:
            m = min(n, len(items))
            vals.append(sum(Fraction(sum(o[:m]), m) for o in orders) / len(orders))
        else:
            vals.append(sum(_ref_ap(o if k is None else o[:k]) for o in orders) / len(orders))
    return sum(vals) / len(vals)


def _random_case(seed, Q=12, N=60, bits=8, classes=4, dup=True):
    """Small codes with many ties and duplicate queries/items; sparse multi-hot labels."""
    rng = np.random.default_rng(seed)
    qc = rng.choice([-1, 1], size=(Q, bits)).astype(np.int8)
    dc = rng.choice([-1, 1], size=(N, bits)).astype(np.int8)
    ql = (rng.random((Q, classes)) < 0.3).astype(np.int64)
    dl = (rng.random((N, classes)) < 0.3).astype(np.int64)
    if dup:
        dc[1::4] = dc[0]
        dc[2::5] = dc[3]
        qc[1] = qc[0]
        ql[1] = ql[0]
        qc[2] = dc[5]
        ql[3] = 0  # a query with no label: nothing is relevant
    return qc, dc, ql, dl


# ----------------------------------------------------------------------------- hand example
def _hand_case():
    # query 1111; item distances [1, 0, 2, 0, 1], relevant [1, 0, 1, 1, 0]
    qc = np.array([[1, 1, 1, 1]])
    dc = np.array([[1, 1, 1, -1], [1, 1, 1, 1], [1, 1, -1, -1], [1, 1, 1, 1], [-1, 1, 1, 1]])
    ql = np.array([[1, 0]])
    dl = np.array([[1, 0], [0, 1], [1, 1], [1, 0], [0, 1]])
    return qc, dc, ql, dl


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hand_computed_example(backend):
    qc, dc, ql, dl = _hand_case()
    kw = dict(backend=backend)
    assert hamming_distance(qc, dc).tolist() == [[1, 0, 2, 0, 1]]
    # stable order: items 1, 3, 0, 4, 2 -> relevance 0, 1, 1, 0, 1 -> relevant ranks 2, 3, 5
    assert calc_map_k(qc, dc, ql, dl, **kw) == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 3, abs=TOL)
    assert calc_map_k(qc, dc, ql, dl, k=2, **kw) == pytest.approx(1 / 2, abs=TOL)
    assert calc_map_k(qc, dc, ql, dl, k=3, **kw) == pytest.approx((1 / 2 + 2 / 3) / 2, abs=TOL)
    assert calc_map_k(qc, dc, ql, dl, k=1, **kw) == 0.0
    assert calc_precision_at_n(qc, dc, ql, dl, ns=[1, 2, 3, 5, 10], **kw) == pytest.approx(
        {1: 0.0, 2: 0.5, 3: 2 / 3, 5: 0.6, 10: 0.6}, abs=TOL
    )
    # tie-aware: group d=0 = {item1 (no), item3 (yes)}, d=1 = {item0 (yes), item4 (no)}, d=2 = {item2 (yes)}
    # orders of the two 2-groups: 4 equally likely rankings
    rankings = [[a, b, c, d, 1] for a, b in ((0, 1), (1, 0)) for c, d in ((1, 0), (0, 1))]
    expected = sum(float(_ref_ap(r)) for r in rankings) / 4
    assert calc_map_k(qc, dc, ql, dl, ties="average", **kw) == pytest.approx(expected, abs=TOL)
    pr = calc_pr_curve(qc, dc, ql, dl, **kw)
    assert pr["radius"].tolist() == [0, 1, 2, 3, 4]
    assert pr["retrieved"].tolist() == [2, 4, 5, 5, 5]
    assert pr["relevant_retrieved"].tolist() == [1, 2, 3, 3, 3]
    np.testing.assert_allclose(pr["precision"], [1 / 2, 2 / 4, 3 / 5, 3 / 5, 3 / 5])
    np.testing.assert_allclose(pr["recall"], [1 / 3, 2 / 3, 1, 1, 1])


# ----------------------------------------------------------------------------- brute force
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_map_all_and_at_k_equal_brute_force(seed, backend):
    qc, dc, ql, dl = _random_case(seed)
    for k in (None, 1, 3, 10, 59, 60, 500):
        exact, _ = ref_map(qc, [(dc, dl)], ql, k)
        assert abs(calc_map_k(qc, dc, ql, dl, k=k, backend=backend) - float(exact)) <= TOL, k


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_query_ap_equals_brute_force(backend):
    qc, dc, ql, dl = _random_case(7, Q=10)
    for k in (None, 7):
        _, aps = ref_map(qc, [(dc, dl)], ql, k)
        for i in range(len(qc)):
            got = calc_map_k(qc[i : i + 1], dc, ql[i : i + 1], dl, k=k, backend=backend)
            assert abs(got - float(aps[i])) <= TOL


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("seed", [0, 5])
def test_precision_at_n_and_topn_curve_equal_brute_force(seed, backend):
    qc, dc, ql, dl = _random_case(seed)
    ns = [1, 5, 17, 60, 100]
    got = calc_precision_at_n(qc, dc, ql, dl, ns=ns, backend=backend)
    assert list(got) == ns
    for n in ns:
        assert abs(got[n] - float(ref_precision(qc, [(dc, dl)], ql, n))) <= TOL
    curve = calc_topn_precision(qc, dc, ql, dl, ns=ns, backend=backend)
    assert curve["n"].tolist() == ns
    np.testing.assert_array_equal(curve["precision"], [got[n] for n in ns])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_multiword_codes_and_wide_labels(backend):
    """Codes over 64 bits (two words) and 80 classes (two label words: 64 + 16 bits)."""
    rng = np.random.default_rng(11)
    base = rng.choice([-1, 1], size=(6, 100))
    qc = base[rng.integers(0, 6, 9)] * np.where(rng.random((9, 100)) < 0.05, -1, 1)
    dc = base[rng.integers(0, 6, 40)] * np.where(rng.random((40, 100)) < 0.05, -1, 1)
    ql = (rng.random((9, 80)) < 0.04).astype(np.uint8)
    dl = (rng.random((40, 80)) < 0.04).astype(np.uint8)
    ql[:, 70] = rng.random(9) < 0.5  # relevance through the second label word only
    dl[:, 70] = rng.random(40) < 0.5
    exact, _ = ref_map(qc, [(dc, dl)], ql)
    assert abs(calc_map_k(qc, dc, ql, dl, backend=backend) - float(exact)) <= TOL
    exact5, _ = ref_map(qc, [(dc, dl)], ql, 5)
    assert abs(calc_map_k(qc, dc, ql, dl, k=5, backend=backend) - float(exact5)) <= TOL
    ref_d = [[int((a != b).sum()) for b in dc] for a in qc]
    assert hamming_distance(qc, dc).tolist() == ref_d


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_queries_without_relevant_items_count_as_zero(backend):
    qc, dc, ql, dl = _hand_case()
    kw = dict(backend=backend)
    qc2 = np.concatenate([qc, qc, qc, -qc])
    ql2 = np.array([[1, 0], [0, 0], [0, 0], [0, 0]])  # three queries with no label at all
    dl2 = dl.copy()
    assert calc_map_k(qc2, dc, ql2, dl2, **kw) == pytest.approx((53 / 90) / 4, abs=TOL)
    # k=1: the top item is not relevant, so R@1 = 0 and the query scores 0 (not NaN)
    assert calc_map_k(qc2, dc, ql2, dl2, k=1, **kw) == 0.0
    # no relevant item anywhere: 0.0, never NaN
    none = np.zeros_like(dl)
    for ties in ("index", "average"):
        for k in (None, 2):
            assert calc_map_k(qc, dc, ql, none, k=k, ties=ties, **kw) == 0.0
    assert calc_precision_at_n(qc, dc, ql, none, ns=[3], **kw) == {3: 0.0}
    pr = calc_pr_curve(qc, dc, ql, none, **kw)
    assert not np.isnan(pr["precision"]).any() and not np.isnan(pr["recall"]).any()
    assert pr["recall"].tolist() == [0.0] * 5


# ----------------------------------------------------------------------------- tie-aware
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_ties_equal_expectation_over_all_tie_orders(seed, backend):
    rng = np.random.default_rng(seed)
    qc = rng.choice([-1, 1], size=(3, 3))
    dc = rng.choice([-1, 1], size=(7, 3))
    ql = (rng.random((3, 2)) < 0.6).astype(int)
    dl = (rng.random((7, 2)) < 0.5).astype(int)
    ql[0] = 1
    for k in (None, 1, 2, 4, 6):
        exact = ref_average(qc, [(dc, dl)], ql, k=k)
        assert abs(calc_map_k(qc, dc, ql, dl, k=k, ties="average", backend=backend) - float(exact)) <= 1e-10, k
    got = calc_precision_at_n(qc, dc, ql, dl, ns=[1, 3, 7, 9], ties="average", backend=backend)
    for n in (1, 3, 7, 9):
        assert abs(got[n] - float(ref_average(qc, [(dc, dl)], ql, n=n))) <= 1e-10


def test_average_ties_without_ties_equal_index_order():
    """With one item per distance there is a single order: both tie rules agree."""
    rng = np.random.default_rng(3)
    dc = np.array([[1 if b < i else -1 for b in range(5)] for i in range(5)])  # distances 0..4 to q
    qc = -np.ones((1, 5), dtype=int)
    dl = (rng.random((5, 2)) < 0.5).astype(int)
    dl[2] = 1
    for k in (None, 2, 4):
        a = calc_map_k(qc, dc, np.array([[1, 1]]), dl, k=k, ties="average")
        assert abs(a - calc_map_k(qc, dc, np.array([[1, 1]]), dl, k=k)) <= 1e-12


# ----------------------------------------------------------------------------- segments
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_segments_equal_matching_on_explicit_prefixes(backend):
    kw = dict(backend=backend)
    rng = np.random.default_rng(4)
    qc = rng.choice([-1, 1], size=(8, 12)).astype(np.float32)
    lengths = [12, 6, 9, 1]
    segs = [
        (rng.choice([-1, 1], size=(n, L)), (rng.random((n, 3)) < 0.4).astype(int))
        for n, L in zip([15, 20, 9, 4], lengths)
    ]
    segs[1][0][3:6] = qc[0, :6]  # exact prefix matches of query 0
    ql = (rng.random((8, 3)) < 0.5).astype(int)
    codes, labels = [c for c, _ in segs], [lab for _, lab in segs]
    for k in (None, 5, 30):
        exact, _ = ref_map(qc, segs, ql, k)
        assert abs(calc_map_k(qc, codes, ql, labels, k=k, **kw) - float(exact)) <= TOL
    got = calc_precision_at_n(qc, codes, ql, labels, ns=[4, 40], **kw)
    for n in (4, 40):
        assert abs(got[n] - float(ref_precision(qc, segs, ql, n))) <= TOL
    # same length everywhere: identical to one array on the query prefix
    short = [(c[:, :6] if c.shape[1] >= 6 else None) for c in codes]
    cat = np.concatenate([s for s in short if s is not None])
    cat_l = np.concatenate([lab for s, lab in zip(short, labels) if s is not None])
    segs6 = [s for s in short if s is not None]
    labs6 = [lab for s, lab in zip(short, labels) if s is not None]
    assert calc_map_k(qc, segs6, ql, labs6, **kw) == pytest.approx(
        calc_map_k(qc[:, :6], cat, ql, cat_l, **kw), abs=TOL
    )
    pr = calc_pr_curve(qc, codes, ql, labels, **kw)
    assert pr["radius"].tolist() == list(range(13))
    assert pr["retrieved"][-1] == len(qc) * cat.shape[0] + len(qc) * 4  # every item by radius 12


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_segments_average_ties_equal_enumeration(backend):
    rng = np.random.default_rng(9)
    qc = rng.choice([-1, 1], size=(2, 4))
    segs = [(rng.choice([-1, 1], size=(3, 4)), (rng.random((3, 2)) < 0.5).astype(int)),
            (rng.choice([-1, 1], size=(4, 2)), (rng.random((4, 2)) < 0.5).astype(int))]
    ql = np.ones((2, 2), dtype=int)
    for k in (None, 3):
        exact = ref_average(qc, segs, ql, k=k)
        got = calc_map_k(qc, [c for c, _ in segs], ql, [lab for _, lab in segs], k=k, ties="average", backend=backend)
        assert abs(got - float(exact)) <= 1e-10


# ----------------------------------------------------------------------------- typed queries
def test_query_descriptions_validate_and_normalise():
    assert AveragePrecision(np.int64(5)).k == 5 and type(AveragePrecision(np.int64(5)).k) is int
    assert AveragePrecision() == AveragePrecision(None)
    for bad in (0, -1, True, 2.5, "3"):
        with pytest.raises(MetricInputError, match="k: expected a positive integer or None"):
            AveragePrecision(bad)
    assert AveragePrecision(None).cutoff(10) is None
    assert AveragePrecision(10).cutoff(10) is None and AveragePrecision(11).cutoff(10) is None
    assert AveragePrecision(9).cutoff(10) == 9
    q = RelevantInTop([10, np.int64(3)])
    assert q.ns == (10, 3) and q == RelevantInTop((10, 3)) and hash(q) == hash(RelevantInTop((10, 3)))
    assert RelevantInTop(7).ns == (7,)
    for bad, msg in (([], "at least one N"), ([5, 0], "positive integer"), (None, "list of positive")):
        with pytest.raises(MetricInputError, match=msg):
            RelevantInTop(bad)
    assert DistanceCounts() == DistanceCounts()
    with pytest.raises(dataclasses.FrozenInstanceError):
        AveragePrecision(3).k = 4


ALL_BACKENDS = CPU_BACKENDS + ["torch"]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_per_query_results_equal_brute_force(backend):
    """dispatch.per_query, per query and on segments: AP@k, top-n counts and distance
    counts from every engine equal the exact references (duplicate queries included)."""
    qc, dc, ql, dl = _random_case(11, Q=9, N=40, bits=12)
    segs = [(dc[:25], dl[:25]), (dc[25:, :7], dl[25:])]
    inp = prepare(qc, [c for c, _ in segs], ql, [lab for _, lab in segs])
    rankings = [sorted(items, key=lambda t: (t[0], t[1])) for items in _ref_rankings(qc, segs, ql)]
    for k in (None, 1, 6, 40, 99):
        got = dispatch.per_query(inp, AveragePrecision(k), backend, None, None)
        _, aps = ref_map(qc, segs, ql, k)
        assert got.shape == (9,) and got.dtype == np.float64
        np.testing.assert_allclose(got, [float(a) for a in aps], rtol=0, atol=TOL)
    ns = (30, 1, 7, 500)
    got = dispatch.per_query(inp, RelevantInTop(ns), backend, 2, None)
    assert got.shape == (9, len(ns)) and got.dtype == np.float64
    assert got.tolist() == [[sum(rel for _, _, rel in r[:n]) for n in ns] for r in rankings]
    hist = dispatch.per_query(inp, DistanceCounts(), backend, None, None)
    assert hist.shape == (9, 2, 13) and hist.dtype == np.int64
    expected = np.zeros((9, 2, 13), dtype=np.int64)
    for i, r in enumerate(rankings):
        for dist, _, rel in r:
            expected[i, int(rel), dist] += 1
    np.testing.assert_array_equal(hist, expected)
    with pytest.raises(TypeError, match="query: expected AveragePrecision"):
        dispatch.per_query(inp, "topn", backend, None, None)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: {**a, "query_codes": a["query_codes"][0]}, "query_codes: expected a 2-D"),
        (lambda a: {**a, "db_codes": (a["db_codes"] > 0).astype(int)}, r"\{-1,1\}"),
        (lambda a: {**a, "db_codes": a["db_codes"] > 0}, "boolean"),
        (lambda a: {**a, "db_codes": a["db_codes"][:, :3]}, "pass a list of segments"),
        (lambda a: {**a, "db_labels": a["db_labels"][:3]}, "3 label rows for 5 rows"),
        (lambda a: {**a, "db_labels": a["db_labels"][:, :1]}, "label columns"),
        (lambda a: {**a, "db_labels": a["db_labels"] * 2}, r"\{0,1\}"),
        (lambda a: {**a, "query_labels": np.array([0])}, "one-hot"),
        (
            lambda a: {**a, "db_codes": [a["db_codes"], np.ones((2, 6))], "db_labels": [a["db_labels"], np.ones((2, 2))]},
            "longer than",
        ),
        (lambda a: {**a, "db_codes": [a["db_codes"]]}, "must be a list too"),
        (lambda a: {**a, "db_codes": [a["db_codes"]], "db_labels": [a["db_labels"]] * 2}, "2 label arrays for 1"),
        (lambda a: {**a, "db_codes": [], "db_labels": []}, "empty list"),
        (lambda a: {**a, "query_codes": a["query_codes"][:0], "query_labels": a["query_labels"][:0]}, "no queries"),
        (lambda a: {**a, "db_codes": a["db_codes"][:0], "db_labels": a["db_labels"][:0]}, "empty database"),
        (lambda a: {**a, "k": 0}, "k: expected a positive integer"),
        (lambda a: {**a, "k": True}, "k: expected"),
        (lambda a: {**a, "k": 2.5}, "k: expected"),
        (lambda a: {**a, "ties": "random"}, "ties: expected one of"),
        (lambda a: {**a, "chunk_size": 0}, "chunk_size"),
        (lambda a: {**a, "backend": "jax"}, "backend"),
        (lambda a: {**a, "query_codes": np.full((1, 4), np.nan)}, r"\{-1,1\}"),
    ],
)
def test_bad_input_is_refused_with_one_line(mutate, match):
    qc, dc, ql, dl = _hand_case()
    args = mutate(dict(query_codes=qc, db_codes=dc, query_labels=ql, db_labels=dl))
    with pytest.raises(MetricInputError, match=match) as info:
        calc_map_k(**args)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, DataError)


def test_bad_ns_and_hamming_shapes_are_refused():
    qc, dc, ql, dl = _hand_case()
    for ns in ([], [0], ["a"], None, [3, -1]):
        with pytest.raises(MetricInputError, match="ns"):
            calc_precision_at_n(qc, dc, ql, dl, ns=ns)
    with pytest.raises(MetricInputError, match="bits"):
        hamming_distance(qc, dc[:, :2])


# ----------------------------------------------------------------------------- backends
def test_torch_and_numpy_inputs_agree():
    qc, dc, ql, dl = _random_case(6, Q=15, N=70)
    expected = {
        "all": calc_map_k(qc, dc, ql, dl),
        "k": calc_map_k(qc, dc, ql, dl, k=9),
        "avg": calc_map_k(qc, dc, ql, dl, k=9, ties="average"),
        "p": calc_precision_at_n(qc, dc, ql, dl, ns=[5, 20]),
        "pr": calc_pr_curve(qc, dc, ql, dl)["precision"],
    }
    tq, td = torch.from_numpy(qc).float(), torch.from_numpy(dc).to(torch.int64)
    tql, tdl = torch.from_numpy(ql).bool(), torch.from_numpy(dl).float()
    for backend in ("auto", "torch"):
        for chunk in (None, 4):
            kw = dict(backend=backend, chunk_size=chunk)
            assert calc_map_k(tq, td, tql, tdl, **kw) == pytest.approx(expected["all"], abs=TOL)
            assert calc_map_k(tq, dc, tql, dl, k=9, **kw) == pytest.approx(expected["k"], abs=TOL)
            assert calc_map_k(tq, td, tql, tdl, k=9, ties="average", **kw) == pytest.approx(expected["avg"], abs=TOL)
            assert calc_precision_at_n(tq, td, tql, tdl, ns=[5, 20], **kw) == pytest.approx(expected["p"], abs=TOL)
            np.testing.assert_allclose(calc_pr_curve(tq, td, tql, tdl, **kw)["precision"], expected["pr"], atol=TOL)
    d = hamming_distance(tq, td)
    assert isinstance(d, torch.Tensor) and d.dtype == torch.int64
    assert d.tolist() == hamming_distance(qc, dc).tolist()


def test_torch_backend_segments_equal_numpy():
    rng = np.random.default_rng(12)
    qc = rng.choice([-1, 1], size=(6, 70))
    codes = [rng.choice([-1, 1], size=(11, 70)), rng.choice([-1, 1], size=(7, 33))]
    labels = [(rng.random((11, 3)) < 0.5).astype(int), (rng.random((7, 3)) < 0.5).astype(int)]
    ql = (rng.random((6, 3)) < 0.5).astype(int)
    for k in (None, 4):
        a = calc_map_k(qc, codes, ql, labels, k=k)
        b = calc_map_k(torch.from_numpy(qc), [torch.from_numpy(c) for c in codes], ql, labels, k=k, backend="torch")
        assert a == pytest.approx(b, abs=TOL)


def test_numpy1_popcount_fallback(monkeypatch):
    x = np.random.default_rng(0).integers(0, 2**63, size=(5, 7), dtype=np.uint64) * np.uint64(3)
    np.testing.assert_array_equal(cpu.popcount_lut(x), np.bitwise_count(x))
    qc, dc, ql, dl = _random_case(2, bits=70)
    expected = calc_map_k(qc, dc, ql, dl, backend="numpy")
    monkeypatch.setattr(cpu, "bitcount", cpu.popcount_lut)
    assert calc_map_k(qc, dc, ql, dl, backend="numpy") == expected
    assert hamming_distance(qc, dc).tolist() == [[int((a != b).sum()) for b in dc] for a in qc]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deterministic_across_threads_and_blocks(backend, monkeypatch):
    """Bit-identical results for 1, 2, 3 threads and any block size (threads really used:
    the small-input threshold is lifted)."""
    monkeypatch.setattr(cpu, "THREADS_MIN_PAIRS", 0)
    qc, dc, ql, dl = _random_case(8, Q=40, N=300, bits=16, classes=6)
    for k in (None, 25):
        kw = dict(k=k, backend=backend)
        ref = calc_map_k(qc, dc, ql, dl, num_threads=1, **kw)
        for threads, chunk in ((2, None), (3, 1), (2, 7), (1, 3)):
            assert calc_map_k(qc, dc, ql, dl, num_threads=threads, chunk_size=chunk, **kw) == ref
        assert calc_map_k(qc, dc, ql, dl, **kw) == ref
    p1 = calc_precision_at_n(qc, dc, ql, dl, ns=[10, 50], num_threads=1, backend=backend)
    assert calc_precision_at_n(qc, dc, ql, dl, ns=[10, 50], num_threads=2, chunk_size=3, backend=backend) == p1
    h1 = calc_pr_curve(qc, dc, ql, dl, num_threads=1, backend=backend)["relevant_retrieved"]
    h2 = calc_pr_curve(qc, dc, ql, dl, num_threads=2, backend=backend)["relevant_retrieved"]
    np.testing.assert_array_equal(h2, h1)


def test_structured_codes_beat_random_codes():
    """Codes that follow the labels rank relevant items first; random codes do not."""
    rng = np.random.default_rng(0)
    proto = rng.choice([-1, 1], size=(4, 32))
    qy, dy = rng.integers(0, 4, 30), rng.integers(0, 4, 400)
    ql, dl = np.eye(4, dtype=int)[qy], np.eye(4, dtype=int)[dy]
    flip = lambda n: np.where(rng.random((n, 32)) < 0.1, -1, 1)  # noqa: E731
    good = calc_map_k(proto[qy] * flip(30), proto[dy] * flip(400), ql, dl)
    rand = calc_map_k(rng.choice([-1, 1], (30, 32)), rng.choice([-1, 1], (400, 32)), ql, dl)
    assert good > 0.9 and rand < 0.4


# ----------------------------------------------------------------------------- numba engine
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_wide_codes_and_mixed_segments_equal_brute_force(backend):
    """130-bit queries (3 words; 16-bit keys in the kernel) against segments of 130, 70, 64
    and 5 bits: prefix masks inside the first, second and third word."""
    rng = np.random.default_rng(21)
    base = rng.choice([-1, 1], size=(4, 130))
    qc = base[rng.integers(0, 4, 7)] * np.where(rng.random((7, 130)) < 0.1, -1, 1)
    segs = []
    for n, L in ((9, 130), (8, 70), (6, 64), (5, 5)):
        codes = base[rng.integers(0, 4, n), :L] * np.where(rng.random((n, L)) < 0.1, -1, 1)
        segs.append((codes, (rng.random((n, 5)) < 0.4).astype(np.uint8)))
    segs[3][0][:2] = qc[0, :5]  # distance-0 ties in the shortest segment
    ql = (rng.random((7, 5)) < 0.5).astype(np.uint8)
    codes, labels = [c for c, _ in segs], [lab for _, lab in segs]
    for k in (None, 1, 4, 13, 28):
        exact, _ = ref_map(qc, segs, ql, k)
        assert abs(calc_map_k(qc, codes, ql, labels, k=k, backend=backend) - float(exact)) <= TOL, k
    got = calc_precision_at_n(qc, codes, ql, labels, ns=[3, 11, 50], backend=backend)
    for n in (3, 11, 50):
        assert abs(got[n] - float(ref_precision(qc, segs, ql, n))) <= TOL
    exact_avg = ref_average(qc[:2], [(c[:3], lab[:3]) for c, lab in segs], ql[:2], k=4)
    got_avg = calc_map_k(qc[:2], [c[:3] for c in codes], ql[:2], [lab[:3] for lab in labels], k=4,
                         ties="average", backend=backend)
    assert abs(got_avg - float(exact_avg)) <= 1e-10


def _structured_case(seed, Q, N, bits=64, classes=80):
    """Codes that cluster by label set (like trained hash codes): big tie groups."""
    rng = np.random.default_rng(seed)
    freq = np.clip(0.5 / np.arange(1, classes + 1) ** 0.9, 0.004, 0.5)
    proto = rng.standard_normal((classes, bits))

    def make(n):
        lab = rng.random((n, classes)) < freq
        codes = np.where(lab @ proto + rng.standard_normal((n, bits)) * 1.5 >= 0, 1, -1).astype(np.int8)
        return codes, lab.astype(np.uint8)

    (qc, ql), (dc, dl) = make(Q), make(N)
    ql[:3] = 0  # queries with no label
    return qc, dc, ql, dl


@needs_numba
def test_numba_equals_numpy_on_structured_data():
    """Over 1024 relevant items per query (several summation blocks), many ties, 80 labels."""
    qc, dc, ql, dl = _structured_case(1, Q=40, N=6000)
    kw_n, kw_p = dict(backend="numba"), dict(backend="numpy")
    for k in (None, 1, 100, 5999, 6000):
        a = calc_map_k(qc, dc, ql, dl, k=k, **kw_n)
        assert a == pytest.approx(calc_map_k(qc, dc, ql, dl, k=k, **kw_p), abs=TOL, rel=0), k
    for k in (None, 100):
        a = calc_map_k(qc, dc, ql, dl, k=k, ties="average", **kw_n)
        assert a == pytest.approx(calc_map_k(qc, dc, ql, dl, k=k, ties="average", **kw_p), abs=TOL, rel=0)
    ns = [1000, 1, 10, 7000]
    assert calc_precision_at_n(qc, dc, ql, dl, ns=ns, **kw_n) == pytest.approx(
        calc_precision_at_n(qc, dc, ql, dl, ns=ns, **kw_p), abs=TOL, rel=0)
    pr_n, pr_p = calc_pr_curve(qc, dc, ql, dl, **kw_n), calc_pr_curve(qc, dc, ql, dl, **kw_p)
    for key in ("retrieved", "relevant_retrieved", "relevant"):
        np.testing.assert_array_equal(pr_n[key], pr_p[key])


def test_auto_falls_back_to_numpy_without_numba(monkeypatch):
    qc, dc, ql, dl = _random_case(3)
    exact, _ = ref_map(qc, [(dc, dl)], ql)
    exact5, _ = ref_map(qc, [(dc, dl)], ql, 5)

    def numba_path(*args, **kwargs):
        raise AssertionError("the numba path ran")

    monkeypatch.setattr(numba_engine, "run", numba_path)
    monkeypatch.setattr(dispatch, "USE_NUMBA", False)  # the availability flag
    assert abs(calc_map_k(qc, dc, ql, dl) - float(exact)) <= TOL
    monkeypatch.setattr(dispatch, "USE_NUMBA", True)
    monkeypatch.setattr(numba_engine, "engine", lambda: None)  # numba not importable
    assert abs(calc_map_k(qc, dc, ql, dl, k=5) - float(exact5)) <= TOL
    with pytest.raises(MetricInputError, match="numba is not installed"):
        calc_map_k(qc, dc, ql, dl, backend="numba")


@needs_numba
def test_auto_runs_numba_and_restores_its_settings(monkeypatch):
    """auto -> numba on CPU; numba's thread count is restored after the call (a request
    above numba's pool size is capped), and each key width compiles once per process."""
    import numba

    calls = []
    real = numba_engine.run
    monkeypatch.setattr(numba_engine, "run", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    monkeypatch.setattr(cpu, "THREADS_MIN_PAIRS", 0)
    qc, dc, ql, dl = _random_case(4, Q=20, N=100)
    before = numba.get_num_threads()
    ref = calc_map_k(qc, dc, ql, dl, num_threads=1)
    assert calc_map_k(qc, dc, ql, dl, num_threads=64) == ref
    assert calc_map_k(torch.from_numpy(qc), dc, torch.from_numpy(ql), dl) == ref
    calc_precision_at_n(qc, dc, ql, dl, ns=[5])
    calc_pr_curve(qc, dc, ql, dl)
    assert numba.get_num_threads() == before
    assert calls == [AveragePrecision()] * 3 + [RelevantInTop((5,)), DistanceCounts()]
    signatures = numba_engine.engine().kernel.signatures
    assert len(signatures) == len({sig[6] for sig in signatures})  # one per key dtype


def test_kernel_logic_as_plain_python_equals_brute_force(monkeypatch):
    """The numba kernel's source run uncompiled (range for prange, no numba needed):
    checks its logic wherever numba is missing, on segments, k, ns and histograms."""
    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(NUMBA_NUM_THREADS=1), get_num_threads=lambda: 1,
        set_num_threads=lambda n: None, parallel_chunksize=lambda n: contextlib.nullcontext(),
    )
    monkeypatch.setattr(numba_engine, "engine",
                        lambda: numba_engine.Engine(fake, numba_engine.rank_kernel, threading.Lock()))
    rng = np.random.default_rng(13)
    qc = rng.choice([-1, 1], size=(5, 70))
    segs = [(rng.choice([-1, 1], size=(14, 70)), (rng.random((14, 3)) < 0.4).astype(int)),
            (rng.choice([-1, 1], size=(9, 6)), (rng.random((9, 3)) < 0.4).astype(int))]
    segs[1][0][:4] = qc[1, :6]
    ql = (rng.random((5, 3)) < 0.5).astype(int)
    codes, labels = [c for c, _ in segs], [lab for _, lab in segs]
    with np.errstate(over="ignore"):  # the SWAR popcount multiplies modulo 2**64
        for k in (None, 1, 6):
            exact, _ = ref_map(qc, segs, ql, k)
            assert abs(calc_map_k(qc, codes, ql, labels, k=k, backend="numba") - float(exact)) <= TOL
        got = calc_precision_at_n(qc, codes, ql, labels, ns=[2, 30], backend="numba")
        pr = calc_pr_curve(qc, codes, ql, labels, backend="numba")
    for n in (2, 30):
        assert abs(got[n] - float(ref_precision(qc, segs, ql, n))) <= TOL
    ref_pr = calc_pr_curve(qc, codes, ql, labels, backend="numpy")
    for key in ("retrieved", "relevant_retrieved", "relevant"):
        np.testing.assert_array_equal(pr[key], ref_pr[key])


def test_importing_the_module_does_not_import_numba():
    code = "import sys, common.calc_utils; print('numba' in sys.modules, 'torch' in sys.modules)"
    root = __file__.rsplit("/tests/", 1)[0]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.split() == ["False", "False"]


# ----------------------------------------------------------------------------- continual
def test_continual_summary_hand_computed():
    R = [[0.8, 0.3, 0.2], [0.7, 0.9, 0.35], [0.6, 0.8, 0.85]]
    out = continual_summary(R, untrained=[0.1, 0.2, 0.25])
    assert out["per_step_average"] == pytest.approx([0.8, 0.8, 0.75])
    assert out["acc"] == pytest.approx(0.75)
    assert out["avg_incremental"] == pytest.approx((0.8 + 0.8 + 0.75) / 3)
    assert out["bwt"] == pytest.approx(((0.6 - 0.8) + (0.8 - 0.9)) / 2)
    assert out["forgetting"] == pytest.approx(((0.8 - 0.6) + (0.9 - 0.8)) / 2)
    assert out["forgetting_per_task"] == pytest.approx([0.2, 0.1])
    assert out["fwt"] == pytest.approx(((0.3 - 0.2) + (0.35 - 0.25)) / 2)
    den = out["denominators"]
    assert (den["acc"], den["avg_incremental"], den["bwt"], den["forgetting"], den["fwt"]) == (3, 3, 2, 2, 2)
    # the runner's matrix: nothing above the diagonal, so no FWT
    lower = [[0.8, None, None], [0.7, 0.9, None], [0.6, 0.8, 0.85]]
    out2 = continual_summary(lower)
    assert out2["fwt"] is None and out2["bwt"] == pytest.approx(out["bwt"])
    with pytest.raises(MetricInputError, match=r"R\[0\]\[1\]: missing; FWT"):
        continual_summary(lower, untrained=[0.1, 0.2, 0.25])
    # forgetting takes the best earlier score, not the one right after the task
    out3 = continual_summary([[0.5], [0.9, 0.4], [0.7, 0.6, 0.3]])
    assert out3["forgetting_per_task"] == pytest.approx([0.9 - 0.7, 0.4 - 0.6])


def test_continual_summary_single_task_and_bad_matrices():
    out = continual_summary([[0.42]], untrained=[0.1])
    assert out["acc"] == 0.42 and out["per_step_average"] == [0.42]
    assert out["bwt"] is None and out["forgetting"] is None and out["fwt"] is None
    assert out["denominators"]["bwt"] is None
    with pytest.raises(MetricInputError, match=r"R\[1\]\[1\]: missing"):
        continual_summary([[0.5, None], [0.4, None]])
    with pytest.raises(MetricInputError, match=r"R\[1\]\[0\]: missing"):
        continual_summary([[0.5], [float("nan"), 0.3]])
    with pytest.raises(MetricInputError, match=r"R\[1\]: 1 entries"):
        continual_summary([[0.5], [0.4]])
    with pytest.raises(MetricInputError, match="empty"):
        continual_summary([])
    with pytest.raises(MetricInputError, match="untrained: 2 scores for 3"):
        continual_summary([[1.0], [1.0, 1.0], [1.0, 1.0, 1.0]], untrained=[0, 0])
    assert math.isclose(continual_summary([[1.0], [0.5, 1.0]])["bwt"], -0.5)


def test_numba_kernel_leaves_torch_thread_count_alone():
    """numba's OpenMP layer shares the OpenMP runtime with torch; a metric call must not
    change the thread count torch trains with (it changed float sums of later runs)."""
    pytest.importorskip("numba")
    torch.set_num_threads(1)
    q = torch.randint(0, 2, (40, 16)) * 2 - 1
    labels = torch.eye(4)[torch.arange(40) % 4]
    calc_map_k(q, q, labels, labels, backend="numba", num_threads=2)
    assert torch.get_num_threads() == 1
