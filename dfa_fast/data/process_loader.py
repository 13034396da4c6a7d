"""The CPU train loader in a child process: FFCV's batches reach the training thread through shared
memory, and no loader code competes with the training step for the interpreter lock.

FFCV's loader is a thread of the training process. Its decoding is compiled code that runs without
the GIL, but around it every batch takes Python: FFCV's own bookkeeping, the conversion to scaled
floats (`loaders.ScaleToFloat`), the queue, and the training thread's `next` waits on all of it.
The training step is a few milliseconds of small PyTorch calls, each dropping and retaking the GIL,
so the loader's Python slips in between them, and every hand-over between the two cores costs
microseconds. On the Colored MNIST DisEnt step (one thread) the loader running paced in a thread
beside it cost 0.65 ms a step, in another process 0.03 ms; `next` took 0.29 ms from the thread and
takes about 0.1 ms from the slots. Trainer against trainer (eight alternating pairs of separate
processes, 800 fp32 steps each) the step fell from 5.97 to 5.26 ms (medians; the paired difference
0.54 ms median, 0.44 ms mean, seven pairs of eight faster); with the child one batch ahead instead
of three, 0.26 ms.

`ProcessLoader` wraps a `DeviceLoader`. At the first batch of a `stream` it forks a child that
runs the wrapped loader's `raw_epoch` from the current place (epoch, position) and copies each batch
of FFCV outputs into the next of ``slots`` shared-memory slots (an anonymous shared mapping made
before the fork; only the two semaphores live in /dev/shm). The parent copies the small integer
fields and hands out the image where it lies, through the wrapped loader's own transform: the same order, values and transform as in one
process, and the same checkpointed place (each slot carries the epoch and position after its batch).
A batch's image lives in its slot until `KEEP` more batches are taken; the slot then goes back to
the child, and if anything still holds that image (a caller that keeps batches) `next` raises
instead of letting it change under the caller. (Copying every image out of its slot, 0.15 ms,
took all of the gain.)

The child is forked, not spawned: it inherits the open loader and needs no import time. It exits
when the parent does (``PR_SET_PDEATHSIG`` and a parent check while it waits for a free slot); an
error in the child is raised in the parent with the child's message, and a child that dies is
reported with its exit code.

Linux only (fork, prctl), which FFCV already is; used for CPU training (`DataConfig.loader_process`).
"""
from __future__ import annotations

import ctypes
import mmap
import multiprocessing
import os
import signal
import traceback
import warnings
from typing import Iterator, Optional

import numpy as np
import torch

from dfa_fast import compat
from dfa_fast.data.loaders import Batch, DeviceLoader
from dfa_fast.errors import DfaError

_HEADER = 4                 # int64 per slot: state, epoch after, position after, batch length
_READY, _ERROR = 1, 2
_MESSAGE_BYTES = 8192
_POLL_S = 1.0
KEEP = 2                    # a batch's image lives in its slot until KEEP more batches are taken


def _aligned(nbytes: int) -> int:
    return (nbytes + 63) // 64 * 64


