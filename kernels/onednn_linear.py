"""Linear + ReLU in float32 on a CPU through oneDNN, for the MLP encoder's layers.

PyTorch's CPU wheels compute a float32 ``F.linear`` with MKL's sgemm, which on AMD processors runs
its AVX2 code; oneDNN (bundled with PyTorch, the library behind its bfloat16 products) picks its
kernels by the instruction sets it finds, AVX-512 included. At the Colored MNIST first layer
(256 x 2352 by 2352 x 100) that is 2-2.6x faster for the forward product and the weight gradient
on the AMD EPYC of these machines (``benchmarks/train_throughput.py`` times both).

`linear_relu_chain` is one autograd function over its layers: each forward product fused with its
bias and ReLU, the backward pass as two oneDNN products a layer (the input gradient only where the
input needs one). The values are float32 products of the same operands; only the order of the
additions inside a product differs from MKL's, as between any two BLAS libraries.

`usable` says when it applies: float32 CPU tensors outside autocast (bfloat16 autocast already runs
its products through oneDNN), PyTorch built with oneDNN and its ``_linear_pointwise`` operator
present. `dfa_fast.ops` (the one place that chooses) uses it where `usable` holds and no other
backend is forced.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _operator():
    """Return PyTorch's fused oneDNN linear operator, or None where this build lacks it or its
    positional signature (X, W, B, attr, scalars, algorithm) does not give ``relu(X W^T + B)`` on
    a probe product (a private operator: another torch may change it)."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise.default
        x, w, b = (torch.linspace(-1, 1, n).reshape(shape) for n, shape in
                   ((6, (2, 3)), (12, (4, 3)), (4, (4,))))
        with torch.no_grad():
            ok = torch.allclose(op(x, w, b, "relu", [None], ""),
                                torch.relu(torch.nn.functional.linear(x, w, b)), atol=1e-6)
    except (AttributeError, RuntimeError, TypeError):
        return None
    return op if ok else None


_LINEAR = _operator()


def available() -> bool:
    """Return whether this PyTorch has the oneDNN linear operator."""
    return _LINEAR is not None


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Return whether `linear_relu_chain` computes ``relu(linear(x, weight, bias))`` for these
    tensors."""
    return (_LINEAR is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.dim() == 2
            and not torch.is_autocast_enabled("cpu"))


def product(a: torch.Tensor, b: torch.Tensor, bias=None, relu: bool = False) -> torch.Tensor:
    """Return ``a @ b.T (+ bias) (then ReLU)`` through oneDNN; a and b may be transposed views."""
    return _LINEAR(a, b, bias, "relu" if relu else "none", [None] if relu else [], "")


class LinearReLUChainFunction(torch.autograd.Function):
    """relu(... relu(relu(x W1^T + b1) W2^T + b2) ...) as one autograd node: per layer the forward
    product with bias and ReLU fused, and backward the input and weight gradients as two more
    oneDNN products (the input's only when it needs one), with one Python call forward and one
    backward for the whole chain."""

    @staticmethod
    def forward(ctx, x, *params):  # params: weight, bias of each layer in turn
        outs = []
        h = x
        for weight, bias in zip(params[::2], params[1::2]):
            h = product(h, weight, bias, relu=True)
            outs.append(h)
        ctx.save_for_backward(x, *params, *outs)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        layers = (len(saved) - 1) // 3
        x, params, outs = saved[0], saved[1:1 + 2 * layers], saved[1 + 2 * layers:]
        needs = ctx.needs_input_grad
        grads = [None] * (1 + 2 * layers)
        grad = grad_out
        for layer in reversed(range(layers)):
            weight, out = params[2 * layer], outs[layer]
            inp = outs[layer - 1] if layer else x
            grad = torch.ops.aten.threshold_backward(grad, out, 0)
            grad_in = product(grad, weight.t()) if layer or needs[0] else None
            if needs[1 + 2 * layer]:
                grads[1 + 2 * layer] = product(grad.t(), inp.t())
            if needs[2 + 2 * layer]:
                grads[2 + 2 * layer] = grad.sum(0)
            grad = grad_in
        grads[0] = grad
        return tuple(grads)


def linear_relu_chain(x: torch.Tensor, layers) -> torch.Tensor:
    """Return the output of ``layers`` (`nn.Linear` modules, each followed by a ReLU) on ``x``
    (B, in) through oneDNN, as one autograd node; see `usable`."""
    params = []
    width = x.shape[1]
    for linear in layers:
        weight, bias = linear.weight, linear.bias
        if weight.shape[1] != width or bias is None or bias.shape != (weight.shape[0],):
            raise ValueError(f"linear_relu_chain: input width {width}, weight "
                             f"{tuple(weight.shape)} and bias do not match; expected (N, "
                             f"{width}) and (N,)")
        params += [weight, bias]
        width = weight.shape[0]
    return LinearReLUChainFunction.apply(x, *params)
