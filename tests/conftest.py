"""Shared test set-up: the Triton interpreter on CPU, and the location of the real data sets."""
import os
from pathlib import Path

# Triton reads this when a kernel is decorated, so it must be set before any kernel module import.
os.environ.setdefault("TRITON_INTERPRET", "1")

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
