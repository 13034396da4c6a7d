"""The fused DisEnt head (kernels/head.py) against a float64 DisEnt step written out in full.

The oracle materialises the classifier inputs ([z_i, sg(z_b)], [sg(z_i), z_b], and the swapped
ones with z_b[pi]) and runs two float64 linear layers, so it checks the kernel's partial-product
form, its stop-gradients and its routing of the swapped gradients through the permutation. Every
test compares the loss, the statistics, the updated EMA state and the gradients of all six inputs.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from dfa_fast.kernels import head, reference
from dfa_fast.kernels.reference import Linear, LossSettings, Swap
from kernel_oracle import (BATCHES, CLASSES, FEATURES, TOLERANCE, assert_close,
                           assert_scratch_clean, assert_state, clone_state, cross_entropy64,
                           float32_error_bounds, head_oracle, loss_state, random_state,
                           requires_cuda)
from kernel_oracle import device, gpu_tiles, poison, seed  # noqa: F401 (fixtures)

ALPHA = 0.7
Q = 0.7
LAMBDAS = {"lambda_dis": 2.0, "lambda_swap_b": 3.0, "lambda_swap": 0.5}
PARAM_NAMES = ("z_i", "z_b", "weight_i", "bias_i", "weight_b", "bias_b")


def make_inputs(batch, num_classes, features, dtype, device, bias=True):
    """Features, classifier weights scaled for logits of a few units, and biases."""
    scale = 3.0 / (2 * features) ** 0.5
    params = [torch.randn(batch, features, device=device),
              torch.randn(batch, features, device=device),
              torch.randn(num_classes, 2 * features, device=device) * scale,
              torch.randn(num_classes, device=device),
              torch.randn(num_classes, 2 * features, device=device) * scale,
              torch.randn(num_classes, device=device)]
    params = [p.to(dtype) for p in params]
    if not bias:
        params[3] = params[5] = None
    return params


def head_args(params, label, index, state, num_classes, perm, lambdas, form, gather=None):
    """The head's arguments: ``params`` the six tensors, ``state`` an EMA state tuple."""
    z_i, z_b, weight_i, bias_i, weight_b, bias_b = params
    return (z_i, z_b, label, index, Linear(weight_i, bias_i), Linear(weight_b, bias_b),
            loss_state(state, num_classes, ALPHA, gather), None if perm is None else Swap(perm),
            LossSettings(q=Q, gce_form=form, **lambdas))


def run_head(params, label, index, state, num_classes, perm, lambdas, form, gather=None):
    leaves = [p.detach().clone().requires_grad_() if p is not None else None for p in params]
    loss, stats = head.disent_head(*head_args(leaves, label, index, state, num_classes, perm,
                                              lambdas, form, gather))
    grad_out = torch.tensor(1.7, device=loss.device)
    used = [p for p in leaves if p is not None]
    grads = torch.autograd.grad(loss, used, grad_out)
    return loss, stats, grads


def check_head(batch, num_classes, features, dtype, device, perm_kind="random", form="reference",
               bias=True, duplicates=False, gather=False, lambdas=LAMBDAS, params=None):
    n = 3 * batch + 5
    state = random_state(n, num_classes, device)
    if duplicates:
        index = torch.randint(0, n, (batch,), device=device)
        index[-1] = index[0]
    else:
        index = torch.randperm(n, device=device)[:batch]
    label = state[3][index]
    perm = {"none": None, "identity": torch.arange(batch, device=device),
            "random": torch.randperm(batch, device=device)}[perm_kind]
    if params is None:
        params = make_inputs(batch, num_classes, features, dtype, device, bias)
    hook = upd = None
    if gather:
        remote = (torch.randint(0, n, (6,), device=device), torch.rand(6, device=device) * 2,
                  torch.rand(6, device=device) * 2)

        def hook(i, a, b):
            return tuple(torch.cat([x, r]) for x, r in zip((i, a, b), remote))

    before = clone_state(state)
    loss, stats, grads = run_head(params, label, index, state, num_classes, perm, lambdas, form,
                                  hook)
    ref_params = [p.detach().double().requires_grad_() if p is not None else None
                  for p in params]
    if gather:
        # The oracle updates the EMAs with this batch's float64 losses plus the remote triples.
        ce_i, ce_b = _oracle_ce(ref_params, label)
        upd = (torch.cat([index, remote[0]]), torch.cat([ce_i, remote[1].double()]),
               torch.cat([ce_b, remote[2].double()]))
    parts = {}
    ref_loss, ref_stats, ref_state = head_oracle(ref_params, label, index, before, num_classes,
                                                 perm, lambdas, form, upd, parts, q=Q, alpha=ALPHA)
    used = [p for p in ref_params if p is not None]
    ref_grad_out = torch.tensor(1.7, dtype=torch.float64, device=ref_loss.device)
    bounds = float32_error_bounds(ref_loss, parts, ref_params, ref_grad_out, Q)
    ref_grads = torch.autograd.grad(ref_loss, used, ref_grad_out)
    # PyTorch's float32 result on the same (exactly upcast) inputs: the accuracy baseline.
    base_params = [p.detach().float().requires_grad_() if p is not None else None
                   for p in params]
    base_loss, base_stats = reference.disent_head(
        *head_args(base_params, label, index, clone_state(before), num_classes, perm, lambdas,
                   form, hook))
    base_grads = torch.autograd.grad(base_loss, [p for p in base_params if p is not None],
                                     torch.tensor(1.7, device=base_loss.device))
    what = f"B={batch} C={num_classes} D={features} {dtype} perm={perm_kind} {form}"
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, ref_loss, 1e-5, f"{what}: loss", base_loss)
    assert set(stats) == set(ref_stats), f"{what}: statistics {sorted(stats)}"
    for key in stats:
        assert not stats[key].requires_grad
        assert_close(stats[key], ref_stats[key], 1e-5, f"{what}: stat {key}", base_stats[key])
    assert_state(state, ref_state, what)
    names = [name for name, p in zip(PARAM_NAMES, params) if p is not None]
    for name, grad, ref_grad, base_grad, param in zip(
            names, grads, ref_grads, base_grads, [p for p in params if p is not None]):
        assert grad.dtype == param.dtype and grad.shape == param.shape, f"{what}: {name}"
        assert_close(grad, ref_grad, TOLERANCE[dtype], f"{what}: grad {name}", base_grad,
                     bounds[name])
    assert_scratch_clean(device, n)


