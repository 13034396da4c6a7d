"""PyTorch reference implementations of the fused DisEnt operations.

These functions define the semantics that the Triton kernels next to this file must reproduce, and
they are the implementation `dfa_fast.ops` uses on every device without Triton (the CPU). They follow
docs/method.md ("Losses") and the reference implementation's behaviour:

* GCE (reference form): ``loss = CE(l, y) * q * sg(p_y) ** q``, gradient ``q * p_y**q * (p - onehot)``.
  The textbook form ``(1 - p_y**q) / q`` has gradient ``p_y**q * (p - onehot)`` (no extra factor q).
* Per-sample loss EMA over the whole training set with one shared "seen" flag: the first update of a
  sample writes its raw loss, later ones ``alpha * old + (1 - alpha) * loss``. An index that appears
  k times in one update is updated once, with the mean of its k losses (order-independent, so the
  kernel and the reference agree without any ordering between writers).
* Class-wise maximum over the whole buffer (every training sample of the class, seen or not: unseen
  entries are 0 and losses are >= 0, as in the reference implementation).
* Relative difficulty ``W = e_b / (e_b + e_i + 1e-8)`` with ``e = ema[index] / class_max[label]``;
  W carries no gradient.

All losses are computed in float32 whatever the input dtype. Nothing here synchronises with the host.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

# Added to the denominator of the relative difficulty, as in the reference implementation.
WEIGHT_EPS = 1e-8
# Guards the class-wise normalisation against a class whose maximum is still 0 (0 / tiny = 0).
MAX_FLOOR = 1e-30

GCE_FORMS = ("reference", "textbook")
# The statistics a DisEnt head returns, in this order (loss_swap only with a swap).
STAT_NAMES = ("ce_i", "gce_b", "weight", "loss_dis", "loss_swap")

# gather(index, ce_i, ce_b) -> (index, ce_i, ce_b) of the global batch; identity in one process.
Gather = Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                           tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


# The contract of every head implementation: a few named objects instead of loose tensors.
class Linear(NamedTuple):
    """A linear classifier's parameters: logits = x @ weight.T + bias (bias may be None)."""
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None


class Swap(NamedTuple):
    """The feature swap of one DisEnt step: row r takes the bias features ``source[0][perm[r]]``
    (and the label ``source[1][perm[r]]`` for the swapped bias branch). ``source`` is this batch's
    (z_b, label) when None; under data parallelism the global batch's."""
    perm: torch.Tensor
    source: Optional[tuple[torch.Tensor, torch.Tensor]] = None


@dataclass(frozen=True)
class LossSettings:
    """The loss hyperparameters of the heads (the lambdas are DisEnt's; LfF ignores them)."""
    q: float = 0.7
    gce_form: str = "reference"
    lambda_dis: float = 1.0
    lambda_swap_b: float = 1.0
    lambda_swap: float = 1.0


@dataclass(eq=False)
class LossState:
    """The per-sample loss EMAs of the two branches over the whole training split, updated in
    place by `sample_weights` and the heads: ``ema_i`` (intrinsic / debiased branch), ``ema_b``
    (bias branch), the shared ``seen`` flags and every sample's label; ``gather`` under data
    parallelism. ``cache`` holds what an implementation derives from the buffers and keeps between
    calls (the compiled pass's class maxima and scratch: `numba_weighting`); whoever writes the
    buffers in another way clears it (`clear_cache`). The buffers belong to one state: a second
    state over the same tensors would not see the first one's compiled writes in its cache."""
    ema_i: torch.Tensor
    ema_b: torch.Tensor
    seen: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    alpha: float = 0.7
    gather: Gather = None
    cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def zeros(cls, labels: torch.Tensor, num_classes: int, alpha: float = 0.7,
              device: Optional[torch.device] = None) -> "LossState":
        """Return a fresh state (nothing seen) for training samples with these labels."""
        labels = labels.to(device=device or labels.device, dtype=torch.int64)
        n, dev = len(labels), labels.device
        return cls(torch.zeros(n, device=dev), torch.zeros(n, device=dev),
                   torch.zeros(n, dtype=torch.bool, device=dev), labels, num_classes, alpha)

    def clear_cache(self) -> None:
        """Forget what implementations derived from the buffers (call after writing them)."""
        self.cache.clear()


