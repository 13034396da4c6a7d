"""compute.precision=bf16_mixed: the networks' products run in bf16 (autocast) while the weights,
gradients, Adam, heads, losses and EMA buffers stay float32; compared with the fp32 step from the
same weights, and run end to end on real Colored MNIST."""
import json
import platform

import pytest
import torch

from dfa_fast import config
from dfa_fast.data.loaders import Batch
from dfa_fast.environment import cpuinfo_bf16, native_bf16, resolve_precision
from dfa_fast.methods import build_method
from dfa_fast.trainer import load_run, train


@pytest.fixture(autouse=True, params=["torch", "fused"])
def torch_path(request, monkeypatch):
    """Every test on the reference and on the fused PyTorch head (the CPU default)."""
    monkeypatch.setenv("DFA_KERNELS", request.param)


def make_method(name, precision):
    cfg = config.resolve("cmnist", 1, name, {"compute": {"precision": precision},
                                             "method": {"swap_start": 0}})
    torch.manual_seed(0)
    method = build_method(cfg, 10, torch.device("cpu"))
    method.attach(torch.arange(300) % 10)
    return method


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), 0)


@pytest.mark.parametrize("name", ["vanilla", "lff", "disent"])
def test_bf16_mixed_step_is_the_fp32_step_in_bf16_products(name):
    mixed, full = make_method(name, "bf16_mixed"), make_method(name, "fp32")
    for a, b in zip(mixed.model.parameters(), full.model.parameters()):
        assert torch.equal(a, b)
    torch.manual_seed(1)
    x = torch.rand(64, 3, 28, 28) * (torch.rand(64, 1, 28, 28) < 0.2)  # sparse digits in [0, 1]
    index = torch.randperm(300)[:64]
    y = index % 10
    losses = []
    for method in (mixed, full):
        loss, stats = method.step(Batch(x, y, y.clone(), index), step=1)
        loss.backward()
        assert loss.dtype == torch.float32 and all(v.dtype == torch.float32
                                                   for v in stats.values())
        losses.append(loss.item())
    assert losses[0] != losses[1]  # the products did run in bf16 ...
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)  # ... to bf16's precision
    for (key, a), b in zip(mixed.model.named_parameters(), full.model.parameters()):
        assert a.dtype == a.grad.dtype == torch.float32, key
        assert cosine(a.grad, b.grad) > 0.99, key
    if full.ema is not None:
        assert mixed.ema.ema_i.dtype == torch.float32
        assert torch.allclose(mixed.ema.ema_i, full.ema.ema_i, rtol=3e-2, atol=1e-3)
        assert torch.allclose(mixed.ema.ema_b, full.ema.ema_b, rtol=3e-2, atol=1e-3)
    with torch.no_grad():
        logits = mixed.predict(x)
        assert logits.dtype == torch.float32
        assert torch.allclose(logits, full.predict(x), rtol=5e-2, atol=5e-2)


def test_bf16_mixed_run_learns_on_colored_mnist(cmnist_full, tmp_path):
    cfg = config.resolve("cmnist", 1, "disent", {
        "data": {"path": str(cmnist_full / "1pct")},
        "train": {"steps": 300, "eval_every": 150, "log_every": 50, "ckpt_every": 300,
                  "progress": False},
        "compute": {"precision": "bf16_mixed"},
        "method": {"swap_start": 100}})
    summary = train(cfg, tmp_path / "run")
    valid = summary["final"]["valid"]
    assert valid["aligned"] > 90 and valid["accuracy"] > 15  # chance is 10 %
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [l for l in lines if l["kind"] == "train"]
    assert all(l["loss"] == l["loss"] for l in train_lines)  # finite, no NaN
    trainer = load_run(tmp_path / "run", "latest")
    assert all(p.dtype == torch.float32 for p in trainer.method.model.parameters())


def test_auto_precision_is_bf16_mixed_only_where_bf16_is_native(cmnist_full, tmp_path):
    # Emulated bf16 products are up to 10x slower than fp32 (an AVX2-only CPU): auto avoids them.
    cpu = torch.device("cpu")
    if platform.machine() in ("x86_64", "aarch64"):  # the public fallback agrees with torch
        assert cpuinfo_bf16() == native_bf16()
    assert resolve_precision("auto", cpu) == ("bf16_mixed" if native_bf16() else "fp32")
    assert resolve_precision("fp16", cpu) == "fp16"  # a concrete choice is kept
    cfg = config.resolve("cmnist", 1, "vanilla", {
        "data": {"path": str(cmnist_full / "1pct")},
        "train": {"steps": 2, "eval_every": 2, "log_every": 1, "ckpt_every": 2,
                  "progress": False},
        "compute": {"precision": "auto"}})
    train(cfg, tmp_path / "run")
    # The run saves what auto chose, so that a resume elsewhere keeps its arithmetic.
    saved = config.load(tmp_path / "run" / "config.yaml")
    assert saved.compute.precision == resolve_precision("auto", cpu)
