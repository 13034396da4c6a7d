"""Per-sample weighting kernels (kernels/weighting.py): EMA update, class maxima, W, weighted CE, LfF.

Everything is compared with the float64 oracles of kernel_oracle.py; the duplicate-index rule
(an index repeated in one update is updated once, with the mean of its losses) is also checked
against numbers worked out by hand and against kernels/reference.py.
"""
import pytest
import torch

from dfa_fast.kernels import reference, weighting
from dfa_fast.kernels.reference import LossSettings
from kernel_oracle import (BATCHES, CLASSES, TOLERANCE, assert_close, assert_scratch_clean,
                           assert_state, clone_state, cross_entropy64, ema_update64, gce64,
                           loss_state, random_state, requires_cuda, weights64)
from kernel_oracle import device, gpu_tiles, poison, seed  # noqa: F401 (fixtures)

ALPHA = 0.7


def batch_indices(n, batch, duplicates, device):
    """Sample indices of a batch: distinct, or with some indices repeated 2-3 times."""
    if not duplicates:
        return torch.randperm(n, device=device)[:batch]
    index = torch.randint(0, n, (batch,), device=device)
    index[batch // 2:batch // 2 + 2] = index[0]
    return index


def check_sample_weights(state, num_classes, index, ce_i, ce_b, gather=None, upd=None):
    """Run the kernel on ``state`` (in place) and compare W and the new state with the oracle."""
    labels = state[3]
    label = labels[index]
    before = clone_state(state)
    w = weighting.sample_weights(loss_state(state, num_classes, ALPHA, gather), index, label,
                                 ce_i, ce_b)
    upd_index, upd_i, upd_b = upd if upd is not None else (index, ce_i, ce_b)
    expected = ema_update64(before[0], before[1], before[2], upd_index, upd_i, upd_b, ALPHA)
    assert_state(state, expected, "sample_weights")
    assert_close(w, weights64(expected[0], expected[1], labels, index, label, num_classes), 1e-5,
                 "W")
    assert_scratch_clean(state[0].device.type, labels.numel())
    return w


@pytest.mark.parametrize("duplicates", (False, True))
@pytest.mark.parametrize("num_classes", CLASSES)
@pytest.mark.parametrize("batch", BATCHES)
def test_sample_weights(batch, num_classes, duplicates, device, seed, poison):
    n = 4 * batch + 3
    state = random_state(n, num_classes, device)
    index = batch_indices(n, batch, duplicates, device)
    check_sample_weights(state, num_classes, index, torch.rand(batch, device=device) * 3,
                         torch.rand(batch, device=device) * 3)


def test_duplicate_index_is_updated_once_with_the_mean(device, poison):
    # Index 3 (seen, EMA 1.0) appears three times, index 7 (unseen) twice, index 5 once.
    ema_i = torch.zeros(10, device=device)
    ema_i[3] = 1.0
    ema_b = ema_i.clone()
    seen = torch.zeros(10, dtype=torch.bool, device=device)
    seen[3] = True
    labels = torch.zeros(10, dtype=torch.long, device=device)
    index = torch.tensor([3, 7, 3, 5, 7, 3], device=device)
    ce_i = torch.tensor([1.0, 2.0, 2.0, 4.0, 4.0, 3.0], device=device)
    ce_b = ce_i * 2
    state = (ema_i, ema_b, seen, labels)
    ref_state = clone_state(state)
    weighting.sample_weights(loss_state(state, 1, ALPHA), index, labels[index], ce_i, ce_b)
    # 3: 0.7 * 1.0 + 0.3 * mean(1, 2, 3) = 1.3;  7: first write, mean(2, 4) = 3;  5: 4.
    expected = torch.zeros(10)
    expected[3], expected[7], expected[5] = 1.3, 3.0, 4.0
    assert_close(ema_i, expected, 1e-6, "ema_i")
    expected_b = expected.clone()
    expected_b[3] = 0.7 + 0.3 * 4.0
    expected_b[7], expected_b[5] = 6.0, 8.0
    assert_close(ema_b, expected_b, 1e-6, "ema_b")
    assert seen.cpu().tolist() == [False] * 3 + [True] + [False] + [True] + [False] + [True] + \
        [False] * 2
    # The PyTorch reference defines the same rule.
    reference.sample_weights(loss_state(ref_state, 1, ALPHA), index, labels[index], ce_i, ce_b)
    assert_close(ema_i, ref_state[0], 1e-6, "reference ema_i")
    assert_close(ema_b, ref_state[1], 1e-6, "reference ema_b")


def test_duplicates_across_programs(device, seed, poison, gpu_tiles):
    # 600 rows are three scatter programs; one index repeats in all three.
    n, batch = 2000, 600
    state = random_state(n, 10, device)
    index = torch.randperm(n, device=device)[:batch]
    index[299] = index[0]
    index[599] = index[0]
    check_sample_weights(state, 10, index, torch.rand(batch, device=device) * 3,
                         torch.rand(batch, device=device) * 3)


def test_class_max_over_many_programs(device, seed, poison, gpu_tiles):
    # N = 5000 at 10 classes is five apply/class-max programs folding their maxima atomically;
    # one sample outside the batch holds the maximum of its class.
    n, batch = 5000, 64
    state = random_state(n, 10, device)
    state[0][4321] = 50.0
    index = torch.randperm(4000, device=device)[:batch]
    check_sample_weights(state, 10, index, torch.rand(batch, device=device) * 3,
                         torch.rand(batch, device=device) * 3)


def test_unseen_class_gets_zero_weight(device, poison):
    # A class whose whole buffer is 0 after the update has maximum 0 (floored to 1e-30): W = 0.
    state = (torch.zeros(6, device=device), torch.zeros(6, device=device),
             torch.zeros(6, dtype=torch.bool, device=device),
             torch.tensor([0, 0, 0, 1, 1, 1], device=device))
    index = torch.tensor([0, 3], device=device)
    w = check_sample_weights(state, 2, index, torch.tensor([1.0, 0.0], device=device),
                             torch.tensor([2.0, 0.0], device=device))
    assert w[1].item() == 0.0


def test_gather_updates_with_the_global_batch(device, seed, poison):
    # The hook adds another rank's triples (one index shared with this rank); the EMA uses all of
    # them, W is returned for the local samples only.
    n, batch = 300, 32
    state = random_state(n, 10, device)
    index = torch.randperm(n, device=device)[:2 * batch]
    local, remote = index[:batch], index[batch:].clone()
    remote[0] = local[5]
    ce_i, ce_b = torch.rand(batch, device=device) * 3, torch.rand(batch, device=device) * 3
    remote_i, remote_b = torch.rand(batch, device=device) * 3, torch.rand(batch, device=device) * 3

    def gather(i, a, b):
        return torch.cat([i, remote]), torch.cat([a, remote_i]), torch.cat([b, remote_b])

    ref_state = clone_state(state)
    w = check_sample_weights(state, 10, local, ce_i, ce_b, gather,
                             upd=gather(local, ce_i, ce_b))
    assert w.shape == (batch,)
    ref_w = reference.sample_weights(loss_state(ref_state, 10, ALPHA, gather), local,
                                     ref_state[3][local], ce_i, ce_b)
    assert_close(w, ref_w, 1e-5, "W against reference")


def check_weighted_ce(logits, target, weight):
    leaf = logits.detach().clone().requires_grad_()
    loss = weighting.weighted_cross_entropy(leaf, target, weight)
    assert loss.shape == () and loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss * 3.0, leaf)
    ref_leaf = logits.detach().double().requires_grad_()
    ref = (weight.double() * cross_entropy64(ref_leaf, target)).mean()
    (ref_grad,) = torch.autograd.grad(ref * 3.0, ref_leaf)
    assert_close(loss, ref, TOLERANCE[torch.float32], "weighted CE")
    assert_close(grad, ref_grad, TOLERANCE[logits.dtype], "weighted CE grad")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16,
                                   pytest.param(torch.bfloat16, marks=requires_cuda)))
