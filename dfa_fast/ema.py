"""The per-sample loss state of LfF and DisEnt, kept on the device (docs/design.md rule 4).

Two float buffers (the intrinsic/debiased and the bias branch's loss EMA), one "seen" flag and the
label of every training sample. The update and the weights are computed by `dfa_fast.ops`. Under data
parallelism `gather` is `distributed.all_gather_batch`, so every rank applies the identical update
and the buffers stay equal to a single process's.
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

