"""`kernels.onednn_linear`: float32 Linear + ReLU through oneDNN on a CPU, against a float64
reference, and the MLP encoder's use of it."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dfa_fast.config import ModelConfig
from dfa_fast.kernels import onednn_linear
from dfa_fast.models import MLPEncoder, build_encoder

pytestmark = pytest.mark.skipif(not onednn_linear.available(),
                                reason="this PyTorch has no oneDNN linear operator")


def linear_relu(x, weight, bias):
    """One Linear + ReLU layer through oneDNN: a chain of one."""
    return onednn_linear.linear_relu_chain(x, [SimpleNamespace(weight=weight, bias=bias)])


def reference(x, weight, bias):
    """relu(x W^T + b) in float64 with autograd."""
    x, weight, bias = (t.detach().double().requires_grad_(t.requires_grad)
                       for t in (x, weight, bias))
    return torch.relu(x @ weight.t() + bias), (x, weight, bias)


@pytest.mark.parametrize("batch,k,n", [(256, 2352, 100), (256, 100, 100), (256, 100, 16),
                                       (1, 7, 3), (33, 65, 17)])
@pytest.mark.parametrize("input_grad", [False, True])
def test_values_and_gradients_match_a_float64_reference(batch, k, n, input_grad):
    gen = torch.Generator().manual_seed(batch + k + n)
    x = torch.randn(batch, k, generator=gen).requires_grad_(input_grad)
    weight = (torch.randn(n, k, generator=gen) / k ** 0.5).requires_grad_()
    bias = torch.randn(n, generator=gen).requires_grad_()
    out = linear_relu(x, weight, bias)
    expected, leaves = reference(x, weight, bias)
    assert out.dtype == torch.float32 and out.shape == (batch, n)
    assert (out == 0).any() and (out > 0).any()  # both sides of the ReLU are exercised
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(batch, n, generator=gen)
    out.backward(grad)
    expected.backward(grad.double())
    for got, want in zip((x, weight, bias), leaves):
        if not want.requires_grad:
            assert got.grad is None
            continue
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-4)


def test_transposed_and_sliced_inputs_give_the_same_values():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 64, generator=gen).t()  # (64, 40), not contiguous
    weight, bias = torch.randn(12, 40, generator=gen), torch.randn(12, generator=gen)
    expected, _ = reference(x, weight, bias)
    torch.testing.assert_close(linear_relu(x, weight, bias).double(), expected,
                               rtol=1e-5, atol=1e-5)


def test_mismatched_shapes_are_an_error():
    with pytest.raises(ValueError, match="do not match"):
        linear_relu(torch.ones(4, 5), torch.ones(3, 6), torch.ones(3))
    with pytest.raises(ValueError, match="do not match"):
        linear_relu(torch.ones(4, 5), torch.ones(3, 5), torch.ones(4))


def test_it_applies_only_to_float32_cpu_tensors_outside_autocast(monkeypatch):
    x, weight = torch.ones(4, 5), torch.ones(3, 5)
    assert onednn_linear.usable(x, weight)
    assert not onednn_linear.usable(x.bfloat16(), weight)
    assert not onednn_linear.usable(x, weight.double())
    assert not onednn_linear.usable(x.to("meta"), weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn_linear.usable(x, weight)
    # The kernel does not read DFA_KERNELS; the chooser does.
    from dfa_fast import ops
    layers = [torch.nn.Linear(5, 3)]
    monkeypatch.delenv("DFA_KERNELS", raising=False)
    assert ops.choose("linear_relu_chain", x, layers).name == "onednn"
    monkeypatch.setenv("DFA_KERNELS", "torch")
    assert onednn_linear.usable(x, weight)
    assert ops.choose("linear_relu_chain", x, layers).name == "torch"


def _encoder_pair():
    torch.manual_seed(0)
    fast = build_encoder(ModelConfig(arch="mlp"))
    plain = MLPEncoder()
    plain.load_state_dict(fast.state_dict())
    return fast, plain


def _chain_inputs(seed, input_grad, frozen=()):
    gen = torch.Generator().manual_seed(seed)
    layers = [torch.nn.Linear(k, n) for k, n in ((57, 33), (33, 20), (20, 9))]
    for i, layer in enumerate(layers):
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) / 5)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))
        layer.requires_grad_(i not in frozen)
    x = torch.randn(31, 57, generator=gen).requires_grad_(input_grad)
    return x, layers


@pytest.mark.parametrize("input_grad,frozen", [(False, ()), (True, ()), (False, (1,)),
                                               (True, (0, 2))])
def test_a_chain_is_its_layers_one_after_another_bit_for_bit(input_grad, frozen):
    x, layers = _chain_inputs(5, input_grad, frozen)
    chained = onednn_linear.linear_relu_chain(x, layers)
    y = x
    for layer in layers:
        y = linear_relu(y, layer.weight, layer.bias)
    assert torch.equal(chained, y) and (y == 0).any() and (y > 0).any()
    grad = torch.randn_like(y)
    leaves = [x] + [p for layer in layers for p in layer.parameters()]
    got = torch.autograd.grad(chained, [t for t in leaves if t.requires_grad], grad)
    want = torch.autograd.grad(y, [t for t in leaves if t.requires_grad], grad)
    assert len(got) == len(want) == sum(t.requires_grad for t in leaves)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_a_chain_with_mismatched_layers_is_an_error():
    x, layers = _chain_inputs(6, False)
    with pytest.raises(ValueError, match="do not match"):
        onednn_linear.linear_relu_chain(x, layers[1:])


def test_the_mlp_encoder_runs_through_onednn_and_matches_the_plain_layers(monkeypatch):
    calls = []
    real = onednn_linear.linear_relu_chain
    monkeypatch.setattr(onednn_linear, "linear_relu_chain",
                        lambda x, layers: calls.append([l.weight.shape for l in layers])
                        or real(x, layers))
    fast, plain = _encoder_pair()
    x = torch.rand(64, 3, 28, 28).to(memory_format=torch.channels_last)
    x[x < 0.8] = 0  # sparse like Colored MNIST
    z_fast = fast(x)
    assert calls == [[(100, 2352), (100, 100), (16, 100)]]
    z_plain = plain.layers(x.permute(0, 2, 3, 1).flatten(1))
    torch.testing.assert_close(z_fast, z_plain, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(z_fast)
    z_fast.backward(grad)
    z_plain.backward(grad)
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_the_mlp_encoder_keeps_the_plain_layers_under_autocast_and_when_forced(monkeypatch):
    calls = []
    monkeypatch.setattr(onednn_linear, "linear_relu_chain", lambda *args: calls.append(1))
    fast, plain = _encoder_pair()
    x = torch.rand(8, 3, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(fast(x), plain(x))
    monkeypatch.setenv("DFA_KERNELS", "torch")
    torch.testing.assert_close(fast(x), plain.layers(x.permute(0, 2, 3, 1).flatten(1)))
    assert calls == []
