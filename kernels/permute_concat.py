"""Feature permutation-concat: the classifier inputs of a DisEnt step, with the stop-gradients.

docs/method.md: the intrinsic classifier sees ``[z_i, sg(z_b[pi])]`` and the bias classifier
``[sg(z_i), z_b[pi]]`` (``pi`` = identity before swapping starts). Both inputs hold the same values;
they differ in where gradients may flow:

* forward: one launch writes both (B, 2D) inputs, reading ``z_i`` row r and ``z_b`` row ``pi[r]``
  (a gathered load; ``pi`` is drawn on the device).
* backward: one launch. ``d z_i = d x_i[:, :D]`` (the bias input's first half is stop-gradient) and
  ``d z_b[pi[r]] = d x_b[r, D:]``: row r of the swapped input came from row ``pi[r]``, so its
  gradient goes back there, which is a gather through the inverse permutation written as a
  scatter through ``pi``. Every destination row is written exactly once because ``pi`` is a
  permutation, so no atomics and no zero-initialisation are needed.

This is the simple, materialising version (two B x 2D tensors), kept as the Triton twin of
``reference.permute_concat``. The fused DisEnt head (``head.py``) never builds these tensors: it
computes the swapped logits from the per-half partial products, ``z_i W1^T + (z_b W2^T)[pi] + b``.

Tiles: [BLOCK_B rows x BLOCK_D features] per program, grid (row blocks, feature blocks); a pure
copy, so it is bandwidth-bound, and the dtype is kept (no conversion).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import gce as _gce

MAX_BLOCK_FEATURES = 128


@triton.jit
def _permuted_tile(perm_ptr, B, D, HAS_PERM: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Return (rows, feats, mask, pi[rows]) of this program's [BLOCK_B x BLOCK_D] tile; without a
    permutation pi is the identity. Rows past B are masked out of every load and store."""
    # int64 ids: row * stride exceeds int32 for large B x D.
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    feats = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (feats < D)[None, :]
    if HAS_PERM:
        perm_rows = tl.load(perm_ptr + rows, mask=row_ok, other=0)
    else:
        perm_rows = rows
    return rows, feats, mask, perm_rows


# Row and sample counts are only compared against: not specialising on them (Triton would
# compile separate variants for 1 and for multiples of 16) keeps compiled variants few.
@triton.jit(do_not_specialize=["B"])
def _permute_concat_fwd_kernel(z_i_ptr, stride_i, z_b_ptr, stride_b, perm_ptr, x_i_ptr, x_b_ptr,
                               B, D, HAS_PERM: tl.constexpr,
                               BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    # z_b is read at row pi[r] (a gathered load).
    rows, feats, mask, src = _permuted_tile(perm_ptr, B, D, HAS_PERM, BLOCK_B, BLOCK_D)
    z_i = tl.load(z_i_ptr + rows[:, None] * stride_i + feats[None, :], mask=mask, other=0.0)
    z_b = tl.load(z_b_ptr + src[:, None] * stride_b + feats[None, :], mask=mask, other=0.0)
    # Both outputs are (B, 2D) contiguous: [z_i | z_b[pi]].
    out = rows[:, None] * (2 * D) + feats[None, :]
    tl.store(x_i_ptr + out, z_i, mask=mask)
    tl.store(x_i_ptr + out + D, z_b, mask=mask)
    tl.store(x_b_ptr + out, z_i, mask=mask)
    tl.store(x_b_ptr + out + D, z_b, mask=mask)


@triton.jit(do_not_specialize=["B"])
def _permute_concat_bwd_kernel(g_i_ptr, stride_gi, g_b_ptr, stride_gb, perm_ptr, dz_i_ptr,
                               dz_b_ptr, B, D, HAS_PERM: tl.constexpr,
                               BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, feats, mask, dst = _permuted_tile(perm_ptr, B, D, HAS_PERM, BLOCK_B, BLOCK_D)
    # d z_i: first half of the intrinsic input's gradient (the bias input stops it).
    g_i = tl.load(g_i_ptr + rows[:, None] * stride_gi + feats[None, :], mask=mask, other=0.0)
    tl.store(dz_i_ptr + rows[:, None] * D + feats[None, :], g_i, mask=mask)
    # d z_b[pi[r]] = second half of the bias input's gradient at row r (scatter through pi).
    g_b = tl.load(g_b_ptr + rows[:, None] * stride_gb + D + feats[None, :], mask=mask, other=0.0)
    tl.store(dz_b_ptr + dst[:, None] * D + feats[None, :], g_b, mask=mask)


def _tiles(B: int, D: int) -> tuple[tuple[int, int], int, int]:
    """Return (grid, rows per program, features per program)."""
    block_b = _gce.tile(32, 128)
    block_d = min(MAX_BLOCK_FEATURES, triton.next_power_of_2(max(D, 1)))
    return (triton.cdiv(B, block_b), triton.cdiv(D, block_d)), block_b, block_d


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class PermuteConcatFunction(torch.autograd.Function):
    """([z_i, sg(z_b[pi])], [sg(z_i), z_b[pi]]), each (B, 2D), and the routed gradients."""

    @staticmethod
    def forward(ctx, z_i, z_b, perm):
        z_i, z_b = _unit_stride(z_i), _unit_stride(z_b)
        B, D = z_i.shape
        x_i = torch.empty((B, 2 * D), dtype=z_i.dtype, device=z_i.device)
        x_b = torch.empty((B, 2 * D), dtype=z_i.dtype, device=z_i.device)
        grid, block_b, block_d = _tiles(B, D)
        perm_arg = perm.contiguous() if perm is not None else z_i
        _permute_concat_fwd_kernel[grid](
            z_i, z_i.stride(0), z_b, z_b.stride(0), perm_arg, x_i, x_b, B, D,
            HAS_PERM=perm is not None, BLOCK_B=block_b, BLOCK_D=block_d, num_warps=4)
        ctx.save_for_backward(perm_arg if perm is not None else None)
        ctx.shape_dtypes = (B, D, z_i.dtype, z_b.dtype)
        return x_i, x_b

    @staticmethod
    def backward(ctx, grad_x_i, grad_x_b):
        (perm,) = ctx.saved_tensors
        B, D, dtype_i, dtype_b = ctx.shape_dtypes
        grad_x_i, grad_x_b = _unit_stride(grad_x_i), _unit_stride(grad_x_b)
        dz_i = torch.empty((B, D), dtype=dtype_i, device=grad_x_i.device)
        dz_b = torch.empty((B, D), dtype=dtype_b, device=grad_x_i.device)
        grid, block_b, block_d = _tiles(B, D)
        _permute_concat_bwd_kernel[grid](
            grad_x_i, grad_x_i.stride(0), grad_x_b, grad_x_b.stride(0),
            perm if perm is not None else dz_i, dz_i, dz_b, B, D, HAS_PERM=perm is not None,
            BLOCK_B=block_b, BLOCK_D=block_d, num_warps=4)
        return dz_i, dz_b, None


def permute_concat(z_i: torch.Tensor, z_b: torch.Tensor,
                   perm: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the classifier inputs ([z_i, sg(z_b[pi])], [sg(z_i), z_b[pi]]), each (B, 2D)."""
    return PermuteConcatFunction.apply(z_i, z_b, perm)
