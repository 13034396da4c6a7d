"""Every private torch and DeepSpeed name that dfa-fast uses for CPU speed, behind a feature test.

Users run other versions than the one these shortcuts were measured on (torch 2.4 to 2.13, the GPU
machine's 2.11), and a private name may be gone or changed there. Each function here looks its
name up when it is asked (so a test can remove it), and where the name is missing returns the
public path's answer and warns once, naming what is missing and what runs instead. Nothing else in
the package touches these names.

| private name | what it buys | without it |
| --- | --- | --- |
| `torch._fused_adam_`, `torch._foreach_add_`, `torch.optim.optimizer._global_optimizer_*_hooks`, `torch.autograd._profiler_enabled` | `dfa_fast.optim.Adam`'s short step | `torch.optim.Adam.step` (fused) |
| `torch._C._storage_Use_Count` | the loader child's slots hand out images in place | a copy of each image out of its slot |
| `deepspeed.comm.torch.build_shm_op` | no minutes-long JIT build at the first run | nothing to skip |
| `torch.ops.mkldnn._is_mkldnn_bf16_supported` | whether oneDNN runs bf16 natively | torch's rule read from /proc/cpuinfo |

`kernels/onednn_linear.py` tests its own private operator (`torch.ops.mkldnn._linear_pointwise`)
with a probe product; where it is missing or differs, `dfa_fast.ops` runs the plain layers.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Callable, Optional

import torch

_warned: set[str] = set()


def _missing(name: str, instead: str) -> None:
    """Warn once per process that ``name`` is missing and what runs ``instead``."""
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"{name} is missing in torch {torch.__version__}: {instead}",
                      RuntimeWarning, stacklevel=3)


def adam_kernels() -> Optional[dict]:
    """Return the private names `dfa_fast.optim.Adam`'s short step calls (the fused kernel, the
    step-count add, the global step-hook dicts, the profiler test), or None (with one warning)
    where one is missing: then every step is `torch.optim.Adam.step`."""
    optimizer_module = importlib.import_module("torch.optim.optimizer")
    names = {"fused_adam": (torch, "_fused_adam_"), "foreach_add": (torch, "_foreach_add_"),
             "profiler_enabled": (torch.autograd, "_profiler_enabled"),
             "pre": (optimizer_module, "_global_optimizer_pre_hooks"),
             "post": (optimizer_module, "_global_optimizer_post_hooks")}
    found = {key: getattr(owner, name, None) for key, (owner, name) in names.items()}
    absent = [names[key][1] for key, value in found.items()
              if value is None or (key in ("pre", "post") and not isinstance(value, dict))]
    if absent:
        _missing(f"the fused Adam short path's private names ({', '.join(absent)})",
                 "every step is torch.optim.Adam.step (the same update, more Python)")
        return None
    return found


def storage_use_count() -> Optional[Callable[[torch.Tensor], int]]:
    """Return a function giving how many tensors share a tensor's storage, or None (with one
    warning) where torch lacks it: then the loader copies each image out of its slot."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        _missing("torch._C._storage_Use_Count",
                 "the loader process copies each batch out of shared memory (about 0.15 ms)")
        return None
    return lambda tensor: count(tensor.untyped_storage()._cdata)


def skip_shm_op_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory op (minutes; it serves only inference
    all-reduce); where DeepSpeed has no such builder there is nothing to skip."""
    module = importlib.import_module("deepspeed.comm.torch")
    if hasattr(module, "build_shm_op"):
        module.build_shm_op = lambda: None


def short_zero_grad(engine) -> None:
    """Give a DeepSpeed engine a ``zero_grad`` that sets the gradients to None over a kept
    parameter list (DeepSpeed's own does the same by walking the module tree each step: 60 us on
    the Colored MNIST MLP), where the engine's is DeepSpeed's own (a subclass keeps its override).
    Public names only (an instance attribute over a method); here because it is CPU tuning."""
    import deepspeed
    if type(engine).zero_grad is not getattr(deepspeed.DeepSpeedEngine, "zero_grad", None):
        return
    parameters = list(engine.module.parameters())

    def zero_grad(*args, **kwargs):
        for parameter in parameters:
            parameter.grad = None
    engine.zero_grad = zero_grad


def mkldnn_bf16_probe() -> Optional[Callable[[], bool]]:
    """Return torch's test of oneDNN bf16 support, or None where this torch lacks it (no warning:
    `dfa_fast.environment.native_bf16` reads the same rule from /proc/cpuinfo)."""
    return getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
