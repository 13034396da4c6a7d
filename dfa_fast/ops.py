"""The one place that chooses how the DisEnt/LfF loss operations are computed.

Three backends with the same functions and signatures (methods call these wrappers, never a kernel
directly):

* ``triton``: the fused Triton kernels (`dfa_fast.kernels.triton_ops`), the default for CUDA tensors;
* ``fused``: the default everywhere else (CPUs): the DisEnt head as one autograd function with
  closed-form gradients, two compiled numba calls for float32 (`dfa_fast.kernels.numba_head`) and
  PyTorch operations otherwise (`dfa_fast.kernels.fused_torch`), the EMA update and weights as one
  numba pass (`dfa_fast.kernels.numba_weighting`), the other operations as in the reference;
* ``torch``: the PyTorch reference (`dfa_fast.kernels.reference`), which defines the semantics.

``DFA_KERNELS=triton|fused|torch`` forces one (``triton`` on a CPU tensor needs
``TRITON_INTERPRET=1``, which the tests set).
"""
from __future__ import annotations

import os
from types import ModuleType

import torch

from dfa_fast.kernels import fused_torch, reference

BACKENDS = ("triton", "fused", "torch")


def backend(tensor: torch.Tensor) -> str:
    """Return the backend ("triton", "fused" or "torch") that computes operations on ``tensor``."""
    forced = os.environ.get("DFA_KERNELS", "")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"DFA_KERNELS={forced!r} is not a backend; expected one of {BACKENDS}")
        return forced
    return "triton" if tensor.is_cuda else "fused"


def _impl(tensor: torch.Tensor) -> ModuleType:
    name = backend(tensor)
    if name == "triton":
        from dfa_fast.kernels import triton_ops  # imported lazily: Triton is not needed on a CPU
        return triton_ops
    return fused_torch if name == "fused" else reference


def cross_entropy(logits, target):
    """Return the per-sample cross-entropy (B,) in float32."""
    return _impl(logits).cross_entropy(logits, target)


def gce(logits, target, q=0.7, form="reference"):
    """Return the per-sample generalized cross-entropy (B,) in float32."""
    return _impl(logits).gce(logits, target, q, form)


def sample_weights(ema_i, ema_b, seen, labels, num_classes, index, label, ce_i, ce_b, alpha,
                   gather=None):
    """Update the per-sample loss EMAs in place and return the relative-difficulty weights (B,)."""
    return _impl(ema_i).sample_weights(ema_i, ema_b, seen, labels, num_classes, index, label,
                                       ce_i, ce_b, alpha, gather)


def relative_difficulty(ema_i, ema_b, labels, index, label, num_classes):
    """Return the weights W (B,) of the samples at ``index`` from the EMAs as they stand, without
    updating them: the statistic of the logs (the reference's formula on every backend; no step
    computes it apart from `sample_weights`)."""
    return reference.relative_difficulty(ema_i, ema_b, labels, index, label, num_classes)


def weighted_cross_entropy(logits, target, weight):
    """Return mean(weight * CE(logits, target)), a scalar."""
    return _impl(logits).weighted_cross_entropy(logits, target, weight)


def permute_concat(z_i, z_b, perm=None):
    """Return the intrinsic and bias classifier inputs, each (B, 2D), with the stop-gradients."""
    return _impl(z_i).permute_concat(z_i, z_b, perm)


def disent_head(z_i, z_b, weight_i, bias_i, weight_b, bias_b, label, index, ema_i, ema_b, seen,
                labels, num_classes, perm, **kwargs):
    """Return the DisEnt loss and its statistics (see `reference.disent_head`)."""
    return _impl(z_i).disent_head(z_i, z_b, weight_i, bias_i, weight_b, bias_b, label, index,
                                  ema_i, ema_b, seen, labels, num_classes, perm, **kwargs)


def lff_head(logits_d, logits_b, label, index, ema_d, ema_b, seen, labels, num_classes, **kwargs):
    """Return the LfF loss and its statistics (see `reference.lff_head`)."""
    return _impl(logits_d).lff_head(logits_d, logits_b, label, index, ema_d, ema_b, seen, labels,
                                    num_classes, **kwargs)
