"""dfa_fast.ops: backend choice, same results from both backends, and one whole training step.

Under the interpreter the Triton backend runs on CPU tensors when forced (DFA_KERNELS=triton);
with a GPU (the GPU check kit) the same tests run on CUDA tensors, where Triton is the default.
"""
import copy

import pytest
import torch
from torch import nn

from dfa_fast import ops
from dfa_fast.kernels.reference import Linear, LossSettings, Swap
from kernel_oracle import (assert_close, assert_scratch_clean, clone_state, loss_state,
                           random_state, requires_cuda)
from kernel_oracle import device, poison, seed  # noqa: F401 (fixtures)

LAMBDAS = {"lambda_dis": 10.0, "lambda_swap_b": 10.0, "lambda_swap": 1.0}
SETTINGS = LossSettings(**LAMBDAS)


def test_cpu_tensors_use_the_pytorch_backends(monkeypatch):
    monkeypatch.delenv("DFA_KERNELS", raising=False)
    logits = torch.randn(4, 3, requires_grad=True)
    assert ops.choose("cross_entropy", logits, torch.tensor([0, 1, 2, 0])).backend == "torch"
    loss = ops.cross_entropy(logits, torch.tensor([0, 1, 2, 0]))
    assert "RowLoss" not in type(loss.grad_fn).__name__


@pytest.mark.parametrize("forced", ("triton", "fused", "torch"))
def test_environment_forces_a_backend(forced, device, monkeypatch):
    monkeypatch.setenv("DFA_KERNELS", forced)
    assert ops.forced_backend() == forced
    logits = torch.randn(4, 3, device=device, requires_grad=True)
    loss = ops.cross_entropy(logits, torch.tensor([0, 1, 2, 0], device=device))
    assert ("RowLoss" in type(loss.grad_fn).__name__) == (forced == "triton")


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("DFA_KERNELS", "cuda")
    with pytest.raises(ValueError, match="DFA_KERNELS='cuda' is not a backend"):
        ops.forced_backend()


@requires_cuda[0]
@requires_cuda[1]
def test_cuda_tensors_use_triton(monkeypatch):
    monkeypatch.delenv("DFA_KERNELS", raising=False)
    logits = torch.zeros(2, 3, device="cuda")
    target = torch.zeros(2, dtype=torch.long, device="cuda")
    assert ops.choose("cross_entropy", logits, target).backend == "triton"


def both_backends(monkeypatch, fn):
    """Return fn() under DFA_KERNELS=triton and under DFA_KERNELS=torch."""
    out = []
    for name in ("triton", "torch"):
        monkeypatch.setenv("DFA_KERNELS", name)
        out.append(fn())
    return out


def test_cross_entropy_agrees_across_backends(device, seed, monkeypatch):
    # Through ops.py, same inputs, both backends, fp32 (the heads: below; the Triton pieces the
    # heads are built from against the reference: test_kernel_gce.py, test_kernel_weighting.py).
    B, C = 37, 10
    logits = torch.randn(B, C, device=device) * 3
    target = torch.randint(0, C, (B,), device=device)
    upstream = torch.linspace(-1, 2, B, device=device)  # a fixed, non-uniform upstream gradient

    def loss_and_grad():
        leaf = logits.detach().clone().requires_grad_()
        loss = ops.cross_entropy(leaf, target)
        return loss, torch.autograd.grad((loss * upstream).sum(), leaf)[0]

    triton_out, torch_out = both_backends(monkeypatch, loss_and_grad)
    for got, want in zip(triton_out, torch_out):
        assert_close(got, want, 1e-5, "cross_entropy")


class Encoder(nn.Sequential):
    """A small MLP encoder: flattened input -> 32 -> D, ReLU after each layer."""

    def __init__(self, inputs: int, features: int):
        super().__init__(nn.Linear(inputs, 32), nn.ReLU(), nn.Linear(32, features), nn.ReLU())


def finish_step(model, optimizer, loss, stats):
    """Backward and optimizer step; return the loss, statistics and the parameters' gradients."""
    optimizer.zero_grad()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    return loss.detach(), {k: v.clone() for k, v in stats.items()}, grads


