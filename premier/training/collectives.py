"""Collectives and sharding of stage 1 on N workers: what `Stage1Trainer` needs to run as one of N.

The trainer has one `train_step`; what differs between one process and N is a `Comm`:

- `LocalComm` (one process, no Ray, no process group): every collective is the identity;
- `TorchComm` (inside a Ray Train worker, whose `TorchTrainer` set up the process group: gloo on
  CPU, NCCL on GPU): sums, the autograd-aware `gather_rows`, one flat all-reduce of the gradients.

`assign_users` gives every user one owner rank (balanced by example count) and `chunk` a rank's
contiguous share of n rows; both are deterministic, so every rank computes the same split. How a
step uses them is described in `premier.training.distributed` (the Ray Train launcher). This module
knows nothing of the trainer or of Ray: torch and the error types only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from premier.errors import InvalidRequestError


# ----------------------------------------------------------------------------- users -> ranks
def assign_users(counts: Sequence[int], world_size: int) -> torch.Tensor:
    """Owner rank of each user: largest users first, each to the rank with the fewest examples so far.

    Deterministic from the counts alone, so every rank computes the same assignment."""
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    if len(counts) < world_size:
        raise InvalidRequestError(
            "num_workers",
            f"{world_size} workers need at least {world_size} training users; the dataset has {len(counts)}",
        )
    load = [0] * world_size
    owner = [0] * len(counts)
    for u in sorted(range(len(counts)), key=lambda u: (-counts[u], u)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[u] = r
        load[r] += counts[u]
    return torch.tensor(owner, dtype=torch.long)


def chunk(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous share of n rows (the first n % world ranks get one more)."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


# ----------------------------------------------------------------------------- communicators
class LocalComm:
    """One process: the identity for every collective."""

    rank = 0
    world_size = 1

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_reduce_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        return None

    def barrier(self) -> None:
        return None


class TorchComm(LocalComm):
    """torch.distributed's default process group (set up by Ray Train's TorchTrainer)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("TorchComm needs an initialised torch.distributed process group")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        y = x.detach().clone()
        dist.all_reduce(y)
        return y

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        return gather_rows(x)

    def all_reduce_grads(self, params: Sequence[torch.nn.Parameter], bucket_elements: int = 1 << 26) -> None:
        """SUM over ranks of every gradient (missing ones count as zero), in flat buckets of at most
        `bucket_elements` (256 MiB of fp32) copied back in place: one bucket of extra memory, few calls."""
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        size = 0
        for i, p in enumerate(params):
            bucket.append(p.grad)
            size += p.grad.numel()
            if size >= bucket_elements or i == len(params) - 1:
                if len(bucket) == 1:
                    dist.all_reduce(bucket[0])
                else:
                    flat = torch.cat([g.reshape(-1) for g in bucket])
                    dist.all_reduce(flat)
                    offset = 0
                    for g in bucket:
                        g.copy_(flat[offset : offset + g.numel()].view_as(g))
                        offset += g.numel()
                bucket, size = [], 0

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's rows (counts may differ) in rank order; backward: SUM the gradient of
    the gathered tensor over ranks (each rank's loss used all of it) and keep this rank's rows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
        counts = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(counts, n)
        counts = [int(c) for c in counts]
        most = max(counts)
        padded = x.new_zeros((most, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        ctx.lo, ctx.hi = sum(counts[:rank]), sum(counts[: rank + 1])
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total[ctx.lo : ctx.hi]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `x` concatenated in rank order, on every rank, with gradients flowing back
    (needs an initialised process group; `LocalComm.gather_rows` is the one-process identity)."""
    return _GatherRows.apply(x)
