"""The EMA update, the class maxima and the weights W of one step as one compiled CPU pass (numba).

`reference.sample_weights` runs about 40 PyTorch operations on 256 samples, three of them over
buffer-sized scratch tensors, and two scatter-max reductions over the whole buffer: about 0.3 ms of
a 5 ms CPU step, nearly all of it dispatch. Here one numba function does the same arithmetic in one
call, in the same float32 operations and order, so the EMA buffers, the seen flags and W are the
reference's bit for bit (the tests compare them):

1. duplicated indices: the mean of their losses (summed in batch order, as ``index_add_``); the
   first occurrence of each index is found with a sparse-set scratch array that needs no clearing;
2. the EMA: ``alpha * ema + (1 - alpha) * loss`` for seen samples, the loss itself for new ones;
3. the class maxima over the whole buffer (a NaN anywhere in a class makes its maximum NaN, as
   ``amax`` does), floored at ``reference.MAX_FLOOR``. They are kept from the previous step and
   updated from the samples of this one; a pass over both whole buffers (about 55 us of the 67 us
   a call took at 55,000 samples) runs only where that cannot give them: the first call, buffers
   written by PyTorch since (checkpoints), or a sample that held its class maximum whose value
   fell (3 % of the first 3,000 steps of a Colored MNIST run). A maximum is exact either way, so W
   is the same bit for bit;
4. W = e_b / (e_b + e_i + eps) for the batch's samples.

Only for the CPU buffers of `takes`; `dfa_fast.ops` sends others to the reference.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

from . import reference as _reference
from .reference import LossState


@numba.njit(nogil=True, cache=True)
def _update_and_weigh(ema_i, ema_b, seen, labels, num_classes, upd_index, upd_i, upd_b, alpha,
                      index, label, floor, eps, slot, out, max_i, max_b,
                      known):  # pragma: no cover (compiled)
    size = ema_i.shape[0]
    n = upd_index.shape[0]
    first = np.empty(n, np.int64)
    count = np.zeros(n, np.float32)
    sum_i = np.zeros(n, np.float32)
    sum_b = np.zeros(n, np.float32)
    for r in range(n):
        j = upd_index[r]
        if j < 0 or j >= size:
            raise IndexError("sample index outside the EMA buffer")
        s = slot[j]  # valid only if it points at an earlier row with the same index
        if not (0 <= s < r and upd_index[s] == j):
            slot[j] = r
            s = r
        first[r] = s
        count[s] += np.float32(1.0)
        sum_i[s] += upd_i[r]
        sum_b[s] += upd_b[r]
    keep = np.float32(alpha)
    take = np.float32(1.0 - alpha)
    rescan = not known
    for r in range(n):
        if first[r] == r:
            j = upd_index[r]
            value_i = sum_i[r] / count[r]
            value_b = sum_b[r] / count[r]
            old_i = ema_i[j]
            old_b = ema_b[j]
            if seen[j]:
                ema_i[j] = keep * old_i + take * value_i
                ema_b[j] = keep * old_b + take * value_b
            else:
                ema_i[j] = value_i
                ema_b[j] = value_b
                seen[j] = True
            if not rescan:
                # The maxima of the buffers before this step are known: a raised value can only
                # raise its class maximum; a lowered (or NaN) value that held it needs a rescan.
                c = labels[j]
                if c < 0 or c >= num_classes:
                    raise IndexError("a label of the EMA buffer is outside [0, num_classes)")
                new_i = ema_i[j]
                new_b = ema_b[j]
                if (new_i != new_i or new_b != new_b or (old_i == max_i[c] and new_i < old_i)
                        or (old_b == max_b[c] and new_b < old_b)):
                    rescan = True
                else:
                    if new_i > max_i[c]:
                        max_i[c] = new_i
                    if new_b > max_b[c]:
                        max_b[c] = new_b
    if rescan:
        for c in range(num_classes):
            max_i[c] = 0.0  # the smallest an EMA of losses can be; unseen samples hold 0
            max_b[c] = 0.0
        for j in range(size):
            c = labels[j]
            if c < 0 or c >= num_classes:
                raise IndexError("a label of the EMA buffer is outside [0, num_classes)")
            v = ema_i[j]
            if v > max_i[c] or v != v:
                max_i[c] = v
            v = ema_b[j]
            if v > max_b[c] or v != v:
                max_b[c] = v
    floor32 = np.float32(floor)
    use_i = np.empty(num_classes, np.float32)
    use_b = np.empty(num_classes, np.float32)
    for c in range(num_classes):
        use_i[c] = max_i[c] if max_i[c] >= floor32 or max_i[c] != max_i[c] else floor32
        use_b[c] = max_b[c] if max_b[c] >= floor32 or max_b[c] != max_b[c] else floor32
    eps32 = np.float32(eps)
    for r in range(index.shape[0]):
        j = index[r]
        if j < 0 or j >= size or label[r] < 0 or label[r] >= num_classes:
            raise IndexError("a batch index or label is out of range")
        e_i = ema_i[j] / use_i[label[r]]
        e_b = ema_b[j] / use_b[label[r]]
        out[r] = e_b / (e_b + e_i + eps32)
    return rescan


def takes(state: LossState) -> bool:
    """Whether the kernel works on this state's buffers: contiguous CPU float32 EMAs, bool flags,
    int64 labels, all of one length."""
    ema_i, ema_b, seen, labels = state.ema_i, state.ema_b, state.seen, state.labels
    return (ema_i.device.type == "cpu" and ema_i.dtype == torch.float32
            and ema_b.dtype == torch.float32 and seen.dtype == torch.bool
            and labels.dtype == torch.int64
            and all(t.is_contiguous() for t in (ema_i, ema_b, seen, labels))
            and len(ema_i) == len(ema_b) == len(seen) == len(labels))


def sample_weights(state: LossState, index: torch.Tensor, label: torch.Tensor,
                   ce_i: torch.Tensor, ce_b: torch.Tensor) -> torch.Tensor:
    """`reference.sample_weights` (same arguments, values and in-place updates) in one call."""
    if not takes(state):
        raise ValueError("numba_weighting.sample_weights takes contiguous CPU float32 EMA "
                         "buffers, bool flags and int64 labels of one length (see `takes`)")
    upd_index, upd_i, upd_b = index, ce_i.detach(), ce_b.detach()
    if state.gather is not None:
        upd_index, upd_i, upd_b = state.gather(upd_index, upd_i, upd_b)
    out = torch.empty(len(index), dtype=torch.float32)
    known, valid = take_class_maxima(state)
    rescanned = _update_and_weigh(
        state.ema_i.numpy(), state.ema_b.numpy(), state.seen.numpy(), state.labels.numpy(),
        state.num_classes, _ints(upd_index), _floats(upd_i), _floats(upd_b), float(state.alpha),
        _ints(index), _ints(label), _reference.MAX_FLOOR, _reference.WEIGHT_EPS, scratch(state),
        out.numpy(), known.max_i, known.max_b, valid)
    keep_class_maxima(state, known, rescanned)
    return out


def scratch(state: LossState) -> np.ndarray:
    """Return the kernel's scratch array for the state's buffers (kept in its cache)."""
    slot = state.cache.get("slots")
    if slot is None or len(slot) != len(state.ema_i):
        # Uninitialised on purpose: the kernel validates every entry it reads.
        slot = state.cache["slots"] = np.empty(len(state.ema_i), np.int64)
    return slot


def _versions(state: LossState) -> tuple:
    return (state.num_classes, state.ema_i._version, state.ema_b._version, state.seen._version,
            state.labels._version)


def take_class_maxima(state: LossState) -> tuple["ClassMaxima", bool]:
    """Take the class maxima kept in the state's cache out of it (an error in the call that
    follows may leave them half updated; `keep_class_maxima` puts them back after it) and return
    them with whether they are valid.

    They are the maxima after the last call, valid while no PyTorch operation has written the
    buffers since (a copy from a checkpoint, the reference's update): their version counters are
    those recorded then (the kernel's own writes go through NumPy views and leave the counters
    alone), and the buffers are the same tensors."""
    buffers = (state.ema_i, state.ema_b, state.seen, state.labels)
    known = state.cache.pop("class_maxima", None)
    if known is not None and known.versions == _versions(state) and all(
            a is b for a, b in zip(known.buffers, buffers)):
        return known, True
    return ClassMaxima(buffers, np.zeros(state.num_classes, np.float32),
                       np.zeros(state.num_classes, np.float32)), False


def keep_class_maxima(state: LossState, known: "ClassMaxima", rescanned: bool) -> None:
    """Keep the maxima a kernel call left in ``known`` in the state's cache for the next call."""
    known.versions = _versions(state)
    known.calls += 1
    known.scans += bool(rescanned)
    state.cache["class_maxima"] = known


class ClassMaxima:
    """The class maxima of two EMA buffers (before the floor), the buffers they are of and the
    version counters they are valid for."""

    def __init__(self, buffers, max_i, max_b):
        self.buffers, self.versions = buffers, None
        self.max_i, self.max_b = max_i, max_b
        self.calls = self.scans = 0  # calls since the last invalidation, and full passes


def _ints(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.int64).contiguous().numpy()


def _floats(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()
