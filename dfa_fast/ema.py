"""The per-sample loss state of LfF and DisEnt, kept on the device (docs/design.md rule 4).

Two float buffers (the intrinsic/debiased and the bias branch's loss EMA), one "seen" flag and the
label of every training sample. The update and the weights are computed by `dfa_fast.ops`. Under data
parallelism `gather` is `distributed.all_gather_batch`, so every rank applies the identical update
and the buffers stay equal to a single process's.
"""
from __future__ import annotations

from typing import Optional

import torch

from dfa_fast import ops
from dfa_fast.kernels.reference import LossState


class SampleLossEMA(LossState):
    """Per-sample loss EMAs of two branches over the whole training split (the `LossState` the
    heads take), with the checkpoint and log views of it."""

    def __init__(self, labels: torch.Tensor, num_classes: int, alpha: float,
                 device: torch.device, biases: Optional[torch.Tensor] = None):
        fresh = LossState.zeros(labels, num_classes, alpha, device)
        super().__init__(fresh.ema_i, fresh.ema_b, fresh.seen, fresh.labels, num_classes, alpha)
        # Which samples are bias-aligned (label == bias), for the logged weight statistics only.
        self.aligned = None if biases is None else \
            (self.labels == biases.to(device=device, dtype=torch.int64))

    def group_weights(self) -> dict:
        """Return the mean weight W of the seen bias-aligned and bias-conflicting training samples,
        over the whole buffer as it stands (floats; one host read). A group with no seen sample
        is left out; so is everything when the biases were not given."""
        if self.aligned is None:
            return {}
        every = torch.arange(len(self.labels), device=self.labels.device)
        w = ops.relative_difficulty(self, every, self.labels)
        groups = torch.stack([self.aligned, ~self.aligned]) & self.seen  # (2, N)
        (sum_a, sum_c), (n_a, n_c) = torch.stack([(groups * w).sum(1),
                                                  groups.sum(1).to(w.dtype)]).tolist()  # one read
        return {name: total / count for name, total, count in
                (("weight_aligned", sum_a, n_a), ("weight_conflicting", sum_c, n_c)) if count}

    def state_dict(self) -> dict:
        """Return the buffers (CPU copies) for a checkpoint."""
        return {"ema_i": self.ema_i.cpu(), "ema_b": self.ema_b.cpu(), "seen": self.seen.cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Restore buffers saved by `state_dict`."""
        for name in ("ema_i", "ema_b", "seen"):
            getattr(self, name).copy_(state[name])
        self.clear_cache()
