"""Fused per-sample cross-entropy and generalized cross-entropy (GCE): loss and gradient in one pass.

One program handles a 2-D tile of ``BLOCK_B`` rows x ``BLOCK_C`` classes (``BLOCK_C`` = next power of
two of the class count, at least 16 so the same tile shape feeds ``tl.dot`` in the fused head). The
forward reads the logits once and writes the per-sample loss and, when the logits need a gradient,
d(loss_r)/d(logits_r) in float32; the backward is one launch that multiplies those rows by the
incoming gradient and casts them to the logits' dtype (the Liger-Kernel layout: the gradient is
computed while the softmax is in registers, not recomputed).

Semantics (docs/method.md, "Losses"; ``kernels/reference.py``), with p = softmax(l), ce = -log p_y:
* cross-entropy:   loss = ce,                          grad = p - onehot(y)
* GCE, reference:  loss = ce * q * sg(p_y)**q,        grad = q * p_y**q * (p - onehot(y))
* GCE, textbook:   loss = (1 - p_y**q) / q,           grad = p_y**q * (p - onehot(y))
All arithmetic is float32 whatever the input dtype (fp32, fp16, bf16): the losses feed a per-sample
EMA and a division by a class maximum, where half precision would visibly bias the weights. Where
float32 PyTorch cancels (p_y -> 1, the common case of a well-fit sample) the kernels do not: ce is
log1p(sum of the non-max exponentials) - (x_y - max), p_y - 1 is -(sum of the other exponentials) /
denominator, and 1 - p_y**q is -expm1(-q ce), so loss and gradient stay accurate to a few ulps.

The ``@triton.jit`` helpers ``row_tile``, ``load_logits_tile``, ``softmax_ce_rows`` and ``gce_rows``
are shared by the weighting (``weighting.py``) and DisEnt head (``head.py``) kernels, so the tiling
and the loss math live in one place.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Loss kinds of the row kernel (constexpr values).
LOSS_CE = 0
LOSS_GCE_REFERENCE = 1
LOSS_GCE_TEXTBOOK = 2
GCE_FORM_CODES = {"reference": LOSS_GCE_REFERENCE, "textbook": LOSS_GCE_TEXTBOOK}

# Triton reads TRITON_INTERPRET when a kernel is decorated; the tile choices read it here. The
# interpreter runs every program instance and every @triton.jit helper call in Python (about 2 ms a
# program), so under it the kernels take larger tiles: fewer programs and loop trips, the same code
# and masks. Tests flip this flag to run the GPU tiles on the interpreter as well.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def tile(gpu: int, interpreter: int) -> int:
    """Return the GPU tile size, or the interpreter's when kernels run under TRITON_INTERPRET=1."""
    return interpreter if INTERPRET else gpu


# Elements of one [rows x classes] float32 tile in the row kernels: 4096 keeps a handful of live
# tiles inside the register file of 4 warps, and for 10 classes (16 lanes) gives 256 rows a program,
# so the published batch sizes run as one program (and their reductions are deterministic).
ROW_TILE_ELEMENTS = 4096
MAX_BLOCK_ROWS = 256


def block_classes(num_classes: int) -> int:
    """Return the class-tile width: the next power of two of ``num_classes``, at least 16."""
    return max(16, triton.next_power_of_2(num_classes))


