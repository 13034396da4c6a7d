"""The DisEnt head of a float32 CPU step as two compiled calls (numba): one forward, one backward.

The reference (`reference.disent_head`) builds the head from autograd operations: four classifier
calls on concatenated inputs, five log-softmaxes, the GCE weights and means, about 280 small
operations a step, each a few microseconds of dispatch on a CPU at Colored MNIST sizes (256 x 10
logits per block). Here the forward pass computes the loss and its gradient with respect to the
logits in closed form, as the Triton head does (`head.py`), and the backward pass is four matrix
products, all in two compiled calls with the batch as the vectorised dimension (the logits and
their gradient are kept transposed, classes x rows):

    rows [i; i'; b; b'] of the logits: [X; Xs] Wi^T + b_i and [X; Xs] Wb^T + b_b, with
    X = [z_i, z_b], Xs = [z_i, z_b[pi]] (the swapped rows i', b' exist only with a swap)
    G = dL/dlogits = coef * (softmax - onehot(target)), targets [y, y, y, y[pi]], with
    coef = W/B (i), ls W/B (i'), ld f/B (b), ls lsb f/B (b'); f = q p_y^q (reference GCE form)
    or p_y^q (textbook form)
    dWi = G_i^T [X; Xs], d b_i = sum G_i (the same for the bias classifier)
    dz_i = (G_i + G_i') Wi[:, :D]                 (the bias classifier's inputs stop z_i)
    dz_b = (G_b + unpermute(G_b')) Wb[:, D:]       (the intrinsic classifier's inputs stop z_b)

* forward: the logit blocks, their log-softmax, CE and GCE, the EMA update, class maxima and
  weights W (`numba_weighting._update_and_weigh`, the same pass and bookkeeping as
  `numba_weighting.sample_weights`), the loss and its statistics, and G;
* backward: the classifier and feature gradients above.

Float32 arithmetic throughout; the products' sums may be reordered (and vectorised) as any BLAS
does, so values agree with the reference to float32 rounding (the tests compare them), not bit
for bit. The EMA buffers, seen flags and W are `numba_weighting`'s, which are the reference's bit
for bit given the same losses. `usable` says when it applies; `dfa_fast.ops` gives every other
call (other dtypes, a data-parallel gather or swap) to the reference.
"""
from __future__ import annotations

from typing import Optional

import numba
import numpy as np
import torch
from torch.autograd.function import once_differentiable

from . import numba_weighting
from . import reference as _reference
from .numba_weighting import _floats, _ints
from .reference import Linear, LossSettings, LossState, Swap

GCE_FORM_CODES = {"reference": 0, "textbook": 1}


# Only the products may sum in any order (as any BLAS does); NaN and infinity keep their rules.
_PRODUCTS = {"reassoc", "contract"}


@numba.njit(nogil=True, cache=True, fastmath=_PRODUCTS)
def _rows_t(z_i, z_b, perm, swap):  # pragma: no cover (compiled)
    """Return the classifier inputs transposed, (2D, R): columns [z_i[s], z_b[s]] for the samples
    s and, with a swap, [z_i[s], z_b[perm[s]]] after them (R = B or 2B)."""
    batch, dim = z_i.shape
    rows = 2 * batch if swap else batch
    out = np.empty((2 * dim, rows), np.float32)
    # Row by row of the output: writing down its columns instead hits one cache set.
    for d in range(dim):
        for s in range(batch):
            out[d, s] = z_i[s, d]
        for s in range(batch):
            out[dim + d, s] = z_b[s, d]
        if swap:
            for s in range(batch):
                out[d, batch + s] = z_i[s, d]
            for s in range(batch):
                out[dim + d, batch + s] = z_b[perm[s], d]
    return out


@numba.njit(nogil=True, cache=True, fastmath=_PRODUCTS)
def _logits_t(weight, bias, rows_t, out, col0):  # pragma: no cover (compiled)
    """out[:, col0:col0 + R] (C, R) = weight (C, 2D) @ rows_t (2D, R) + bias, vectorised over
    the rows."""
    classes, width = weight.shape
    rows = rows_t.shape[1]
    acc = np.empty(rows, np.float32)
    for c in range(classes):
        acc[:] = 0.0
        for d in range(width):
            w = weight[c, d]
            for r in range(rows):
                acc[r] += w * rows_t[d, r]
        target = out[c, col0:col0 + rows]
        for r in range(rows):
            target[r] = acc[r] + bias[c]


