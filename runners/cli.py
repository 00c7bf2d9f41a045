"""Command line of the continual cross-modal hashing library: ``python main.py`` at the
repository root and the installed ``ccmh`` command both call ``main`` here.

``python main.py --config-file configs/CASH/demo.yaml`` trains and evaluates one config
(the ``train`` command, the default). Other commands: ``compare``, ``evaluate``,
``extract``, ``index``, ``search``, ``serve``, ``list``; ``python main.py COMMAND --help``
explains each. Importing this module fills every registry and runs nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import dataset  # noqa: F401  (registers datasets)
import models  # noqa: F401  (registers models)
import runners  # noqa: F401  (registers runners, optimisers, schedules)
from common.register import DATASETS, MODELS, OPTIMIZERS, RUNNERS, SCHEDULERS
from runners import compare, evaluate_cli, extract_cli, index_cli, search_cli, serve
from utils.errors import ParameterError, UserError


def default_output_dir(config_file: str | Path) -> Path:
    """``configs/CASH/demo.yaml`` -> ``outputs/CASH/demo``."""
    p = Path(config_file)
    return Path("outputs") / p.parent.name / p.stem


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors on one line (``main.py train: error: ...; see --help``)
    and exit code 2, as every other refusal of the command line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Once(argparse.Action):
    """A flag that may be given once: a second one is refused instead of silently winning."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            raise argparse.ArgumentError(self, "given twice; give it once" + (
                " with all values after it" if self.nargs not in (None, "?") else ""))
        setattr(namespace, self.dest, values)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-file", required=True, metavar="FILE", action=Once,
                        help="YAML config with dataset / model / optimizer / [scheduler] / runner blocks, "
                             "e.g. configs/CASH/demo.yaml")
    parser.add_argument("--output-dir", metavar="DIR", action=Once,
                        help="where config.yaml, train.log, tensorboard/, checkpoints/, codes.npz, results.json "
                             "and results.csv go (default: outputs/<METHOD>/<config name>); a folder holding a "
                             "run is only continued with --resume or replaced with --overwrite")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config keys, values parsed as YAML, e.g. --set runner.epochs=5 model.bits=32; "
                             "may be repeated (every --set applies, in order: a key given twice takes the later value)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir after its last finished task (same config required); "
                             "the results equal those of an uninterrupted run")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in --output-dir; the old run is kept until the new one has finished "
                             "and is restored if the new one fails")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines on the console")


def run_train(args: argparse.Namespace) -> int:
    from runners.config import read_config
    from runners.experiment import format_results, prepare

    if args.output_dir is not None and not args.output_dir.strip():
        raise UserError("--output-dir: empty; give a directory, or leave the flag out for the default "
                        f"({default_output_dir(args.config_file)})")
    quiet = ["runner.progress=false"] if args.quiet else []   # no progress bars either (display-only)
    experiment = prepare(read_config(args.config_file, [*args.overrides, *quiet]), source=str(args.config_file))
    out = Path(args.output_dir) if args.output_dir else default_output_dir(args.config_file)
    results = experiment.run(out, resume=args.resume, quiet=args.quiet, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        print(format_results(results))
        print(f"\nresults: {out / 'results.json'}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    for title, reg in (("models", MODELS), ("datasets", DATASETS), ("runners", RUNNERS), ("optimizers", OPTIMIZERS), ("schedulers", SCHEDULERS)):
        print(f"{title}: {', '.join(reg.names())}")
    return 0


def program_name() -> str:
    """``ccmh`` when the installed command runs, else ``main.py`` (what the user typed)."""
    return "ccmh" if Path(sys.argv[0]).stem == "ccmh" else "main.py"


def build_parser(prog: str = "main.py") -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=prog,
        description="Continual cross-modal hashing: train, evaluate and compare hashing methods on "
                    "image/text features over a stream of tasks. Without a command, 'train' is assumed: "
                    f"{'python ' if prog.endswith('.py') else ''}{prog} --config-file configs/CASH/demo.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="train and evaluate one config (the default command)",
                           description="Train and evaluate one config over its task stream; prints the result "
                                       "matrices and the continual summary.")
    add_train_arguments(train)
    train.set_defaults(func=run_train)
    commands = (
        ("compare", compare, "add_compare_arguments", "run_compare",
         "run several configs over one or more seeds (or reuse finished runs) and write tables of mean +/- std, "
         "paired differences and plots"),
        ("evaluate", evaluate_cli, "add_evaluate_arguments", "run_evaluate",
         "re-score a finished run from its checkpoint and stored codes (mAP@K, tie-aware mAP, "
         "precision@N, PR curve) without retraining"),
        ("extract", extract_cli, "add_extract_arguments", "run_extract",
         "extract CLIP image/text features from raw images and captions into a feature cache"),
        ("index", index_cli, "add_index_arguments", "run_index",
         "export a run's stored database codes to FAISS binary indexes (flat, hash, multihash, ivf, hnsw)"),
        ("search", search_cli, "add_search_arguments", "run_search",
         "encode image or text queries (one or a batch) with a run's hash model and list their nearest "
         "stored items, optionally within one task"),
        ("serve", serve, "add_serve_arguments", "run_serve",
         "serve a run's index over HTTP (JSON search API on FastAPI + uvicorn; pip install 'ccmh[serve]')"),
    )
    for name, module, add, run, help_text in commands:
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        getattr(module, add)(p)
        p.set_defaults(func=getattr(module, run))
    lst = sub.add_parser("list", help="list the registered models, datasets, runners and optimisers")
    lst.set_defaults(func=run_list)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command line (default: this process's arguments); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "train")
    parser = build_parser(program_name())
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:  # a library call's parameter is named by its flag here
        print(f"error: {exc.as_flag() if isinstance(exc, ParameterError) else exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if getattr(args, "overwrite", False):
            print("interrupted: the run it was to replace is restored", file=sys.stderr)
        else:
            print("interrupted: the last finished task is checkpointed; continue with --resume", file=sys.stderr)
        return 130