def block_rows(num_classes: int) -> int:
    """Return the rows per program of the row kernels for ``num_classes`` classes."""
    elements = tile(ROW_TILE_ELEMENTS, 16 * ROW_TILE_ELEMENTS)
    return max(1, min(MAX_BLOCK_ROWS, elements // block_classes(num_classes)))


def gce_form_code(form: str) -> int:
    """Return the constexpr code of a GCE form, or raise the reference's error for an unknown one."""
    if form not in GCE_FORM_CODES:
        raise ValueError(f"unknown GCE form {form!r}; expected one of {tuple(GCE_FORM_CODES)}")
    return GCE_FORM_CODES[form]


@triton.jit
def row_tile(B, C, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Return (rows, row_ok, cols, col_ok) of this program's [BLOCK_B rows x BLOCK_C classes] tile
    of a (B, C) row kernel whose grid is over row blocks (axis 0)."""
    # int64 program id: row offsets times a row stride overflow int32 beyond 2**31 elements
    # (large B x C logits, or B x D features in the head).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_C)
    return rows, rows < B, cols, cols < C


@triton.jit
def load_logits_tile(ptr, stride_row, rows, row_ok, cols, col_ok):
    """Return a [rows x classes] float32 tile; padded classes are -inf, padded rows are 0."""
    # `other=0.0` keeps masked rows finite (their max is 0, no -inf - -inf); padded classes become
    # -inf only after the load so that exp() gives them exactly zero probability.
    x = tl.load(ptr + rows[:, None] * stride_row + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    return tl.where(col_ok[None, :], x, float("-inf"))


@triton.jit
def _log1p(r):
    # log(1 + r) to a few ulps for r >= 0 without libdevice: log(u) * r / (u - 1) with u = 1 + r
    # cancels the rounding of u (Goldberg); u == 1 means r is below half an ulp of 1: log1p(r) = r.
    u = 1.0 + r
    return tl.where(u == 1.0, r, tl.log(u) * (r / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _expm1(x):
    # exp(x) - 1 without cancellation for small |x| (Kahan: (u - 1) * x / log(u), u = exp(x));
    # for |x| >= 0.5 the plain difference has no cancellation to speak of.
    u = tl.exp(x)
    small = tl.abs(x) < 0.5
    # log of a safe argument on the lanes that do not use it (u may underflow to 0 there).
    log_u = tl.log(tl.where(small & (u != 1.0), u, 2.0))
    return tl.where(small, tl.where(u == 1.0, x, (u - 1.0) * (x / log_u)), u - 1.0)


@triton.jit
def softmax_ce_rows(x, cols, target):
    """Return (ce, p - onehot) of a float32 logits tile (padded classes -inf) for ``target``."""
    row_max = tl.max(x, axis=1)
    shifted = x - row_max[:, None]
    e = tl.exp(shifted)
    # The softmax denominator is 1 (the max itself) + the rest. Keeping the rest apart gives
    # ce = log1p(rest) - (x_y - max), exact to a few ulps even when p_y -> 1 and ce -> 0, where
    # log(rounded 1 + rest) would lose everything below 6e-8.
    is_max = cols[None, :] == tl.argmax(x, axis=1)[:, None]
    rest = tl.sum(tl.where(is_max, 0.0, e), axis=1)
    is_target = cols[None, :] == target[:, None]
    shifted_t = tl.sum(tl.where(is_target, shifted, 0.0), axis=1)
    # Both terms are >= 0 (rest >= 0, x_y <= max), so ce >= 0 exactly, never -0.0: the class
    # maximum relies on that.
    ce = _log1p(rest) - shifted_t
    # d ce / d x = softmax(x) - onehot(y). At the target, p_y - 1 = -(sum of the other classes'
    # e) / denom, computed as such: p_y - 1 in float32 would cancel to nothing as p_y -> 1 (the
    # gradient of a well-fit sample). Padded classes have e = 0 and no target, so 0.
    inv_denom = 1.0 / (1.0 + rest)
    others = tl.sum(tl.where(is_target, 0.0, e), axis=1)
    p_minus_onehot = tl.where(is_target, -(others * inv_denom)[:, None], e * inv_denom[:, None])
    return ce, p_minus_onehot


@triton.jit
def gce_rows(ce, q, FORM: tl.constexpr):
    """Return (gce loss, gradient factor f) with d gce / d logits = f * (p - onehot)."""
    # p_y ** q = exp(q * log p_y) = exp(-q * ce), in float32.
    p_y_q = tl.exp(-q * ce)
    if FORM == 1:
        # Reference form: ce * q * sg(p_y)^q; the stop-gradient makes q * p_y^q a constant weight.
        factor = q * p_y_q
        loss = ce * factor
    else:
        # Textbook form: (1 - p_y^q) / q, whose derivative is -p_y^(q-1) dp_y = p_y^q (p - onehot);
        # 1 - p_y^q = -expm1(-q ce), exact to a few ulps also when p_y -> 1.
        factor = p_y_q
        loss = -_expm1(-q * ce) / q
    return loss, factor


# Row and sample counts are only compared against: not specialising on them (Triton would
# compile separate variants for 1 and for multiples of 16) keeps compiled variants few.
@triton.jit(do_not_specialize=["B"])
def _row_loss_kernel(logits_ptr, stride_row, target_ptr, weight_ptr, loss_ptr, grad_ptr,
                     B, C, q, scale,
                     LOSS: tl.constexpr, HAS_WEIGHT: tl.constexpr, REDUCE: tl.constexpr,
                     ATOMIC: tl.constexpr, STORE_GRAD: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, row_ok, cols, col_ok = row_tile(B, C, BLOCK_B, BLOCK_C)
    target = tl.load(target_ptr + rows, mask=row_ok, other=0)
    x = load_logits_tile(logits_ptr, stride_row, rows, row_ok, cols, col_ok)
    ce, grad = softmax_ce_rows(x, cols, target)
    if LOSS == 0:
        loss = ce
    else:
        loss, factor = gce_rows(ce, q, LOSS)
        grad = grad * factor[:, None]
    # Per-row multiplier of the loss: the sample weight (no gradient flows into it) times `scale`
    # (1/B for a mean, 1 for per-sample losses); the gradient carries the same multiplier.
    if HAS_WEIGHT:
        mult = tl.load(weight_ptr + rows, mask=row_ok, other=0.0).to(tl.float32) * scale
    else:
        mult = tl.full([BLOCK_B], 1.0, tl.float32) * scale
    loss = tl.where(row_ok, loss * mult, 0.0)
    if REDUCE:
        # Sum of this program's rows into the scalar output: a plain store when the grid is one
        # program (deterministic), else an atomic add into a zeroed scalar.
        total = tl.sum(loss, axis=0)
        if ATOMIC:
            tl.atomic_add(loss_ptr, total)
        else:
            tl.store(loss_ptr, total)
    else:
        tl.store(loss_ptr + rows, loss, mask=row_ok)
    if STORE_GRAD:
        tl.store(grad_ptr + rows[:, None] * C + cols[None, :], grad * mult[:, None],
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["R"])
def _scale_rows_kernel(grad_ptr, grad_out_ptr, grad_out_stride, out_ptr, R, C,
                       BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    # out[r, :] = grad_out[r * stride] * grad[r, :]: the chain rule for per-sample losses
    # (stride 1) and for a scalar loss (stride 0, one value broadcast to every row).
    rows, row_ok, cols, col_ok = row_tile(R, C, BLOCK_B, BLOCK_C)
    mask = row_ok[:, None] & col_ok[None, :]
    g = tl.load(grad_out_ptr + rows * grad_out_stride, mask=row_ok, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :],
             (grad * g[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """Return ``t`` with unit stride along its last dimension: the kernels take a row stride but
    need contiguous rows (classes, features)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def row_loss_forward(logits: torch.Tensor, target: torch.Tensor, loss: int, q: float = 0.7,
                     weight: torch.Tensor | None = None, reduce: bool = False,
                     store_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (loss, d loss/d logits in float32 or None): per-sample (B,) or, with ``reduce``,
    the scalar mean of ``weight * loss``; one launch (two when a reduction spans several programs).
    """
    logits = unit_stride(logits)
    B, C = logits.shape
    BLOCK_C = block_classes(C)
    BLOCK_B = block_rows(C)
    grid = (triton.cdiv(B, BLOCK_B),)
    atomic = reduce and grid[0] > 1
    if reduce:
        out = torch.zeros((), dtype=torch.float32, device=logits.device) if atomic else \
            torch.empty((), dtype=torch.float32, device=logits.device)
    else:
        out = torch.empty(B, dtype=torch.float32, device=logits.device)
    grad = torch.empty((B, C), dtype=torch.float32, device=logits.device) if store_grad else None
    _row_loss_kernel[grid](
        logits, logits.stride(0), target, weight if weight is not None else logits, out,
        grad if grad is not None else out, B, C, q, 1.0 / B if reduce else 1.0,
        LOSS=loss, HAS_WEIGHT=weight is not None, REDUCE=reduce, ATOMIC=atomic,
        STORE_GRAD=store_grad, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, num_warps=4)
    return out, grad


def scale_rows(grad: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Return ``grad_out * grad`` row by row in ``dtype``: per-row (R,) or scalar ``grad_out``.

    ``grad`` is float32 of shape (..., C), viewed as R rows; one launch.
    """
    C = grad.shape[-1]
    R = grad.numel() // max(C, 1)
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    grad_out = grad_out.float().contiguous()
    BLOCK_C = block_classes(C)
    BLOCK_B = block_rows(C)
    _scale_rows_kernel[(triton.cdiv(R, BLOCK_B),)](
        grad, grad_out, 0 if grad_out.dim() == 0 else 1, out, R, C,
        BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, num_warps=4)
    return out


class RowLossFunction(torch.autograd.Function):
    """Per-sample cross-entropy or GCE (B,) in float32, or with ``reduce`` the scalar mean of
    ``weight * loss``; the gradient goes into the logits only (never into ``weight``)."""

    @staticmethod
    def forward(ctx, logits, target, loss_kind, q, weight=None, reduce=False):
        if weight is not None:
            weight = weight.detach().float().contiguous()
        loss, grad = row_loss_forward(logits, target, loss_kind, q, weight=weight, reduce=reduce,
                                      store_grad=logits.requires_grad)
        ctx.save_for_backward(grad)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return scale_rows(grad, grad_loss, ctx.logits_dtype), None, None, None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return the per-sample cross-entropy (B,) in float32."""
    return RowLossFunction.apply(logits, target, LOSS_CE, 0.0)


def gce(logits: torch.Tensor, target: torch.Tensor, q: float = 0.7,
        form: str = "reference") -> torch.Tensor:
    """Return the per-sample generalized cross-entropy (B,) in float32."""
    return RowLossFunction.apply(logits, target, gce_form_code(form), float(q))