@numba.njit(nogil=True, cache=True)
def _forward(z_i, z_b, weight_i, bias_i, weight_b, bias_b, label, index, perm, swap,
             ema_i, ema_b, seen, labels, num_classes, lambda_dis, lambda_swap_b, lambda_swap,
             q, alpha, form, floor, eps, slot, max_i, max_b, known,
             grad_t, stats):  # pragma: no cover (compiled)
    """Fill grad_t (C, 2R) with dL/dlogits (columns: the intrinsic classifier's R rows, then the
    bias classifier's) and stats; update the EMAs; return (loss, whether the class maxima were
    found by a full pass)."""
    batch = z_i.shape[0]
    if swap:
        for s in range(batch):
            if perm[s] < 0 or perm[s] >= batch:
                raise IndexError("a swap permutation index is outside the batch")
    for s in range(batch):
        if label[s] < 0 or label[s] >= num_classes:
            raise IndexError("a batch label is outside [0, num_classes)")
    rows = 2 * batch if swap else batch
    total = 2 * rows
    rows_t = _rows_t(z_i, z_b, perm, swap)
    _logits_t(weight_i, bias_i, rows_t, grad_t, 0)
    _logits_t(weight_b, bias_b, rows_t, grad_t, rows)
    classes = grad_t.shape[0]
    # Targets: y for the intrinsic rows and the bias classifier's own rows, y[pi] for its swapped.
    target = np.empty(total, np.int64)
    for r in range(total):
        s = r % batch
        target[r] = label[perm[s]] if swap and r >= rows + batch else label[s]
    # Log-softmax over the classes, vectorised over the rows; grad_t becomes the softmax.
    m = grad_t[0].copy()
    for c in range(1, classes):
        for r in range(total):
            v = grad_t[c, r]
            if v > m[r] or v != v:
                m[r] = v
    log_p_y = np.empty(total, np.float32)
    for r in range(total):
        log_p_y[r] = grad_t[target[r], r] - m[r]
    sums = np.zeros(total, np.float32)
    for c in range(classes):
        for r in range(total):
            e = np.exp(grad_t[c, r] - m[r])
            grad_t[c, r] = e
            sums[r] += e
    for r in range(total):
        log_p_y[r] -= np.log(sums[r])
        sums[r] = np.float32(1.0) / sums[r]
    for c in range(classes):
        for r in range(total):
            grad_t[c, r] *= sums[r]
    for r in range(total):
        grad_t[target[r], r] -= np.float32(1.0)
    # Per-sample losses of the original samples: CE of the intrinsic and of the bias classifier.
    ce_i = np.empty(batch, np.float32)
    ce_b = np.empty(batch, np.float32)
    for s in range(batch):
        ce_i[s] = -log_p_y[s]
        ce_b[s] = -log_p_y[rows + s]
    w = np.empty(batch, np.float32)
    rescanned = numba_weighting._update_and_weigh(
        ema_i, ema_b, seen, labels, num_classes, index, ce_i, ce_b, alpha, index, label, floor,
        eps, slot, w, max_i, max_b, known)
    # GCE over the bias classifier's rows (original and swapped) and its gradient factor.
    qq = np.float32(q)
    gce_value = np.empty(rows, np.float32)
    gce_factor = np.empty(rows, np.float32)
    for r in range(rows):
        lp = log_p_y[rows + r]
        p_q = np.exp(qq * lp)
        if form == 0:
            gce_factor[r] = qq * p_q
            gce_value[r] = -lp * gce_factor[r]
        else:
            gce_factor[r] = p_q
            gce_value[r] = (np.float32(1.0) - p_q) / qq
    inv_b = np.float32(1.0) / np.float32(batch)
    sum_wce = sum_ce = sum_w = sum_gce = np.float32(0.0)
    for s in range(batch):
        sum_wce += w[s] * ce_i[s]
        sum_ce += ce_i[s]
        sum_w += w[s]
        sum_gce += gce_value[s]
    ld, ls, lsb = np.float32(lambda_dis), np.float32(lambda_swap), np.float32(lambda_swap_b)
    gce_b = sum_gce * inv_b
    loss_dis = sum_wce * inv_b + ld * gce_b
    stats[0] = sum_ce * inv_b
    stats[1] = gce_b
    stats[2] = sum_w * inv_b
    stats[3] = loss_dis
    loss = loss_dis
    if swap:
        sum_wce_s = sum_gce_s = np.float32(0.0)
        for s in range(batch):
            sum_wce_s += w[s] * (-log_p_y[batch + s])
            sum_gce_s += gce_value[batch + s]
        loss_swap = sum_wce_s * inv_b + lsb * (sum_gce_s * inv_b)
        loss = loss_dis + ls * loss_swap
        stats[4] = loss_swap
    # dL/dlogits = coef / B * (softmax - onehot): coef W (i), ls W (i'), ld f (b), ls lsb f (b').
    coef = np.empty(total, np.float32)
    for s in range(batch):
        coef[s] = w[s] * inv_b
        coef[rows + s] = (ld * gce_factor[s]) * inv_b
        if swap:
            coef[batch + s] = (ls * w[s]) * inv_b
            coef[rows + batch + s] = ((ls * lsb) * gce_factor[batch + s]) * inv_b
    for c in range(classes):
        for r in range(total):
            grad_t[c, r] *= coef[r]
    return loss, rescanned


