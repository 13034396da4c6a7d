"""The fused DisEnt heads (the default on CPUs: `kernels/numba_head.py` in float32,
`kernels/fused_torch.py` otherwise) against the reference (`kernels/reference.py`): loss,
statistics, every input gradient and the EMA buffers, on random inputs over batch sizes, class and
feature counts, both GCE forms, with and without a swap and a bias, in float32, bfloat16 and
float16, non-contiguous features, saturated logits, and under a gradient that is not 1 (gradient
accumulation, a loss scale). In float32 both backends' gradients are also held to the float64
oracle of `kernel_oracle` within its float32 error bounds."""
import pytest
import torch

from dfa_fast import ops
from dfa_fast.kernels import numba_head, numba_weighting
from kernel_oracle import assert_close as oracle_close
from kernel_oracle import clone_state, float32_error_bounds, head_oracle, random_state
from kernel_oracle import seed  # noqa: F401 (fixture)

# Three different values, so that a lambda applied to the wrong loss shows.
LAMBDAS = {"lambda_dis": 10.0, "lambda_swap_b": 3.0, "lambda_swap": 0.5}
# float32: the same products and log-softmax as the reference, sums in another order.
FP32 = {"rtol": 1e-5, "atol": 1e-6}


def assert_close(actual, expected, what, rtol, atol):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def head(backend, monkeypatch, inputs, state, num_classes, perm, grad_scale=1.0, **kwargs):
    """Run ops.disent_head on ``backend``; return the loss, statistics, input gradients, state."""
    monkeypatch.setenv("DFA_KERNELS", backend)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs[:6]]
    state = clone_state(state)
    loss, stats = ops.disent_head(*leaves, *inputs[6:], *state, num_classes, perm,
                                  **{**LAMBDAS, **kwargs})
    (loss * grad_scale).backward()
    return loss.detach(), stats, [t.grad if t is not None else None for t in leaves], state


@pytest.mark.parametrize("batch,classes,features", [(1, 2, 16), (7, 3, 33), (64, 10, 16),
                                                    (257, 100, 16), (256, 10, 16)])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("form", ["reference", "textbook"])
