"""Float64 oracles and fixtures shared by the kernel tests (imported by tests/test_kernel_*.py).

The oracles are written independently of ``kernels/reference.py`` (which computes in float32 by
design): losses in float64 with autograd, and the EMA update as a per-sample Python loop over the
batch, so the duplicate-index rule (each index once, with the mean of its losses) is checked against
its plainest statement; `head_oracle` is a whole DisEnt head in float64 and `float32_error_bounds`
says how far a float32 head's gradients may fall from it by rounding alone. Fixtures: ``device``
(the interpreter's CPU, or a CUDA GPU when the tests run without the interpreter), ``seed`` (fresh
every run, printed so a failure can be replayed with
``DFA_TEST_SEED``), ``poison`` (every ``torch.empty`` returns NaN / sentinel-filled memory, so an
element a kernel forgets to write fails the comparison) and ``gpu_tiles`` (the GPU tile sizes on the
interpreter: more programs, atomics across programs, more loop trips). States are tuples
(ema_i, ema_b, seen, labels) of plain tensors (`random_state`, `clone_state`, the oracles);
`loss_state` wraps one into the `LossState` the implementations take, sharing its tensors.
"""
from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

from dfa_fast.kernels import gce as gce_kernels
from dfa_fast.kernels.reference import LossState

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
                 baseline: torch.Tensor | None = None,
                 bound: torch.Tensor | None = None) -> None:
    """Assert |actual - expected| <= rtol * (|expected| + max|expected|), NaN never passing.

    fp16 results also get fp16's resolution near zero (its subnormal spacing, 2**-24). A sum that
    cancels (a bias gradient over a few rows, say) has an error set by its terms, not by its small
    result, so two allowances may be added: with a ``baseline`` (PyTorch's float32 result for the
    same inputs) 4x the baseline's largest error, and ``bound`` (elementwise, from
    `float32_error_bounds`).
    """
    atol = 2.0 ** -24 if actual.dtype == torch.float16 else 0.0
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    if baseline is not None:
        atol += 4 * (baseline.detach().double().cpu() - expected).abs().max().item()
    if bound is not None:
        atol = atol + bound.detach().double().cpu()
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


def head_oracle(params, label, index, state, num_classes, perm, lambdas, form, upd=None,
                parts=None, q=0.7, alpha=0.7):
    """Float64 DisEnt loss, statistics and new EMA state (docs/method.md, materialised).

    The classifier inputs ([z_i, sg(z_b)], [sg(z_i), z_b], and the swapped ones with z_b[pi]) go
    through two float64 linear layers. ``upd`` replaces the (index, ce_i, ce_b) the EMAs are
    updated with (a data-parallel gather; the batch's own losses first). ``parts``, a dict,
    receives what `float32_error_bounds` needs: "calls", (classifier, logits, inputs, rows of z
    the inputs came from, targets) for each of the 2 or 4 classifier calls; "w"; "upd" (its
    losses as leaves); "index".
    """
    parts = {} if parts is None else parts
    z_i, z_b, weight_i, bias_i, weight_b, bias_b = params
    logits_i = F.linear(torch.cat([z_i, z_b.detach()], 1), weight_i, bias_i)
    logits_b = F.linear(torch.cat([z_i.detach(), z_b], 1), weight_b, bias_b)
    rows = torch.arange(z_i.shape[0], device=z_i.device)
    calls = [(0, logits_i, torch.cat([z_i, z_b], 1).detach(), rows, label),
             (1, logits_b, torch.cat([z_i, z_b], 1).detach(), rows, label)]
    ce_i = cross_entropy64(logits_i, label)
    ce_b = cross_entropy64(logits_b.detach(), label)
    if upd is None:
        upd = (index, ce_i, ce_b)
    # The losses the EMAs take are leaves, so that the bounds can ask how W depends on them.
    upd = (upd[0], *(losses.detach().clone().requires_grad_() for losses in upd[1:]))
    new_state = ema_update64(state[0], state[1], state[2], *upd, alpha)
    w = weights64(new_state[0], new_state[1], state[3], index, label, num_classes).to(ce_i.device)
    gce_b = gce64(logits_b, label, q, form).mean()
    loss = (w.detach() * ce_i).mean() + lambdas["lambda_dis"] * gce_b
    stats = {"ce_i": ce_i.mean(), "gce_b": gce_b, "weight": w.mean(), "loss_dis": loss}
    if perm is not None:
        z_b_perm = z_b[perm]
        swapped_i = F.linear(torch.cat([z_i, z_b_perm.detach()], 1), weight_i, bias_i)
        swapped_b = F.linear(torch.cat([z_i.detach(), z_b_perm], 1), weight_b, bias_b)
        swapped_rows = torch.cat([z_i, z_b_perm], 1).detach()
        calls += [(0, swapped_i, swapped_rows, rows, label),
                  (1, swapped_b, swapped_rows, perm, label[perm])]
        loss_swap = ((w.detach() * cross_entropy64(swapped_i, label)).mean()
                     + lambdas["lambda_swap_b"] * gce64(swapped_b, label[perm], q, form).mean())
        stats["loss_swap"] = loss_swap
        loss = loss + lambdas["lambda_swap"] * loss_swap
    parts.update(calls=calls, w=w, upd=upd, index=index)
    stats = {key: value.detach() for key, value in stats.items()}
    return loss, stats, tuple(t.detach() for t in new_state)