@numba.njit(nogil=True, cache=True, fastmath=_PRODUCTS)
def _backward(grad_t, scale, z_i, z_b, perm, swap, weight_i, weight_b, d_z_i, d_z_b,
              d_weight_i, d_bias_i, d_weight_b, d_bias_b):  # pragma: no cover (compiled)
    batch, dim = z_i.shape
    classes = grad_t.shape[0]
    rows = 2 * batch if swap else batch
    rows_t = _rows_t(z_i, z_b, perm, swap)
    # g[m, c, r]: dL/dlogits of classifier m (0: intrinsic, 1: bias), row r (B or 2B rows).
    g = np.empty((2, classes, rows), np.float32)
    for m in range(2):
        for c in range(classes):
            source = grad_t[c, m * rows:(m + 1) * rows]
            for r in range(rows):
                g[m, c, r] = source[r] * scale
    # Classifier gradients: the sums of G and G^T [rows], per classifier.
    for m in range(2):
        d_weight = d_weight_i if m == 0 else d_weight_b
        d_bias = d_bias_i if m == 0 else d_bias_b
        for c in range(classes):
            gc = g[m, c]
            acc = np.float32(0.0)
            for r in range(rows):
                acc += gc[r]
            d_bias[c] = acc
            for d in range(2 * dim):
                feature = rows_t[d]
                acc = np.float32(0.0)
                for r in range(rows):
                    acc += gc[r] * feature[r]
                d_weight[c, d] = acc
    # Feature gradients, transposed (D, B): the intrinsic classifier's loss reaches z_i only
    # (its rows i and i'), the bias classifier's z_b only (rows b, and b' through pi): the
    # stop-gradients of docs/method.md.
    gi = np.zeros((dim, rows), np.float32)
    gb = np.zeros((dim, rows), np.float32)
    for c in range(classes):
        g_i, g_b = g[0, c], g[1, c]
        for d in range(dim):
            wi, wb = weight_i[c, d], weight_b[c, dim + d]
            out_i, out_b = gi[d], gb[d]
            for r in range(rows):
                out_i[r] += wi * g_i[r]
                out_b[r] += wb * g_b[r]
    for s in range(batch):
        for d in range(dim):
            d_z_i[s, d] = gi[d, s] + gi[d, batch + s] if swap else gi[d, s]
            d_z_b[s, d] = gb[d, s]
    if swap:
        for s in range(batch):
            t = perm[s]
            for d in range(dim):
                d_z_b[t, d] += gb[d, batch + s]


