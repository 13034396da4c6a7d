"""The per-sample loss state of LfF and DisEnt, kept on the device (DESIGN.md rule 4).

Two float buffers (the intrinsic/debiased and the bias branch's loss EMA), one "seen" flag and the
label of every training sample. The update and the weights are computed by `dfa_fast.ops`. Under data
parallelism `gather` all-gathers (index, ce_i, ce_b) of every rank's part of the batch, so every
rank applies the identical update and the buffers stay equal to a single process's.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


class SampleLossEMA:
    """Per-sample loss EMAs of two branches over the whole training split."""

    def __init__(self, labels: torch.Tensor, num_classes: int, alpha: float,
                 device: torch.device):
        self.labels = labels.to(device=device, dtype=torch.int64)
        self.num_classes = num_classes
        self.alpha = alpha
        n = len(labels)
        self.ema_i = torch.zeros(n, dtype=torch.float32, device=device)
        self.ema_b = torch.zeros(n, dtype=torch.float32, device=device)
        self.seen = torch.zeros(n, dtype=torch.bool, device=device)
        self.gather: Optional[Callable] = None

    def state_dict(self) -> dict:
        """Return the buffers (CPU copies) for a checkpoint."""
        return {"ema_i": self.ema_i.cpu(), "ema_b": self.ema_b.cpu(), "seen": self.seen.cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Restore buffers saved by `state_dict`."""
        for name in ("ema_i", "ema_b", "seen"):
            getattr(self, name).copy_(state[name])


def all_gather_batch(index: torch.Tensor, ce_i: torch.Tensor,
                     ce_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (index, ce_i, ce_b) of all ranks' batches concatenated in rank order."""
    import torch.distributed as dist
    world = dist.get_world_size()
    values = torch.stack([index.to(torch.float64), ce_i.double(), ce_b.double()])
    gathered = torch.empty((world, *values.shape), dtype=values.dtype, device=values.device)
    dist.all_gather_into_tensor(gathered, values)
    merged = gathered.permute(1, 0, 2).reshape(3, -1)
    return merged[0].to(torch.int64), merged[1].float(), merged[2].float()
