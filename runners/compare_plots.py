"""The figures of ``compare``: PNG files drawn on matplotlib's Agg canvas (no display,
no global backend switch), one colour and one marker per config in every figure.

* ``result_matrices.png``: every config's result matrix R (first seed), both directions,
  side by side on one colour scale, each panel titled with its metric and direction;
* ``map_over_tasks.png``: A_t, the mean mAP over the tasks seen after each task t, per
  config, mean +/- sample std over seeds as a band when several seeds ran;
* ``final_row.png``: mAP of every task after the last one (grouped bars);
* ``training_curves.png``: training loss and validation mAP per epoch along the stream,
  task boundaries marked, the kept epoch starred (first seed);
* ``pr_curve.png`` and ``precision_at_n.png``: precision / recall by Hamming radius
  and the top-N precision curve of all queries, task-agnostic, against every stored
  code after the last task (``RunResults.curves``; mean over seeds);
* ``code_length.png`` (with a bit-scalable run): mAP against code length.

The data behind each figure comes from functions here that tests check by number
(``task_average_curve``, ``mean_band``).
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from runners.results import RunResults
from runners.seed_stats import spread
from utils.io import atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    from runners.compare import ComparedConfig

DIRECTIONS = (("i2t", "image -> text"), ("t2i", "text -> image"))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p")
HEATMAP_COLUMNS = 4  # at most this many configs per row of result_matrices.png
# every file name compare may write here: a later comparison removes those it no longer writes
FIGURE_FILES = ("result_matrices.png", "map_over_tasks.png", "final_row.png", "training_curves.png",
                "pr_curve.png", "precision_at_n.png", "code_length.png")


# ====================================================================== figure data
def task_average_curve(results: RunResults, direction: str) -> List[Optional[float]]:
    """A_t for t = 1..(tasks finished): the mean of row t of R over the tasks seen."""
    return [results.row_average(direction, t) for t in range(results.completed_tasks)]


def mean_band(curves: Sequence[Sequence[Optional[float]]]) -> Tuple[List[Optional[float]], List[Optional[float]]]:
    """Point by point over seeds: the mean and the sample std (None with one value)."""
    n = max((len(c) for c in curves), default=0)
    spreads = [spread([c[i] if i < len(c) else None for c in curves]) for i in range(n)]
    return [s.mean for s in spreads], [s.std for s in spreads]


def metric_of(groups: Sequence["ComparedConfig"]) -> str:
    """The metric every run reports, or a warning when they differ."""
    metrics = sorted({str(g.first.metric) for g in groups})
    return metrics[0] if len(metrics) == 1 else "mAP (metric differs between runs)"


def task_label(results: RunResults, j: int, width: int = 16) -> str:
    """``task j+1`` with the task's name under it when it says more than its number
    (category-defined tasks, e.g. ``person, bicycle, car +13``), wrapped to ``width``."""
    import textwrap

    names = results.task_names or []
    name = str(names[j]) if j < len(names) else ""
    if not name or name in (f"task_{j + 1}", f"task {j + 1}", "all"):
        return f"task {j + 1}"
    return f"task {j + 1}\n" + "\n".join(textwrap.wrap(name, width)[:3])


def curves_of(group: "ComparedConfig") -> List[Dict[str, Any]]:
    """The retrieval curves of the group's runs that have them (one per seed)."""
    return [run.results.curves for run in group.runs if run.results.curves]


# ====================================================================== drawing
def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _direction_panels(height: float):
    """A figure with one panel per direction: (figure, [(axes, direction, title), ...])."""
    fig = _figure(10, height)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    return fig, [(ax, d, title) for ax, (d, title) in zip(axes, DIRECTIONS)]


def _mean_line(ax, xs: Sequence[float], mean: Sequence[Optional[float]], std: Sequence[Optional[float]],
               style: Dict[str, Any], label: str, markersize: float = 6) -> None:
    """The mean as a line, and a band of +/- std where there is one (several seeds)."""
    pts = [(x, m, s) for x, m, s in zip(xs, mean, std) if m is not None]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=style["color"], marker=style["marker"],
            markersize=markersize, label=label)
    band = [p for p in pts if p[2] is not None]
    if band:
        ax.fill_between([p[0] for p in band], [p[1] - p[2] for p in band], [p[1] + p[2] for p in band],
                        color=style["color"], alpha=0.18, linewidth=0)


