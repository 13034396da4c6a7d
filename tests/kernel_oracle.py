"""Float64 oracles and fixtures shared by the kernel tests (imported by tests/test_kernel_*.py).

The oracles are written independently of ``kernels/reference.py`` (which computes in float32 by
design): losses in float64 with autograd, and the EMA update as a per-sample Python loop over the
batch, so the duplicate-index rule (each index once, with the mean of its losses) is checked against
its plainest statement. Fixtures: ``device`` (the interpreter's CPU, or a CUDA GPU when the tests run
without the interpreter), ``seed`` (fresh every run, printed so a failure can be replayed with
``DFA_TEST_SEED``), ``poison`` (every ``torch.empty`` returns NaN / sentinel-filled memory, so an
element a kernel forgets to write fails the comparison) and ``gpu_tiles`` (the GPU tile sizes on the
interpreter: more programs, atomics across programs, more loop trips).
"""
from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

from dfa_fast.kernels import gce as gce_kernels

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
requires_cuda = [pytest.mark.cuda,
                 pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(),
                                    reason="needs a CUDA GPU and TRITON_INTERPRET unset or 0")]

BATCHES = (1, 7, 64, 257)
CLASSES = (2, 3, 10, 100)
FEATURES = (16, 33, 512)
# fp32: float32 arithmetic against float64 (rtol of the error relative to the largest magnitude);
# fp16/bf16: the same float32 arithmetic, but gradients are rounded to the input dtype on output.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture
def device() -> str:
    """The device the kernels run on: 'cpu' under TRITON_INTERPRET=1, else 'cuda' if present."""
    if INTERPRET:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 or a CUDA GPU")


@pytest.fixture
def seed() -> int:
    """Seed torch's generators with a fresh seed (or $DFA_TEST_SEED) and print it."""
    value = int(os.environ.get("DFA_TEST_SEED", random.SystemRandom().randrange(2 ** 31)))
    print(f"DFA_TEST_SEED={value}")
    torch.manual_seed(value)
    return value


@pytest.fixture
def poison(monkeypatch):
    """Make torch.empty return NaN-filled floats and sentinel-filled integers for this test."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.dtype.is_floating_point:
            out.fill_(float("nan"))
        elif out.dtype == torch.bool:
            out.fill_(True)
        elif out.dtype == torch.uint8:
            out.fill_(0xA5)
        else:
            out.fill_(0x5A5A5A5A if out.dtype.itemsize >= 4 else 0x5A)
        return out

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.fixture
def gpu_tiles(monkeypatch):
    """Run the kernels with the tile sizes they use on a GPU (also under the interpreter)."""
    monkeypatch.setattr(gce_kernels, "INTERPRET", False)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str,
                 baseline: torch.Tensor | None = None) -> None:
    """Assert |actual - expected| <= rtol * (|expected| + max|expected|), NaN never passing.

    fp16 results also get fp16's resolution near zero (its subnormal spacing, 2**-24). With a
    ``baseline`` (PyTorch's float32 result for the same inputs) the error may also reach 4x the
    baseline's largest error: a sum that cancels (a bias gradient over a few rows, say) has an
    error set by its terms, not by its small result, and float32 PyTorch faces the same.
    """
    atol = 2.0 ** -24 if actual.dtype == torch.float16 else 0.0
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    if baseline is not None:
        atol += 4 * (baseline.detach().double().cpu() - expected).abs().max().item()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten output?)"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    bound = rtol * (expected.abs() + scale) + atol + 1e-30
    err = (actual - expected).abs()
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"{what}: error {err.max().item():.3e} is {worst:.2f}x the tolerance"


def cross_entropy64(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy in float64."""
    return F.cross_entropy(logits.double(), target, reduction="none")


def gce64(logits: torch.Tensor, target: torch.Tensor, q: float, form: str) -> torch.Tensor:
    """Per-sample GCE in float64: reference form ce * q * sg(p_y)^q, textbook (1 - p_y^q) / q."""
    log_p_y = F.log_softmax(logits.double(), dim=1).gather(1, target[:, None]).squeeze(1)
    p_y_q = torch.exp(q * log_p_y)
    if form == "reference":
        return -log_p_y * q * p_y_q.detach()
    return (1.0 - p_y_q) / q


def ema_update64(ema_i, ema_b, seen, index, loss_i, loss_b, alpha):
    """Return the updated (ema_i, ema_b, seen) in float64: a loop over the distinct indices."""
    ema_i, ema_b = ema_i.double().cpu().clone(), ema_b.double().cpu().clone()
    seen = seen.cpu().clone()
    loss_i, loss_b = loss_i.double().cpu(), loss_b.double().cpu()
    positions: dict[int, list[int]] = {}
    for j, n in enumerate(index.tolist()):
        positions.setdefault(n, []).append(j)
    for n, js in positions.items():
        for ema, loss in ((ema_i, loss_i), (ema_b, loss_b)):
            mean = loss[js].mean()
            ema[n] = alpha * ema[n] + (1 - alpha) * mean if seen[n] else mean
        seen[n] = True
    return ema_i, ema_b, seen


def weights64(ema_i, ema_b, labels, index, label, num_classes):
    """Return W (float64) from the class maxima over the whole buffers (a loop over classes)."""
    ema_i, ema_b = ema_i.double().cpu(), ema_b.double().cpu()
    labels, index, label = labels.cpu(), index.cpu(), label.cpu()
    class_max = torch.zeros(2, num_classes, dtype=torch.float64)
    for c in range(num_classes):
        members = labels == c
        if members.any():
            class_max[0, c] = max(ema_i[members].max().item(), 0.0)
            class_max[1, c] = max(ema_b[members].max().item(), 0.0)
    class_max = class_max.clamp_min(1e-30)
    e_i = ema_i[index] / class_max[0, label]
    e_b = ema_b[index] / class_max[1, label]
    return e_b / (e_b + e_i + 1e-8)


def random_state(n: int, num_classes: int, device: str):
    """Return (ema_i, ema_b, seen, labels): float32 EMAs, about half the samples seen."""
    seen = torch.rand(n, device=device) < 0.5
    ema_i = torch.where(seen, torch.rand(n, device=device) * 3, torch.zeros(n, device=device))
    ema_b = torch.where(seen, torch.rand(n, device=device) * 3, torch.zeros(n, device=device))
    labels = torch.randint(0, num_classes, (n,), device=device)
    return ema_i, ema_b, seen, labels


def clone_state(state):
    """Return independent copies of an EMA state tuple."""
    return tuple(t.clone() for t in state)


def assert_state(actual, expected, what: str) -> None:
    """Compare an EMA state (kernel, float32) with the float64 oracle's."""
    assert_close(actual[0], expected[0], 1e-5, f"{what}: ema_i")
    assert_close(actual[1], expected[1], 1e-5, f"{what}: ema_b")
    assert torch.equal(actual[2].cpu(), expected[2].cpu()), f"{what}: seen flags differ"


def assert_scratch_clean(device: str, n: int) -> None:
    """The EMA scratch must be all zero between calls (launch 2 resets what it consumed)."""
    from dfa_fast.kernels import weighting
    sums, count = weighting.ema_scratch(torch.device(device), n)
    assert not sums.any() and not count.any(), "EMA scratch left non-zero"