@pytest.mark.parametrize("compiled", [True, False])
def test_fused_head_matches_the_reference(batch, classes, features, swap, form, compiled, seed,
                                          monkeypatch):
    # float32 CPU steps run the compiled head (numba_head); compiled=False runs the PyTorch one
    # that takes the other dtypes and a gather.
    if not compiled:
        monkeypatch.setattr(numba_head, "usable", lambda *args: False)
    N = 600
    state = random_state(N, classes, "cpu")
    index = torch.randperm(N)[:batch]
    if batch > 1:
        index[-1] = index[0]  # a duplicated sample: the EMA takes the mean of its losses
    # Logits of a few units, as in training (the saturated extremes have their own test).
    scale = 3.0 / (2 * features) ** 0.5
    inputs = [torch.randn(batch, features), torch.randn(batch, features),
              torch.randn(classes, 2 * features) * scale, torch.randn(classes),
              torch.randn(classes, 2 * features) * scale, torch.randn(classes),
              state[3][index], index]
    perm = torch.randperm(batch) if swap else None
    kwargs = {"q": 0.7, "alpha": 0.7, "gce_form": form}
    fused = head("fused", monkeypatch, inputs, state, classes, perm, **kwargs)
    ref = head("torch", monkeypatch, inputs, state, classes, perm, **kwargs)
    assert_close(fused[0], ref[0], "loss", **FP32)
    assert set(fused[1]) == set(ref[1])
    for key in ref[1]:
        assert_close(fused[1][key], ref[1][key], f"stat {key}", **FP32)
    for got, want, name in zip(fused[3][:2], ref[3][:2], ("ema_i", "ema_b")):
        assert_close(got, want, name, **FP32)
    assert torch.equal(fused[3][2], ref[3][2]), "seen flags differ"
    # Gradients: each backend against the float64 oracle, within the float32 error bounds of
    # kernel_oracle (a row the classifier gets right has a dL/dlogits that cancels, and a small CE
    # has a large relative error, which W carries; two float32 backends round them differently).
    params = [t.double().requires_grad_() for t in inputs[:6]]
    parts = {}
    loss64, _, _ = head_oracle(params, inputs[6], index, clone_state(state), classes, perm,
                               LAMBDAS, form, parts=parts, q=0.7, alpha=0.7)
    one = torch.tensor(1.0, dtype=torch.float64)
    bounds = float32_error_bounds(loss64, parts, params, one)
    names = ("z_i", "z_b", "weight_i", "bias_i", "weight_b", "bias_b")
    for name, want, got_fused, got_ref in zip(names, torch.autograd.grad(loss64, params, one),
                                              fused[2], ref[2]):
        for backend, got in (("fused", got_fused), ("torch", got_ref)):
            oracle_close(got, want, FP32["rtol"], f"{backend}: gradient of {name}",
                         bound=bounds[name])


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("form", ["reference", "textbook"])
def test_fused_head_saturated_logits(form, compiled, seed, monkeypatch):
    # Logits of hundreds of units: softmax probabilities of 1 and exp underflows. Everything stays
    # finite and the backends agree to float32 resolution of these magnitudes (max-relative 1e-4:
    # a confident row's loss and gradient are differences that cancel to below one rounding).
    if not compiled:
        monkeypatch.setattr(numba_head, "usable", lambda *args: False)
    B, C, D, N = 64, 10, 16, 300
    state = random_state(N, C, "cpu")
    index = torch.randperm(N)[:B]
    inputs = [torch.randn(B, D) * 10, torch.randn(B, D) * 10, torch.randn(C, 2 * D) * 3,
              torch.randn(C), torch.randn(C, 2 * D) * 3, torch.randn(C), state[3][index], index]
    perm = torch.randperm(B)
    kwargs = {"q": 0.7, "alpha": 0.7, "gce_form": form}
    fused = head("fused", monkeypatch, inputs, state, C, perm, **kwargs)
    ref = head("torch", monkeypatch, inputs, state, C, perm, **kwargs)
    got = [fused[0], *fused[1].values(), *fused[2], *fused[3][:2]]
    want = [ref[0], *ref[1].values(), *ref[2], *ref[3][:2]]
    for position, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a).all(), f"output {position}: not finite"
        scale = b.abs().max().item()
        assert_close(a, b, f"output {position}", rtol=1e-4, atol=1e-4 * scale + 1e-6)


