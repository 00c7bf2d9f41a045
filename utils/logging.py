"""Run logs: one named logger per run, to the console and to ``<output>/train.log``."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

FORMAT = "%(asctime)s %(levelname)s %(message)s"


def run_logger(log_file: Optional[Path] = None, name: str = "ccmh", quiet: bool = False) -> logging.Logger:
    """A logger writing to stderr (unless ``quiet``) and to ``log_file``; handlers are
    replaced on every call, so two runs in one process never share a file."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    close_logger(logger)
    if not quiet:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(fh)
    return logger


def close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)