class _Slots:
    """``count`` slots of (image, label, bias, index) and a header each, in one shared mapping."""

    def __init__(self, count: int, batch_size: int, image_shape: tuple, image_dtype: torch.dtype):
        self.count = count
        self.image_shape = (batch_size, *image_shape)
        self.image_dtype = image_dtype
        image_bytes = _aligned(torch.Size(self.image_shape).numel() * image_dtype.itemsize)
        int_bytes = batch_size * 8
        self.slot_bytes = image_bytes + _aligned(3 * int_bytes) + _aligned(_HEADER * 8)
        self.memory = mmap.mmap(-1, count * self.slot_bytes + _MESSAGE_BYTES)  # MAP_SHARED
        self.images, self.ints, self.headers = [], [], []
        for k in range(count):
            base = k * self.slot_bytes
            self.images.append(self._view(base, image_dtype, self.image_shape))
            self.ints.append(self._view(base + image_bytes, torch.int64, (3, batch_size)))
            self.headers.append(np.frombuffer(self.memory, np.int64, _HEADER,
                                              base + image_bytes + _aligned(3 * int_bytes)))
        self.message = self._view(count * self.slot_bytes, torch.uint8, (_MESSAGE_BYTES,))
        # Without torch's storage use count the parent hands out copies, never the slot itself.
        self.use_count = compat.storage_use_count()
        self.unused = [self._uses(k) for k in range(count)]

    def _uses(self, k: int) -> int:
        return self.use_count(self.images[k]) if self.use_count is not None else 0

    def in_use(self, k: int) -> bool:
        """Whether a tensor outside these slots still shares slot k's image memory."""
        return self._uses(k) > self.unused[k]

    def image(self, k: int) -> torch.Tensor:
        """Slot k's image to hand out: the slot itself, or a copy where uses cannot be counted."""
        return self.images[k] if self.use_count is not None else self.images[k].clone()

    def _view(self, offset: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        count = torch.Size(shape).numel()
        return torch.frombuffer(self.memory, dtype=dtype, count=count, offset=offset).view(shape)

    def write_message(self, text: str) -> None:
        data = text.encode("utf-8", "replace")[: _MESSAGE_BYTES - 1]
        self.message[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.message[len(data)] = 0

    def read_message(self) -> str:
        data = bytes(self.message.tolist())
        return data[: data.index(0) if 0 in data else len(data)].decode("utf-8", "replace")


def _still_held(what: str, reuser: str, then: str) -> DfaError:
    """The error for a caller that still holds an image whose slot is about to be reused."""
    return DfaError(f"{what} is still referenced; {reuser} reuses its memory: copy what you keep "
                    f"(batch.image.clone()) {then}")


def _child(inner: DeviceLoader, slots: _Slots, ready, free, parent: int) -> None:
    """Fill the slots with the wrapped loader's batches, in order, forever."""
    status, n = 0, 0
    try:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # the parent check in the wait loop still ends the child
        if os.getppid() != parent:
            os._exit(0)
        for sig in (signal.SIGINT, signal.SIGTERM):  # not the parent's Python handlers
            signal.signal(sig, signal.SIG_DFL)
        # One thread here: an OpenMP team the parent's thread made does not exist after the fork,
        # and a parallel region of this thread (a large copy) would wait for it forever.
        torch.set_num_threads(1)
        # A CPU pipeline: FFCV would otherwise make CUDA streams wherever CUDA exists, and CUDA
        # cannot start in a child forked after the parent started it.
        import ffcv.loader.epoch_iterator as epoch_iterator
        epoch_iterator.IS_CUDA = False
        while True:
            for image, label, bias, index in inner.raw_epoch():
                while not free.acquire(timeout=_POLL_S):
                    if os.getppid() != parent:
                        os._exit(0)
                k = n % slots.count
                if tuple(image.shape) != slots.image_shape or image.dtype != slots.image_dtype:
                    raise DfaError(f"loader process: image batch {tuple(image.shape)} "
                                   f"{image.dtype}; expected {slots.image_shape} "
                                   f"{slots.image_dtype} from the sidecar")
                slots.images[k].copy_(image)
                for dst, src in zip(slots.ints[k], (label, bias, index)):
                    dst[: src.numel()].copy_(src.reshape(-1))
                slots.headers[k][:] = (_READY, inner.epoch, inner.position, label.numel())
                n += 1
                ready.release()
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which raises it
        message = str(error) if isinstance(error, DfaError) else traceback.format_exc()
        slots.write_message(message.strip() or type(error).__name__)
        slots.headers[n % slots.count][0] = _ERROR
        ready.release()
        status = 1
    os._exit(status)


class ProcessLoader:
    """A `DeviceLoader` (CPU) whose `stream` runs in a forked child process; see the module doc.

    Same interface as `DeviceLoader` for training: `stream`, `state_dict`,
    `load_state_dict`; ``close`` stops the child (also on deletion).
    The child ends with the thread that started the stream (``PR_SET_PDEATHSIG``), so a stream
    is meant for the thread that trains.
    """

    def __init__(self, inner: DeviceLoader, slots: int = KEEP + 3):
        if inner.device.type != "cpu":
            raise DfaError(f"ProcessLoader runs CPU loaders; this one is on {inner.device}")
        if slots <= KEEP:
            raise DfaError(f"ProcessLoader needs more than {KEEP} slots; got {slots}")
        if "fork" not in multiprocessing.get_all_start_methods():
            raise DfaError("ProcessLoader needs the fork start method (Linux); set "
                           "data.loader_process=false on this system")
        try:  # POSIX semaphores need a writable /dev/shm, which some containers lack
            multiprocessing.get_context("fork").Semaphore(0)
        except OSError as error:
            raise DfaError(f"ProcessLoader cannot make a semaphore ({error}); set "
                           "data.loader_process=false on this system") from error
        self.inner = inner
        dtype = inner.transform.loader_dtype if inner.transform is not None else torch.uint8
        self.slots = _Slots(slots, inner.loader.batch_size, tuple(inner.meta["image_shape"]),
                            dtype)
        self.process: Optional[multiprocessing.process.BaseProcess] = None

    def state_dict(self) -> dict:
        """Return the place of the last batch taken (epoch and batches taken in it)."""
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from a place saved by `state_dict` (restarts the child on the next `stream`)."""
        self.close()
        self.inner.load_state_dict(state)

    def _start(self) -> None:
        if any(self.slots.in_use(k) for k in range(self.slots.count)):
            raise _still_held("a batch of an earlier stream of this loader", "a new stream",
                              "before calling stream() again")
        ctx = multiprocessing.get_context("fork")
        # The child may fill every slot but the KEEP that the batches handed out last occupy:
        # the slot of batch n comes back when batch n + KEEP is taken.
        self.ready, self.free = ctx.Semaphore(0), ctx.Semaphore(self.slots.count)
        self.taken = 0
        self.process = ctx.Process(target=_child, name="dfa-fast-loader", daemon=True,
                                   args=(self.inner, self.slots, self.ready, self.free,
                                         os.getpid()))
        self.process.start()

    def _next(self) -> Batch:
        while not self.ready.acquire(timeout=_POLL_S):
            if not self.process.is_alive():
                code = self.process.exitcode
                self.close()
                raise DfaError(f"the train loader's process exited (code {code}) before "
                               "sending a batch; expected it to run until the trainer stops")
        slots = self.slots
        k = self.taken % slots.count
        state, epoch, position, length = slots.headers[k].tolist()
        if state == _ERROR:
            message = slots.read_message()
            self.close()
            raise DfaError(f"the train loader's process failed: {message}")
        if self.taken >= KEEP:  # the slot of the batch taken KEEP batches ago goes back
            old = (self.taken - KEEP) % slots.count
            if slots.in_use(old):
                self.close()
                raise _still_held(f"a batch taken {KEEP} batches ago", "the process loader",
                                  "or set data.loader_process=false")
            self.free.release()
        label, bias, index = slots.ints[k][:, :length].clone()
        # The batch's place first: its epoch gives the augmentation keys.
        self.inner.load_state_dict({"epoch": epoch, "position": position})
        self.taken += 1
        return Batch(self.inner.image_of(slots.image(k), index), label, bias, index)

    def stream(self) -> Iterator[Batch]:
        """Yield batches forever from the current place, made in the child process (forked at
        the first batch; stopped when the generator is closed or collected)."""
        self.close()
        self._start()
        process = self.process
        try:
            while self.process is process:
                yield self._next()
        finally:
            if self.process is process:
                self.close()

    def close(self) -> None:
        """Stop the child process (the place of the last batch taken is kept)."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()  # nothing once it has exited
            process.join()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def load_in_child(train: DeviceLoader):
    """Return ``train`` wrapped in a `ProcessLoader` where it can run (a CPU loader on a system
    with fork and semaphores), else ``train`` itself with a one-line warning: FFCV's thread still
    works."""
    if train.device.type != "cpu":
        return train
    try:
        return ProcessLoader(train)
    except DfaError as error:
        warnings.warn(f"{error}; loading in FFCV's thread instead")
        return train