@pytest.mark.parametrize("dtype,grad_scale", [(torch.float32, 0.25), (torch.bfloat16, 0.25),
                                              (torch.float16, 2.0 ** 12)])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_head_dtypes_bias_and_scaled_gradient(dtype, grad_scale, bias, seed, monkeypatch):
    # Pure half-precision runs (train.precision=bf16/fp16) hand the head half-precision features
    # and weights; grad_scale 0.25 is what gradient accumulation over 4 micro-batches sends back,
    # 2**12 a DeepSpeed fp16 loss scale. The features are column slices (non-contiguous).
    B, C, D, N = 64, 10, 16, 300
    state = random_state(N, C, "cpu")
    index = torch.randperm(N)[:B]
    inputs = [torch.randn(B, 2 * D)[:, :D].to(dtype), torch.randn(B, 2 * D)[:, D:].to(dtype),
              torch.randn(C, 2 * D).to(dtype), torch.randn(C).to(dtype) if bias else None,
              torch.randn(C, 2 * D).to(dtype), torch.randn(C).to(dtype) if bias else None,
              state[3][index], index]
    perm = torch.randperm(B)
    fused = head("fused", monkeypatch, inputs, state, C, perm, grad_scale=grad_scale)
    ref = head("torch", monkeypatch, inputs, state, C, perm, grad_scale=grad_scale)
    tol = (FP32 if dtype == torch.float32 else
           {"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else
           {"rtol": 2e-3, "atol": 2e-3 * grad_scale})
    assert_close(fused[0], ref[0], "loss", **tol)
    assert set(fused[1]) == set(ref[1])
    for key in ref[1]:
        assert_close(fused[1][key], ref[1][key], f"stat {key}", **tol)
    for got, want in zip(fused[2], ref[2]):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.dtype == dtype
            assert torch.isfinite(got).all()
            assert_close(got, want, "gradient", **tol)
    for got, want in zip(fused[3], ref[3]):
        assert_close(got, want, "EMA state", **tol)


def test_fused_head_applies_the_gathered_batch_to_the_ema(seed, monkeypatch):
    # Under data parallelism `gather` returns the global batch's (index, ce_i, ce_b): a fake second
    # rank's samples must be written into the EMA by both backends alike.
    B, C, D, N = 32, 10, 16, 300
    state = random_state(N, C, "cpu")
    index = torch.randperm(N)[:2 * B]
    other_i, other_b = torch.rand(B) * 3, torch.rand(B) * 3

    def gather(idx, ce_i, ce_b):
        return torch.cat([idx, index[B:]]), torch.cat([ce_i, other_i]), torch.cat([ce_b, other_b])
    inputs = [torch.randn(B, D), torch.randn(B, D), torch.randn(C, 2 * D), torch.randn(C),
              torch.randn(C, 2 * D), torch.randn(C), state[3][index[:B]], index[:B]]
    perm = torch.randperm(B)
    fused = head("fused", monkeypatch, inputs, state, C, perm, gather=gather)
    ref = head("torch", monkeypatch, inputs, state, C, perm, gather=gather)
    assert torch.equal(fused[3][2], ref[3][2]) and fused[3][2][index].all()
    for got, want, name in zip(fused[3][:2], ref[3][:2], ("ema_i", "ema_b")):
        assert_close(got, want, name, **FP32)
    for got, want in zip(fused[2], ref[2]):
        assert_close(got, want, "gradient", **FP32)


def test_fused_head_is_the_cpu_default_and_one_autograd_node(monkeypatch):
    # One node, whose backward refuses to be differentiated again (it is written by hand).
    monkeypatch.delenv("DFA_KERNELS", raising=False)
    assert ops.backend(torch.zeros(1)) == "fused"
    B, C, D, N = 8, 3, 4, 20
    state = random_state(N, C, "cpu")
    index = torch.arange(B)
    z_i, z_b = torch.randn(B, D, requires_grad=True), torch.randn(B, D, requires_grad=True)
    loss, _ = ops.disent_head(z_i, z_b, torch.randn(C, 2 * D), torch.randn(C),
                              torch.randn(C, 2 * D), torch.randn(C), state[3][index], index,
                              *state, C, torch.randperm(B), **LAMBDAS)
    assert type(loss.grad_fn).__name__ == "NumbaHeadFunctionBackward"  # float32
    grad_i, = torch.autograd.grad(loss, z_i, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad_i.square().sum(), z_i)
    half = [t.bfloat16() for t in (z_i, z_b, torch.randn(C, 2 * D), torch.randn(C),
                                   torch.randn(C, 2 * D), torch.randn(C))]
    loss, _ = ops.disent_head(*half, state[3][index], index, *state, C, torch.randperm(B),
                              **LAMBDAS)
    assert type(loss.grad_fn).__name__ == "DisentHeadFunctionBackward"


@pytest.mark.parametrize("bad", ["label", "index", "perm"])
def test_the_compiled_head_refuses_out_of_range_indices_and_forgets_its_class_maxima(bad):
    B, C, D, N = 16, 4, 8, 50
    state = random_state(N, C, "cpu")
    index, perm = torch.randperm(N)[:B], torch.randperm(B)
    label = state[3][index].clone()
    args = [torch.randn(B, D), torch.randn(B, D), torch.randn(C, 2 * D), torch.randn(C),
            torch.randn(C, 2 * D), torch.randn(C)]
    ops.disent_head(*args, label, index, *state, C, perm, **LAMBDAS)  # a good step first
    assert numba_weighting.maxima_of(state[0]) is not None
    {"label": label, "index": index, "perm": perm}[bad][3] = {"label": C, "index": N,
                                                             "perm": B}[bad]
    with pytest.raises(IndexError):
        ops.disent_head(*args, label, index, *state, C, perm, **LAMBDAS)
    assert numba_weighting.maxima_of(state[0]) is None