def _vector_floats() -> int:
    """Return the float32 lanes of torch's CPU kernels on this machine (16 with AVX-512, 8 with
    AVX2), or 0 where its capability is another or unknown (then rows are never transposed)."""
    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return {"AVX512": 16, "AVX2": 8}.get(get() if get is not None else "", 0)


# Below this many classes, log-softmax runs over the transposed view (see `log_softmax`).
NARROW_ROWS = _vector_floats()


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Return the row-wise log-softmax (B, C) in float32.

    With fewer classes than torch's CPU vector width (`NARROW_ROWS`: 16 floats with AVX-512, 8 with
    AVX2) its kernel handles the rows element by element (256 x 10 with AVX-512: 31 us, against 6 us
    over the transposed view, where the batch is the vectorised dimension). Both give the same
    values and gradients bit for bit; at or above the width torch's vectorised rows sum in another
    order, so those rows take torch's kernel itself.
    """
    x = logits.float()
    if x.shape[1] < NARROW_ROWS:
        return F.log_softmax(x.t(), dim=0).t()
    return F.log_softmax(x, dim=1)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return the per-sample cross-entropy (B,) in float32."""
    return -log_softmax(logits).gather(1, target[:, None]).squeeze(1)


def gce(logits: torch.Tensor, target: torch.Tensor, q: float = 0.7,
        form: str = "reference") -> torch.Tensor:
    """Return the per-sample generalized cross-entropy (B,) in float32 (see the module docstring)."""
    log_p_y = log_softmax(logits).gather(1, target[:, None]).squeeze(1)
    if form == "reference":
        # q * p_y^q as a constant weight on the cross-entropy: the reference code's form.
        return -log_p_y * (q * torch.exp(q * log_p_y.detach()))
    if form == "textbook":
        return (1.0 - torch.exp(q * log_p_y)) / q
    raise ValueError(f"unknown GCE form {form!r}; expected one of {GCE_FORMS}")


def ema_update_(state: "LossState", index: torch.Tensor, loss_i: torch.Tensor,
                loss_b: torch.Tensor) -> None:
    """Update both per-sample loss EMAs and the seen flags of ``state`` in place at ``index``."""
    ones = torch.ones_like(index, dtype=torch.float32)
    count = torch.zeros_like(state.ema_i).index_add_(0, index, ones)[index]
    was_seen = state.seen[index]
    alpha = state.alpha
    for ema, loss in ((state.ema_i, loss_i), (state.ema_b, loss_b)):
        # The mean of the losses of duplicated indices (sum / count; exact for unique ones).
        value = torch.zeros_like(ema).index_add_(0, index, loss.detach().float())[index] / count
        ema[index] = torch.where(was_seen, alpha * ema[index] + (1.0 - alpha) * value, value)
    state.seen[index] = True


