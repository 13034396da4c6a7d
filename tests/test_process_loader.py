"""The CPU train loader in a child process: the same batches, order and place as in one process,
resume, and clear errors (a batch kept too long, a child that dies or fails, a dead parent)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dfa_fast.data.augment import CIFAR_MEAN, CIFAR_STD, ImageTransform
from dfa_fast.data.beton import write_split
from dfa_fast.data.loaders import DeviceLoader, make_train_loader
from dfa_fast.data.process_loader import KEEP, ProcessLoader, load_in_child
from dfa_fast.errors import DfaError

N = 600


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("split")
    rng = np.random.default_rng(1)
    write_split(folder, "train", rng.integers(0, 256, (N, 28, 28, 3), dtype=np.uint8),
                rng.integers(0, 10, N), rng.integers(0, 10, N), num_classes=10, num_biases=10,
                progress=False)
    return folder / "train.beton"


TRANSFORMS = {
    "none": None,
    "scale": ImageTransform(scale=1 / 255 / 255, channels_last=True),
    "crop_flip_normalise": ImageTransform(scale=1 / 255, mean=CIFAR_MEAN, std=CIFAR_STD,
                                          crop_padding=4, flip=True),
    "bf16": ImageTransform(scale=1 / 255, channels_last=True, dtype=torch.bfloat16),
}


def pair(path, transform, seed=3, batch=50):
    one = make_train_loader(path, batch, seed=seed, num_workers=1, transform=transform)
    two = load_in_child(make_train_loader(path, batch, seed=seed, num_workers=1,
                                          transform=transform))
    assert isinstance(one, DeviceLoader) and isinstance(two, ProcessLoader)
    return one, two


def same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) and getattr(a, f).dtype ==
               getattr(b, f).dtype for f in ("image", "label", "bias", "index"))


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_process_loader_yields_the_batches_of_one_process(path, name):
    """Batch for batch equal (values, dtypes, layout) across two epoch boundaries, with the same
    place after each batch; a batch stays intact while the next one is taken."""
    one, two = pair(path, TRANSFORMS[name])
    a, b = one.stream(), two.stream()
    previous = None
    for i in range(2 * len(one) + 5):  # 12 batches an epoch
        x, y = next(a), next(b)
        assert same(x, y), i
        assert x.image.stride() == y.image.stride()
        assert one.state_dict() == two.state_dict(), i
        if previous is not None:
            assert same(*previous), i - 1  # the previous batch, still in its slot, unchanged
        previous = (x, y)
    assert two.state_dict() == {"epoch": 2, "position": 5}
    two.close()
    assert two.process is None


def test_process_loader_resumes_from_a_saved_place(path):
    transform = TRANSFORMS["scale"]
    one, two = pair(path, transform, seed=5)
    a, b = one.stream(), two.stream()
    for _ in range(17):
        next(a), next(b)
    state = two.state_dict()
    resumed = load_in_child(make_train_loader(path, 50, seed=5, num_workers=1,
                                              transform=transform))
    resumed.load_state_dict(state)
    c = resumed.stream()
    for i in range(10):
        assert same(next(a), next(c)), i
    assert resumed.state_dict() == one.state_dict() == {"epoch": 2, "position": 3}
    # a new stream on the same loader restarts its child from the last batch taken
    d = resumed.stream()
    assert same(next(a), next(d))
    resumed.close(), two.close()


@pytest.fixture
def watchdog():
    """Fail a test that stalls (parent and child each waiting on the other) within 60 s."""
    def fire(*_):
        raise TimeoutError("the process loader stalled")
    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("slots", [KEEP + 1, KEEP + 2])
def test_few_slots_still_yield_every_batch(path, slots, watchdog):
    """The child fills every slot but the KEEP handed out last; with one or two to spare it must
    neither stall nor overwrite a batch still handed out."""
    transform = TRANSFORMS["scale"]
    one = make_train_loader(path, 50, seed=4, num_workers=1, transform=transform)
    two = ProcessLoader(make_train_loader(path, 50, seed=4, num_workers=1, transform=transform),
                        slots=slots)
    a, b = one.stream(), two.stream()
    previous = None
    for i in range(30):
        x, y = next(a), next(b)
        assert same(x, y), i
        if previous is not None:
            assert same(*previous), i - 1
        previous = (x, y)
    two.close()


def test_a_new_stream_refuses_while_an_old_batch_is_held_and_a_dropped_one_stops_its_child(path):
    _, two = pair(path, TRANSFORMS["scale"])
    stream = two.stream()
    held = next(stream)
    with pytest.raises(DfaError, match="earlier stream .* still referenced"):
        next(two.stream())
    del held
    stream = two.stream()
    next(stream)
    child = two.process
    assert child.is_alive()
    del stream  # the generator is collected: its child stops
    assert two.process is None and not child.is_alive()


def test_a_batch_kept_past_its_slot_is_refused(path):
    _, two = pair(path, TRANSFORMS["scale"])
    stream = two.stream()
    kept = [next(stream) for _ in range(KEEP)]
    with pytest.raises(DfaError, match=f"taken {KEEP} batches ago is still referenced.*clone"):
        next(stream)
    assert two.process is None  # the child was stopped
    copies = [b.image.clone() for b in kept]
    del kept
    _, three = pair(path, TRANSFORMS["none"])  # without a transform the image is a copy
    stream = three.stream()
    kept = [next(stream) for _ in range(8)]
    assert len({b.index[0].item() for b in kept}) == 8 and copies
    three.close()


def test_a_dead_child_is_reported(path):
    _, two = pair(path, TRANSFORMS["scale"])
    stream = two.stream()
    next(stream)
    os.kill(two.process.pid, signal.SIGKILL)
    two.process.join()
    with pytest.raises(DfaError, match=r"process exited \(code -9\)"):
        for _ in range(10):  # the batches already in the slots come first
            next(stream)


def test_an_error_in_the_child_is_raised_with_its_message(path):
    one = make_train_loader(path, 50, seed=3, num_workers=1, transform=TRANSFORMS["scale"])
    one.meta = dict(one.meta, image_shape=[32, 32, 3])  # slots sized for other images
    stream = ProcessLoader(one).stream()
    with pytest.raises(DfaError, match=r"process failed: .*image batch \(50, 28, 28, 3\).*"
                                       r"expected \(50, 32, 32, 3\)"):
        next(stream)


def test_process_loader_refuses_gpu_loaders_and_too_few_slots(path):
    one = make_train_loader(path, 50, seed=3, num_workers=1)
    with pytest.raises(DfaError, match="more than"):
        ProcessLoader(one, slots=KEEP)
    one.device = torch.device("cuda")
    with pytest.raises(DfaError, match="runs CPU loaders"):
        ProcessLoader(one)


def test_without_semaphores_the_loader_stays_a_thread_with_a_warning(path, monkeypatch):
    """Containers without a writable /dev/shm cannot make POSIX semaphores: training goes on
    with FFCV's thread, and says so."""
    import multiprocessing

    def no_semaphore(self, value=1):
        raise OSError(38, "Function not implemented")
    monkeypatch.setattr(type(multiprocessing.get_context("fork")), "Semaphore", no_semaphore)
    with pytest.warns(UserWarning, match="cannot make a semaphore.*loading in FFCV's thread"):
        loader = load_in_child(make_train_loader(path, 50, seed=0, num_workers=1))
    assert isinstance(loader, DeviceLoader) and len(list(loader)) == N // 50


