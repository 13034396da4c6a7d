"""The compiled DisEnt head (`kernels/numba_head.py`, the CPU default in float32) against the
reference (`kernels/reference.py`): loss, statistics, every input gradient and the EMA buffers, on
random inputs over batch sizes, class and feature counts, both GCE forms, with and without a swap,
non-contiguous features, saturated logits, and under a gradient that is not 1 (gradient
accumulation, a loss scale). Its gradients and the reference's are also held to the float64 oracle
of `kernel_oracle` within its float32 error bounds. The calls it does not take (bfloat16 and
float16 heads, classifiers without a bias, a data-parallel gather) go to the reference, and still
train; the compiled head keeps its class maxima in the `LossState` it is given, and forgets them
when a step fails."""
import pytest
import torch

from dfa_fast import ops
from dfa_fast.kernels import reference
from dfa_fast.kernels.reference import Linear, LossSettings, Swap
from kernel_oracle import assert_close as oracle_close
from kernel_oracle import clone_state, float32_error_bounds, head_oracle, loss_state, random_state
from kernel_oracle import seed  # noqa: F401 (fixture)

# Three different values, so that a lambda applied to the wrong loss shows.
LAMBDAS = {"lambda_dis": 10.0, "lambda_swap_b": 3.0, "lambda_swap": 0.5}
SETTINGS = LossSettings(**LAMBDAS)
# float32: the same products and log-softmax as the reference, sums in another order.
FP32 = {"rtol": 1e-5, "atol": 1e-6}
PARAM_NAMES = ("z_i", "z_b", "weight_i", "bias_i", "weight_b", "bias_b")


def assert_close(actual, expected, what, rtol, atol):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def head_args(leaves, inputs, state, num_classes, perm, settings, gather=None, alpha=0.7):
    """The arguments of a head call: features, batch, classifiers, `LossState`, swap, settings."""
    z_i, z_b, weight_i, bias_i, weight_b, bias_b = leaves
    label, index = inputs[6:]
    return (z_i, z_b, label, index, Linear(weight_i, bias_i), Linear(weight_b, bias_b),
            loss_state(state, num_classes, alpha, gather), None if perm is None else Swap(perm),
            settings)


def head(backend, monkeypatch, inputs, state, num_classes, perm, settings=SETTINGS,
         grad_scale=1.0, gather=None, alpha=0.7):
    """Run ops.disent_head with DFA_KERNELS=``backend`` ("" for the default) on a copy of
    ``state``; return the loss, statistics, input gradients, state and the implementation that
    ran."""
    if backend:
        monkeypatch.setenv("DFA_KERNELS", backend)
    else:
        monkeypatch.delenv("DFA_KERNELS", raising=False)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs[:6]]
    state = clone_state(state)
    args = head_args(leaves, inputs, state, num_classes, perm, settings, gather, alpha)
    impl = ops.choose("disent_head", *args).name
    loss, stats = ops.disent_head(*args)
    (loss * grad_scale).backward()
    return loss.detach(), stats, [t.grad if t is not None else None for t in leaves], state, impl


def random_inputs(batch, classes, features, state, index, scale=None):
    """Features and classifiers giving logits of a few units, and the batch's labels and index."""
    scale = 3.0 / (2 * features) ** 0.5 if scale is None else scale
    return [torch.randn(batch, features), torch.randn(batch, features),
            torch.randn(classes, 2 * features) * scale, torch.randn(classes),
            torch.randn(classes, 2 * features) * scale, torch.randn(classes),
            state[3][index], index]


def assert_same_results(got, want, tol):
    """Loss, statistics, EMA buffers and seen flags of two head runs agree."""
    assert_close(got[0], want[0], "loss", **tol)
    assert set(got[1]) == set(want[1])
    for key in want[1]:
        assert_close(got[1][key], want[1][key], f"stat {key}", **tol)
    for have, expected, name in zip(got[3][:2], want[3][:2], ("ema_i", "ema_b")):
        assert_close(have, expected, name, **tol)
    assert torch.equal(got[3][2], want[3][2]), "seen flags differ"


@pytest.mark.parametrize("batch,classes,features", [(1, 2, 16), (7, 3, 33), (64, 10, 16),
                                                    (257, 100, 16), (256, 10, 16)])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("form", ["reference", "textbook"])
