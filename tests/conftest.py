"""Shared test set-up: the Triton interpreter on CPU, and the location of the real data sets."""
import os
from pathlib import Path

# Triton reads this when a kernel is decorated, so it must be set before any kernel module import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import gzip  # noqa: E402
import struct  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO / "data" / "mnist"


def shared_data() -> Path:
    """Return the folder of the real data sets ($DFA_DATA), or skip the test when it is not set."""
    root = os.environ.get("DFA_DATA")
    if not root:
        pytest.skip("DFA_DATA is not set (it points at the folder with cifar10-jpeg.zip etc.)")
    return Path(root)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The folder of the real data sets named by $DFA_DATA."""
    return shared_data()


@pytest.fixture(scope="session")
def cmnist_full(tmp_path_factory):
    """Colored MNIST from the real files at 1% and 5% (seed 0)."""
    from dfa_fast.data.cmnist import build_cmnist
    out = tmp_path_factory.mktemp("cmnist")
    build_cmnist(MNIST_DIR, out, [0.01, 0.05], seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def faces_built(tmp_path_factory, data_root):
    """BFFHQ-style faces from the real UTKFace zip at 0.5% and 2% (64 px; 100 valid and 200 test
    faces per group)."""
    from dfa_fast.data.faces import build_faces
    out = tmp_path_factory.mktemp("faces")
    build_faces(data_root / "utkface-10-29_40-59.zip", out, [0.005, 0.02], seed=0,
                valid_per_group=100, test_per_group=200, size=64, progress=False)
    return out


@pytest.fixture(scope="session")
def mnist_small(tmp_path_factory):
    """The first 6000 train and 1000 test images of the real MNIST, as IDX files."""
    from dfa_fast.data.sources import load_mnist
    src = load_mnist(MNIST_DIR)
    folder_ = tmp_path_factory.mktemp("mnist_small")
    for split, n, (img_name, lab_name) in (("train", 6000, cmnist_names("train")),
                                            ("test", 1000, cmnist_names("t10k"))):
        data = src.splits[split]
        images, labels = data.images[:n], data.labels[:n].astype(np.uint8)
        (folder_ / img_name).write_bytes(gzip.compress(
            b"\x00\x00\x08\x03" + struct.pack(">3I", n, 28, 28) + images.tobytes()))
        (folder_ / lab_name).write_bytes(gzip.compress(
            b"\x00\x00\x08\x01" + struct.pack(">I", n) + labels.tobytes()))
    return folder_


def cmnist_names(prefix):
    return f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"
