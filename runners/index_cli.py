"""The ``index`` command: export a run's stored database codes to FAISS binary indexes
(one shard per stored code length, a manifest, an id map; ``common.binary_index``).

``python main.py index --run-dir RUN [--kind flat|hash|multihash|ivf|hnsw] [--output DIR]``
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, Optional

from common.binary_index import KINDS, export_store, save_index_folder, store_fingerprint
from common.code_store import MODALITIES
from runners.retrieval import DEFAULT_INDEX
from utils.errors import DataError, UserError


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, metavar="DIR",
                        help="a run directory written by 'python main.py train' (checkpoints/last.pt, codes.npz)")
    parser.add_argument("--kind", choices=KINDS, default="flat",
                        help="flat: exact exhaustive popcount (default); hash / multihash: hash tables on code "
                             "substrings, approximate, for large collections; ivf / hnsw: approximate, see "
                             "notes/index_search.md for measured speed and recall")
    parser.add_argument("--output", metavar="DIR",
                        help=f"index folder to write (default: RUN/{DEFAULT_INDEX}); a previous index there is replaced")
    parser.add_argument("--after-task", type=int, metavar="T",
                        help="index the codes stored up to task T (1-based) and search with the model after T "
                             "(default: the last finished task)")
    parser.add_argument("--modalities", nargs="+", action="extend", choices=MODALITIES,
                        help="which stored codes to index: image codes serve text queries, text codes serve image "
                             "queries (default: both)")
    g = parser.add_argument_group("index parameters (default: chosen from the number of codes; see the manifest)")
    g.add_argument("--hash-bits", type=int, metavar="B", help="hash / multihash: bits per hash table (default ~log2 N)")
    g.add_argument("--nhash", type=int, metavar="M", help="multihash: number of tables (default bits // B)")
    g.add_argument("--nflip", type=int, metavar="F",
                   help="hash / multihash: bit flips probed per table at search time (default 2 / 1)")
    g.add_argument("--nlist", type=int, metavar="N", help="ivf: number of inverted lists (default ~sqrt N)")
    g.add_argument("--nprobe", type=int, metavar="P", help="ivf: lists visited at search time (default 8)")
    g.add_argument("--hnsw-m", type=int, metavar="M", help="hnsw: neighbours per node (default 16)")
    g.add_argument("--ef-search", type=int, metavar="E", help="hnsw: search beam width (default 64)")


def _index_params(args: argparse.Namespace) -> Dict[str, Optional[int]]:
    return {k: getattr(args, k, None) for k in ("hash_bits", "nhash", "nflip", "nlist", "nprobe", "hnsw_m", "ef_search")}


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _load_run(run_dir: str | Path, after_task: Optional[int]):
    from runners.experiment import load_run

    root = Path(run_dir)
    if not root.is_dir():
        raise DataError(f"{root}: run directory not found (train one with 'python main.py --config-file FILE')")
    if after_task is not None and after_task < 1:
        raise UserError(f"--after-task: must be >= 1, got {after_task}")
    return load_run(root, task=after_task, device="cpu")


def run_index(args: argparse.Namespace) -> int:
    run = _load_run(args.run_dir, args.after_task)
    out = Path(args.output) if args.output else Path(args.run_dir) / DEFAULT_INDEX
    given = {k: v for k, v in _index_params(args).items() if v is not None}
    indexes = export_store(run.store, args.kind, given, modalities=list(dict.fromkeys(args.modalities or MODALITIES)))
    source = {
        "run_dir": str(Path(args.run_dir).resolve()),
        "after_task": run.task,
        "method": run.config["model"]["name"],
        "dataset": run.config["dataset"]["name"],
        "model_bits": int(run.model.bits),
        "store_fingerprint": store_fingerprint(run.store),
        "per_task": [{"task": e.task + 1, "bits": e.bits, "count": len(e)} for e in run.store.entries()],
    }
    manifest = save_index_folder(out, indexes, source)
    total = sum(s["bytes"] for m in manifest["modalities"].values() for s in m["shards"])
    first = next(iter(manifest["modalities"].values()))["shards"]
    print(f"wrote {out}: {manifest['kind']} index of {' + '.join(manifest['modalities'])} codes, "
          f"{manifest['count']:,} items after task {run.task} ("
          + ", ".join(f"{s['bits']} bits: {s['count']:,}" for s in first) + f"), {_human_bytes(total)}")
    for s in first:
        if s["params"]:
            print(f"  {s['bits']}-bit shard parameters: " + ", ".join(f"{k}={v}" for k, v in s["params"].items()))
    q = "text" if "image" in manifest["modalities"] else "image"
    print(f"search it: python main.py search --run-dir {args.run_dir}"
          + (f" --index {out}" if args.output else "")
          + f" --query-modality {q} --from-dataset --task 1 --row 0 --k 10")
    return 0
