"""Data-parallel helpers on torch.distributed (NCCL on GPUs, gloo on CPU).

``torchrun --nproc-per-node=N main.py ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; the
runner then trains with DistributedDataParallel, shards encoding across ranks and
gathers the rows back exactly (no padded duplicate is ever scored), and only rank 0
writes logs, TensorBoard, checkpoints and results.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Tuple

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job; the default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_with_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> Tuple[DistContext, torch.device]:
    """Join the process group torchrun describes (reading, never writing, the
    environment); returns the context and this rank's device."""
    if not launched_with_torchrun():
        return DistContext(), device
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistContext(rank, world, local), device


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard_bounds(n: int, ctx: DistContext) -> Tuple[int, int]:
    """Contiguous rows [lo, hi) of ``n`` owned by this rank (sizes differ by at most 1)."""
    base, extra = divmod(n, ctx.world_size)
    lo = ctx.rank * base + min(ctx.rank, extra)
    return lo, lo + base + (1 if ctx.rank < extra else 0)


def gather_rows(local: torch.Tensor, n: int, ctx: DistContext) -> torch.Tensor:
    """Every rank's contiguous shard (from ``shard_bounds``) -> the full (n, ...) tensor
    on every rank. Shards are padded to one size for the collective and the padding
    is cut off again, so no row is duplicated or lost."""
    if not ctx.enabled:
        return local
    sizes = [shard_bounds(n, DistContext(r, ctx.world_size)) for r in range(ctx.world_size)]
    longest = max(hi - lo for lo, hi in sizes)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: hi - lo] for p, (lo, hi) in zip(parts, sizes)])


def sync_rows(buffer: torch.Tensor, index: torch.Tensor, ctx: DistContext) -> None:
    """Rows ``index`` of ``buffer`` were split over the ranks as ``index.tensor_split``;
    after each rank wrote its part, copy every rank's part into every ``buffer``."""
    if not ctx.enabled:
        return
    parts = list(index.tensor_split(ctx.world_size))
    mine = parts[ctx.rank]
    gathered = gather_rows(buffer[mine], len(index), ctx)
    buffer[index] = gathered.to(buffer.dtype)


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    box: List[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
