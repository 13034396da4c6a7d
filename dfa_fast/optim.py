"""Plain Adam with PyTorch's fused kernel, called with little Python around it.

`torch.optim.Adam(fused=True)` runs one fused kernel over all parameters, but its ``step`` wraps the
kernel in general-purpose Python: a profiler range and hook chains, grad-mode and graph-capture
checks, compiler graph breaks, the lazy-state scan of every parameter and a regrouping of the
tensors by device and dtype. On a CPU step of the Colored MNIST MLP (16 parameters, about 0.5 M
values) that Python costs nearly half as much again as the kernel: 0.48-0.61 ms a step against
0.32-0.39 ms for the same kernel called directly (alternating calls in one trainer, two runs).

`Adam` is `torch.optim.Adam` with ``fused=True`` whose ``step`` calls the same kernel
(``torch._fused_adam_``) with the same arguments, so the update is the same bit for bit and the
state (``step``, ``exp_avg``, ``exp_avg_sq``) and ``state_dict`` are `torch.optim.Adam`'s: either
optimizer loads the other's checkpoints. Whatever the short path does not cover goes to
`torch.optim.Adam.step` unchanged: the first step (lazy state), a closure, registered step hooks,
an active profiler (so hooks run and the profiler sees its range), AMSGrad, maximize, capturable
or decoupled weight decay, tensor learning rates, sparse gradients and parameters of several
devices or dtypes, and a torch without the private names it calls (`dfa_fast.compat`).
"""
from __future__ import annotations

import torch

from dfa_fast import compat

# Group options under which `Adam.step` takes the short path (their values must be these).
_PLAIN = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False,
          "decoupled_weight_decay": False, "fused": True}


class Adam(torch.optim.Adam):
    """`torch.optim.Adam` (fused) with a short ``step``; the same updates and state."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, **kwargs):
        super().__init__(params, lr=lr, weight_decay=weight_decay, fused=True, **kwargs)
        self._kernels = compat.adam_kernels()  # None: every step is torch.optim.Adam.step

    def step(self, closure=None):
        """Update the parameters (one fused kernel call per parameter group); return the
        closure's loss (``torch.optim.Adam.step`` when the short path does not apply)."""
        kernels = self._kernels
        lists = None if kernels is None or closure is not None or self._hooked() \
            else self._lists()
        if lists is None:
            return super().step(closure)
        with torch.no_grad():
            for group, (params, grads, avgs, squares, steps) in zip(self.param_groups, lists):
                if not params:
                    continue
                beta1, beta2 = group["betas"]
                kernels["foreach_add"](steps, 1)
                kernels["fused_adam"](params, grads, avgs, squares, [], steps, lr=group["lr"],
                                   beta1=float(beta1), beta2=float(beta2),
                                   weight_decay=group["weight_decay"], eps=group["eps"],
                                   amsgrad=False, maximize=False)
        return None

    def _hooked(self) -> bool:
        """Whether something watches ``step``: step hooks or an active profiler."""
        kernels = self._kernels
        return bool(self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                    or kernels["pre"] or kernels["post"] or kernels["profiler_enabled"]())

    def _lists(self):
        """Return, per group, the kernel's tensor lists; None where the short path does not
        apply."""
        out = []
        device = dtype = None
        for group in self.param_groups:
            if any(group.get(key) != value for key, value in _PLAIN.items()) or \
                    torch.is_tensor(group["lr"]):
                return None
            params, grads, avgs, squares, steps = [], [], [], [], []
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                state = self.state.get(p)
                if not state or grad.is_sparse or p.is_complex():
                    return None
                if device is None:
                    device, dtype = p.device, p.dtype
                if p.device != device or p.dtype != dtype or grad.dtype != dtype:
                    return None
                params.append(p)
                grads.append(grad)
                avgs.append(state["exp_avg"])
                squares.append(state["exp_avg_sq"])
                steps.append(state["step"])
            out.append((params, grads, avgs, squares, steps))
        return out

    # torch.optim wraps each optimizer class's ``step`` in a profiler range and the step hooks
    # unless it is marked as wrapped already; this ``step`` runs `torch.optim.Adam.step`, wrapped,
    # whenever hooks or a profiler are active, and skips the wrapper's cost otherwise.
    step.hooked = True
