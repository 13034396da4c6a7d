"""The ResNet-18 presets (Corrupted CIFAR-10 and BFFHQ-style faces) run a few real steps on the CPU:
ImageNet stem, crop/flip augmentation, normalisation, resize and channels-last for faces, every
method. Sizes are cut down (batch, resize, evaluation splits) so a step takes about a second."""
import pytest

from dfa_fast import config
from dfa_fast.data import cifar10c
from dfa_fast.trainer import train
from test_sources import _cifar_subset, write_cifar_batches


@pytest.fixture(scope="module")
def tiny_cifar10c(tmp_path_factory, data_root):
    root = tmp_path_factory.mktemp("tiny_cifar")
    write_cifar_batches(root / "cifar-10-batches-py", _cifar_subset(data_root, per_class=12))
    cifar10c.build_cifar10c(root, root / "out", [0.1], valid_size=20, workers=1, progress=False)
    return root / "out" / "10pct"


@pytest.mark.parametrize("method", ["vanilla", "lff", "disent"])
def test_cifar10c_preset_runs_on_cpu(tiny_cifar10c, tmp_path, method):
    cfg = config.resolve("cifar10c", 5, method, {
        "data": {"path": str(tiny_cifar10c), "batch_size": 8, "eval_batch_size": 64,
                 "num_workers": 1, "ratio_pct": 10.0},
        "method": {"swap_start": 1},
        "train": {"steps": 3, "eval_every": 2, "log_every": 1, "ckpt_every": 3,
                  "progress": False}})
    assert cfg.model.arch == "resnet18" and cfg.model.stem == "imagenet" and cfg.data.flip
    summary = train(cfg, tmp_path / "run")
    assert summary["final"]["step"] == 2 and 0 <= summary["final"]["test"]["accuracy"] <= 100


def test_bffhq_preset_runs_on_cpu(faces_built, tmp_path):
    cfg = config.resolve("bffhq", 0.5, "disent", {
        "data": {"path": str(faces_built / "0.5pct"), "batch_size": 4, "eval_batch_size": 200,
                 "resize": 64, "num_workers": 1},
        "method": {"swap_start": 1},
        "train": {"steps": 3, "eval_every": 1000, "log_every": 1, "ckpt_every": 3,
                  "progress": False}})
    assert cfg.data.channels_last and cfg.train.report_metric == "conflicting"
    summary = train(cfg, tmp_path / "run")
    assert summary["report_metric"] == "conflicting" and summary["final"]["step"] == 2
    assert 0 <= summary["final"]["test"]["conflicting"] <= 100