def _oracle_ce(ref_params, label):
    z_i, z_b, weight_i, bias_i, weight_b, bias_b = (p.detach() if p is not None else None
                                                    for p in ref_params)
    ce_i = cross_entropy64(F.linear(torch.cat([z_i, z_b], 1), weight_i, bias_i), label)
    ce_b = cross_entropy64(F.linear(torch.cat([z_i, z_b], 1), weight_b, bias_b), label)
    return ce_i, ce_b


@pytest.mark.parametrize("batch,num_classes,features",
                         list(itertools.product(BATCHES, CLASSES, FEATURES)))
def test_head_random_permutation(batch, num_classes, features, device, seed, poison):
    check_head(batch, num_classes, features, torch.float32, device)


@pytest.mark.parametrize("perm_kind", ("none", "identity"))
@pytest.mark.parametrize("batch,num_classes,features",
                         [(1, 2, 16), (7, 3, 33), (64, 10, 512), (257, 100, 33)])
def test_head_without_swap_and_identity(batch, num_classes, features, perm_kind, device, seed,
                                        poison):
    check_head(batch, num_classes, features, torch.float32, device, perm_kind)


@pytest.mark.parametrize("dtype", (torch.float16, pytest.param(torch.bfloat16,
                                                               marks=requires_cuda)))
@pytest.mark.parametrize("batch,num_classes,features",
                         [(1, 3, 16), (7, 2, 512), (64, 10, 33), (257, 10, 512), (64, 100, 16)])
def test_head_half_precision(batch, num_classes, features, dtype, device, seed, poison):
    check_head(batch, num_classes, features, dtype, device)


@pytest.mark.parametrize("form", ("reference", "textbook"))
def test_head_gce_forms_without_bias(form, device, seed, poison):
    check_head(64, 10, 33, torch.float32, device, form=form, bias=False)


def test_head_gather_and_duplicate_indices(device, seed, poison):
    check_head(64, 10, 16, torch.float32, device, duplicates=True, gather=True)


def test_head_gpu_tiles_and_split_backward(device, seed, poison, gpu_tiles, monkeypatch):
    # GPU tiles (16 rows a logits program, 64-row backward trips) and a backward split in four
    # partials added up by the second launch.
    monkeypatch.setattr(head, "SINGLE_SPLIT_ROWS", 128)
    monkeypatch.setattr(head, "SPLIT_ROWS", 160)
    check_head(600, 10, 33, torch.float32, device, duplicates=True)


@pytest.mark.parametrize("lambdas", ({"lambda_dis": 1.0, "lambda_swap_b": 1.0, "lambda_swap": 1.0},
                                     {"lambda_dis": 10.0, "lambda_swap_b": 10.0,
                                      "lambda_swap": 1.0},
                                     {"lambda_dis": 0.0, "lambda_swap_b": 2.0,
                                      "lambda_swap": 0.0}))
def test_head_lambdas(lambdas, device, seed, poison):
    check_head(64, 10, 16, torch.float32, device, lambdas=lambdas)


def test_stop_gradients(device, seed):
    # Without the bias-classifier terms no gradient reaches z_b or the bias classifier ...
    params = make_inputs(16, 3, 16, torch.float32, device)
    state = random_state(40, 3, device)
    index = torch.randperm(40, device=device)[:16]
    zero = {"lambda_dis": 0.0, "lambda_swap_b": 1.0, "lambda_swap": 0.0}
    _, _, grads = run_head(params, state[3][index], index, state, 3, None, zero, "reference")
    assert grads[0].abs().sum() > 0
    assert not grads[1].any() and not grads[4].any() and not grads[5].any()
    # ... and with a zero intrinsic classifier none reaches z_i (C_b sees sg(z_i)), swap or not.
    params[2] = torch.zeros_like(params[2])
    _, _, grads = run_head(params, state[3][index], index, state, 3,
                           torch.randperm(16, device=device), LAMBDAS, "reference")
    assert not grads[0].any()
    assert grads[1].abs().sum() > 0 and grads[4].abs().sum() > 0


@requires_cuda[0]
@requires_cuda[1]
def test_head_cuda_graph_capture(device, seed):
    # A whole forward + backward is capturable (no host synchronisation) and replays exactly.
    params = [p.requires_grad_() for p in make_inputs(256, 10, 512, torch.float32, device)]
    state = random_state(1000, 10, device)
    index = torch.randperm(1000, device=device)[:256]
    label = state[3][index]
    perm = torch.randperm(256, device=device)
    eager_state = clone_state(state)

    def step(st):
        loss, stats = head.disent_head(*head_args(params, label, index, st, 10, perm, LAMBDAS,
                                                  "reference"))
        return (loss,) + tuple(torch.autograd.grad(loss, params))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm_state = clone_state(state)
        step(warm_state)  # allocates the EMA scratch and compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(state)
    graph.replay()
    expected = step(eager_state)
    torch.cuda.synchronize()
    for got, want in zip(captured, expected):
        assert torch.equal(got, want)
    for got, want in zip(state, eager_state):
        assert torch.equal(got, want)
