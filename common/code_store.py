"""The database side of continual retrieval: packed binary codes written once per task.

Each task's database is encoded once, right after that task, in both modalities, and
kept with the code length in force at that time. A later, longer query meets a
shorter stored code on its first ``bits`` positions (prefix truncation); codes keep
their most significant bit first, so truncation never reorders meaning.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from utils.io import atomic_write_bytes

MODALITIES = ("image", "text")


def pack_codes(codes: torch.Tensor | np.ndarray) -> np.ndarray:
    """{-1,+1} (or {0,1}) codes (N, bits) -> uint8 (N, ceil(bits/8)), MSB first."""
    arr = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if arr.ndim != 2:
        raise ValueError(f"codes must be 2-D (N, bits), got shape {arr.shape}")
    return np.packbits(arr > 0, axis=1)


def unpack_codes(packed: np.ndarray, bits: int) -> torch.Tensor:
    """uint8 packed codes -> int8 {-1,+1} tensor (N, bits)."""
    unpacked = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=1, count=bits)
    return torch.from_numpy(unpacked.astype(np.int8) * 2 - 1)


@dataclass(frozen=True)
class StoredCodes:
    """One task's database codes: packed image and text codes, labels and ids."""

    task: int
    bits: int
    image: np.ndarray
    text: np.ndarray
    labels: np.ndarray
    ids: Tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def codes(self, modality: str, bits: Optional[int] = None) -> torch.Tensor:
        """{-1,+1} codes of ``modality``; ``bits`` < self.bits takes the prefix."""
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        n = self.bits if bits is None else int(bits)
        if n > self.bits:
            raise ValueError(f"task {self.task} codes have {self.bits} bits; cannot read {n}")
        return unpack_codes(getattr(self, modality), n)


class CodeStore:
    """Stored database codes per task, each with its own length."""

    def __init__(self) -> None:
        self._entries: Dict[int, StoredCodes] = {}

    def add(
        self,
        task: int,
        image_codes: torch.Tensor | np.ndarray,
        text_codes: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray,
        ids: Sequence[str] = (),
    ) -> StoredCodes:
        """Store (or, in joint mode, replace) the database codes of ``task``."""
        img = pack_codes(image_codes)
        txt = pack_codes(text_codes)
        bits = int(image_codes.shape[1])
        if tuple(text_codes.shape) != tuple(image_codes.shape):
            raise ValueError(
                f"task {task}: image codes {tuple(image_codes.shape)} and text codes "
                f"{tuple(text_codes.shape)} differ in shape"
            )
        lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if lab.shape[0] != img.shape[0]:
            raise ValueError(f"task {task}: {lab.shape[0]} labels for {img.shape[0]} codes")
        entry = StoredCodes(int(task), bits, img, txt, (lab > 0).astype(np.uint8), tuple(ids))
        self._entries[int(task)] = entry
        return entry

    def __contains__(self, task: int) -> bool:
        return int(task) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def tasks(self) -> List[int]:
        return sorted(self._entries)

    def get(self, task: int) -> StoredCodes:
        try:
            return self._entries[int(task)]
        except KeyError:
            raise KeyError(f"no stored codes for task {task}; stored tasks: {self.tasks()}") from None

    def entries(self, tasks: Optional[Iterable[int]] = None) -> List[StoredCodes]:
        """The stored entries of ``tasks`` (default: all), in task order."""
        wanted = self.tasks() if tasks is None else sorted(int(t) for t in tasks)
        return [self.get(t) for t in wanted]

    def subset(self, tasks: Iterable[int]) -> "CodeStore":
        """A store holding only the entries of ``tasks`` (shared, not copied)."""
        out = CodeStore()
        for e in self.entries(tasks):
            out._entries[e.task] = e
        return out

    def bits(self) -> Dict[int, int]:
        return {t: e.bits for t, e in sorted(self._entries.items())}

    def num_items(self) -> int:
        return sum(len(e) for e in self._entries.values())

    # ------------------------------------------------------------------ persistence
    def state(self) -> Dict[str, np.ndarray]:
        """A flat dict of arrays (for ``np.savez`` or a checkpoint). Tasks are numbered
        from 1 there, as everywhere a user reads them: ``tasks`` = [1, 2, ...] and
        ``t1_image``, ``t1_text``, ``t1_labels``, ``t1_ids``, ``t1_bits`` for task 1;
        ``task_base`` = 1 marks this layout."""
        out: Dict[str, np.ndarray] = {"tasks": np.array([t + 1 for t in self.tasks()], dtype=np.int64),
                                      "task_base": np.array(1, dtype=np.int64)}
        for t, e in sorted(self._entries.items()):
            n = t + 1
            out[f"t{n}_bits"] = np.array(e.bits, dtype=np.int64)
            out[f"t{n}_image"] = e.image
            out[f"t{n}_text"] = e.text
            out[f"t{n}_labels"] = e.labels
            out[f"t{n}_ids"] = np.array(e.ids, dtype=str)
        return out

    @classmethod
    def from_state(cls, state: Dict[str, np.ndarray]) -> "CodeStore":
        """The store of ``state()``; also reads the earlier layout without ``task_base``,
        whose keys numbered tasks from 0 (``t0_image``)."""
        base = int(np.asarray(state["task_base"])) if "task_base" in state else 0
        if base not in (0, 1):
            raise ValueError(f"task_base: expected 0 or 1, got {base}")
        store = cls()
        for n in np.asarray(state["tasks"]).tolist():
            t = int(n) - base
            store._entries[t] = StoredCodes(
                task=t,
                bits=int(np.asarray(state[f"t{n}_bits"])),
                image=np.asarray(state[f"t{n}_image"], dtype=np.uint8),
                text=np.asarray(state[f"t{n}_text"], dtype=np.uint8),
                labels=np.asarray(state[f"t{n}_labels"], dtype=np.uint8),
                ids=tuple(str(i) for i in np.asarray(state[f"t{n}_ids"]).tolist()),
            )
        return store

    def save(self, path: str | os.PathLike) -> None:
        """Write the store to ``path`` (.npz) atomically."""
        path = Path(path)
        buf = io.BytesIO()
        np.savez_compressed(buf, **self.state())
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CodeStore":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls.from_state({k: data[k] for k in data.files})
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no code store there (expected a codes.npz written by a run)") from None
        except (KeyError, ValueError, OSError) as exc:
            raise ValueError(f"{path}: not a readable code store ({exc})") from None

