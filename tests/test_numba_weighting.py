"""The compiled CPU pass for the EMA update and weights (`kernels/numba_weighting.py`) against
`reference.sample_weights`: the weights, both EMA buffers and the seen flags bit for bit, over
unique and duplicated indices, class counts, loss dtypes, a data-parallel gather, a class without
any seen sample (the floor), a NaN, and bad indices; and the class maxima it keeps in the
`LossState` it is given (``state.cache``) between steps."""
import gc
import weakref

import pytest
import torch

from dfa_fast.ema import SampleLossEMA
from dfa_fast.kernels import numba_weighting, reference
from dfa_fast.kernels.reference import LossSettings, LossState


def random_state(n, classes, gen):
    labels = torch.randint(0, classes, (n,), generator=gen)
    seen = torch.rand(n, generator=gen) < 0.5
    ema_i = torch.rand(n, generator=gen) * 3 * seen
    ema_b = torch.rand(n, generator=gen) * 3 * seen
    return ema_i, ema_b, seen, labels


def loss_state(state, classes, alpha=0.7, gather=None):
    """A `LossState` over the tensors of a state tuple (shared, not copied)."""
    return LossState(*state, classes, alpha, gather)


def both(state, classes, index, ce_i, ce_b, alpha=0.7, gather=None):
    """Run the reference and the numba pass on copies of ``state``; return both results."""
    results = []
    for impl in (reference.sample_weights, numba_weighting.sample_weights):
        ema_i, ema_b, seen, labels = (t.clone() for t in state)
        w = impl(loss_state((ema_i, ema_b, seen, labels), classes, alpha, gather), index,
                 labels[index], ce_i, ce_b)
        results.append((w, ema_i, ema_b, seen))
    return results


