"""The one place that chooses how each operation of the methods and models is computed.

`TABLE` lists, for every operation, its implementations in order of preference. Each has a
backend (``triton``, ``fused`` or ``torch``) and a ``supports(*args, **kwargs)`` test of the call
(device, dtype, layout, a data-parallel gather or swap); the first implementation that supports a
call runs it. Kernels never fall back on their own, and methods and models call only the functions
below (docs/design.md, "Where to add an implementation").

- ``triton``: the fused Triton kernels (`dfa_fast.kernels.triton_ops`), first for CUDA tensors;
- ``fused``: the CPU implementations: the compiled numba DisEnt head and EMA pass
  (`kernels.numba_head`, `kernels.numba_weighting`), oneDNN's Linear + ReLU for the MLP encoder
  (`kernels.onednn_linear`);
- ``torch``: the PyTorch reference (`kernels.reference`), which defines the semantics and supports
  every call.

``DFA_KERNELS=triton|fused|torch`` forces a backend: its implementations are tried first (Triton
also on CPU tensors, under ``TRITON_INTERPRET=1``, which the tests set), then the reference.
`describe` (``dfa-fast ops``) prints what each operation gets on this machine.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from dfa_fast.kernels import reference

BACKENDS = ("triton", "fused", "torch")


def forced_backend() -> str:
    """Return the backend DFA_KERNELS forces, or "" when it is not set."""
    forced = os.environ.get("DFA_KERNELS", "")
    if forced and forced not in BACKENDS:
        raise ValueError(f"DFA_KERNELS={forced!r} is not a backend; expected one of {BACKENDS}")
    return forced


@dataclass(frozen=True)
class Impl:
    """One implementation of an operation: ``load()`` returns the function; ``supports`` takes the
    call's arguments."""
    name: str
    backend: str
    load: Callable[[], Callable]
    supports: Callable[..., bool]


def _always(*_args, **_kwargs) -> bool:
    return True


def _triton_device(tensor: torch.Tensor) -> bool:
    # CUDA tensors; CPU tensors only when Triton is forced and interpreted (the tests).
    return tensor.is_cuda or (forced_backend() == "triton" and tensor.device.type == "cpu")


def _kernel(module: str, name: str) -> Callable:
    """Return ``dfa_fast.kernels.<module>.<name>``, imported on first use (a CPU run imports no
    Triton)."""
    return getattr(importlib.import_module(f"dfa_fast.kernels.{module}"), name)


def _loader(module: str, name: str) -> Callable[[], Callable]:
    return functools.partial(_kernel, module, name)


def _takes_state(state, *_args, **_kwargs) -> bool:
    return _kernel("numba_weighting", "takes")(state)


def _numba_head_supports(*args, **kwargs) -> bool:
    return _kernel("numba_head", "usable")(*args, **kwargs)


def _load_numba_lff_head():
    def head(*args, **kwargs):
        return reference.lff_head(*args, weigh=_kernel("numba_weighting", "sample_weights"),
                                  **kwargs)
    return head


def _onednn_supports(x, layers) -> bool:
    return _kernel("onednn_linear", "usable")(x, layers[0].weight)


def _torch_chain(x, layers):
    for linear in layers:
        x = torch.relu(linear(x))
    return x


def _in_batch_swap(z_i, z_b, label, index, fc_i, fc_b, state, swap, *_args, **_kwargs) -> bool:
    return swap is None or swap.source is None


def _triton_impl(name: str, extra: Callable[..., bool] = _always) -> Impl:
    return Impl("triton", "triton", _loader("triton_ops", name),
                lambda first, *args, **kwargs: _triton_device(first)
                and extra(first, *args, **kwargs))


def _reference(name: str) -> Impl:
    return Impl("torch", "torch", lambda: getattr(reference, name), _always)


TABLE: dict[str, tuple[Impl, ...]] = {
    "cross_entropy": (_triton_impl("cross_entropy"), _reference("cross_entropy")),
    # A swap across data-parallel ranks (swap.source) picks rows of the whole global batch: only
    # the reference permutes beyond its own rows. Other dtypes and a gather also go to the
    # reference (a closed-form PyTorch head for them was within the noise of it in the trainer:
    # benchmarks/results/head_impls-before-fused-torch-removal.md).
    "disent_head": (
        _triton_impl("disent_head", _in_batch_swap),
        Impl("numba", "fused", _loader("numba_head", "disent_head"), _numba_head_supports),
        _reference("disent_head")),
    "lff_head": (
        _triton_impl("lff_head"),
        Impl("numba", "fused", _load_numba_lff_head,
             lambda logits_d, logits_b, label, index, state, *_a, **_k: _takes_state(state)),
        _reference("lff_head")),
    # The MLP encoder's Linear + ReLU layers (B, in) -> (B, out): float32 CPU, outside autocast.
    "linear_relu_chain": (
        Impl("onednn", "fused", _loader("onednn_linear", "linear_relu_chain"), _onednn_supports),
        Impl("torch", "torch", lambda: _torch_chain, _always)),
}


