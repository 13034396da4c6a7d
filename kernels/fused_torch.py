"""The DisEnt head as one autograd function of PyTorch operations, for devices without Triton (CPUs).

The reference (`reference.disent_head`) builds the head from autograd operations: four classifier
calls on concatenated inputs, five log-softmaxes, the GCE weights, means, and autograd records and
replays about 280 small operations per step, each costing a few microseconds of dispatch on a CPU
at Colored MNIST sizes (B x C = 256 x 10). Here the forward pass computes the loss and its gradient
with respect to the logits in closed form, as the Triton head does (`head.py`), and the backward pass
is four matrix products:

    rows [i; i'; b; b'] of the logits: [X; Xs] Wi^T + b_i and [X; Xs] Wb^T + b_b, with
    X = [z_i, z_b], Xs = [z_i, z_b[pi]] (the swapped rows i', b' exist only with a permutation)
    G = dL/dlogits = coef * (softmax - onehot(target)), targets [y, y, y, y[pi]], with
    coef = W/B (i), ls W/B (i'), ld f/B (b), ls lsb f/B (b'); f = q p_y^q (reference GCE form)
    or p_y^q (textbook form)
    dWi = G_i^T [X; Xs], d b_i = sum G_i (the same for the bias classifier)
    dz_i = (G_i + G_i') Wi[:, :D]                 (the bias classifier's inputs stop z_i)
    dz_b = (G_b + unpermute(G_b')) Wb[:, D:]       (the intrinsic classifier's inputs stop z_b)

The values are those of the reference: the same classifier products on the same concatenated
inputs and the same log-softmax; the EMA update, class maxima and weights are one compiled pass
(`numba_weighting.sample_weights`, passed in as ``weigh`` by `dfa_fast.ops`) that gives the
reference's values bit for bit; the tests compare both. `dfa_fast.ops` uses this head where the
compiled one (`numba_head`) does not apply: other dtypes, other devices, a data-parallel gather.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from . import reference as _reference
from .reference import STAT_NAMES, Gather, sample_weights


def _gce_parts(log_p_y: torch.Tensor, q: float, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (GCE values, d GCE / d logits = factor * (softmax - onehot): the factor)."""
    p_q = torch.exp(q * log_p_y)
    if form == "reference":
        factor = q * p_q
        return -log_p_y * factor, factor
    if form == "textbook":
        return (1.0 - p_q) / q, p_q
    raise ValueError(f"unknown GCE form {form!r}; expected one of {_reference.GCE_FORMS}")


class DisentHeadFunction(torch.autograd.Function):
    """The DisEnt loss of docs/method.md with its statistics; updates the EMAs in place."""

    @staticmethod
    def forward(ctx, z_i, z_b, weight_i, bias_i, weight_b, bias_b, label, index, ema_i, ema_b,
                seen, labels, num_classes, perm, lambda_dis, lambda_swap_b, lambda_swap, q,
                alpha, gce_form, gather, weigh):
        B, D = z_i.shape
        swap = perm is not None
        rows = torch.cat([z_i, z_b], 1)
        targets = [label, label]
        if swap:
            rows = torch.cat([rows, torch.cat([z_i, z_b[perm]], 1)])
            targets = [label, label, label, label[perm]]
        k = 2 if swap else 1  # row blocks per classifier: [original; swapped]
        logits = torch.cat([torch.nn.functional.linear(rows, weight_i, bias_i),
                            torch.nn.functional.linear(rows, weight_b, bias_b)])
        target = torch.cat(targets)[:, None]
        log_p = _reference.log_softmax(logits)
        log_p_y = log_p.gather(1, target).squeeze(1)
        ce = -log_p_y
        w = weigh(ema_i, ema_b, seen, labels, num_classes, index, label, ce[:B],
                  ce[k * B:k * B + B], alpha, gather)
        gce_value, gce_factor = _gce_parts(log_p_y[k * B:], q, gce_form)
        gce_b = gce_value[:B].mean()
        ce_i = ce[:B]
        loss_dis = (w * ce_i).mean() + lambda_dis * gce_b
        stats = [ce_i.mean(), gce_b, w.mean(), loss_dis]
        coef = [w, lambda_dis * gce_factor[:B]]
        loss = loss_dis
        if swap:
            loss_swap = ((w * ce[B:2 * B]).mean()
                         + lambda_swap_b * gce_value[B:].mean())
            loss = loss_dis + lambda_swap * loss_swap
            stats.append(loss_swap)
            coef = [w, lambda_swap * w, lambda_dis * gce_factor[:B],
                    (lambda_swap * lambda_swap_b) * gce_factor[B:]]
        # dL/dlogits = coef / B * (softmax - onehot(target)), as float32.
        grad = log_p.exp_().scatter_add_(1, target, torch.full_like(log_p_y, -1.0)[:, None])
        grad.mul_(torch.cat(coef).mul_(1.0 / B)[:, None])
        ctx.save_for_backward(grad, rows, weight_i, weight_b, perm)
        ctx.shape = (B, D, k)
        ctx.has_bias = (bias_i is not None, bias_b is not None)
        stats = torch.stack(stats).detach()
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @once_differentiable  # the hand-written backward is not itself differentiable
    def backward(ctx, grad_loss, _grad_stats):
        grad, rows, weight_i, weight_b, perm = ctx.saved_tensors
        B, D, k = ctx.shape
        grad = grad.mul(grad_loss.float()).to(rows.dtype)
        g_i, g_b = grad[:k * B], grad[k * B:]
        d_weight_i = (g_i.t() @ rows).to(weight_i.dtype)
        d_weight_b = (g_b.t() @ rows).to(weight_b.dtype)
        d_bias_i = g_i.sum(0).to(weight_i.dtype) if ctx.has_bias[0] else None
        d_bias_b = g_b.sum(0).to(weight_b.dtype) if ctx.has_bias[1] else None
        g_zi, g_zb = g_i[:B], g_b[:B]
        if k == 2:
            g_zi = g_zi + g_i[B:]
            # Swapped row r saw z_b[perm[r]]: its gradient goes back to row perm[r].
            g_zb = g_zb.index_add(0, perm, g_b[B:])
        d_z_i = (g_zi @ weight_i[:, :D].to(rows.dtype)).to(rows.dtype)
        d_z_b = (g_zb @ weight_b[:, D:].to(rows.dtype)).to(rows.dtype)
        return (d_z_i, d_z_b, d_weight_i, d_bias_i, d_weight_b, d_bias_b) + (None,) * 16


def disent_head(*tensors, lambda_dis: float, lambda_swap_b: float, lambda_swap: float,
                q: float = 0.7, alpha: float = 0.7, gce_form: str = "reference",
                gather: Gather = None, weigh: Callable = sample_weights
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return the DisEnt loss (scalar) and detached statistics for one step, with the arguments
    and contract of ``reference.disent_head`` (no ``swap_source``: `dfa_fast.ops` sends a swap
    across ranks to the reference); ``weigh`` is the `sample_weights` implementation to use."""
    loss, acc = DisentHeadFunction.apply(*tensors, lambda_dis, lambda_swap_b, lambda_swap, q,
                                         alpha, gce_form, gather, weigh)
    return loss, dict(zip(STAT_NAMES, acc.unbind()))