@pytest.mark.parametrize("num_classes", CLASSES)
@pytest.mark.parametrize("batch", BATCHES)
def test_weighted_cross_entropy(batch, num_classes, dtype, device, seed, poison):
    logits = (torch.randn(batch, num_classes, device=device) * 3).to(dtype)
    check_weighted_ce(logits, torch.randint(0, num_classes, (batch,), device=device),
                      torch.rand(batch, device=device))


def test_weighted_cross_entropy_many_programs(device, seed, poison, gpu_tiles):
    # 600 rows at 10 classes are three programs adding into one zeroed scalar.
    logits = torch.randn(600, 10, device=device) * 3
    check_weighted_ce(logits, torch.randint(0, 10, (600,), device=device),
                      torch.rand(600, device=device))


def test_weighted_cross_entropy_no_grad_into_weight(device, seed):
    weight = torch.rand(7, device=device, requires_grad=True)
    logits = torch.randn(7, 3, device=device, requires_grad=True)
    loss = weighting.weighted_cross_entropy(logits, torch.randint(0, 3, (7,), device=device),
                                            weight)
    grad_logits, grad_weight = torch.autograd.grad(loss, [logits, weight], allow_unused=True)
    assert grad_weight is None and grad_logits is not None


def lff_oracle(logits_d, logits_b, label, index, state, num_classes, q, form, upd=None):
    """Float64 LfF loss, statistics and new state; ``upd`` = gathered (index, ce_d, ce_b)."""
    ce_d = cross_entropy64(logits_d, label)
    ce_b = cross_entropy64(logits_b.detach(), label)
    if upd is None:
        upd = (index, ce_d.detach(), ce_b)
    new_state = ema_update64(state[0], state[1], state[2], *upd, ALPHA)
    w = weights64(new_state[0], new_state[1], state[3], index, label, num_classes)
    gce_b = gce64(logits_b, label, q, form).mean()
    loss = gce_b + (w.to(ce_d.device) * ce_d).mean()
    stats = {"ce_i": ce_d.mean(), "gce_b": gce_b, "weight": w.mean()}
    return loss, stats, new_state


