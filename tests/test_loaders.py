"""FFCV loaders: pixel-exact round trip, each index once per epoch, shuffles, ranks, augmentation."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dfa_fast.data.augment import (CIFAR_MEAN, CIFAR_STD, ImageTransform, random_crop_flip,
                                   sample_keys)
from dfa_fast.data.beton import write_split
from dfa_fast.data.loaders import make_eval_loader, make_train_loader
from dfa_fast.errors import DfaError

N = 1000


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A 1000-image split of random pixels with known labels and biases."""
    folder = tmp_path_factory.mktemp("split")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
    labels, biases = rng.integers(0, 10, N), rng.integers(0, 10, N)
    write_split(folder, "train", images, labels, biases, num_classes=10, num_biases=10,
                progress=False)
    return folder / "train.beton", images, labels, biases


def collect(loader):
    batches = list(loader)
    return [torch.cat([getattr(b, f) for b in batches]) for f in ("image", "label", "bias", "index")]


def test_eval_loader_is_pixel_exact_and_sequential(split):
    path, images, labels, biases = split
    image, label, bias, index = collect(make_eval_loader(path, 64, num_workers=1))
    assert index.tolist() == list(range(N))  # 1000 = 15 x 64 + 40: the last partial batch kept
    assert np.array_equal(image.numpy(), images)
    assert np.array_equal(label.numpy(), labels) and np.array_equal(bias.numpy(), biases)


def test_train_loader_each_index_once_per_epoch_new_shuffle(split):
    path, images, labels, _ = split
    loader = make_train_loader(path, 50, seed=7, num_workers=2)
    epochs = []
    for _ in range(3):
        image, label, _, index = collect(loader)
        assert sorted(index.tolist()) == list(range(N))
        assert np.array_equal(image.numpy(), images[index.numpy()])  # pixels follow the index
        assert np.array_equal(label.numpy(), labels[index.numpy()])
        epochs.append(index.tolist())
    assert epochs[0] != epochs[1] != epochs[2]
    again = make_train_loader(path, 50, seed=7, num_workers=1)
    assert collect(again)[3].tolist() == epochs[0]  # the run seed fixes the order
    other = make_train_loader(path, 50, seed=8, num_workers=1)
    assert collect(other)[3].tolist() != epochs[0]


def test_train_loader_drops_the_last_partial_batch(split):
    path = split[0]
    loader = make_train_loader(path, 300, seed=0, num_workers=1)
    sizes = [len(b) for b in loader]
    assert sizes == [300, 300, 300] and len(loader) == 3


def test_resumed_loader_continues_the_same_order(split):
    path = split[0]
    full = make_train_loader(path, 100, seed=1, num_workers=1)
    stream = full.stream()
    reference = [next(stream).index for _ in range(25)]  # 2.5 epochs
    first = make_train_loader(path, 100, seed=1, num_workers=1)
    stream = first.stream()
    head = [next(stream).index for _ in range(13)]
    resumed = make_train_loader(path, 100, seed=1, num_workers=1)
    resumed.load_state_dict(first.state_dict())
    assert first.state_dict() == {"epoch": 1, "position": 3}
    stream = resumed.stream()
    tail = [next(stream).index for _ in range(12)]
    assert all(torch.equal(a, b) for a, b in zip(reference, head + tail))


def test_quasi_random_refused_when_distributed(split):
    with pytest.raises(DfaError, match="quasi_random"):
        make_train_loader(split[0], 10, seed=0, order="quasi_random", distributed=True)


def test_missing_sidecar_refused(tmp_path, split):
    lonely = tmp_path / "x.beton"
    lonely.write_bytes(split[0].read_bytes())
    with pytest.raises(DfaError, match="sidecar x.json is missing"):
        make_eval_loader(lonely, 10)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_get_disjoint_halves_that_cover_the_split(split, tmp_path):
    path = split[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = Path(__file__).parent / "scripts" / "loader_ranks.py"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(free_port()), str(script), str(path),
                    str(tmp_path / "ranks")], check=True, env=env, timeout=300)
    ranks = [json.loads((tmp_path / f"ranks.{r}.json").read_text()) for r in range(2)]
    single = make_train_loader(path, 20, seed=3, num_workers=1)
    for epoch in range(2):
        a, b = (set(sum(r["train"][epoch], [])) for r in ranks)
        assert len(a) == len(b) == N // 2 and not a & b and a | b == set(range(N))
        # Rank batches of 10 together hold exactly the samples of one process's batches of 20.
        for k, batch in enumerate(single):
            assert sorted(ranks[0]["train"][epoch][k] + ranks[1]["train"][epoch][k]) == \
                sorted(batch.index.tolist())
    assert ranks[0]["train"][0] != ranks[0]["train"][1]  # reshuffled each epoch
    first, second = ranks[0]["eval"], ranks[1]["eval"]
    assert first + second == list(range(N))  # evaluation shards: contiguous, no padding


