"""Command line of the continual cross-modal hashing library.

``python main.py --config-file configs/CASH/demo.yaml`` trains and evaluates one config
(the ``train`` command, the default). Other commands: ``compare``, ``evaluate``,
``extract``, ``index``, ``search``, ``serve``, ``list``; ``python main.py COMMAND --help``
explains each. Importing this module fills
every registry and runs nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import dataset  # noqa: F401  (registers datasets)
import models  # noqa: F401  (registers models)
import runners  # noqa: F401  (registers runners, optimisers, schedules)
from common.register import DATASETS, MODELS, OPTIMIZERS, RUNNERS
from utils.errors import UserError



def default_output_dir(config_file: str | Path) -> Path:
    """``configs/CASH/demo.yaml`` -> ``outputs/CASH/demo``."""
    p = Path(config_file)
    return Path("outputs") / p.parent.name / p.stem


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-file", required=True, metavar="FILE",
                        help="YAML config with dataset / model / optimizer / [scheduler] / runner blocks, "
                             "e.g. configs/CASH/demo.yaml")
    parser.add_argument("--output-dir", metavar="DIR",
                        help="where config.yaml, train.log, tensorboard/, checkpoints/, codes.npz, results.json "
                             "and results.csv go (default: outputs/<METHOD>/<config name>)")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys, values parsed as YAML, e.g. --set runner.epochs=5 model.bits=32")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir after its last finished task (same config required); "
                             "the results equal those of an uninterrupted run")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines on the console")


def run_train(args: argparse.Namespace) -> int:
    from runners.experiment import format_results, run_config
    from utils.config import load_config

    config = load_config(args.config_file, args.overrides)
    if args.quiet:
        config["runner"]["progress"] = False
    out = Path(args.output_dir) if args.output_dir else default_output_dir(args.config_file)
    results = run_config(config, out, resume=args.resume, quiet=args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        print(format_results(results))
        print(f"\nresults: {out / 'results.json'}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    for title, reg in (("models", MODELS), ("datasets", DATASETS), ("runners", RUNNERS), ("optimizers and schedules", OPTIMIZERS)):
        print(f"{title}: {', '.join(reg.names())}")
    return 0


def _optional_command(module: str, add: str, run: str) -> Optional[tuple]:
    """(add_arguments, run) of a command implemented elsewhere, or None if absent."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None
        raise
    return getattr(mod, add), getattr(mod, run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="Continual cross-modal hashing: train, evaluate and compare hashing methods on "
                    "image/text features over a stream of tasks. Without a command, 'train' is assumed: "
                    "python main.py --config-file configs/CASH/demo.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="train and evaluate one config (the default command)",
                           description="Train and evaluate one config over its task stream; prints the result "
                                       "matrices and the continual summary.")
    add_train_arguments(train)
    train.set_defaults(func=run_train)
    commands: Dict[str, tuple] = {
        "compare": ("runners.compare", "add_compare_arguments", "run_compare",
                    "run several configs (or reuse finished runs) and write a side-by-side table and plots"),
        "evaluate": ("runners.evaluate_cli", "add_evaluate_arguments", "run_evaluate",
                     "re-score a finished run from its checkpoint and stored codes (mAP@K, tie-aware mAP, "
                     "precision@N, PR curve) without retraining"),
        "extract": ("dataset.extract_cli", "add_extract_arguments", "run_extract",
                    "extract CLIP image/text features from raw images and captions into a feature cache"),
        "index": ("runners.index_cli", "add_index_arguments", "run_index",
                  "export a run's stored database codes to FAISS binary indexes (flat, hash, multihash, ivf, hnsw)"),
        "search": ("runners.search_cli", "add_search_arguments", "run_search",
                   "encode image or text queries (one or a batch) with a run's hash model and list their nearest "
                   "stored items, optionally within one task"),
        "serve": ("runners.serve", "add_serve_arguments", "run_serve",
                  "serve a run's index over HTTP (JSON search API on FastAPI + uvicorn; pip install 'ccmh[serve]')"),
    }
    for name, (module, add, run, help_text) in commands.items():
        found = _optional_command(module, add, run)
        if found is None:
            continue
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        found[0](p)
        p.set_defaults(func=found[1])
    lst = sub.add_parser("list", help="list the registered models, datasets, runners and optimisers")
    lst.set_defaults(func=run_list)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "train")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last finished task is checkpointed; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
