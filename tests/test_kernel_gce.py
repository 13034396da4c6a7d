"""Fused per-sample CE / GCE kernel (kernels/gce.py) against float64: losses and logit gradients."""
import pytest
import torch

from dfa_fast.kernels import gce as gce_kernels
from kernel_oracle import (BATCHES, CLASSES, TOLERANCE, assert_close, cross_entropy64, gce64,
                           requires_cuda)
from kernel_oracle import device, gpu_tiles, poison, seed  # noqa: F401 (fixtures)

LOSSES = ("ce", "gce-reference", "gce-textbook")
DTYPES = (torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=requires_cuda))


def kernel_loss(kind, logits, target, q):
    if kind == "ce":
        return gce_kernels.cross_entropy(logits, target)
    return gce_kernels.gce(logits, target, q, kind.split("-")[1])


def oracle_loss(kind, logits, target, q):
    if kind == "ce":
        return cross_entropy64(logits, target)
    return gce64(logits, target, q, kind.split("-")[1])


def check(kind, logits, target, q=0.7, rtol=None):
    """Compare loss and d(sum(g * loss))/d logits with the float64 oracle."""
    rtol = rtol or TOLERANCE[logits.dtype]
    leaf = logits.detach().clone().requires_grad_()
    loss = kernel_loss(kind, leaf, target, q)
    assert loss.dtype == torch.float32 and loss.shape == target.shape
    upstream = torch.randn(target.shape, device=logits.device)
    (grad,) = torch.autograd.grad(loss, leaf, upstream)
    assert grad.dtype == logits.dtype
    ref_leaf = logits.detach().double().requires_grad_()
    ref = oracle_loss(kind, ref_leaf, target, q)
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf, upstream.double())
    # The loss is float32 arithmetic on exactly converted inputs, whatever the input dtype.
    assert_close(loss, ref, TOLERANCE[torch.float32], f"{kind} loss")
    assert_close(grad, ref_grad, rtol, f"{kind} grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_classes", CLASSES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("kind", LOSSES)
def test_loss_and_gradient(kind, batch, num_classes, dtype, device, seed, poison):
    logits = (torch.randn(batch, num_classes, device=device) * 4).to(dtype)
    target = torch.randint(0, num_classes, (batch,), device=device)
    check(kind, logits, target)


@pytest.mark.parametrize("kind", LOSSES)
def test_gpu_tiles_many_programs(kind, device, seed, poison, gpu_tiles):
    # GPU tiles: 32 rows a program at 100 classes, so 257 rows are 9 programs with a ragged last one.
    logits = torch.randn(257, 100, device=device) * 4
    check(kind, logits, torch.randint(0, 100, (257,), device=device))


@pytest.mark.parametrize("kind", LOSSES)
def test_extreme_logits_stay_finite(kind, device, seed, poison):
    # Logits of +-1e4 overflow a naive exp; the max-shifted softmax keeps loss and gradient exact.
    logits = torch.randn(64, 10, device=device).sign() * 1e4 + torch.randn(64, 10, device=device)
    check(kind, logits, torch.randint(0, 10, (64,), device=device))


def test_strided_logits(device, seed, poison):
    # A column slice of a wider tensor: the kernel takes the row stride, no copy.
    wide = torch.randn(33, 24, device=device) * 3
    check("gce-reference", wide[:, 4:14], torch.randint(0, 10, (33,), device=device))


@pytest.mark.parametrize("q", (0.3, 0.7, 1.0))
def test_q_values(q, device, seed, poison):
    logits = torch.randn(64, 10, device=device) * 3
    target = torch.randint(0, 10, (64,), device=device)
    check("gce-reference", logits, target, q)
    check("gce-textbook", logits, target, q)


def test_unknown_form_is_rejected(device):
    with pytest.raises(ValueError, match="unknown GCE form 'bogus'"):
        gce_kernels.gce(torch.zeros(2, 3, device=device), torch.zeros(2, dtype=torch.long,
                                                                      device=device), 0.7, "bogus")


def test_no_gradient_buffer_without_grad(device, seed):
    # Detached logits (the EMA's CE of the bias branch) store no gradient and need no backward.
    logits = torch.randn(7, 3, device=device)
    loss = gce_kernels.cross_entropy(logits, torch.randint(0, 3, (7,), device=device))
    assert not loss.requires_grad