def disent_step(model, optimizer, state, batch, perm):
    """One DisEnt step through ops.disent_head (``state``: a `LossState`)."""
    x, label, index = batch
    fc_i, fc_b = (Linear(model[name].weight, model[name].bias) for name in ("cls_i", "cls_b"))
    loss, stats = ops.disent_head(model["enc_i"](x), model["enc_b"](x), label, index, fc_i, fc_b,
                                  state, None if perm is None else Swap(perm), SETTINGS)
    return finish_step(model, optimizer, loss, stats)


def lff_step(model, optimizer, state, batch):
    """One LfF step through ops.lff_head (``state``: a `LossState`)."""
    x, label, index = batch
    logits_d = model["cls_i"](model["enc_i"](x))
    logits_b = model["cls_b"](model["enc_b"](x))
    loss, stats = ops.lff_head(logits_d, logits_b, label, index, state, SETTINGS)
    return finish_step(model, optimizer, loss, stats)


@pytest.mark.parametrize("method", ("disent", "lff"))
def test_whole_step_triton_matches_torch(method, device, seed, poison, monkeypatch):
    # Two MLP encoders and two classifiers, identical copies (EMA state included), two steps each:
    # without swap, then with a device permutation. Same losses, statistics, gradients, EMA buffers
    # and parameters after Adam, within float32 tolerance.
    B, C, D, N, inputs, lr = 64, 10, 16, 500, 48, 1e-3
    width = 2 * D if method == "disent" else D  # DisEnt's classifiers see both encoders' features
    model = nn.ModuleDict({"enc_i": Encoder(inputs, D), "enc_b": Encoder(inputs, D),
                           "cls_i": nn.Linear(width, C), "cls_b": nn.Linear(width, C)}).to(device)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = random_state(N, C, device)
    batches, perms = [], []
    for _ in range(2):
        index = torch.randperm(N, device=device)[:B]
        batches.append((torch.rand(B, inputs, device=device), state[3][index], index))
        perms.append(torch.randperm(B, device=device))
    perms[0] = None
    results = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("DFA_KERNELS", backend)
        run_model = copy.deepcopy(model)
        run_state = clone_state(state)
        step_state = loss_state(run_state, C)  # one state for both steps, as in training
        # Adam moves each weight by lr * g / (|g| + eps): with the default eps = 1e-8 a gradient
        # element of 1e-8 (they occur) turns a float32 rounding difference into a sign flip. The
        # larger eps bounds that sensitivity to lr / eps per unit of gradient error.
        optimizer = torch.optim.Adam(run_model.parameters(), lr=lr, eps=1e-3)
        steps = []
        for batch, perm in zip(batches, perms):
            if method == "disent":
                steps.append(disent_step(run_model, optimizer, step_state, batch, perm))
            else:
                steps.append(lff_step(run_model, optimizer, step_state, batch))
        results[backend] = (steps, run_state, run_model)
    (steps_t, state_t, model_t), (steps_r, state_r, model_r) = results["triton"], results["torch"]
    names = [name for name, _ in model.named_parameters()]
    for step, (run_t, run_r) in enumerate(zip(steps_t, steps_r)):
        (loss_t, stats_t, grads_t), (loss_r, stats_r, grads_r) = run_t, run_r
        assert_close(loss_t, loss_r, 1e-5, f"step {step} loss")
        assert set(stats_t) == set(stats_r)
        for key in stats_r:
            assert_close(stats_t[key], stats_r[key], 1e-5, f"step {step} stat {key}")
        for name, grad_t, grad_r in zip(names, grads_t, grads_r):
            assert_close(grad_t, grad_r, 2e-5, f"step {step} gradient of {name}")
    assert_close(state_t[0], state_r[0], 1e-5, "ema_i")
    assert_close(state_t[1], state_r[1], 1e-5, "ema_b")
    assert torch.equal(state_t[2], state_r[2])
    for (name, p_t), p_r in zip(model_t.named_parameters(), model_r.parameters()):
        # Adam normalises each gradient, so compare the updates in units of the learning rate.
        assert_close((p_t - initial[name]) / lr, (p_r - initial[name]) / lr, 1e-3,
                     f"parameter {name} after Adam")
    assert_scratch_clean(device, N)