def test_crop_flip_keeps_shape_and_differs_between_epochs_not_ranks():
    x = torch.rand(16, 3, 32, 32)
    index = torch.arange(100, 116)
    a = random_crop_flip(x, 4, True, sample_keys(0, 0, index))
    b = random_crop_flip(x, 4, True, sample_keys(0, 1, index))  # the next epoch
    assert a.shape == b.shape == x.shape and not torch.equal(a, b)
    # A sample's augmentation depends on (seed, epoch, index) only, not on its batch position.
    order = torch.randperm(16)
    again = random_crop_flip(x[order], 4, True, sample_keys(0, 0, index[order]))
    assert torch.equal(again, a[order])
    assert not torch.equal(random_crop_flip(x, 4, True, sample_keys(1, 0, index)), a)
    padded = torch.nn.functional.pad(x, (4,) * 4)
    for i in range(16):  # every output is a (possibly mirrored) 32x32 window of the padded image
        windows = [padded[i, :, r:r + 32, c:c + 32] for r in range(9) for c in range(9)]
        assert any(torch.equal(a[i], w) or torch.equal(a[i], w.flip(-1)) for w in windows)


def test_flip_only_mirrors_about_half():
    x = torch.rand(400, 3, 8, 8)
    out = random_crop_flip(x, 0, True, sample_keys(1, 0, torch.arange(400)))
    mirrored = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert (mirrored ^ kept).all() and 150 < int(mirrored.sum()) < 250


def test_image_transform_normalises_resizes_and_augments():
    images = torch.randint(0, 256, (8, 200, 200, 3), dtype=torch.uint8)
    faces = ImageTransform(mean=CIFAR_MEAN, std=CIFAR_STD, resize=224, crop_padding=4, flip=True,
                           channels_last=True)
    train_a = faces(images, True, sample_keys(0, 0, torch.arange(8)))
    train_b = faces(images, True, sample_keys(0, 1, torch.arange(8)))
    assert train_a.shape == (8, 3, 224, 224) and train_a.dtype == torch.float32
    assert train_a.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(train_a, train_b)
    assert torch.equal(faces(images, False), faces(images, False))  # no augmentation in eval
    plain = ImageTransform(mean=CIFAR_MEAN, std=CIFAR_STD)(images[:, :32, :32], False)
    expected = (images[:, :32, :32].permute(0, 3, 1, 2).float() / 255
                - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    assert torch.allclose(plain, expected, atol=1e-6)


def test_cpu_loader_converts_in_its_thread_exactly_as_the_transform(split):
    """On the CPU the uint8 -> float scaling runs in FFCV's thread: the batches must be identical to
    the transform applied to the raw batch, for train (with crop/flip) and eval, and a batch kept
    while later ones are drawn must not change (no aliasing of FFCV's reused buffers)."""
    path = split[0]
    transform = ImageTransform(scale=1 / 255 / 255, mean=CIFAR_MEAN, std=CIFAR_STD, crop_padding=4,
                               flip=True, channels_last=True)
    raw = list(make_train_loader(path, 50, seed=3, num_workers=1))
    converted = make_train_loader(path, 50, seed=3, num_workers=1, transform=transform)
    kept = list(converted)  # all batches of the epoch kept at once
    assert len(kept) == len(raw) == N // 50
    for got, ref in zip(kept, raw):
        assert torch.equal(got.index, ref.index)
        keys = sample_keys(3, 0, ref.index)
        assert torch.equal(got.image, transform(ref.image, True, keys))
        assert got.image.is_contiguous(memory_format=torch.channels_last)
    plain = ImageTransform(channels_last=False)
    for got, ref in zip(make_eval_loader(path, 64, num_workers=1, transform=plain),
                        make_eval_loader(path, 64, num_workers=1)):
        assert got.image.dtype == torch.float32 and got.image.is_contiguous()
        assert torch.equal(got.image, plain(ref.image, False))


def test_image_transform_takes_scaled_floats_and_refuses_other_dtypes():
    images = torch.randint(0, 256, (4, 28, 28, 3), dtype=torch.uint8)
    transform = ImageTransform(scale=0.5)
    assert torch.equal(transform(images.float() * 0.5, False), transform(images, False))
    with pytest.raises(TypeError, match="expected uint8"):
        transform(images.to(torch.int32), False)


@pytest.mark.parametrize("normalize", [False, True])
def test_cpu_loader_rounds_to_bf16_in_its_thread_exactly_as_the_transform(split, normalize):
    """Under the bf16 precisions the transform outputs bf16: the CPU loader rounds to it in its own
    thread when only scaling (and crop/flip) remain, and stays float32 when normalisation follows;
    either way the batches equal the transform of the raw uint8 batch."""
    path = split[0]
    normal = (CIFAR_MEAN, CIFAR_STD) if normalize else (None, None)
    transform = ImageTransform(1 / 255, *normal, crop_padding=4, flip=True, channels_last=True,
                               dtype=torch.bfloat16)
    assert transform.loader_dtype == (torch.float32 if normalize else torch.bfloat16)
    raw = list(make_train_loader(path, 50, seed=3, num_workers=1))
    converted = list(make_train_loader(path, 50, seed=3, num_workers=1, transform=transform))
    for got, ref in zip(converted, raw):
        assert got.image.dtype == torch.bfloat16
        assert torch.equal(got.image, transform(ref.image, True, sample_keys(3, 0, ref.index)))
    if not normalize:  # scaled in float32, then rounded once
        expected = (raw[0].image.permute(0, 3, 1, 2).float() * (1 / 255)).to(torch.bfloat16)
        assert torch.equal(transform(raw[0].image, False), expected)
    with pytest.raises(TypeError, match="expected uint8"):
        transform(raw[0].image.to(torch.float16), False)
