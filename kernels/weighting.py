"""Per-sample weighting: loss EMA update, class-wise maximum, relative difficulty W, weighted CE.

This is the part of LfF/DisEnt that the reference code runs as dozens of small operations with host
synchronisations. Here it is three launches with no host sync (docs/method.md,
``kernels/reference.py``):

1. ``_ema_scatter_kernel`` (grid over the batch; fused into the loss kernel's epilogue when there is no
   ``gather`` hook): atomic adds of each sample's two losses and a count into float32/int32 scratch
   buffers of N entries, at the sample's index. Program 0 also zeroes the class-maximum buffer and
   the loss/statistics accumulators of the later launches.
2. ``_ema_apply_class_max_kernel`` (grid over the N training samples): where the count is non-zero
   the entry was in the batch; its new EMA is the mean of its batch losses, written raw on the first
   update and as ``alpha * old + (1 - alpha) * mean`` afterwards, then ``seen`` is set and the scratch
   entry is reset to zero. Every program then reduces its slice of both buffers to a per-class
   maximum ([samples x classes] one-hot tile, max over the samples) and folds it into the (2, C)
   class-maximum buffer with one atomic max per class. The values are >= 0, and for non-negative
   IEEE floats the order of the bit patterns read as int32 is the order of the values, so an int32
   atomic max on the bits is a float max; the buffer starts at +0.0 (bits 0), which is exactly the
   reference's ``scatter_reduce(amax, include_self=True)`` over zeros.
3. ``_relative_difficulty_kernel`` (grid over the local batch), or the loss kernel of a fused head:
   ``W = e_b / (e_b + e_i + 1e-8)`` with ``e = ema[index] / max(class_max[label], 1e-30)``.

Duplicate indices: an index that appears k times in one update (local batch, or the global batch of a
``gather``) is updated once, with the mean of its k losses. Both implementations define it so
(``reference.ema_update_``); here the k atomic adds meet in one scratch entry and launch 2 divides by
the count, so no ordering between the writers is needed. The float32 atomic sum of k > 1 duplicates
may round differently from run to run (last bit); without duplicates every entry gets exactly one
add onto 0, which is exact and deterministic.

Scratch: the (2, N) sums and (N,) counts are allocated zeroed once per (device, N) and launch 2 resets
every entry it consumed, so they are all-zero between calls (tests check it). The scratch is reused
across calls, which also keeps the step capturable by CUDA graphs (allocate it in a warm-up step).

The same file holds the weighted cross-entropy (``mean(W * CE)``, W without gradient) and the fused
LfF head, which is loss kernel + launch 2 + a weights/loss launch: three launches forward (four with
``gather``), one backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import gce as _gce
from .reference import MAX_FLOOR as _MAX_FLOOR, WEIGHT_EPS as _WEIGHT_EPS
from .reference import LossSettings, LossState

MAX_FLOOR = tl.constexpr(_MAX_FLOOR)
WEIGHT_EPS = tl.constexpr(_WEIGHT_EPS)
# Samples a program of the apply/class-max launch covers: [samples x classes] tiles of at most
# 16384 elements (1024 samples x 16 classes for <= 16 classes; about 54 programs for N = 55,000).
APPLY_TILE_ELEMENTS = 16384
MAX_APPLY_BLOCK = 1024
SCATTER_BLOCK = 256
NUM_ACC_MAX = 8  # loss + statistics accumulators a head zeroes in launch 1

_SCRATCH: dict[tuple[str, Optional[int], int], tuple[torch.Tensor, torch.Tensor]] = {}


def ema_scratch(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the zeroed (2, n) float32 loss sums and (n,) int32 counts reused on ``device``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device.type, device.index, n)
    if key not in _SCRATCH:
        _SCRATCH[key] = (torch.zeros((2, n), dtype=torch.float32, device=device),
                         torch.zeros(n, dtype=torch.int32, device=device))
    return _SCRATCH[key]


# ----------------------------------------------------------------------------------------------
# Shared @triton.jit pieces (used here and by head.py).
# ----------------------------------------------------------------------------------------------
@triton.jit
def scatter_losses(index, loss_i, loss_b, row_ok, sums_ptr, count_ptr, N):
    """Atomically add two losses and a count per row at ``index`` into the EMA scratch."""
    # Out-of-range indices are dropped rather than written out of bounds.
    ok = row_ok & (index >= 0) & (index < N)
    tl.atomic_add(sums_ptr + index, loss_i, mask=ok)
    tl.atomic_add(sums_ptr + N + index, loss_b, mask=ok)
    tl.atomic_add(count_ptr + index, ok.to(tl.int32), mask=ok)


@triton.jit
def zero_small(cmax_ptr, n_cmax, acc_ptr, n_acc, enabled,
               BLOCK_CMAX: tl.constexpr, BLOCK_ACC: tl.constexpr):
    """Zero the class-maximum buffer and the accumulators when ``enabled`` (program 0 only)."""
    # The predicate goes into the bound (0 elements when disabled) rather than a scalar branch.
    offs = tl.arange(0, BLOCK_CMAX)
    tl.store(cmax_ptr + offs, tl.zeros([BLOCK_CMAX], tl.int32),
             mask=offs < tl.where(enabled, n_cmax, 0))
    offs = tl.arange(0, BLOCK_ACC)
    tl.store(acc_ptr + offs, tl.zeros([BLOCK_ACC], tl.float32),
             mask=offs < tl.where(enabled, n_acc, 0))


@triton.jit
def relative_difficulty_rows(index, label, row_ok, ema_i_ptr, ema_b_ptr, cmax_ptr, N,
                             num_classes, CMAX_HALF: tl.constexpr):
    """Return W = e_b / (e_b + e_i + 1e-8) for a block of rows (0 on masked rows).

    ``cmax_ptr`` holds the two class maxima as int32 bits, intrinsic then bias, CMAX_HALF apart.
    """
    in_range = row_ok & (index >= 0) & (index < N)
    ema_i = tl.load(ema_i_ptr + index, mask=in_range, other=0.0)
    ema_b = tl.load(ema_b_ptr + index, mask=in_range, other=0.0)
    label_ok = row_ok & (label >= 0) & (label < num_classes)
    # The class maxima are stored as int32 bit patterns (see launch 2); bitcast them back.
    max_i = tl.load(cmax_ptr + label, mask=label_ok, other=0).to(tl.float32, bitcast=True)
    max_b = tl.load(cmax_ptr + CMAX_HALF + label, mask=label_ok, other=0).to(tl.float32,
                                                                              bitcast=True)
    e_i = ema_i / tl.maximum(max_i, MAX_FLOOR)
    e_b = ema_b / tl.maximum(max_b, MAX_FLOOR)
    return e_b / (e_b + e_i + WEIGHT_EPS)


# ----------------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------------
# Row and sample counts are only compared against: not specialising on them (Triton would
# compile separate variants for 1 and for multiples of 16) keeps compiled variants few.
@triton.jit(do_not_specialize=["B", "N"])
def _ema_scatter_kernel(index_ptr, loss_i_ptr, loss_b_ptr, sums_ptr, count_ptr,
                        cmax_ptr, n_cmax, acc_ptr, n_acc, B, N,
                        BLOCK: tl.constexpr, BLOCK_CMAX: tl.constexpr, BLOCK_ACC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < B
    index = tl.load(index_ptr + rows, mask=row_ok, other=0)
    loss_i = tl.load(loss_i_ptr + rows, mask=row_ok, other=0.0)
    loss_b = tl.load(loss_b_ptr + rows, mask=row_ok, other=0.0)
    scatter_losses(index, loss_i, loss_b, row_ok, sums_ptr, count_ptr, N)
    zero_small(cmax_ptr, n_cmax, acc_ptr, n_acc, pid == 0, BLOCK_CMAX, BLOCK_ACC)


@triton.jit(do_not_specialize=["N"])
def _ema_apply_class_max_kernel(ema_i_ptr, ema_b_ptr, seen_ptr, labels_ptr, sums_ptr, count_ptr,
                                cmax_ptr, N, num_classes, alpha, one_minus_alpha,
                                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = offs < N
    count = tl.load(count_ptr + offs, mask=valid, other=0)
    touched = count > 0
    # Mean of this step's losses of the sample (several when its index repeats in the batch).
    denom = tl.maximum(count, 1).to(tl.float32)
    mean_i = tl.load(sums_ptr + offs, mask=touched, other=0.0) / denom
    mean_b = tl.load(sums_ptr + N + offs, mask=touched, other=0.0) / denom
    old_i = tl.load(ema_i_ptr + offs, mask=valid, other=0.0)
    old_b = tl.load(ema_b_ptr + offs, mask=valid, other=0.0)
    was_seen = tl.load(seen_ptr + offs, mask=valid, other=0) != 0
    # First update stores the raw loss, later ones the exponential moving average.
    new_i = tl.where(was_seen, alpha * old_i + one_minus_alpha * mean_i, mean_i)
    new_b = tl.where(was_seen, alpha * old_b + one_minus_alpha * mean_b, mean_b)
    tl.store(ema_i_ptr + offs, new_i, mask=touched)
    tl.store(ema_b_ptr + offs, new_b, mask=touched)
    tl.store(seen_ptr + offs, tl.full([BLOCK_N], 1, tl.uint8), mask=touched)
    # Reset the consumed scratch entries so the buffers are all-zero for the next step.
    tl.store(sums_ptr + offs, tl.zeros([BLOCK_N], tl.float32), mask=touched)
    tl.store(sums_ptr + N + offs, tl.zeros([BLOCK_N], tl.float32), mask=touched)
    tl.store(count_ptr + offs, tl.zeros([BLOCK_N], tl.int32), mask=touched)
    # Class-wise maximum of the updated buffers: a per-program max per class (one-hot tile), then
    # one atomic max per class. Lanes outside the class contribute 0, the reference's include_self.
    value_i = tl.where(touched, new_i, old_i)
    value_b = tl.where(touched, new_b, old_b)
    classes = tl.arange(0, BLOCK_C)
    labels = tl.load(labels_ptr + offs, mask=valid, other=-1)
    in_class = labels[:, None] == classes[None, :]
    max_i = tl.max(tl.where(in_class, value_i[:, None], 0.0), axis=0)
    max_b = tl.max(tl.where(in_class, value_b[:, None], 0.0), axis=0)
    class_ok = classes < num_classes
    # Non-negative floats compare like their int32 bit patterns; a negative value (never produced
    # by a cross-entropy) has the sign bit set, reads as a negative int and never beats +0.0.
    tl.atomic_max(cmax_ptr + classes, max_i.to(tl.int32, bitcast=True), mask=class_ok)
    tl.atomic_max(cmax_ptr + BLOCK_C + classes, max_b.to(tl.int32, bitcast=True), mask=class_ok)


@triton.jit(do_not_specialize=["B", "N"])
def _relative_difficulty_kernel(index_ptr, label_ptr, ema_i_ptr, ema_b_ptr, cmax_ptr, out_ptr,
                                B, N, num_classes, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < B
    index = tl.load(index_ptr + rows, mask=row_ok, other=0)
    label = tl.load(label_ptr + rows, mask=row_ok, other=0)
    w = relative_difficulty_rows(index, label, row_ok, ema_i_ptr, ema_b_ptr, cmax_ptr, N,
                                 num_classes, BLOCK_C)
    tl.store(out_ptr + rows, w, mask=row_ok)


@triton.jit(do_not_specialize=["B", "N"])
def _lff_rows_kernel(logits_d_ptr, stride_d, logits_b_ptr, stride_b, label_ptr, index_ptr,
                     rows_ptr, grads_ptr, sums_ptr, count_ptr, cmax_ptr, n_cmax, acc_ptr, n_acc,
                     B, C, N, q, inv_b,
                     GCE_FORM: tl.constexpr, FUSED_SCATTER: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_CMAX: tl.constexpr, BLOCK_ACC: tl.constexpr):
    # One pass over both models' logits: CE of f_D with its unweighted gradient (W comes after the
    # EMA update), CE of f_B for the EMA, GCE of f_B with its final gradient (1/B for the mean).
    rows, row_ok, cols, col_ok = _gce.row_tile(B, C, BLOCK_B, BLOCK_C)
    label = tl.load(label_ptr + rows, mask=row_ok, other=0)
    ce_d, d_d = _gce.softmax_ce_rows(
        _gce.load_logits_tile(logits_d_ptr, stride_d, rows, row_ok, cols, col_ok), cols, label)
    ce_b, d_b = _gce.softmax_ce_rows(
        _gce.load_logits_tile(logits_b_ptr, stride_b, rows, row_ok, cols, col_ok), cols, label)
    gce_b, factor_b = _gce.gce_rows(ce_b, q, GCE_FORM)
    tl.store(rows_ptr + rows, ce_d, mask=row_ok)
    tl.store(rows_ptr + B + rows, ce_b, mask=row_ok)
    tl.store(rows_ptr + 2 * B + rows, gce_b, mask=row_ok)
    tile = rows[:, None] * C + cols[None, :]
    tile_ok = row_ok[:, None] & col_ok[None, :]
    tl.store(grads_ptr + tile, d_d, mask=tile_ok)
    tl.store(grads_ptr + B * C + tile, d_b * (factor_b * inv_b)[:, None], mask=tile_ok)
    if FUSED_SCATTER:
        index = tl.load(index_ptr + rows, mask=row_ok, other=0)
        scatter_losses(index, ce_d, ce_b, row_ok, sums_ptr, count_ptr, N)
    zero_small(cmax_ptr, n_cmax, acc_ptr, n_acc, tl.program_id(0) == 0, BLOCK_CMAX, BLOCK_ACC)


@triton.jit(do_not_specialize=["B", "N"])
def _lff_weights_kernel(label_ptr, index_ptr, ema_d_ptr, ema_b_ptr, cmax_ptr, rows_ptr,
                        grads_ptr, acc_ptr, B, C, N, num_classes, inv_b,
                        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, CMAX_HALF: tl.constexpr):
    rows, row_ok, cols, col_ok = _gce.row_tile(B, C, BLOCK_B, BLOCK_C)
    label = tl.load(label_ptr + rows, mask=row_ok, other=0)
    index = tl.load(index_ptr + rows, mask=row_ok, other=0)
    w = relative_difficulty_rows(index, label, row_ok, ema_d_ptr, ema_b_ptr, cmax_ptr, N,
                                 num_classes, CMAX_HALF)
    ce_d = tl.load(rows_ptr + rows, mask=row_ok, other=0.0)
    gce_b = tl.load(rows_ptr + 2 * B + rows, mask=row_ok, other=0.0)
    # loss = mean(GCE(f_B)) + mean(W * CE(f_D)); d/d f_D = W/B * (p - onehot), W constant.
    # Sums over programs by atomic adds onto the zeroed accumulators: exact and deterministic when
    # the batch fits one program (the published shapes), last-bit order effects beyond that.
    tl.atomic_add(acc_ptr, tl.sum(w * ce_d + gce_b, axis=0) * inv_b)
    tl.atomic_add(acc_ptr + 1, tl.sum(ce_d, axis=0) * inv_b)
    tl.atomic_add(acc_ptr + 2, tl.sum(gce_b, axis=0) * inv_b)
    tl.atomic_add(acc_ptr + 3, tl.sum(w, axis=0) * inv_b)
    tile = grads_ptr + rows[:, None] * C + cols[None, :]
    tile_ok = row_ok[:, None] & col_ok[None, :]
    d_d = tl.load(tile, mask=tile_ok, other=0.0)
    tl.store(tile, d_d * (w * inv_b)[:, None], mask=tile_ok)


# ----------------------------------------------------------------------------------------------
# Host wrappers.
# ----------------------------------------------------------------------------------------------
def new_class_max(device: torch.device, num_classes: int) -> torch.Tensor:
    """Return an (uninitialised) int32 buffer of the two class maxima; launch 1 zeroes it."""
    return torch.empty(2 * _gce.block_classes(num_classes), dtype=torch.int32, device=device)


def _apply_block(num_classes: int) -> int:
    elements = _gce.tile(APPLY_TILE_ELEMENTS, 16 * APPLY_TILE_ELEMENTS)
    return max(16, min(_gce.tile(MAX_APPLY_BLOCK, 4096),
                       elements // _gce.block_classes(num_classes)))


def scatter_batch_losses(index: torch.Tensor, loss_i: torch.Tensor, loss_b: torch.Tensor,
                         n: int, cmax: torch.Tensor) -> None:
    """Launch 1: add (loss_i, loss_b, 1) at ``index`` into the EMA scratch and zero ``cmax``."""
    sums, count = ema_scratch(index.device, n)
    B = index.numel()
    _ema_scatter_kernel[(max(1, triton.cdiv(B, SCATTER_BLOCK)),)](
        index.contiguous(), loss_i.detach().float().contiguous(),
        loss_b.detach().float().contiguous(), sums, count, cmax, cmax.numel(), sums, 0, B, n,
        BLOCK=SCATTER_BLOCK, BLOCK_CMAX=cmax.numel(), BLOCK_ACC=NUM_ACC_MAX, num_warps=4)


def apply_ema_class_max(ema_i: torch.Tensor, ema_b: torch.Tensor, seen: torch.Tensor,
                        labels: torch.Tensor, num_classes: int, alpha: float,
                        cmax: torch.Tensor) -> None:
    """Launch 2: apply the scattered losses to both EMAs and ``seen``, fold the class maxima."""
    n = ema_i.numel()
    sums, count = ema_scratch(ema_i.device, n)
    block = _apply_block(num_classes)
    _ema_apply_class_max_kernel[(triton.cdiv(n, block),)](
        ema_i, ema_b, seen.view(torch.uint8), labels, sums, count, cmax, n, num_classes,
        float(alpha), 1.0 - float(alpha), BLOCK_N=block,
        BLOCK_C=_gce.block_classes(num_classes), num_warps=4)


def sample_weights(state: LossState, index: torch.Tensor, label: torch.Tensor,
                   ce_i: torch.Tensor, ce_b: torch.Tensor) -> torch.Tensor:
    """Update the EMAs with this batch's losses and return the weights W (B,) of its samples.

    Three launches (scatter, apply + class max, weights); ``state.gather`` runs between the
    caller's losses and launch 1 and supplies the global batch, while W is computed for the local
    ``index``.
    """
    ema_i, ema_b, seen, labels = state.ema_i, state.ema_b, state.seen, state.labels
    num_classes, alpha, gather = state.num_classes, state.alpha, state.gather
    upd_index, upd_i, upd_b = index, ce_i.detach(), ce_b.detach()
    if gather is not None:
        upd_index, upd_i, upd_b = gather(upd_index, upd_i, upd_b)
    cmax = new_class_max(ema_i.device, num_classes)
    scatter_batch_losses(upd_index, upd_i, upd_b, ema_i.numel(), cmax)
    apply_ema_class_max(ema_i, ema_b, seen, labels, num_classes, alpha, cmax)
    B = index.numel()
    out = torch.empty(B, dtype=torch.float32, device=ema_i.device)
    _relative_difficulty_kernel[(max(1, triton.cdiv(B, SCATTER_BLOCK)),)](
        index.contiguous(), label.contiguous(), ema_i, ema_b, cmax, out, B, ema_i.numel(),
        num_classes, BLOCK=SCATTER_BLOCK, BLOCK_C=_gce.block_classes(num_classes), num_warps=4)
    return out


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                           weight: torch.Tensor) -> torch.Tensor:
    """Return mean(weight * CE(logits, target)), a scalar; no gradient flows into ``weight``."""
    return _gce.RowLossFunction.apply(logits, target, _gce.LOSS_CE, 0.0, weight, True)


class LffHeadFunction(torch.autograd.Function):
    """The fused LfF loss mean(GCE(f_B)) + mean(W * CE(f_D)); updates the EMAs in place."""

    @staticmethod
    def forward(ctx, logits_d, logits_b, label, index, state, settings):
        ema_d, ema_b, seen, labels = state.ema_i, state.ema_b, state.seen, state.labels
        num_classes, alpha, gather = state.num_classes, state.alpha, state.gather
        q, gce_form = settings.q, settings.gce_form
        logits_d = _gce.unit_stride(logits_d)
        logits_b = _gce.unit_stride(logits_b)
        B, C = logits_d.shape
        device = logits_d.device
        n = ema_d.numel()
        BLOCK_C = _gce.block_classes(C)
        BLOCK_B = _gce.block_rows(C)
        grid = (triton.cdiv(B, BLOCK_B),)
        cmax = new_class_max(device, num_classes)
        # acc = [loss, mean ce_d, mean gce_b, mean W]: zeroed by launch 1 (program 0), summed
        # atomically by the weights launch; the loss and the statistics are views of it.
        acc = torch.empty(4, dtype=torch.float32, device=device)
        rows = torch.empty((3, B), dtype=torch.float32, device=device)  # ce_d, ce_b, gce_b
        grads = torch.empty((2, B, C), dtype=torch.float32, device=device)
        sums, count = ema_scratch(device, n)
        label = label.contiguous()
        index = index.contiguous()
        _lff_rows_kernel[grid](
            logits_d, logits_d.stride(0), logits_b, logits_b.stride(0), label, index, rows, grads,
            sums, count, cmax, cmax.numel(), acc, acc.numel(), B, C, n, float(q), 1.0 / B,
            GCE_FORM=_gce.gce_form_code(gce_form), FUSED_SCATTER=gather is None,
            BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, BLOCK_CMAX=cmax.numel(), BLOCK_ACC=NUM_ACC_MAX,
            num_warps=4)
        if gather is not None:
            scatter_batch_losses(*gather(index, rows[0], rows[1]), n, cmax)
        apply_ema_class_max(ema_d, ema_b, seen, labels, num_classes, alpha, cmax)
        _lff_weights_kernel[grid](
            label, index, ema_d, ema_b, cmax, rows, grads, acc, B, C, n, num_classes,
            1.0 / B, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, CMAX_HALF=cmax.numel() // 2, num_warps=4)
        stats = acc[1:]
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(grads)
        ctx.dtypes = (logits_d.dtype, logits_b.dtype)
        return acc[0], stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        (grads,) = ctx.saved_tensors
        dtype_d, dtype_b = ctx.dtypes
        if dtype_d == dtype_b:
            out = _gce.scale_rows(grads, grad_loss, dtype_d)
            grad_d, grad_b = out[0], out[1]
        else:
            grad_d = _gce.scale_rows(grads[0], grad_loss, dtype_d)
            grad_b = _gce.scale_rows(grads[1], grad_loss, dtype_b)
        return (grad_d, grad_b) + (None,) * 4


def lff_head(logits_d: torch.Tensor, logits_b: torch.Tensor, label: torch.Tensor,
             index: torch.Tensor, state: LossState, settings: LossSettings
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return the LfF loss mean(GCE(f_B)) + mean(W * CE(f_D)) and detached statistics (the
    contract of ``reference.lff_head``)."""
    loss, stats = LffHeadFunction.apply(logits_d, logits_b, label, index, state, settings)
    return loss, {"ce_i": stats[0], "gce_b": stats[1], "weight": stats[2]}