def _matrix(results: RunResults, direction: str):
    import numpy as np

    M = np.full((results.completed_tasks, results.tasks), np.nan)
    for t in range(results.completed_tasks):
        for j, v in enumerate(results.row(direction, t)):
            if v is not None:
                M[t, j] = float(v)
    return M


def _legend_below(fig, groups: Sequence["ComparedConfig"], style: Dict[str, Dict[str, Any]]) -> None:
    """One legend for the whole figure, under the panels (never over the data)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=style[g.slug]["color"], marker=style[g.slug]["marker"], label=g.label)
               for g in groups]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(groups), 6), fontsize=8, frameon=False)


def result_matrices(out: Path, groups: Sequence["ComparedConfig"]) -> Optional[str]:
    """All configs' R matrices (first seed), i2t above t2i, side by side."""
    shown = [g for g in groups if g.first.completed_tasks]
    if not shown:
        return None
    blocks = math.ceil(len(shown) / HEATMAP_COLUMNS)
    cols = math.ceil(len(shown) / blocks)   # balanced rows: 6 configs = 2 x 3, not 4 + 2
    T = max(g.first.tasks for g in shown)
    panel = 0.55 * T + 1.0
    fig = _figure(panel * cols + 0.8, (panel + 0.35) * 2 * blocks)
    axes = fig.subplots(2 * blocks, cols, squeeze=False)
    image = None
    for k in range(blocks * cols):
        for r, (d, _) in enumerate(DIRECTIONS):
            ax = axes[2 * (k // cols) + r][k % cols]
            if k >= len(shown):
                ax.set_axis_off()
                continue
            g = shown[k]
            M = _matrix(g.first, d)
            image = ax.imshow(M, vmin=0.0, vmax=1.0, cmap="viridis")
            for t in range(M.shape[0]):
                for j in range(M.shape[1]):
                    if not math.isnan(M[t, j]):
                        ax.text(j, t, f"{M[t, j]:.2f}", ha="center", va="center", fontsize=7,
                                color="black" if M[t, j] > 0.6 else "white")
            ax.set_xticks(range(M.shape[1]), [str(j + 1) for j in range(M.shape[1])], fontsize=7)
            ax.set_yticks(range(M.shape[0]), [str(t + 1) for t in range(M.shape[0])], fontsize=7)
            ax.set_title(f"{g.label}\n{g.first.metric}, {d}", fontsize=8)
            if k % cols == 0:
                ax.set_ylabel("after training task", fontsize=7)
            ax.set_xlabel("task evaluated", fontsize=7)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="mAP")
    fig.suptitle("Result matrices R[t, j] (first seed): row = after task t, column = task j", fontsize=9)
    _save(fig, out / "result_matrices.png")
    return "result_matrices.png"


def map_over_tasks(out: Path, groups: Sequence["ComparedConfig"], style) -> Optional[str]:
    """A_t after each task, per config; mean +/- std band over seeds."""
    if not any(g.first.completed_tasks for g in groups):
        return None
    metric = metric_of(groups)
    fig, panels = _direction_panels(3.8)
    T = max(g.first.tasks for g in groups)
    for ax, d, title in panels:
        for g in groups:
            mean, std = mean_band([task_average_curve(run.results, d) for run in g.runs])
            _mean_line(ax, range(1, len(mean) + 1), mean, std, style[g.slug], g.label)
        ax.set_xticks(range(1, T + 1))
        ax.set_xlabel("tasks trained")
        ax.set_ylabel(f"A_t: mean {metric} over tasks 1..t")
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    seeds = max(len(g.runs) for g in groups)
    fig.suptitle("mAP over the tasks seen after each task" + (" (band: ± sample std over seeds)" if seeds > 1 else ""),
                 fontsize=9)
    _legend_below(fig, groups, style)
    _save(fig, out / "map_over_tasks.png")
    return "map_over_tasks.png"


def final_row(out: Path, groups: Sequence["ComparedConfig"], style) -> Optional[str]:
    """Grouped bars of R[T, j] (first seed), one panel per dataset and direction."""
    datasets: Dict[str, List["ComparedConfig"]] = {}
    for g in groups:
        if g.first.completed_tasks:
            datasets.setdefault(str(g.first.dataset), []).append(g)
    if not datasets:
        return None
    metric = metric_of(groups)
    fig = _figure(11, 3.0 * len(datasets) + 0.6)
    axes = fig.subplots(len(datasets), 2, squeeze=False)
    for row, (dataset, members) in enumerate(datasets.items()):
        for col, (d, title) in enumerate(DIRECTIONS):
            ax = axes[row][col]
            T = max(len(g.first.final_row(d)) for g in members)
            width = 0.8 / len(members)
            for k, g in enumerate(members):
                vals = [math.nan if v is None else v for v in g.first.final_row(d)]
                xs = [j + (k - (len(members) - 1) / 2) * width for j in range(len(vals))]
                ax.bar(xs, vals, width=width, color=style[g.slug]["color"], label=g.label)
            longest = max(members, key=lambda g: g.first.tasks).first
            ax.set_xticks(range(T), [task_label(longest, j) for j in range(T)], fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_ylabel(f"{metric} after the last task")
            ax.set_title(f"{dataset}: {title}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), fontsize=8, frameon=False)
    fig.suptitle("mAP of every task after the last task (first seed)", fontsize=9)
    _save(fig, out / "final_row.png")
    return "final_row.png"


def _training_segments(results: RunResults) -> List[Dict[str, Any]]:
    """Per task, (epoch along the stream, value) points of the training loss and the
    validation mAP, and the kept epoch's point; epochs count on from the previous task."""
    segments, start = [], 0
    for record in results.val:
        history = record.get("history") or []
        loss = [(start + int(h["epoch"]), float(h["loss"])) for h in history if "loss" in h]
        val = [(start + int(h["epoch"]), float(h["val_map"])) for h in history if h.get("val_map") is not None]
        best = record.get("best_epoch")
        kept = next(((x, y) for x, y in val if x == start + (best or 0)), None)
        segments.append({"start": start, "loss": loss, "val": val, "kept": kept})
        start += len(history)
    return segments


def training_curves(out: Path, groups: Sequence["ComparedConfig"], style) -> Optional[str]:
    """Per config (first seed): mean training loss per epoch and validation mAP along
    the stream; dotted lines between tasks; a star on each task's kept epoch."""
    if not groups:
        return None
    cols = min(len(groups), 3)
    rows = math.ceil(len(groups) / cols)
    fig = _figure(4.2 * cols, 3.0 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        if k >= len(groups):
            ax.set_axis_off()
            continue
        g = groups[k]
        r = g.first
        colour = style[g.slug]["color"]
        ax.set_title(f"{g.label} (seed {r.seed})", fontsize=9)
        segments = _training_segments(r)
        if not any(seg["loss"] for seg in segments):
            ax.text(0.5, 0.5, "no training epochs\n(closed form, or epochs: 0)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        from matplotlib.ticker import MaxNLocator

        twin = ax.twinx() if any(seg["val"] for seg in segments) else None
        for t, seg in enumerate(segments):   # one line per task: no line joins two tasks
            if t:
                ax.axvline(seg["start"] + 0.5, color="grey", linestyle=":", linewidth=0.8)
            ax.plot([p[0] for p in seg["loss"]], [p[1] for p in seg["loss"]], color=colour, linewidth=1.2)
            if twin is not None and seg["val"]:
                twin.plot([p[0] for p in seg["val"]], [p[1] for p in seg["val"]], color="black", linestyle="--",
                          linewidth=1.0, marker=".", markersize=3)
                if seg["kept"]:
                    twin.plot(*seg["kept"], linestyle="none", marker="*", markersize=9, color="black")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch along the stream (dotted: next task)", fontsize=8)
        ax.set_ylabel("training loss", color=colour, fontsize=8)
        ax.grid(alpha=0.3)
        if twin is not None:
            twin.set_ylabel(f"validation {r.metric} (dashed; *: kept)", fontsize=8)
    fig.suptitle("Training: loss (left axis) and validation mAP, val queries vs the task's train split (right)",
                 fontsize=9)
    _save(fig, out / "training_curves.png")
    return "training_curves.png"


def pr_curve(out: Path, groups: Sequence["ComparedConfig"], style) -> Optional[str]:
    """Precision against recall by Hamming radius (mean over seeds at each radius);
    radii that retrieve nothing relevant are left out."""
    shown = [g for g in groups if curves_of(g)]
    if not shown:
        return None
    fig, panels = _direction_panels(4.0)
    for ax, d, title in panels:
        for g in shown:
            curves = [c[d]["pr_curve"] for c in curves_of(g)]
            precision, _ = mean_band([c["precision"] for c in curves])
            recall, _ = mean_band([c["recall"] for c in curves])
            pts = [(rc, p) for rc, p in zip(recall, precision) if rc]
            _mean_line(ax, [p[0] for p in pts], [p[1] for p in pts], [None] * len(pts), style[g.slug], g.label, 4)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"{title}: one point per Hamming radius 0, 1, ...", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("Precision / recall by Hamming radius: all queries, task-agnostic, vs all stored codes after the "
                 "last task", fontsize=9)
    _legend_below(fig, shown, style)
    _save(fig, out / "pr_curve.png")
    return "pr_curve.png"


def precision_at_n(out: Path, groups: Sequence["ComparedConfig"], style) -> Optional[str]:
    """Top-N precision against N (log scale), mean +/- std over seeds."""
    shown = [g for g in groups if curves_of(g)]
    if not shown:
        return None
    fig, panels = _direction_panels(3.8)
    for ax, d, title in panels:
        for g in shown:
            curves = [c[d]["precision_at"] for c in curves_of(g)]
            ns = curves[0]["n"]
            mean, std = mean_band([c["precision"] for c in curves if c["n"] == ns])
            _mean_line(ax, ns, mean, std, style[g.slug], g.label, markersize=4)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("N (top-N retrieved)")
        ax.set_ylabel("precision@N")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
    seeds = max(len(g.runs) for g in shown)
    fig.suptitle("Precision of the top N: all queries, task-agnostic, vs all stored codes after the last task"
                 + (" (band: ± sample std over seeds)" if seeds > 1 else ""), fontsize=9)
    _legend_below(fig, shown, style)
    _save(fig, out / "precision_at_n.png")
    return "precision_at_n.png"


def code_length(out: Path, groups: Sequence["ComparedConfig"], style) -> Optional[str]:
    """Lines: one bit-scalable model's most significant bits; points: other runs at
    their own length, spread sideways when several share a length."""
    if not any(g.first.bit_scalable for g in groups):
        return None
    fig, panels = _direction_panels(3.8)
    points = [g for g in groups if not g.first.bit_scalable and g.first.bits and g.first.agnostic("i2t") is not None]
    pointed = {g.slug for g in points}
    at_length: Dict[int, List[str]] = {}
    for g in points:
        at_length.setdefault(int(g.first.bits[-1]), []).append(g.slug)
    for ax, d, title in panels:
        for g in groups:
            s = style[g.slug]
            if g.first.bit_scalable:
                pts = sorted((int(b), float(v[d])) for b, v in g.first.bit_scalable.items())
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=s["color"], marker=s["marker"], label=g.label)
            elif g.slug in pointed:
                bits = int(g.first.bits[-1])
                same = at_length[bits]
                shift = (same.index(g.slug) - (len(same) - 1) / 2) * 0.07  # in octaves: side by side, not stacked
                ax.scatter([bits * 2 ** shift], [g.first.agnostic(d)], color=s["color"], marker=s["marker"], s=45,
                           edgecolors="black", linewidths=0.5, label=g.label, zorder=3)
        ax.set_xscale("log", base=2)
        ticks = sorted({int(b) for g in groups for b in (g.first.bit_scalable or {})}
                       | {int(g.first.bits[-1]) for g in groups if g.first.bits})
        ax.set_xticks(ticks, [str(b) for b in ticks])
        ax.minorticks_off()
        ax.set_xlabel("code length (bits)")
        ax.set_ylabel(f"{metric_of(groups)}, all queries vs all codes")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("mAP versus code length (first seed; points at one length are spread sideways)", fontsize=9)
    _legend_below(fig, [g for g in groups if g.first.bit_scalable or g.slug in pointed], style)
    _save(fig, out / "code_length.png")
    return "code_length.png"


def write_plots(out: Path, groups: Sequence["ComparedConfig"]) -> Dict[str, str]:
    """Every figure that has data, written into ``out``; returns {kind: file name}."""
    style = {g.slug: {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)]} for i, g in enumerate(groups)}
    drawn = {
        "result_matrices": result_matrices(out, groups),
        "map_over_tasks": map_over_tasks(out, groups, style),
        "final_row": final_row(out, groups, style),
        "training_curves": training_curves(out, groups, style),
        "pr_curve": pr_curve(out, groups, style),
        "precision_at_n": precision_at_n(out, groups, style),
        "code_length": code_length(out, groups, style),
    }
    return {kind: name for kind, name in drawn.items() if name}