def test_numba_head_matches_the_reference(batch, classes, features, swap, form, seed,
                                          monkeypatch):
    N = 600
    state = random_state(N, classes, "cpu")
    index = torch.randperm(N)[:batch]
    if batch > 1:
        index[-1] = index[0]  # a duplicated sample: the EMA takes the mean of its losses
    # Logits of a few units, as in training (the saturated extremes have their own test).
    inputs = random_inputs(batch, classes, features, state, index)
    perm = torch.randperm(batch) if swap else None
    settings = LossSettings(q=0.7, gce_form=form, **LAMBDAS)
    numba = head("fused", monkeypatch, inputs, state, classes, perm, settings)
    ref = head("torch", monkeypatch, inputs, state, classes, perm, settings)
    assert (numba[4], ref[4]) == ("numba", "torch")
    assert_same_results(numba, ref, FP32)
    # Gradients: each implementation against the float64 oracle, within the float32 error
    # bounds of kernel_oracle (a row the classifier gets right has a dL/dlogits that cancels, and
    # a small CE has a large relative error, which W carries; two float32 implementations round
    # them differently).
    params = [t.double().requires_grad_() for t in inputs[:6]]
    parts = {}
    loss64, _, _ = head_oracle(params, inputs[6], index, clone_state(state), classes, perm,
                               LAMBDAS, form, parts=parts, q=0.7, alpha=0.7)
    one = torch.tensor(1.0, dtype=torch.float64)
    bounds = float32_error_bounds(loss64, parts, params, one)
    for name, want, got_numba, got_ref in zip(PARAM_NAMES, torch.autograd.grad(loss64, params, one),
                                              numba[2], ref[2]):
        for impl, got in (("numba", got_numba), ("torch", got_ref)):
            oracle_close(got, want, FP32["rtol"], f"{impl}: gradient of {name}",
                         bound=bounds[name])


@pytest.mark.parametrize("form", ["reference", "textbook"])
def test_numba_head_saturated_logits(form, seed, monkeypatch):
    # Logits of hundreds of units: softmax probabilities of 1 and exp underflows. Everything stays
    # finite and the implementations agree to float32 resolution of these magnitudes
    # (max-relative 1e-4: a confident row's loss and gradient are differences that cancel to
    # below one rounding).
    B, C, D, N = 64, 10, 16, 300
    state = random_state(N, C, "cpu")
    index = torch.randperm(N)[:B]
    inputs = [torch.randn(B, D) * 10, torch.randn(B, D) * 10, torch.randn(C, 2 * D) * 3,
              torch.randn(C), torch.randn(C, 2 * D) * 3, torch.randn(C), state[3][index], index]
    perm = torch.randperm(B)
    settings = LossSettings(q=0.7, gce_form=form, **LAMBDAS)
    numba = head("fused", monkeypatch, inputs, state, C, perm, settings)
    ref = head("torch", monkeypatch, inputs, state, C, perm, settings)
    assert (numba[4], ref[4]) == ("numba", "torch")
    got = [numba[0], *numba[1].values(), *numba[2], *numba[3][:2]]
    want = [ref[0], *ref[1].values(), *ref[2], *ref[3][:2]]
    for position, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a).all(), f"output {position}: not finite"
        scale = b.abs().max().item()
        assert_close(a, b, f"output {position}", rtol=1e-4, atol=1e-4 * scale + 1e-6)


def strided_inputs(B, C, D, state, index, dtype, bias):
    """Column slices (non-contiguous) as features, classifiers in ``dtype``, optional biases."""
    return [torch.randn(B, 2 * D)[:, :D].to(dtype), torch.randn(B, 2 * D)[:, D:].to(dtype),
            torch.randn(C, 2 * D).to(dtype), torch.randn(C).to(dtype) if bias else None,
            torch.randn(C, 2 * D).to(dtype), torch.randn(C).to(dtype) if bias else None,
            state[3][index], index]


