"""Who may write a run directory, and what a new run may do to the run already there.

One writer at a time: ``.lock`` holds an exclusive ``fcntl`` lock and says who holds
it (pid, host, command); the kernel drops the lock when its process dies, so the lock
of a dead process is simply taken over. A finished run is never destroyed unless the
user asks (``overwrite``), and then only once the new run has finished: the old
run's files are moved aside into ``.previous/`` and moved back when the new run fails,
or on the next start when it was killed. Stale temporaries of an interrupted atomic
write are removed on start.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Literal, Optional

from utils.errors import OutputError, UserError

LOCK = ".lock"
ASIDE = ".previous"  # the finished run an --overwrite run replaces, until it has finished
ASIDE_PARTIAL = ".previous.partial"  # being filled: moving it back is always safe
# Everything a run writes (runners.outputs); nothing else in the directory is touched.
RUN_FILES = ("results.json", "results.csv", "codes.npz", "config.yaml", "train.log", "checkpoints", "tensorboard")
# The files whose presence means there is a run to resume or to keep.
RUN_STATE = ("results.json", "codes.npz", "checkpoints")

Status = Literal["empty", "unfinished", "finished"]


def run_status(root: Path) -> Status:
    """``finished`` when results.json says so (it is written after the last checkpoint,
    so this one fact means the whole run is on disk), ``unfinished`` when any result or
    checkpoint is there, else ``empty`` (at most the log and config of a run that
    failed before its first checkpoint)."""
    results = root / "results.json"
    if results.is_file() and (root / "checkpoints" / "last.pt").is_file():
        try:
            if json.loads(results.read_text(encoding="utf-8")).get("status") == "finished":
                return "finished"
        except (OSError, ValueError, AttributeError):
            pass
    return "unfinished" if any((root / name).exists() for name in RUN_STATE) else "empty"


def check_new_run(root: Path, resume: bool, overwrite: bool, locked: bool = False) -> Status:
    """Refuse a run that would replace a run in ``root`` it was not told to replace, or
    that another process is writing (unless the caller holds the lock: ``locked``)."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite: give one (continue the run, or replace it)")
    if root.exists() and not root.is_dir():
        raise OutputError(f"{root}: is a file, not a directory; give --output-dir a directory")
    if not locked:
        refuse_if_locked(root)
    if any((root / name).is_dir() for name in (ASIDE, ASIDE_PARTIAL)):
        return "unfinished"  # an interrupted --overwrite run: decided again after recover(), under the lock
    status = run_status(root) if root.is_dir() else "empty"
    if resume or overwrite or status == "empty":
        return status
    if status == "finished":
        raise OutputError(f"{root}: holds a finished run; use --overwrite to replace it (it is kept until the "
                          "new run has finished) or another --output-dir")
    raise OutputError(f"{root}: holds an unfinished run; continue it with --resume or replace it with --overwrite")


def _in_use(root: Path, fd: int) -> OutputError:
    return OutputError(f"{root}: in use by another run ({_holder(fd)}); wait for it to end or use another --output-dir")


def refuse_if_locked(root: Path) -> None:
    """An OutputError naming the holder when another process holds the lock of ``root``
    (a probe: creates nothing, keeps nothing)."""
    try:
        fd = os.open(root / LOCK, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(root, fd) from None
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    return text or "a process that has not written its name yet"


class RunLock:
    """The exclusive lock on a run directory (see the module docstring)."""

    def __init__(self, root: Path, command: Optional[str] = None) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK
        self.command = command if command is not None else " ".join(sys.argv)
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    error = _in_use(self.root, fd)
                    os.close(fd)
                    raise error from None
                try:  # the holder may have removed the file between our open and our lock
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            info = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: {self.command}"
            os.ftruncate(fd, 0)
            os.pwrite(fd, (info + "\n").encode("utf-8"), 0)
            os.fsync(fd)
        except OSError as exc:
            raise OutputError(f"{self.root}: cannot write the run directory ({exc.strerror or exc})") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the lock
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def clean_temporaries(root: Path) -> int:
    """Remove ``.<name>.*.tmp`` files that an interrupted atomic write left (the caller
    holds the lock, so no writer is using them); returns how many."""
    count = 0
    for folder in (root, root / "checkpoints"):
        if not folder.is_dir():
            continue
        for p in folder.glob(".*.tmp"):
            if p.is_file():
                p.unlink()
                count += 1
    return count


def _move_back(aside: Path, root: Path) -> None:
    for name in RUN_FILES:
        target, kept = root / name, aside / name
        if not kept.exists():
            continue
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.rename(kept, target)
    shutil.rmtree(aside)


def recover(root: Path) -> bool:
    """Put back a finished run that an interrupted ``overwrite`` run had moved aside,
    dropping what that run wrote; True when something was put back."""
    restored = False
    if (root / ASIDE_PARTIAL).is_dir():  # killed while moving aside: no new file was written yet
        _move_back(root / ASIDE_PARTIAL, root)
        restored = True
    if (root / ASIDE).is_dir():
        _move_back(root / ASIDE, root)
        restored = True
    return restored


def set_aside(root: Path) -> None:
    """Move the run files of ``root`` into ``.previous/`` (each move a rename)."""
    partial = root / ASIDE_PARTIAL
    partial.mkdir()
    for name in RUN_FILES:
        if (root / name).exists():
            os.rename(root / name, partial / name)
    os.rename(partial, root / ASIDE)


def put_back(root: Path) -> None:
    """The new run failed: restore the run set aside."""
    _move_back(root / ASIDE, root)


def discard_aside(root: Path) -> None:
    """The new run has finished: the old one may go now."""
    shutil.rmtree(root / ASIDE, ignore_errors=True)


def check_free_space(root: Path, need_bytes: int) -> None:
    """Refuse a run whose checkpoints and codes will not fit on the disk of ``root``."""
    try:
        free = shutil.disk_usage(root).free
    except OSError as exc:
        raise OutputError(f"{root}: cannot check the free space ({exc.strerror or exc})") from None
    if free < need_bytes:
        raise OutputError(f"{root}: {free / 2**20:.1f} MiB free, the run needs about {need_bytes / 2**20:.1f} MiB "
                          "(checkpoints, codes, results); free some space or use another --output-dir")
