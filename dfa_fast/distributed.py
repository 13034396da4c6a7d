"""Data parallelism that keeps N ranks x batch b exactly equal to one process x batch N*b.

Three things of DisEnt/LfF are not per-sample and would silently differ under plain data
parallelism; each is made global here (docs/design.md rule 4):

* the per-sample loss EMA: every rank all-gathers (index, ce_i, ce_b) of the whole batch and applies
  the identical update (`all_gather_batch`), so buffers and class maxima agree everywhere;
* the feature swap: the permutation is drawn over the global batch (the same generator on every
  rank) and the bias features are all-gathered with a gradient (`global_swap`), so a sample may take
  the features of a sample on another rank, exactly as in one process;
* the logged statistics: averaged over ranks at log time (`average_over_ranks`).

The train loader gives rank r the samples at positions r, r + N, r + 2N, ... of each global batch
(`data.loaders`), so local row j of rank r is position N*j + r of the single-process batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """Return (rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_batch(index: torch.Tensor, ce_i: torch.Tensor,
                     ce_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (index, ce_i, ce_b) of all ranks' batches concatenated in rank order (one collective)."""
    _, world = rank_and_world()
    # float64 holds int64 indices exactly up to 2**53 and float32 losses exactly.
    values = torch.stack([index.to(torch.float64), ce_i.double(), ce_b.double()])
    gathered = values.new_empty((world * 3, values.shape[1]))
    dist.all_gather_into_tensor(gathered, values)
    merged = gathered.view(world, 3, -1).permute(1, 0, 2).reshape(3, -1)
    return merged[0].to(torch.int64), merged[1].float(), merged[2].float()


class _AllGatherRows(torch.autograd.Function):
    """All-gather of rows (rank order) whose backward returns each rank the summed gradient of its
    own rows: every rank's loss may use every rank's rows."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor) -> torch.Tensor:
        rank, world = rank_and_world()
        ctx.rank, ctx.count = rank, rows.shape[0]
        out = rows.new_empty((world * rows.shape[0], *rows.shape[1:]))
        dist.all_gather_into_tensor(out, rows.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.count:(ctx.rank + 1) * ctx.count]


def global_swap(z_b: torch.Tensor, label: torch.Tensor, generator: torch.Generator
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Return (perm, (bias features, labels) of the global batch) for the DisEnt swap.

    ``perm[j]`` is the row of the gathered batch whose features local row j takes: the permutation
    one process would draw over the whole batch, read at this rank's positions.
    """
    rank, world = rank_and_world()
    rows = z_b.shape[0]
    features = _AllGatherRows.apply(z_b)
    labels = label.new_empty(world * rows)
    dist.all_gather_into_tensor(labels, label.contiguous())
    # Single-process position p = world * j + r  <->  gathered row r * rows + j.
    gathered_row = torch.arange(world * rows, device=z_b.device).view(world, rows).t().reshape(-1)
    perm = torch.randperm(world * rows, device=z_b.device, generator=generator)
    return gathered_row[perm[rank::world]], (features, labels)


def average_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Return the mean of a tensor over all ranks (the tensor itself in one process)."""
    _, world = rank_and_world()
    if world == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world