def usable(z_i, z_b, label, index, fc_i: Linear, fc_b: Linear, state: LossState,
           swap: Optional[Swap] = None, settings: Optional[LossSettings] = None) -> bool:
    """Whether the compiled head computes this call (the head's arguments): float32 CPU tensors,
    features of equal shape, classifiers over [z_i, z_b] with biases, buffers `numba_weighting`
    takes, no data-parallel gather, a swap within the batch."""
    (weight_i, bias_i), (weight_b, bias_b) = fc_i, fc_b
    tensors = (z_i, z_b, weight_i, bias_i, weight_b, bias_b)
    return (state.gather is None and numba_weighting.takes(state)
            and (swap is None or swap.source is None)
            and all(t is not None and t.device.type == "cpu" and t.dtype == torch.float32
                    for t in tensors)
            and z_i.dim() == 2 and z_i.shape == z_b.shape
            and weight_i.shape == weight_b.shape == (weight_i.shape[0], 2 * z_i.shape[1])
            and bias_i.shape == bias_b.shape == (weight_i.shape[0],))


class NumbaHeadFunction(torch.autograd.Function):
    """The DisEnt loss of docs/method.md with its statistics; updates the EMAs in place. The
    tensors that take gradients are arguments (autograd needs them so); the rest travel as the
    head's named objects."""

    @staticmethod
    def forward(ctx, z_i, z_b, weight_i, bias_i, weight_b, bias_b, label, index, state, perm,
                settings):
        gce_form = settings.gce_form
        if gce_form not in GCE_FORM_CODES:
            raise ValueError(f"unknown GCE form {gce_form!r}; expected one of "
                             f"{_reference.GCE_FORMS}")
        B = z_i.shape[0]
        swap = perm is not None
        if swap and perm.shape != (B,):
            raise IndexError(f"the swap permutation must hold {B} indices, not "
                             f"{tuple(perm.shape)}")
        classes = weight_i.shape[0]
        num_classes = state.num_classes
        if num_classes > classes:
            raise ValueError(f"num_classes={num_classes} but the classifiers have {classes} "
                             "outputs")
        grad = torch.empty(classes, 2 * (2 if swap else 1) * B)  # dL/dlogits, transposed
        stats = torch.empty(5 if swap else 4)
        perm_array = _ints(perm) if swap else np.zeros(B, np.int64)
        z_i_a, z_b_a = _floats(z_i), _floats(z_b)
        known, valid = numba_weighting.take_class_maxima(state)
        loss, rescanned = _forward(
            z_i_a, z_b_a, _floats(weight_i), _floats(bias_i), _floats(weight_b), _floats(bias_b),
            _ints(label), _ints(index), perm_array, swap,
            state.ema_i.numpy(), state.ema_b.numpy(), state.seen.numpy(), state.labels.numpy(),
            num_classes, float(settings.lambda_dis), float(settings.lambda_swap_b),
            float(settings.lambda_swap), float(settings.q), float(state.alpha),
            GCE_FORM_CODES[gce_form], _reference.MAX_FLOOR, _reference.WEIGHT_EPS,
            numba_weighting.scratch(state), known.max_i, known.max_b, valid,
            grad.numpy(), stats.numpy())
        numba_weighting.keep_class_maxima(state, known, rescanned)
        ctx.save_for_backward(grad, z_i, z_b, weight_i, weight_b)  # version-checked by autograd
        ctx.swap = (perm_array, swap)
        ctx.mark_non_differentiable(stats)
        return torch.tensor(loss, dtype=torch.float32), stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_stats):
        grad, z_i, z_b, weight_i, weight_b = ctx.saved_tensors
        perm, swap = ctx.swap
        outs = [torch.empty(z_i.shape), torch.empty(z_b.shape), torch.empty(weight_i.shape),
                torch.empty(weight_i.shape[0]), torch.empty(weight_b.shape),
                torch.empty(weight_b.shape[0])]
        _backward(grad.numpy(), float(grad_loss), _floats(z_i), _floats(z_b), perm, swap,
                  _floats(weight_i), _floats(weight_b), *(t.numpy() for t in outs))
        return tuple(outs) + (None,) * 5


def disent_head(z_i: torch.Tensor, z_b: torch.Tensor, label: torch.Tensor, index: torch.Tensor,
                fc_i: Linear, fc_b: Linear, state: LossState, swap: Optional[Swap],
                settings: LossSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return the DisEnt loss (scalar) and detached statistics for one step, with the arguments
    and contract of ``reference.disent_head``, for the calls `usable` accepts."""
    loss, acc = NumbaHeadFunction.apply(z_i, z_b, *fc_i, *fc_b, label, index, state,
                                        None if swap is None else swap.perm, settings)
    return loss, dict(zip(_reference.STAT_NAMES, acc.unbind()))
