"""What makes a result citable: the library version, its git commit (and whether the tree
had uncommitted changes), the versions of torch / numpy / CUDA, the device, the torch
thread count and the command line, recorded once per run in results.json."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def library_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("ccmh")
    except Exception:  # not installed (run from a checkout on PYTHONPATH)
        return None


def environment(device: Any) -> Dict[str, Any]:
    """The facts above as a JSON-able dict; git fields are None outside a git checkout."""
    import numpy
    import torch

    commit = _git("rev-parse", "HEAD") if (REPO / ".git").exists() else None
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None
    return {
        "library_version": library_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": str(numpy.__version__),
        "cuda": str(torch.version.cuda) if torch.cuda.is_available() else None,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
    }