@pytest.mark.parametrize("bias", [True, False])
def test_numba_head_strided_features_and_scaled_gradient(bias, seed, monkeypatch):
    # grad_scale 0.25 is what gradient accumulation over 4 micro-batches sends back; the features
    # are column slices (non-contiguous). The compiled head needs both biases: classifiers
    # without one go to the reference.
    B, C, D, N = 64, 10, 16, 300
    state = random_state(N, C, "cpu")
    index = torch.randperm(N)[:B]
    inputs = strided_inputs(B, C, D, state, index, torch.float32, bias)
    perm = torch.randperm(B)
    fused = head("", monkeypatch, inputs, state, C, perm, grad_scale=0.25)
    ref = head("torch", monkeypatch, inputs, state, C, perm, grad_scale=0.25)
    assert fused[4] == ("numba" if bias else "torch")
    assert_same_results(fused, ref, FP32)
    for got, want, name in zip(fused[2], ref[2], PARAM_NAMES):
        assert (got is None) == (want is None), name
        if got is not None:
            assert got.dtype == torch.float32
            assert_close(got, want, f"gradient of {name}", **FP32)


@pytest.mark.parametrize("dtype,grad_scale", [(torch.bfloat16, 0.25), (torch.float16, 2.0 ** 12)])
@pytest.mark.parametrize("bias", [True, False])
def test_half_precision_heads_go_to_the_reference_and_train(dtype, grad_scale, bias, seed,
                                                            monkeypatch):
    # Pure half-precision runs (compute.precision=bf16/fp16) hand the head half-precision features
    # and weights (grad_scale 2**12: a DeepSpeed fp16 loss scale). The chooser gives them to the
    # reference, whatever CPU backend is asked for, and a few steps of SGD on them stay finite,
    # keep the parameters' dtypes and lower the loss.
    B, C, D, N = 64, 10, 16, 300
    state = random_state(N, C, "cpu")
    index = torch.randperm(N)[:B]
    inputs = strided_inputs(B, C, D, state, index, dtype, bias)
    perm = torch.randperm(B)
    for backend in ("", "fused", "torch"):
        run = head(backend, monkeypatch, inputs, state, C, perm, grad_scale=grad_scale)
        assert run[4] == "torch", backend
    # The same call to the reference itself: the chooser hands over the arguments as they are.
    leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs[:6]]
    direct_state = clone_state(state)
    loss, stats = reference.disent_head(*head_args(leaves, inputs, direct_state, C, perm,
                                                   SETTINGS))
    (loss * grad_scale).backward()
    assert torch.equal(run[0], loss.detach())
    assert all(torch.equal(run[1][key], stats[key]) for key in stats)
    for got, want in zip(run[3], direct_state):
        assert torch.equal(got, want)
    for got, leaf, name in zip(run[2], leaves, PARAM_NAMES):
        assert (got is None) == (leaf is None) == (name.startswith("bias") and not bias), name
        if got is not None:
            assert got.dtype == dtype and torch.isfinite(got).all(), name
            assert torch.equal(got, leaf.grad), name
    assert torch.isfinite(run[0]) and all(torch.isfinite(v) for v in run[1].values())
    assert run[3][2][index].all() and torch.isfinite(run[3][0]).all()
    # Training: SGD on the classifiers (and features) in ``dtype`` lowers the loss.
    monkeypatch.delenv("DFA_KERNELS", raising=False)
    params = [t.clone().requires_grad_() if t is not None else None for t in inputs[:6]]
    train_state = clone_state(state)
    optimizer = torch.optim.SGD([p for p in params if p is not None], lr=0.5)
    losses = []
    for _ in range(5):
        loss, _ = ops.disent_head(*head_args(params, inputs, train_state, C, perm, SETTINGS))
        assert torch.isfinite(loss) and loss.dtype == torch.float32
        optimizer.zero_grad()
        (loss * grad_scale).backward()
        for p in params:
            if p is not None:
                assert p.grad.dtype == dtype and torch.isfinite(p.grad).all()
                p.grad /= grad_scale
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_a_gather_goes_to_the_reference_and_updates_the_ema_with_the_global_batch(seed,
                                                                                   monkeypatch):
    # Under data parallelism `state.gather` returns the global batch's (index, ce_i, ce_b): the
    # chooser gives the head to the reference, and a fake second rank's samples are written into
    # the EMA as the rule says.
    B, C, D, N = 32, 10, 16, 300
    alpha = 0.7
    state = random_state(N, C, "cpu")
    index = torch.randperm(N)[:2 * B]
    other = index[B:]
    other_i, other_b = torch.rand(B) * 3, torch.rand(B) * 3

    def gather(idx, ce_i, ce_b):
        return torch.cat([idx, other]), torch.cat([ce_i, other_i]), torch.cat([ce_b, other_b])
    inputs = random_inputs(B, C, D, state, index[:B], scale=1.0)
    perm = torch.randperm(B)
    default = head("", monkeypatch, inputs, state, C, perm, gather=gather, alpha=alpha)
    ref = head("torch", monkeypatch, inputs, state, C, perm, gather=gather, alpha=alpha)
    assert default[4] == "torch"
    assert_same_results(default, ref, {"rtol": 0, "atol": 0})
    for got, want in zip(default[2], ref[2]):
        assert torch.equal(got, want)
    assert default[3][2][index].all()
    # The other rank's samples (none of them in this batch): their losses by the EMA rule.
    seen = state[2][other]
    for position, (ema, losses) in enumerate(((default[3][0], other_i), (default[3][1], other_b))):
        old = state[position][other]
        want = torch.where(seen, alpha * old + (1 - alpha) * losses, losses)
        assert_close(ema[other], want, f"the other rank's {('ema_i', 'ema_b')[position]}", **FP32)
    # The rest of the buffer is untouched.
    rest = torch.ones(N, dtype=torch.bool)
    rest[index] = False
    for got, want in zip(default[3][:3], state[:3]):
        assert torch.equal(got[rest], want[rest])