def float32_error_bounds(loss, parts, params, grad_out, q=0.7):
    """Per parameter, elementwise, how far a float32 DisEnt head's gradient may fall from the
    float64 oracle's by rounding alone (``parts`` from `head_oracle`).

    Row r of a classifier call has dL/dlogits = coef_r * (softmax - onehot(target)). Three errors:

    * rounding of the terms: the target entry subtracts two numbers of size |coef_r| (a row the
      classifier gets right cancels to a small result), so a row's term magnitudes are
      |dL/dlogits| plus |coef_r| at the target, each with a few float32 roundings (16 units);
    * the logits: a float32 logit is off by up to u (sum over d of |w_cd x_d| + |b_c|), its
      log-softmax by up to u (1 + that, largest over the classes) = e_r; that moves the row's
      softmax (relative e_r) and a GCE row's coefficient q p_y^q (relative q e_r);
    * W: an unseen sample's W is its bias CE over its two CEs; for a confident row the float32
      CE is log(1 + tiny), off by e_r in absolute terms, which can be a large relative error of a
      small CE. The intrinsic rows' coefficients carry W, so they move by dW / W.

    A weight gradient sums its rows' errors times |input|, a bias gradient over rows, a feature
    row times |weight| over classes (z_i through the intrinsic classifier's first half, z_b
    through the bias classifier's second half, the swapped rows back through the permutation).
    """
    unit = 2.0 ** -24
    z_i, z_b, weight_i, bias_i, weight_b, bias_b = params
    features = z_i.shape[1]
    calls = parts["calls"]
    grads = torch.autograd.grad(loss, [call[1] for call in calls], grad_out, retain_graph=True)
    # e_r of every row of every call.
    errors = []
    for classifier, logits, inputs, rows, target in calls:
        weight = (weight_i, weight_b)[classifier].detach().abs()
        bias = (bias_i, bias_b)[classifier]
        size = inputs.abs() @ weight.T + (bias.detach().abs() if bias is not None else 0.0)
        errors.append(unit * (1.0 + size.max(1).values))
    # dW of each sample: the float32 losses the EMAs take (the first 2 calls, the first B entries
    # of the update) are off by e_r. w.sum() counts a duplicated index once per row holding it.
    w, (_, upd_i, upd_b), index = parts["w"], parts["upd"], parts["index"].cpu()
    d_i, d_b = torch.autograd.grad(w.sum(), [upd_i, upd_b])
    batch = index.shape[0]
    share = d_i[:batch].abs() * errors[0] + d_b[:batch].abs() * errors[1]
    per_index = torch.zeros(int(index.max()) + 1, dtype=torch.float64).index_add_(0, index, share)
    d_w = (per_index / torch.bincount(index).clamp_min(1))[index]
    relative_w = torch.where(w > 0, d_w / w.detach().clamp_min(1e-300), torch.zeros_like(w))
    shapes = {"z_i": z_i, "z_b": z_b, "weight_i": weight_i, "weight_b": weight_b,
              "bias_i": weight_i[:, 0], "bias_b": weight_b[:, 0]}
    bounds = {name: torch.zeros_like(like, dtype=torch.float64) for name, like in shapes.items()}
    for (classifier, logits, inputs, rows, target), g, error in zip(calls, grads, errors):
        g = g.detach()
        others = 1.0 - F.one_hot(target, g.shape[1]).to(g.dtype)
        # coef = (sum of the non-target entries) / (their softmax mass), both free of cancellation.
        mass = (torch.softmax(logits.detach(), 1) * others).sum(1)
        coef = torch.where(mass > 0, (g * others).sum(1) / mass.clamp_min(1e-300),
                           torch.zeros_like(mass))
        terms = g.abs() + coef.abs()[:, None] * (1.0 - others)
        moved = error * (1.0 + q) if classifier == 1 else error + relative_w
        row_bound = 16 * unit * terms + g.abs() * moved[:, None]
        suffix = "ib"[classifier]
        weight = (weight_i, weight_b)[classifier].detach().abs()
        bounds[f"weight_{suffix}"] += row_bound.T @ inputs.abs()
        bounds[f"bias_{suffix}"] += row_bound.sum(0)
        if classifier == 0:
            bounds["z_i"] += row_bound @ weight[:, :features]
        else:
            bounds["z_b"].index_add_(0, rows, row_bound @ weight[:, features:])
    return bounds


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


def loss_state(state, num_classes: int, alpha: float = 0.7, gather=None) -> LossState:
    """Wrap an EMA state tuple (ema_i, ema_b, seen, labels) into the `LossState` the heads and
    `sample_weights` take. The tensors are shared, not copied: the implementations' in-place
    updates show in the tuple (the float64 oracles keep working on the plain tensors)."""
    ema_i, ema_b, seen, labels = state
    return LossState(ema_i, ema_b, seen, labels, num_classes, alpha, gather)


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