def class_max(ema: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Return the maximum EMA value of each class over the whole buffer, shape (C,)."""
    return torch.zeros(num_classes, dtype=ema.dtype, device=ema.device).scatter_reduce_(
        0, labels, ema, "amax", include_self=True)


def relative_difficulty(state: "LossState", index: torch.Tensor,
                        label: torch.Tensor) -> torch.Tensor:
    """Return W = e_b / (e_b + e_i + 1e-8) for the samples at ``index`` (B,), without gradient."""
    max_i = class_max(state.ema_i, state.labels, state.num_classes).clamp_min(MAX_FLOOR)
    max_b = class_max(state.ema_b, state.labels, state.num_classes).clamp_min(MAX_FLOOR)
    e_i = state.ema_i[index] / max_i[label]
    e_b = state.ema_b[index] / max_b[label]
    return e_b / (e_b + e_i + WEIGHT_EPS)


def sample_weights(state: "LossState", index: torch.Tensor, label: torch.Tensor,
                   ce_i: torch.Tensor, ce_b: torch.Tensor) -> torch.Tensor:
    """Update the EMAs with this batch's losses and return the weights W (B,) of its samples.

    Under data parallelism ``state.gather`` turns the local (index, ce_i, ce_b) into the global
    batch's, so every rank applies the identical update; the weights are those of the local
    samples.
    """
    upd_index, upd_i, upd_b = (index, ce_i.detach(), ce_b.detach())
    if state.gather is not None:
        upd_index, upd_i, upd_b = state.gather(upd_index, upd_i, upd_b)
    ema_update_(state, upd_index, upd_i, upd_b)
    return relative_difficulty(state, index, label)


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                           weight: torch.Tensor) -> torch.Tensor:
    """Return mean(weight * CE(logits, target)), a scalar; no gradient flows into ``weight``."""
    return (weight.detach() * cross_entropy(logits, target)).mean()


def permute_concat(z_i: torch.Tensor, z_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the classifier inputs ([z_i, sg(z_b)], [sg(z_i), z_b]), each (B, 2D); the swap
    passes the permuted bias features as ``z_b``."""
    return torch.cat([z_i, z_b.detach()], 1), torch.cat([z_i.detach(), z_b], 1)


def disent_head(z_i: torch.Tensor, z_b: torch.Tensor, label: torch.Tensor, index: torch.Tensor,
                fc_i: Linear, fc_b: Linear, state: "LossState", swap: Optional[Swap],
                settings: LossSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return the DisEnt loss (scalar) and detached statistics for one step (docs/method.md).

    ``fc_i``/``fc_b`` are the two linear classifiers over 2D features [intrinsic, bias]; ``swap``
    is the step's feature swap, or None before swapping starts. Updates ``state`` in place.
    """
    x_i, x_b = permute_concat(z_i, z_b)
    logits_i = F.linear(x_i, *fc_i)
    logits_b = F.linear(x_b, *fc_b)
    ce_i = cross_entropy(logits_i, label)
    w = sample_weights(state, index, label, ce_i, cross_entropy(logits_b.detach(), label))
    q, form = settings.q, settings.gce_form
    gce_b = gce(logits_b, label, q, form).mean()
    loss_dis = (w * ce_i).mean() + settings.lambda_dis * gce_b
    stats = {"ce_i": ce_i.detach().mean(), "gce_b": gce_b.detach(), "weight": w.mean(),
             "loss_dis": loss_dis.detach()}
    loss = loss_dis
    if swap is not None:
        source_z, source_label = swap.source if swap.source is not None else (z_b, label)
        xs_i, xs_b = permute_concat(z_i, source_z[swap.perm])
        loss_swap = (weighted_cross_entropy(F.linear(xs_i, *fc_i), label, w)
                     + settings.lambda_swap_b * gce(F.linear(xs_b, *fc_b),
                                                    source_label[swap.perm], q, form).mean())
        loss = loss_dis + settings.lambda_swap * loss_swap
        stats["loss_swap"] = loss_swap.detach()
    return loss, stats


def lff_head(logits_d: torch.Tensor, logits_b: torch.Tensor, label: torch.Tensor,
             index: torch.Tensor, state: "LossState", settings: LossSettings, *,
             weigh: Optional[Callable] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return the LfF loss mean(GCE(f_B)) + mean(W * CE(f_D)) and detached statistics (``state``
    holds the debiased branch's EMA as ``ema_i``); ``weigh``: an implementation of
    `sample_weights` with its arguments and values."""
    ce_d = cross_entropy(logits_d, label)
    w = (weigh or sample_weights)(state, index, label, ce_d,
                                  cross_entropy(logits_b.detach(), label))
    gce_b = gce(logits_b, label, settings.q, settings.gce_form).mean()
    loss = gce_b + (w * ce_d).mean()
    return loss, {"ce_i": ce_d.detach().mean(), "gce_b": gce_b.detach(), "weight": w.mean()}
