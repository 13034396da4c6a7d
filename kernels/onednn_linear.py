"""Linear + ReLU in float32 on a CPU through oneDNN, for the MLP encoder's layers.

PyTorch's CPU wheels compute a float32 ``F.linear`` with MKL's sgemm, which on AMD processors runs
its AVX2 code; oneDNN (bundled with PyTorch, the library behind its bfloat16 products) picks its
kernels by the instruction sets it finds, AVX-512 included. At the Colored MNIST first layer
(256 x 2352 by 2352 x 100) that is 2-2.6x faster for the forward product and the weight gradient
on the AMD EPYC of these machines (``benchmarks/train_throughput.py`` times both).

`linear_relu` is one autograd function: the forward product with the bias and the ReLU fused, the
backward pass as two oneDNN products (the input gradient only when the input needs one). The values
are float32 products of the same operands; only the order of the additions inside a product differs
from MKL's, as between any two BLAS libraries.

`usable` says when it applies: float32 CPU tensors outside autocast (bfloat16 autocast already runs
its products through oneDNN), PyTorch built with oneDNN and its ``_linear_pointwise`` operator
present, and `dfa_fast.ops.backend` (the one switch of the implementations) not choosing the
PyTorch reference (``DFA_KERNELS=torch``).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from dfa_fast import ops


def _operator():
    """Return PyTorch's fused oneDNN linear operator, or None where this build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_LINEAR = _operator()


def available() -> bool:
    """Return whether this PyTorch has the oneDNN linear operator."""
    return _LINEAR is not None


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Return whether `linear_relu` computes ``relu(linear(x, weight, bias))`` for these tensors."""
    return (_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.dim() == 2
            and not torch.is_autocast_enabled("cpu") and ops.backend(x) != "torch")


def product(a: torch.Tensor, b: torch.Tensor, bias=None, relu: bool = False) -> torch.Tensor:
    """Return ``a @ b.T (+ bias) (then ReLU)`` through oneDNN; a and b may be transposed views."""
    return _LINEAR(a, b, bias, "relu" if relu else "none", [None] if relu else [], "")


class LinearReLUFunction(torch.autograd.Function):
    """relu(x W^T + b) with the gradients of x, W and b."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        out = product(x, weight, bias, relu=True)
        ctx.save_for_backward(x, weight, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, out = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad_out, out, 0)  # zero where ReLU was off
        grad_x = product(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad_w = product(grad.t(), x.t()) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Return ``relu(x @ weight.T + bias)`` (B, out) through oneDNN; see `usable`."""
    if x.shape[1] != weight.shape[1] or bias.shape != (weight.shape[0],):
        raise ValueError(f"linear_relu: input {tuple(x.shape)}, weight {tuple(weight.shape)} and "
                         f"bias {tuple(bias.shape)} do not match; expected (B, K), (N, K), (N,)")
    return LinearReLUFunction.apply(x, weight, bias)