def count_nodes(grad_fn) -> int:
    """Return how many autograd nodes the graph below ``grad_fn`` holds."""
    seen, todo = set(), [grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return len(seen)


def test_numba_head_is_the_cpu_default_and_one_autograd_node(monkeypatch):
    # One node, whose backward refuses to be differentiated again (it is written by hand).
    monkeypatch.delenv("DFA_KERNELS", raising=False)
    B, C, D, N = 8, 3, 4, 20
    state = random_state(N, C, "cpu")
    index = torch.arange(B)
    z_i, z_b = torch.randn(B, D, requires_grad=True), torch.randn(B, D, requires_grad=True)
    fc = [Linear(torch.randn(C, 2 * D), torch.randn(C)) for _ in range(2)]
    swap = Swap(torch.randperm(B))
    loss, _ = ops.disent_head(z_i, z_b, state[3][index], index, *fc, loss_state(state, C), swap,
                              SETTINGS)
    assert type(loss.grad_fn).__name__ == "NumbaHeadFunctionBackward"  # float32
    assert count_nodes(loss.grad_fn) == 3  # the head and the two features' leaves
    grad_i, = torch.autograd.grad(loss, z_i, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad_i.square().sum(), z_i)
    # A bfloat16 head is the reference: PyTorch's operations, twice differentiable.
    half_i, half_b = z_i.bfloat16(), z_b.bfloat16()
    half_fc = [Linear(w.bfloat16(), b.bfloat16()) for w, b in fc]
    args = (half_i, half_b, state[3][index], index, *half_fc, loss_state(state, C), swap,
            SETTINGS)
    assert ops.choose("disent_head", *args).name == "torch"
    loss, _ = ops.disent_head(*args)
    assert type(loss.grad_fn).__name__ != "NumbaHeadFunctionBackward"
    assert count_nodes(loss.grad_fn) > 10
    grad_i, = torch.autograd.grad(loss, z_i, create_graph=True)
    torch.autograd.grad(grad_i.float().square().sum(), z_i)


@pytest.mark.parametrize("bad", ["label", "index", "perm"])
def test_the_compiled_head_refuses_out_of_range_indices_and_forgets_its_class_maxima(
        bad, monkeypatch):
    monkeypatch.delenv("DFA_KERNELS", raising=False)
    B, C, D, N = 16, 4, 8, 50
    state = loss_state(random_state(N, C, "cpu"), C)
    index, perm = torch.randperm(N)[:B], torch.randperm(B)
    label = state.labels[index].clone()
    features = [torch.randn(B, D), torch.randn(B, D)]
    fc = [Linear(torch.randn(C, 2 * D), torch.randn(C)) for _ in range(2)]
    args = (*features, label, index, *fc, state, Swap(perm), SETTINGS)
    assert ops.choose("disent_head", *args).name == "numba"
    assert state.cache.get("class_maxima") is None
    ops.disent_head(*args)  # a good step first: its class maxima are kept in the state
    assert state.cache.get("class_maxima") is not None
    {"label": label, "index": index, "perm": perm}[bad][3] = {"label": C, "index": N,
                                                             "perm": B}[bad]
    with pytest.raises(IndexError):
        ops.disent_head(*args)
    assert state.cache.get("class_maxima") is None
