"""The fused DisEnt head: classifiers, losses, EMA weighting and swap in three launches forward.

docs/method.md's DisEnt step with both classifiers linear over 2D features, W1 = W[:, :D],
W2 = W[:, D:]:

    l_i  = z_i Wi1^T + sg(z_b) Wi2^T + b_i          l_b  = sg(z_i) Wb1^T + z_b Wb2^T + b_b
    l_i' = z_i Wi1^T + (sg(z_b) Wi2^T)[pi] + b_i    l_b' = sg(z_i) Wb1^T + (z_b Wb2^T)[pi] + b_b
    loss = mean(W ce(l_i, y)) + ld mean(gce(l_b, y))
           + ls (mean(W ce(l_i', y)) + lsb mean(gce(l_b', y[pi])))

The swapped logits are built from the four per-half partial products P = z W^T (B x C each), so no
B x 2D input and no second matrix product exists: row r of ``(z_b W2^T)[pi]`` is row ``pi[r]`` of P.

Forward, three launches (four with a ``gather`` hook, which runs between the first two):
1. ``_head_logits_kernel``, grid over row blocks: the four partial products with ``tl.dot`` over
   feature chunks ([BLOCK_B x BLOCK_D] @ [BLOCK_D x BLOCK_C], float32 accumulation), stored (4, B, C)
   in float32; the un-swapped cross-entropies of both branches; their atomic scatter into the EMA
   scratch (``weighting.scatter_losses``), or, with ``gather``, a store for the hook. Program 0
   zeroes the class-maximum buffer and the loss/statistics accumulators.
2. ``weighting._ema_apply_class_max_kernel``, grid over the N training samples: EMA update and
   class-wise maxima (see weighting.py).
3. ``_head_loss_kernel``, grid over row blocks (256 rows for <= 16 classes: one program at the
   published batch sizes): W, the four losses, their gradients d loss / d logits (already carrying
   1/B, the lambdas and W), the loss and the statistics (atomic adds onto the zeroed accumulators).
   The swapped rows gather P rows ``pi[r]``; the swapped gradients are stored twice: row-aligned
   (they flow into z_i and into the first halves of the weights) and scattered to row ``pi[r]``
   (they flow into z_b and into the second halves, which saw ``z_b[pi]``). Scattering through a
   permutation writes each row once: no atomics.

Backward, one launch (two for batches above ``SINGLE_SPLIT_ROWS``): with G = dL/dl summed over the
original and swapped logits of each classifier (``G2`` = the same with the swapped part moved to the
row it came from):

    d z_i = G_i Wi1          d z_b = G_b2 Wb2            (stop-gradients: nothing else reaches them)
    d Wi  = [G_i^T z_i, G_i2^T z_b]    d b_i = sum_r G_i
    d Wb  = [G_b^T z_i, G_b2^T z_b]    d b_b = sum_r G_b

``_head_backward_kernel`` runs on a grid (row splits, feature blocks): each program loops over its
rows, writes d z for its feature block and accumulates the weight gradients of that block in
registers. With one split it writes the final gradients (times the incoming gradient, in the
parameters' dtype); with several it writes float32 partials that ``_sum_splits_kernel`` adds up in a
fixed order (deterministic, no atomics).

Precision: every product accumulates in float32. Half-precision inputs are converted to float32 in
registers (exact) and multiplied with ``tf32x3`` on a GPU (three TF32 tensor-core passes, about
float32 accuracy; the interpreter multiplies in float32), so fp16/bf16 only halve the bytes read.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import gce as _gce
from . import weighting as _weighting
from .reference import Linear, LossSettings, LossState, Swap

# Matrix products of float32 tiles: tf32x3 keeps float32 accuracy on tensor cores.
DOT_PRECISION = "tf32x3"
# Batches up to this many rows use one split in the backward (one launch, final gradients); larger
# ones about SPLIT_ROWS rows a split (at most MAX_SPLITS) so that the grid fills the GPU.
SINGLE_SPLIT_ROWS = 2048
SPLIT_ROWS = 1024
MAX_SPLITS = 128
NUM_ACC = 6  # loss, ce_i, gce_b, weight, loss_dis, loss_swap


@triton.jit
def _classifier_logits(first, second, bias, col_ok):
    # Logits = first-half product + second-half product + bias, in this order in every kernel so
    # the forward launches agree bit for bit; padded classes -inf for the softmax.
    return tl.where(col_ok[None, :], first + second + bias[None, :], float("-inf"))


@triton.jit
def _load_bias(bias_ptr, cols, col_ok, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([cols.shape[0]], tl.float32)
    return bias


@triton.jit
def _load_rows(ptr, k, B, rows, row_ok, C, cols, col_ok):
    # Rows of plane k of a (planes, B, C) float32 buffer; masked entries are 0.
    return tl.load(ptr + (k * B + rows)[:, None] * C + cols[None, :],
                   mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _store_rows(ptr, k, B, rows, row_ok, C, cols, col_ok, value):
    tl.store(ptr + (k * B + rows)[:, None] * C + cols[None, :], value,
             mask=row_ok[:, None] & col_ok[None, :])


# Row and sample counts are only compared against: not specialising on them (Triton would
# compile separate variants for 1 and for multiples of 16) keeps compiled variants few.
@triton.jit(do_not_specialize=["B", "N"])
def _head_logits_kernel(z_i_ptr, stride_zi, z_b_ptr, stride_zb, w_i_ptr, w_b_ptr,
                        bias_i_ptr, bias_b_ptr, label_ptr, index_ptr, parts_ptr, ce_ptr,
                        sums_ptr, count_ptr, cmax_ptr, n_cmax, acc_ptr, n_acc, B, C, D, N,
                        HAS_BIAS: tl.constexpr, FUSED_SCATTER: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_CMAX: tl.constexpr, BLOCK_ACC: tl.constexpr):
    rows, row_ok, cols, col_ok = _gce.row_tile(B, C, BLOCK_B, BLOCK_C)
    acc_ii = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)  # z_i Wi1^T
    acc_ib = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)  # z_b Wi2^T
    acc_bi = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)  # z_i Wb1^T
    acc_bb = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)  # z_b Wb2^T
    for d0 in range(0, D, BLOCK_D):
        feats = d0 + tl.arange(0, BLOCK_D)
        feat_ok = feats < D
        z_mask = row_ok[:, None] & feat_ok[None, :]
        # Features are converted to float32 in registers: fp16/bf16 are exact in float32.
        z_i = tl.load(z_i_ptr + rows[:, None] * stride_zi + feats[None, :], mask=z_mask,
                      other=0.0).to(tl.float32)
        z_b = tl.load(z_b_ptr + rows[:, None] * stride_zb + feats[None, :], mask=z_mask,
                      other=0.0).to(tl.float32)
        # W^T tiles [BLOCK_D x BLOCK_C]: element (d, c) is W[c, d] (first half) or W[c, D + d].
        w_off = cols[None, :] * (2 * D) + feats[:, None]
        w_mask = feat_ok[:, None] & col_ok[None, :]
        w_i1 = tl.load(w_i_ptr + w_off, mask=w_mask, other=0.0).to(tl.float32)
        w_i2 = tl.load(w_i_ptr + w_off + D, mask=w_mask, other=0.0).to(tl.float32)
        w_b1 = tl.load(w_b_ptr + w_off, mask=w_mask, other=0.0).to(tl.float32)
        w_b2 = tl.load(w_b_ptr + w_off + D, mask=w_mask, other=0.0).to(tl.float32)
        acc_ii = tl.dot(z_i, w_i1, acc_ii, input_precision=DOT_PRECISION)
        acc_ib = tl.dot(z_b, w_i2, acc_ib, input_precision=DOT_PRECISION)
        acc_bi = tl.dot(z_i, w_b1, acc_bi, input_precision=DOT_PRECISION)
        acc_bb = tl.dot(z_b, w_b2, acc_bb, input_precision=DOT_PRECISION)
    _store_rows(parts_ptr, 0, B, rows, row_ok, C, cols, col_ok, acc_ii)
    _store_rows(parts_ptr, 1, B, rows, row_ok, C, cols, col_ok, acc_ib)
    _store_rows(parts_ptr, 2, B, rows, row_ok, C, cols, col_ok, acc_bi)
    _store_rows(parts_ptr, 3, B, rows, row_ok, C, cols, col_ok, acc_bb)
    # Un-swapped cross-entropies of both branches: what the EMAs are updated with.
    label = tl.load(label_ptr + rows, mask=row_ok, other=0)
    bias_i = _load_bias(bias_i_ptr, cols, col_ok, HAS_BIAS)
    bias_b = _load_bias(bias_b_ptr, cols, col_ok, HAS_BIAS)
    ce_i, _ = _gce.softmax_ce_rows(_classifier_logits(acc_ii, acc_ib, bias_i, col_ok), cols, label)
    ce_b, _ = _gce.softmax_ce_rows(_classifier_logits(acc_bi, acc_bb, bias_b, col_ok), cols, label)
    if FUSED_SCATTER:
        index = tl.load(index_ptr + rows, mask=row_ok, other=0)
        _weighting.scatter_losses(index, ce_i, ce_b, row_ok, sums_ptr, count_ptr, N)
    else:
        tl.store(ce_ptr + rows, ce_i, mask=row_ok)
        tl.store(ce_ptr + B + rows, ce_b, mask=row_ok)
    _weighting.zero_small(cmax_ptr, n_cmax, acc_ptr, n_acc, tl.program_id(0) == 0,
                           BLOCK_CMAX, BLOCK_ACC)


@triton.jit(do_not_specialize=["B", "N"])
def _head_loss_kernel(parts_ptr, bias_i_ptr, bias_b_ptr, label_ptr, index_ptr, perm_ptr,
                      ema_i_ptr, ema_b_ptr, cmax_ptr, grads_ptr, acc_ptr,
                      B, C, N, num_classes, q, inv_b, lambda_dis, lambda_swap_b, lambda_swap,
                      HAS_BIAS: tl.constexpr, HAS_SWAP: tl.constexpr, GCE_FORM: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, CMAX_HALF: tl.constexpr):
    rows, row_ok, cols, col_ok = _gce.row_tile(B, C, BLOCK_B, BLOCK_C)
    label = tl.load(label_ptr + rows, mask=row_ok, other=0)
    index = tl.load(index_ptr + rows, mask=row_ok, other=0)
    # Relative difficulty of the sample (after this step's EMA update); 0 on masked rows.
    w = _weighting.relative_difficulty_rows(index, label, row_ok, ema_i_ptr, ema_b_ptr, cmax_ptr,
                                            N, num_classes, CMAX_HALF)
    bias_i = _load_bias(bias_i_ptr, cols, col_ok, HAS_BIAS)
    bias_b = _load_bias(bias_b_ptr, cols, col_ok, HAS_BIAS)
    p_ii = _load_rows(parts_ptr, 0, B, rows, row_ok, C, cols, col_ok)
    p_ib = _load_rows(parts_ptr, 1, B, rows, row_ok, C, cols, col_ok)
    p_bi = _load_rows(parts_ptr, 2, B, rows, row_ok, C, cols, col_ok)
    p_bb = _load_rows(parts_ptr, 3, B, rows, row_ok, C, cols, col_ok)
    ce_i, d_i = _gce.softmax_ce_rows(_classifier_logits(p_ii, p_ib, bias_i, col_ok), cols, label)
    ce_b, d_b = _gce.softmax_ce_rows(_classifier_logits(p_bi, p_bb, bias_b, col_ok), cols, label)
    gce_b, factor_b = _gce.gce_rows(ce_b, q, GCE_FORM)
    ce_i = tl.where(row_ok, ce_i, 0.0)
    gce_b = tl.where(row_ok, gce_b, 0.0)
    # dL/dl_i = W/B (p - onehot) (W is a constant); dL/dl_b = ld/B * f (p - onehot) (GCE factor f).
    g_i = d_i * (w * inv_b)[:, None]
    g_b = d_b * (lambda_dis * inv_b * factor_b)[:, None]
    loss_dis = tl.sum(w * ce_i + lambda_dis * gce_b, axis=0) * inv_b
    # Sums over programs by atomic adds onto accumulators zeroed in launch 1: exact and
    # deterministic when the batch fits one program, last-bit order effects beyond that.
    tl.atomic_add(acc_ptr + 1, tl.sum(ce_i, axis=0) * inv_b)
    tl.atomic_add(acc_ptr + 2, tl.sum(gce_b, axis=0) * inv_b)
    tl.atomic_add(acc_ptr + 3, tl.sum(w, axis=0) * inv_b)
    tl.atomic_add(acc_ptr + 4, loss_dis)
    if HAS_SWAP:
        # Row r of the swapped logits pairs z_i[r] with z_b[pi[r]]: gather P rows pi[r].
        src = tl.load(perm_ptr + rows, mask=row_ok, other=0)
        label_src = tl.load(label_ptr + src, mask=row_ok, other=0)
        p_ib_src = _load_rows(parts_ptr, 1, B, src, row_ok, C, cols, col_ok)
        p_bb_src = _load_rows(parts_ptr, 3, B, src, row_ok, C, cols, col_ok)
        # l_i' keeps the label y[r] and the weight W[r]; l_b' takes the label y[pi[r]].
        ce_is, d_is = _gce.softmax_ce_rows(
            _classifier_logits(p_ii, p_ib_src, bias_i, col_ok), cols, label)
        ce_bs, d_bs = _gce.softmax_ce_rows(
            _classifier_logits(p_bi, p_bb_src, bias_b, col_ok), cols, label_src)
        gce_bs, factor_bs = _gce.gce_rows(ce_bs, q, GCE_FORM)
        ce_is = tl.where(row_ok, ce_is, 0.0)
        gce_bs = tl.where(row_ok, gce_bs, 0.0)
        g_is = d_is * (lambda_swap * w * inv_b)[:, None]
        g_bs = d_bs * (lambda_swap * lambda_swap_b * inv_b * factor_bs)[:, None]
        loss_swap = tl.sum(w * ce_is + lambda_swap_b * gce_bs, axis=0) * inv_b
        tl.atomic_add(acc_ptr + 5, loss_swap)
        tl.atomic_add(acc_ptr, loss_dis + lambda_swap * loss_swap)
        # Planes: 0 G_i (row-aligned total), 1 g_i, 2 g_i' at row pi[r], and 3-5 the same for the
        # bias classifier; the backward forms G2 = plane 1 + plane 2 (= g + g'[pi^-1]).
        _store_rows(grads_ptr, 0, B, rows, row_ok, C, cols, col_ok, g_i + g_is)
        _store_rows(grads_ptr, 1, B, rows, row_ok, C, cols, col_ok, g_i)
        _store_rows(grads_ptr, 2, B, src, row_ok, C, cols, col_ok, g_is)
        _store_rows(grads_ptr, 3, B, rows, row_ok, C, cols, col_ok, g_b + g_bs)
        _store_rows(grads_ptr, 4, B, rows, row_ok, C, cols, col_ok, g_b)
        _store_rows(grads_ptr, 5, B, src, row_ok, C, cols, col_ok, g_bs)
    else:
        tl.atomic_add(acc_ptr, loss_dis)
        _store_rows(grads_ptr, 0, B, rows, row_ok, C, cols, col_ok, g_i)
        _store_rows(grads_ptr, 1, B, rows, row_ok, C, cols, col_ok, g_b)


@triton.jit(do_not_specialize=["B", "rows_per_split"])
def _head_backward_kernel(grads_ptr, z_i_ptr, stride_zi, z_b_ptr, stride_zb, w_i_ptr, w_b_ptr,
                          grad_loss_ptr, dz_i_ptr, dz_b_ptr, out_ptr, B, C, D, rows_per_split,
                          HAS_SWAP: tl.constexpr, FINAL: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    split = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    g = tl.load(grad_loss_ptr).to(tl.float32)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    feats = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    feat_ok = feats < D
    # W tiles [BLOCK_C x BLOCK_D] of this feature block: Wi1 for d z_i, Wb2 for d z_b.
    w_off = cols[:, None] * (2 * D) + feats[None, :]
    w_mask = col_ok[:, None] & feat_ok[None, :]
    w_i1 = tl.load(w_i_ptr + w_off, mask=w_mask, other=0.0).to(tl.float32)
    w_b2 = tl.load(w_b_ptr + w_off + D, mask=w_mask, other=0.0).to(tl.float32)
    acc_wi1 = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)  # G_i^T z_i
    acc_wi2 = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)  # G_i2^T z_b
    acc_wb1 = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)  # G_b^T z_i
    acc_wb2 = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)  # G_b2^T z_b
    acc_bias_i = tl.zeros([BLOCK_C], tl.float32)
    acc_bias_b = tl.zeros([BLOCK_C], tl.float32)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, B)
    for r0 in range(row_start, row_end, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        row_ok = rows < row_end
        g_i = _load_rows(grads_ptr, 0, B, rows, row_ok, C, cols, col_ok)
        if HAS_SWAP:
            g_i2 = (_load_rows(grads_ptr, 1, B, rows, row_ok, C, cols, col_ok)
                    + _load_rows(grads_ptr, 2, B, rows, row_ok, C, cols, col_ok))
            g_b = _load_rows(grads_ptr, 3, B, rows, row_ok, C, cols, col_ok)
            g_b2 = (_load_rows(grads_ptr, 4, B, rows, row_ok, C, cols, col_ok)
                    + _load_rows(grads_ptr, 5, B, rows, row_ok, C, cols, col_ok))
        else:
            g_i2 = g_i
            g_b = _load_rows(grads_ptr, 1, B, rows, row_ok, C, cols, col_ok)
            g_b2 = g_b
        z_mask = row_ok[:, None] & feat_ok[None, :]
        z_i = tl.load(z_i_ptr + rows[:, None] * stride_zi + feats[None, :], mask=z_mask,
                      other=0.0).to(tl.float32)
        z_b = tl.load(z_b_ptr + rows[:, None] * stride_zb + feats[None, :], mask=z_mask,
                      other=0.0).to(tl.float32)
        # d z_i = G_i Wi1 and d z_b = G_b2 Wb2: [BLOCK_B x BLOCK_C] @ [BLOCK_C x BLOCK_D].
        dz_i = tl.dot(g_i, w_i1, input_precision=DOT_PRECISION) * g
        dz_b = tl.dot(g_b2, w_b2, input_precision=DOT_PRECISION) * g
        dz_off = rows[:, None] * D + feats[None, :]
        tl.store(dz_i_ptr + dz_off, dz_i.to(dz_i_ptr.dtype.element_ty), mask=z_mask)
        tl.store(dz_b_ptr + dz_off, dz_b.to(dz_b_ptr.dtype.element_ty), mask=z_mask)
        # Weight gradients: G^T z, [BLOCK_C x BLOCK_B] @ [BLOCK_B x BLOCK_D], summed over rows.
        acc_wi1 = tl.dot(tl.trans(g_i), z_i, acc_wi1, input_precision=DOT_PRECISION)
        acc_wi2 = tl.dot(tl.trans(g_i2), z_b, acc_wi2, input_precision=DOT_PRECISION)
        acc_wb1 = tl.dot(tl.trans(g_b), z_i, acc_wb1, input_precision=DOT_PRECISION)
        acc_wb2 = tl.dot(tl.trans(g_b2), z_b, acc_wb2, input_precision=DOT_PRECISION)
        acc_bias_i += tl.sum(g_i, axis=0)
        acc_bias_b += tl.sum(g_b, axis=0)
    # Output row of this split: [dWi (C x 2D), dWb (C x 2D), db_i (C), db_b (C)], flattened. The
    # final write (one split) carries the incoming gradient and the parameters' dtype; partials stay
    # float32 and unscaled for _sum_splits_kernel.
    if FINAL:
        scale = g
    else:
        scale = 1.0
    n_weight = C * 2 * D
    out = out_ptr + split * (2 * n_weight + 2 * C)
    dtype = out_ptr.dtype.element_ty
    tl.store(out + w_off, (acc_wi1 * scale).to(dtype), mask=w_mask)
    tl.store(out + w_off + D, (acc_wi2 * scale).to(dtype), mask=w_mask)
    tl.store(out + n_weight + w_off, (acc_wb1 * scale).to(dtype), mask=w_mask)
    tl.store(out + n_weight + w_off + D, (acc_wb2 * scale).to(dtype), mask=w_mask)
    # Bias gradients once per split: only the first feature block writes them.
    bias_ok = cols < tl.where(pid_d == 0, C, 0)
    tl.store(out + 2 * n_weight + cols, (acc_bias_i * scale).to(dtype), mask=bias_ok)
    tl.store(out + 2 * n_weight + C + cols, (acc_bias_b * scale).to(dtype), mask=bias_ok)


@triton.jit(do_not_specialize=["n_splits", "numel"])
def _sum_splits_kernel(partial_ptr, n_splits, numel, grad_loss_ptr, out_ptr,
                       BLOCK: tl.constexpr):
    # out = g * sum over splits of the float32 partials, in split order (deterministic).
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(0, n_splits):
        acc += tl.load(partial_ptr + s * numel + offs, mask=ok, other=0.0)
    g = tl.load(grad_loss_ptr).to(tl.float32)
    tl.store(out_ptr + offs, (acc * g).to(out_ptr.dtype.element_ty), mask=ok)


def _feature_block(D: int, cap: int) -> int:
    return max(16, min(_gce.tile(cap, 128), triton.next_power_of_2(D)))


def _logits_block_rows(B: int) -> int:
    # Small batches: 16 rows a program spreads B = 256 over 16 programs; large ones: 64.
    return _gce.tile(16 if B <= 4096 else 64, 128)


class DisentHeadFunction(torch.autograd.Function):
    """The DisEnt loss of docs/method.md with its statistics; updates the EMAs in place."""

    @staticmethod
    def forward(ctx, z_i, z_b, weight_i, bias_i, weight_b, bias_b, label, index, state, perm,
                settings):
        ema_i, ema_b, seen, labels = state.ema_i, state.ema_b, state.seen, state.labels
        num_classes, alpha, gather = state.num_classes, state.alpha, state.gather
        q, gce_form = settings.q, settings.gce_form
        lambda_dis, lambda_swap_b, lambda_swap = (settings.lambda_dis, settings.lambda_swap_b,
                                                  settings.lambda_swap)
        z_i, z_b = _gce.unit_stride(z_i), _gce.unit_stride(z_b)
        weight_i, weight_b = weight_i.contiguous(), weight_b.contiguous()
        label, index = label.contiguous(), index.contiguous()
        B, D = z_i.shape
        C = weight_i.shape[0]
        n = ema_i.numel()
        device = z_i.device
        has_bias = bias_i is not None
        has_swap = perm is not None
        BLOCK_C = _gce.block_classes(C)
        cmax = _weighting.new_class_max(device, num_classes)
        acc = torch.empty(NUM_ACC, dtype=torch.float32, device=device)
        parts = torch.empty((4, B, C), dtype=torch.float32, device=device)
        ce = torch.empty((2, B), dtype=torch.float32, device=device)
        grads = torch.empty((6 if has_swap else 2, B, C), dtype=torch.float32, device=device)
        sums, count = _weighting.ema_scratch(device, n)
        bias_args = (bias_i, bias_b) if has_bias else (parts, parts)
        block_b = _logits_block_rows(B)
        _head_logits_kernel[(triton.cdiv(B, block_b),)](
            z_i, z_i.stride(0), z_b, z_b.stride(0), weight_i, weight_b, *bias_args, label, index,
            parts, ce, sums, count, cmax, cmax.numel(), acc, NUM_ACC, B, C, D, n,
            HAS_BIAS=has_bias, FUSED_SCATTER=gather is None, DOT_PRECISION=DOT_PRECISION,
            BLOCK_B=block_b, BLOCK_C=BLOCK_C, BLOCK_D=_feature_block(D, 64),
            BLOCK_CMAX=cmax.numel(), BLOCK_ACC=_weighting.NUM_ACC_MAX, num_warps=4)
        if gather is not None:
            _weighting.scatter_batch_losses(*gather(index, ce[0], ce[1]), n, cmax)
        _weighting.apply_ema_class_max(ema_i, ema_b, seen, labels, num_classes, alpha, cmax)
        block_b = _gce.block_rows(C)
        _head_loss_kernel[(triton.cdiv(B, block_b),)](
            parts, *bias_args, label, index, perm.contiguous() if has_swap else index,
            ema_i, ema_b, cmax, grads, acc, B, C, n, num_classes, float(q), 1.0 / B,
            float(lambda_dis), float(lambda_swap_b), float(lambda_swap),
            HAS_BIAS=has_bias, HAS_SWAP=has_swap, GCE_FORM=_gce.gce_form_code(gce_form),
            BLOCK_B=block_b, BLOCK_C=BLOCK_C, CMAX_HALF=cmax.numel() // 2, num_warps=8)
        ctx.save_for_backward(grads, z_i, z_b, weight_i, weight_b)
        ctx.has_bias = has_bias
        ctx.bias_dtypes = (bias_i.dtype, bias_b.dtype) if has_bias else None
        stats = acc[1:]
        ctx.mark_non_differentiable(stats)
        return acc[0], stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        grads, z_i, z_b, weight_i, weight_b = ctx.saved_tensors
        B, D = z_i.shape
        C = weight_i.shape[0]
        device = z_i.device
        grad_loss = grad_loss.float().contiguous()
        dz_i = torch.empty((B, D), dtype=z_i.dtype, device=device)
        dz_b = torch.empty((B, D), dtype=z_b.dtype, device=device)
        block_b = _gce.tile(64, 128)
        block_d = _feature_block(D, 32)
        n_splits = 1 if B <= SINGLE_SPLIT_ROWS else min(MAX_SPLITS, triton.cdiv(B, SPLIT_ROWS))
        rows_per_split = triton.cdiv(triton.cdiv(B, n_splits), block_b) * block_b
        n_splits = triton.cdiv(B, rows_per_split)
        numel = 2 * C * 2 * D + 2 * C  # [dWi, dWb, db_i, db_b] flattened
        final = n_splits == 1
        out = torch.empty(numel, dtype=weight_i.dtype, device=device)
        partial = out if final else torch.empty((n_splits, numel), dtype=torch.float32,
                                                device=device)
        _head_backward_kernel[(n_splits, triton.cdiv(D, block_d))](
            grads, z_i, z_i.stride(0), z_b, z_b.stride(0), weight_i, weight_b, grad_loss,
            dz_i, dz_b, partial, B, C, D, rows_per_split, HAS_SWAP=grads.shape[0] == 6,
            FINAL=final, DOT_PRECISION=DOT_PRECISION, BLOCK_B=block_b,
            BLOCK_C=_gce.block_classes(C), BLOCK_D=block_d, num_warps=4)
        if not final:
            block = 1024
            _sum_splits_kernel[(triton.cdiv(numel, block),)](
                partial, n_splits, numel, grad_loss, out, BLOCK=block, num_warps=4)
        n_weight = C * 2 * D
        d_weight_i = out[:n_weight].view(C, 2 * D)
        d_weight_b = out[n_weight:2 * n_weight].view(C, 2 * D).to(weight_b.dtype)
        d_bias_i = d_bias_b = None
        if ctx.has_bias:
            d_bias_i = out[2 * n_weight:2 * n_weight + C].to(ctx.bias_dtypes[0])
            d_bias_b = out[2 * n_weight + C:].to(ctx.bias_dtypes[1])
        return (dz_i, dz_b, d_weight_i, d_bias_i, d_weight_b, d_bias_b) + (None,) * 5


def disent_head(z_i: torch.Tensor, z_b: torch.Tensor, label: torch.Tensor, index: torch.Tensor,
                fc_i: Linear, fc_b: Linear, state: LossState, swap: Optional[Swap],
                settings: LossSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return the DisEnt loss (scalar) and detached statistics for one step (docs/method.md).

    Same contract as ``reference.disent_head``, for a swap within the batch (``swap.source``
    None; `dfa_fast.ops` sends a swap across ranks to the reference); ``swap.perm`` is a device
    permutation of range(B). The EMA buffers are updated in place.
    """
    if swap is not None and swap.source is not None:
        raise ValueError("the Triton head swaps within its own batch; a swap.source is the "
                         "reference's")
    perm = None if swap is None else swap.perm
    loss, acc = DisentHeadFunction.apply(z_i, z_b, *fc_i, *fc_b, label, index, state, perm,
                                         settings)
    stats = {"ce_i": acc[0], "gce_b": acc[1], "weight": acc[2], "loss_dis": acc[3]}
    if perm is not None:
        stats["loss_swap"] = acc[4]
    return loss, stats