def check_lff(batch, num_classes, dtype, form, device, gather=False, duplicates=False):
    n = 3 * batch + 5
    state = random_state(n, num_classes, device)
    index = batch_indices(n, batch, duplicates, device)
    label = state[3][index]
    logits = [(torch.randn(batch, num_classes, device=device) * 3).to(dtype) for _ in range(2)]
    remote = None
    hook = None
    if gather:
        remote = (torch.randint(0, n, (5,), device=device), torch.rand(5, device=device),
                  torch.rand(5, device=device))

        def hook(i, a, b):
            return tuple(torch.cat([x, r]) for x, r in zip((i, a, b), remote))

    before = clone_state(state)
    leaves = [t.detach().clone().requires_grad_() for t in logits]
    loss, stats = weighting.lff_head(*leaves, label, index,
                                     loss_state(state, num_classes, ALPHA, hook),
                                     LossSettings(q=0.7, gce_form=form))
    grads = torch.autograd.grad(loss * 2.0, leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in logits]
    upd = None
    if gather:
        ce_d = cross_entropy64(ref_leaves[0].detach(), label)
        ce_b = cross_entropy64(ref_leaves[1].detach(), label)
        upd = hook(index, ce_d.to(remote[1]), ce_b.to(remote[1]))
    ref_loss, ref_stats, ref_state = lff_oracle(*ref_leaves, label, index, before, num_classes,
                                                0.7, form, upd)
    ref_grads = torch.autograd.grad(ref_loss * 2.0, ref_leaves)
    assert_close(loss, ref_loss, 1e-5, "LfF loss")
    assert set(stats) == set(ref_stats)
    for key in stats:
        assert_close(stats[key], ref_stats[key], 1e-5, f"LfF stat {key}")
    assert_state(state, ref_state, "LfF")
    for name, grad, ref_grad in zip(("logits_d", "logits_b"), grads, ref_grads):
        assert grad.dtype == dtype
        assert_close(grad, ref_grad, TOLERANCE[dtype], f"LfF grad {name}")
    assert_scratch_clean(device, n)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("num_classes", CLASSES)
@pytest.mark.parametrize("batch", BATCHES)
def test_lff_head(batch, num_classes, dtype, device, seed, poison):
    check_lff(batch, num_classes, dtype, "reference", device)


@pytest.mark.parametrize("form", ("reference", "textbook"))
def test_lff_head_gather_and_duplicates(form, device, seed, poison):
    check_lff(64, 10, torch.float32, form, device, gather=True, duplicates=True)


def test_lff_head_gpu_tiles(device, seed, poison, gpu_tiles):
    check_lff(600, 10, torch.float32, "reference", device, duplicates=True)


@requires_cuda[0]
@requires_cuda[1]
def test_lff_head_bf16(device, seed):
    check_lff(257, 10, torch.bfloat16, "reference", device)
