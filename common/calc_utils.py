"""Retrieval metrics and continual figures: the public entry point (``common.calc_utils``).

The implementation lives in the ``common.metrics`` package (its docstring gives the
definitions); this module re-exports its public names so that every importer keeps one
stable path.
"""
from common.metrics import (
    MetricInputError,
    calc_map_k,
    calc_pr_curve,
    calc_precision_at_n,
    calc_topn_precision,
    continual_summary,
    hamming_distance,
)

__all__ = [
    "MetricInputError",
    "hamming_distance",
    "calc_map_k",
    "calc_precision_at_n",
    "calc_pr_curve",
    "calc_topn_precision",
    "continual_summary",
]
