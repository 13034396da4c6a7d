"""Feature permutation-concat kernel (kernels/permute_concat.py): values, stop-gradients, routing.

A pure copy, so forward values and gradients must match the float64 autograd reference exactly
(no arithmetic happens; the gradients of the two outputs never meet in one element).
"""
import pytest
import torch

from dfa_fast.kernels import permute_concat as pc
from dfa_fast.kernels import reference
from kernel_oracle import BATCHES, FEATURES, requires_cuda
from kernel_oracle import device, gpu_tiles, poison, seed  # noqa: F401 (fixtures)

PERMS = ("none", "identity", "random")


def make_perm(kind, batch, device):
    if kind == "none":
        return None
    if kind == "identity":
        return torch.arange(batch, device=device)
    return torch.randperm(batch, device=device)


def check(z_i, z_b, perm):
    leaves = [z_i.detach().clone().requires_grad_(), z_b.detach().clone().requires_grad_()]
    x_i, x_b = pc.permute_concat(*leaves, perm)
    ref_leaves = [z_i.detach().double().requires_grad_(), z_b.detach().double().requires_grad_()]
    ref_x_i, ref_x_b = reference.permute_concat(*ref_leaves, perm)
    assert x_i.dtype == z_i.dtype and x_b.dtype == z_i.dtype
    assert torch.equal(x_i.double(), ref_x_i.detach()), "intrinsic input differs"
    assert torch.equal(x_b.double(), ref_x_b.detach()), "bias input differs"
    # Upstream gradients representable in the input dtype, so the comparison is exact.
    g_i = torch.randn_like(x_i)
    g_b = torch.randn_like(x_b)
    grads = torch.autograd.grad([x_i, x_b], leaves, [g_i, g_b])
    ref_grads = torch.autograd.grad([ref_x_i, ref_x_b], ref_leaves, [g_i.double(), g_b.double()])
    for name, grad, ref_grad in zip(("z_i", "z_b"), grads, ref_grads):
        assert grad.dtype == z_i.dtype
        assert torch.equal(grad.double(), ref_grad), f"gradient of {name} differs"


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16,
                                   pytest.param(torch.bfloat16, marks=requires_cuda)))
@pytest.mark.parametrize("perm_kind", PERMS)
@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("batch", BATCHES)
def test_permute_concat(batch, features, perm_kind, dtype, device, seed, poison):
    z_i = torch.randn(batch, features, device=device).to(dtype)
    z_b = torch.randn(batch, features, device=device).to(dtype)
    check(z_i, z_b, make_perm(perm_kind, batch, device))


def test_gpu_tiles(device, seed, poison, gpu_tiles):
    # GPU tiles: 32 rows x 128 features a program, so (257, 512) is a 9 x 4 grid.
    check(torch.randn(257, 512, device=device), torch.randn(257, 512, device=device),
          torch.randperm(257, device=device))


def test_stop_gradients(device, seed):
    # Only the bias input reaches z_b, only the intrinsic input reaches z_i, and the gradient of
    # swapped row r lands on row perm[r].
    z_i = torch.randn(5, 4, device=device, requires_grad=True)
    z_b = torch.randn(5, 4, device=device, requires_grad=True)
    perm = torch.tensor([2, 0, 4, 1, 3], device=device)
    x_i, x_b = pc.permute_concat(z_i, z_b, perm)
    grad_z_i, grad_z_b = torch.autograd.grad(x_i.sum() * 2 + (x_b * 0).sum(), [z_i, z_b],
                                             retain_graph=True)
    assert torch.equal(grad_z_i, torch.full_like(z_i, 2.0))
    assert torch.equal(grad_z_b, torch.zeros_like(z_b))
    upstream = torch.zeros(5, 8, device=device)
    upstream[0, 4:] = 1.0  # row 0 of the swapped input holds z_b[perm[0]] = z_b[2]
    grad_z_i, grad_z_b = torch.autograd.grad([x_i, x_b], [z_i, z_b], [torch.zeros_like(x_i),
                                                                      upstream])
    assert not grad_z_i.any()
    expected = torch.zeros_like(z_b)
    expected[2] = 1.0
    assert torch.equal(grad_z_b, expected)


def test_strided_features(device, seed, poison):
    # Row-strided views (a slice of wider features) are read in place.
    wide = torch.randn(33, 40, device=device)
    check(wide[:, :16], wide[:, 20:36], torch.randperm(33, device=device))