def assert_identical(ref, got):
    for name, want, have in zip(("W", "ema_i", "ema_b", "seen"), ref, got):
        torch.testing.assert_close(have, want, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("n,classes,batch", [(600, 2, 7), (5000, 10, 256), (3000, 100, 257),
                                             (40, 10, 64)])
def test_bit_identical_to_the_reference_over_a_sequence_of_steps(n, classes, batch):
    gen = torch.Generator().manual_seed(n + classes)
    state = random_state(n, classes, gen)
    for step in range(12):
        # Every third step draws with replacement (duplicated indices); the scratch array the
        # kernel keeps between calls then holds stale entries from the steps before.
        if step % 3 == 0 or batch > n:
            index = torch.randint(0, n, (batch,), generator=gen)
        else:
            index = torch.randperm(n, generator=gen)[:batch]
        ce_i = torch.rand(batch, generator=gen) * 5
        ce_b = torch.rand(batch, generator=gen) * 5
        ref, got = both(state, classes, index, ce_i, ce_b, alpha=0.7 if step % 2 else 0.9)
        assert_identical(ref, got)
        state = (ref[1], ref[2], ref[3], state[3])


def raw_class_max(ema, labels, classes):
    """The class maxima of a buffer before the floor (0 for an empty class, NaN spreads)."""
    return torch.zeros(classes).scatter_reduce(0, labels, ema, "amax", include_self=True)


@pytest.mark.parametrize("n,classes,batch", [(300, 3, 64), (5000, 10, 256)])
def test_class_maxima_kept_between_steps_stay_exact(n, classes, batch):
    """The same state step after step (the trainer's use): the maxima carried over in its cache
    and the full passes where a maximum's holder fell give the reference's W and buffers bit for
    bit."""
    gen = torch.Generator().manual_seed(n)
    ref_state = random_state(n, classes, gen)
    mine = tuple(t.clone() for t in ref_state)
    labels = ref_state[3]
    ref_loss_state, my_loss_state = loss_state(ref_state, classes), loss_state(mine, classes)
    for step in range(80):
        index = torch.randint(0, n, (batch,), generator=gen) if step % 4 == 0 else \
            torch.randperm(n, generator=gen)[:batch]
        ce_i = torch.rand(batch, generator=gen) * (5 if step % 7 else 0.1)  # some steps fall
        ce_b = torch.rand(batch, generator=gen) * 5
        w_ref = reference.sample_weights(ref_loss_state, index, labels[index], ce_i, ce_b)
        w = numba_weighting.sample_weights(my_loss_state, index, labels[index], ce_i, ce_b)
        assert_identical((w_ref, *ref_state[:3]), (w, *mine[:3]))
        known = my_loss_state.cache.get("class_maxima")
        for got, ema in ((known.max_i, mine[0]), (known.max_b, mine[1])):
            assert torch.equal(torch.from_numpy(got), raw_class_max(ema, labels, classes))
    assert 1 <= known.scans < known.calls == 80  # both ways were taken


def test_buffers_written_by_pytorch_or_replaced_are_scanned_again():
    gen = torch.Generator().manual_seed(9)
    ema_i, ema_b, seen, labels = random_state(400, 4, gen)
    state = loss_state((ema_i, ema_b, seen, labels), 4)
    index = torch.randperm(400, generator=gen)[:32]
    ce = torch.rand(32, generator=gen)

    def kept():
        return state.cache["class_maxima"]
    numba_weighting.sample_weights(state, index, labels[index], ce, ce)
    numba_weighting.sample_weights(state, index, labels[index], ce, ce)
    assert kept().scans == 1 and kept().calls == 2
    # A checkpoint restore lowers every value (copy_ into the buffers, as SampleLossEMA does).
    ema_b.copy_(ema_b * 0.5)
    ref = reference.sample_weights(loss_state((ema_i.clone(), ema_b.clone(), seen.clone(), labels),
                                              4), index, labels[index], ce, ce)
    got = numba_weighting.sample_weights(state, index, labels[index], ce, ce)
    assert torch.equal(got, ref)
    assert kept().scans == kept().calls == 1  # started over
    numba_weighting.sample_weights(state, index, labels[index], ce, ce)
    assert kept().scans == 1 and kept().calls == 2
    # Another seen-flag tensor in the same state (the buffers it was kept for are replaced).
    state.seen = seen.clone()
    numba_weighting.sample_weights(state, index, labels[index], ce, ce)
    assert kept().scans == kept().calls == 1
    # Another state over the same buffers has its own cache: it starts with a full pass.
    other = loss_state((ema_i, ema_b, state.seen, labels), 4)
    numba_weighting.sample_weights(other, index, labels[index], ce, ce)
    assert other.cache["class_maxima"].scans == other.cache["class_maxima"].calls == 1
    assert kept().calls == 1  # the first state's is its own
    # A state whose cache was cleared (whoever writes the buffers otherwise) starts over.
    state.clear_cache()
    numba_weighting.sample_weights(state, index, labels[index], ce, ce)
    assert kept().scans == kept().calls == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_and_strided_losses(dtype):
    gen = torch.Generator().manual_seed(1)
    state = random_state(1000, 10, gen)
    index = torch.randperm(1000, generator=gen)[:128]
    losses = (torch.rand(256, generator=gen) * 4).to(dtype)
    ref, got = both(state, 10, index, losses[::2], losses[1::2])
    assert_identical(ref, got)


def test_gathered_batch_updates_every_sample_and_weighs_the_local_ones():
    gen = torch.Generator().manual_seed(2)
    state = random_state(2000, 10, gen)
    index = torch.randperm(2000, generator=gen)[:96]
    other = torch.randperm(2000, generator=gen)[:96]  # another rank's samples, some overlapping
    other_i, other_b = torch.rand(96, generator=gen), torch.rand(96, generator=gen)

    def gather(idx, ce_i, ce_b):
        return torch.cat([idx, other]), torch.cat([ce_i, other_i]), torch.cat([ce_b, other_b])

    ref, got = both(state, 10, index, torch.rand(96, generator=gen), torch.rand(96, generator=gen),
                    gather=gather)
    assert got[0].shape == (96,)
    assert_identical(ref, got)


def test_a_class_without_seen_samples_is_floored_and_a_nan_spreads_to_its_class():
    gen = torch.Generator().manual_seed(3)
    ema_i, ema_b, seen, labels = random_state(500, 4, gen)
    unseen = labels == 0
    ema_i[unseen], ema_b[unseen], seen[unseen] = 0.0, 0.0, False
    ema_b[(labels == 2).nonzero()[-1]] = float("nan")  # samples outside the batch
    ema_i[(labels == 3).nonzero()[-1]] = float("nan")
    index = torch.cat([(labels == c).nonzero()[:5, 0] for c in (1, 2, 3)])
    zeros = torch.zeros(len(index))
    ref, got = both((ema_i, ema_b, seen, labels), 4, index, zeros, zeros)
    assert_identical(ref, got)
    weights = got[0].view(3, 5)
    assert weights[1:].isnan().all() and not weights[0].isnan().any()
    # Class 0 only now gets its first losses (zero): its maximum is the floor, its weight 0.
    first = (labels == 0).nonzero()[:4, 0]
    ref, got = both((ema_i, ema_b, seen, labels), 4, first, torch.zeros(4), torch.zeros(4))
    assert_identical(ref, got)
    assert (got[0] == 0).all()


@pytest.mark.parametrize("bad", ["index", "negative", "label"])
def test_out_of_range_indices_raise_instead_of_writing_outside_the_buffers(bad):
    gen = torch.Generator().manual_seed(4)
    ema_i, ema_b, seen, labels = random_state(100, 10, gen)
    index = torch.arange(8)
    if bad == "index":
        index[3] = 100
    elif bad == "negative":
        index[3] = -1
    else:
        labels[50] = 10
    state = loss_state((ema_i, ema_b, seen, labels), 10)
    with pytest.raises(IndexError):
        numba_weighting.sample_weights(state, index, labels[index.clamp(0, 99)], torch.rand(8),
                                       torch.rand(8))
    assert state.cache.get("class_maxima") is None  # maxima of a failed call are not kept


def test_buffers_it_cannot_take_go_to_the_reference(monkeypatch):
    from dfa_fast import ops
    monkeypatch.delenv("DFA_KERNELS", raising=False)
    gen = torch.Generator().manual_seed(5)
    ema_i, ema_b, seen, labels = random_state(400, 10, gen)
    wide = torch.stack([ema_i, ema_i], 1)  # a strided view of the buffer
    index = torch.randperm(200, generator=gen)[:32]
    logits_d, logits_b = torch.randn(32, 10, generator=gen), torch.randn(32, 10, generator=gen)
    kept, kept_b, kept_seen = wide.clone(), ema_b.clone(), seen.clone()
    state = loss_state((wide[:200, 0], ema_b[:200], seen[:200], labels[:200]), 10)
    ce = torch.rand(32, generator=gen)
    # The kernel refuses them itself; the chooser hands the LfF head to the reference.
    assert not numba_weighting.takes(state)
    with pytest.raises(ValueError, match="contiguous CPU float32"):
        numba_weighting.sample_weights(state, index, labels[index], ce, ce)
    call = (logits_d, logits_b, labels[index], index)
    assert ops.choose("lff_head", *call, state, LossSettings()).name == "torch"
    got, _ = ops.lff_head(*call, state, LossSettings())
    want, _ = reference.lff_head(*call, loss_state(
        (kept[:200, 0], kept_b[:200], kept_seen[:200], labels[:200]), 10), LossSettings())
    assert torch.equal(got, want) and torch.equal(wide, kept) and torch.equal(ema_b, kept_b)


def test_lff_head_of_the_numba_backend_matches_the_reference(monkeypatch):
    from dfa_fast import ops
    gen = torch.Generator().manual_seed(6)
    state = random_state(800, 10, gen)
    index = torch.randperm(800, generator=gen)[:64]
    index[-1] = index[0]
    logits = torch.randn(2, 64, 10, generator=gen)
    results = []
    for backend, impl in (("torch", "torch"), ("fused", "numba"), ("", "numba")):
        if backend:
            monkeypatch.setenv("DFA_KERNELS", backend)
        else:
            monkeypatch.delenv("DFA_KERNELS", raising=False)
        leaves = [t.clone().requires_grad_() for t in logits]
        buffers = [t.clone() for t in state]
        args = (*leaves, buffers[3][index], index, loss_state(buffers, 10, 0.7),
                LossSettings(q=0.7))
        assert ops.choose("lff_head", *args).name == impl
        loss, stats = ops.lff_head(*args)
        if impl == "numba":  # the numba pass ran: it kept its class maxima in the state
            assert args[4].cache.get("class_maxima") is not None
        loss.backward()
        results.append([loss.detach(), *stats.values(), *(t.grad for t in leaves), *buffers])
    want = results[0]
    for run in results[1:]:
        assert len(run) == len(want)
        for expected, got in zip(want, run):
            assert torch.equal(got, expected)


def test_kept_maxima_stay_out_of_checkpoints_and_go_with_their_state(tmp_path):
    gen = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 3, (200,), generator=gen)
    ema = SampleLossEMA(labels, 3, 0.7, torch.device("cpu"))
    index = torch.randperm(200, generator=gen)[:16]
    ce = torch.rand(16, generator=gen)
    numba_weighting.sample_weights(ema, index, labels[index], ce, ce)
    numba_weighting.sample_weights(ema, index, labels[index], ce * 2, ce)
    known = ema.cache.get("class_maxima")
    assert known is not None and known.calls == 2
    # SampleLossEMA.state_dict hands out the buffers themselves on a CPU: nothing else is saved.
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    loaded = torch.load(tmp_path / "ema.pt", weights_only=True)
    assert set(loaded) == {"ema_i", "ema_b", "seen"}
    assert torch.equal(loaded["ema_i"], ema.ema_i) and not loaded["ema_i"].__dict__
    # Restoring a checkpoint writes the buffers: the kept maxima are forgotten, and the next
    # call gives the reference's W from a full pass.
    loaded["ema_i"] = loaded["ema_i"] * 0.5
    ema.load_state_dict(loaded)
    assert ema.cache.get("class_maxima") is None
    want = reference.sample_weights(
        loss_state((ema.ema_i.clone(), ema.ema_b.clone(), ema.seen.clone(), labels), 3), index,
        labels[index], ce, ce)
    assert torch.equal(numba_weighting.sample_weights(ema, index, labels[index], ce, ce), want)
    assert ema.cache["class_maxima"].scans == ema.cache["class_maxima"].calls == 1
    # The maxima live in the state and nowhere else: they go when it goes.
    gone = weakref.ref(ema.cache["class_maxima"])
    del ema, known
    gc.collect()
    assert gone() is None