@functools.lru_cache(maxsize=None)
def _candidates(operation: str, forced: str, cuda: bool) -> tuple[Impl, ...]:
    impls = TABLE[operation]
    if forced:  # the forced backend's implementations, then the reference
        return tuple(i for i in impls if i.backend == forced) + \
            tuple(i for i in impls if i.backend == "torch")
    # Triton's are for CUDA tensors unless forced.
    return impls if cuda else tuple(i for i in impls if i.backend != "triton")


def choose(operation: str, *args, **kwargs) -> Impl:
    """Return the implementation that computes ``operation(*args, **kwargs)``."""
    for impl in _candidates(operation, forced_backend(), args[0].is_cuda):
        if impl.supports(*args, **kwargs):
            return impl
    raise RuntimeError(f"no implementation of {operation} supports this call")  # unreachable


def _run(operation: str, *args, **kwargs):
    return choose(operation, *args, **kwargs).load()(*args, **kwargs)


def cross_entropy(logits, target):
    """Return the per-sample cross-entropy (B,) in float32."""
    return _run("cross_entropy", logits, target)


def relative_difficulty(state, index, label):
    """Return the weights W (B,) of the samples at ``index`` from the EMAs as they stand, without
    updating them: the statistic of the logs (the reference's formula on every backend; no step
    computes it apart from the heads' weighting)."""
    return reference.relative_difficulty(state, index, label)


def disent_head(z_i, z_b, label, index, fc_i, fc_b, state, swap, settings):
    """Return the DisEnt loss and its statistics (see `reference.disent_head`)."""
    return _run("disent_head", z_i, z_b, label, index, fc_i, fc_b, state, swap, settings)


def lff_head(logits_d, logits_b, label, index, state, settings):
    """Return the LfF loss and its statistics (see `reference.lff_head`)."""
    return _run("lff_head", logits_d, logits_b, label, index, state, settings)


def linear_relu_chain(x, layers):
    """Return ``relu(... relu(relu(x W1^T + b1) W2^T + b2) ...)`` over ``layers`` (`nn.Linear`
    modules, each followed by a ReLU) for a (B, in) input."""
    return _run("linear_relu_chain", x, layers)


_EXAMPLE_BATCH = 8  # rows of the example calls' batch tensors (the EMA buffers have 32)


def examples(device: str = "cpu", gather: bool = False) -> dict[str, tuple[tuple, dict]]:
    """Return small example calls of every operation (arguments, keyword arguments) on a device,
    with an identity data-parallel gather in the loss state if ``gather``: what `describe` asks
    the table about."""
    B, C, D, N = _EXAMPLE_BATCH, 4, 6, 32
    dev = torch.device(device)
    logits, target = torch.zeros(B, C, device=dev), torch.zeros(B, dtype=torch.int64, device=dev)
    z = torch.zeros(B, D, device=dev)
    fc = reference.Linear(torch.zeros(C, 2 * D, device=dev), torch.zeros(C, device=dev))
    state = reference.LossState.zeros(torch.zeros(N, dtype=torch.int64, device=dev), C)
    if gather:
        state.gather = lambda *t: t
    index = torch.arange(B, device=dev)
    settings = reference.LossSettings()
    layers = [torch.nn.Linear(D, D).to(dev)]
    return {
        "cross_entropy": ((logits, target), {}),
        "disent_head": ((z, z, target, index, fc, fc, state, None, settings), {}),
        "lff_head": ((logits, logits, target, index, state, settings), {}),
        "linear_relu_chain": ((z, layers), {}),
    }


def _cast(value, dtype):
    # The batch's float tensors in ``dtype``; classifiers and the EMA buffers stay float32.
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() \
        and value.dim() and value.shape[0] == _EXAMPLE_BATCH else value


def describe(device: str = "cpu") -> list[dict]:
    """Return, for every operation, the implementation each case gets on this machine: float32,
    bfloat16 inputs, under bf16 autocast (bf16_mixed) and with a data-parallel gather."""
    rows = []
    gathering = examples(device, gather=True)
    for operation, (args, kwargs) in examples(device).items():
        def pick(call_args=args, call_kwargs=kwargs):
            return choose(operation, *call_args, **call_kwargs).name
        row = {"operation": operation, "fp32": pick(),
               "bf16": pick(tuple(_cast(a, torch.bfloat16) for a in args))}
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            row["bf16_mixed"] = pick()
        row["gather"] = pick(*gathering[operation])
        rows.append(row)
    return rows