def test_the_child_ends_with_its_parent(path, tmp_path):
    """A parent killed outright (no clean-up) must not leave its loader process behind."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, signal, sys\n"
        "from dfa_fast.data.loaders import make_train_loader\n"
        "from dfa_fast.data.process_loader import load_in_child\n"
        f"loader = load_in_child(make_train_loader({str(path)!r}, 50, seed=0, num_workers=1))\n"
        "stream = loader.stream(); next(stream)\n"
        "print(loader.process.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == -signal.SIGKILL, out.stderr
    child = int(out.stdout.split()[0])
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    raise AssertionError(f"loader process {child} outlived its killed parent")


def test_child_of_a_multithreaded_parent_does_not_hang(path, tmp_path):
    """The parent's thread ran an OpenMP team (two threads) before the fork; the child's copies
    into the slots must not wait on that team, which does not exist in the child."""
    script = tmp_path / "omp.py"
    script.write_text(
        "import torch\n"
        "torch.set_num_threads(2); torch.ones(2 ** 24).mul_(2)  # an OpenMP team in this thread\n"
        "from dfa_fast.data.augment import ImageTransform\n"
        "from dfa_fast.data.loaders import make_train_loader\n"
        "from dfa_fast.data.process_loader import load_in_child\n"
        f"loader = load_in_child(make_train_loader({str(path)!r}, 300, seed=0, num_workers=2,\n"
        "                                         transform=ImageTransform(scale=1 / 255)))\n"
        "stream = loader.stream()\n"
        "for _ in range(6): next(stream)\n"
        "print('ok', torch.get_num_threads())\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[1])  # hung: timeout
    assert out.returncode == 0 and out.stdout.split() == ["ok", "2"], out.stderr[-2000:]


def test_ffcv_leaves_the_callers_thread_count(path):
    """FFCV's Loader sets PyTorch's thread count to its workers when made and at every epoch;
    the loaders keep the caller's (the trainer's cpu.threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loader = make_train_loader(path, 50, seed=0, num_workers=2)
        assert torch.get_num_threads() == 1
        assert len(list(loader)) == N // 50 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
