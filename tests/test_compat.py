"""dfa_fast.compat: each private torch or DeepSpeed name the CPU shortcuts use is looked up when it
is needed, and where it is missing (removed here with monkeypatch, as another torch would lack it)
a short Colored MNIST run still trains, through the public path, with one warning naming it."""
import importlib
import json
import warnings

import pytest
import torch

from dfa_fast import compat, config
from dfa_fast.environment import cpuinfo_bf16, native_bf16
from dfa_fast.optim import Adam
from dfa_fast.trainer import load_run, train


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(compat, "_warned", set())


def short_run(cmnist_full, tmp_path, steps=40):
    """A 40-step Vanilla run; return its train lines (loss falls when it learns)."""
    cfg = config.resolve("cmnist", 1, "vanilla", {
        "data": {"path": str(cmnist_full / "1pct")},
        "train": {"steps": steps, "eval_every": steps, "log_every": 10, "ckpt_every": steps,
                  "progress": False}})
    train(cfg, tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == "train"]


def learned(lines):
    return lines[-1]["loss"] < 0.8 * lines[0]["loss"]


@pytest.mark.parametrize("module, name", [
    ("torch.optim.optimizer", "_global_optimizer_pre_hooks"),
    ("torch.optim.optimizer", "_global_optimizer_post_hooks"),
    ("torch.autograd", "_profiler_enabled"),
])
def test_without_adams_private_names_every_step_is_torch_adam(cmnist_full, tmp_path,
                                                              monkeypatch, module, name):
    # The name is gone while the feature test looks (torch's own Optimizer.step wrapper reads
    # the hook dicts too, so removing them for the whole run would break torch itself).
    real = compat.adam_kernels

    def without_the_name():
        with monkeypatch.context() as patch:
            patch.delattr(importlib.import_module(module), name)
            return real()
    monkeypatch.setattr(compat, "adam_kernels", without_the_name)
    with pytest.warns(RuntimeWarning, match=f"short path's private names.*{name}"):
        lines = short_run(cmnist_full, tmp_path)
    assert learned(lines), lines
    assert load_run(tmp_path / "run", "latest").engine.optimizer._kernels is None


def test_adams_short_path_needs_the_fused_kernel(monkeypatch):
    # Removing torch's fused kernel would break torch.optim.Adam(fused=True) itself, so this is
    # the feature test alone: the short path is off, with the warning.
    monkeypatch.delattr(torch, "_fused_adam_")
    with pytest.warns(RuntimeWarning, match="_fused_adam_"):
        assert compat.adam_kernels() is None
    monkeypatch.undo()
    optimizer = Adam([torch.nn.Parameter(torch.ones(3))])
    assert optimizer._kernels is not None  # the names are back: the short path is on again


def test_without_the_storage_use_count_the_loader_hands_out_copies(cmnist_full, tmp_path,
                                                                   monkeypatch):
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    with pytest.warns(RuntimeWarning, match="_storage_Use_Count"):
        lines = short_run(cmnist_full, tmp_path)
    assert learned(lines), lines


def test_without_deepspeeds_shm_builder_there_is_nothing_to_skip(cmnist_full, tmp_path,
                                                                 monkeypatch):
    monkeypatch.delattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op",
                        raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing missing that matters
        lines = short_run(cmnist_full, tmp_path)
    assert learned(lines), lines


def test_without_torchs_bf16_probe_native_bf16_reads_cpuinfo(monkeypatch):
    expected = cpuinfo_bf16()
    monkeypatch.setattr(compat, "mkldnn_bf16_probe", lambda: None)
    assert native_bf16() == expected


def test_a_changed_onednn_linear_operator_is_not_used(monkeypatch):
    from dfa_fast.kernels import onednn_linear

    class Changed:  # the operator of another torch, with another signature
        @staticmethod
        def default(*args):
            raise TypeError("unexpected arguments")
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Changed, raising=False)
    assert onednn_linear._operator() is None
    monkeypatch.undo()
    assert (onednn_linear._operator() is not None) == onednn_linear.available()
