"""The config's sections (train, compute, parallel, cpu): old `train.*` names still read (saved runs,
presets, --set), one name per setting, resume across the split, and the checks across keys made by
the config's own validation."""
import dataclasses
import re

import pytest
import torch
import yaml

from dfa_fast import config
from dfa_fast.cli import build_parser, train_config
from dfa_fast.errors import DfaError

# Every moved key at a value other than its default, so that a key that is dropped or read into
# the wrong place shows.
MOVED_VALUES = {"device": "cpu", "precision": "bf16_mixed", "zero_stage": 1, "grad_accum": 2,
                "dist_timeout_s": 77, "threads": 3, "flush_denormal": False}


def new_style(**overrides) -> config.RunConfig:
    return config.resolve("cmnist", 1, "disent", {
        "compute": {"device": "cpu", "precision": "bf16_mixed"},
        "parallel": {"zero_stage": 1, "grad_accum": 2, "dist_timeout_s": 77},
        "cpu": {"threads": 3, "flush_denormal": False}, **overrides})


def old_layout(cfg: config.RunConfig) -> dict:
    """Return ``cfg`` as an earlier version saved it: the moved keys inside ``train``."""
    data = cfg.to_dict()
    flat = {}
    for (old_section, old_key), (new_section, new_key) in config.MOVED_KEYS.items():
        flat[old_key] = data[new_section].pop(new_key)
    for section in ("compute", "parallel", "cpu"):
        assert not data.pop(section)  # every key of the new sections is a moved one
    data["train"].update(flat)
    return data


def test_the_sections_hold_the_keys_they_say():
    fields = {name: [f.name for f in dataclasses.fields(kind)] for name, kind in (
        ("train", config.TrainConfig), ("compute", config.ComputeConfig),
        ("parallel", config.ParallelConfig), ("cpu", config.CpuConfig))}
    assert fields == {
        "train": ["steps", "seed", "eval_every", "log_every", "ckpt_every", "schedule_length",
                  "preset", "report_metric", "tensorboard", "progress"],
        "compute": ["device", "precision"],
        "parallel": ["zero_stage", "grad_accum", "dist_timeout_s"],
        "cpu": ["threads", "flush_denormal"]}
    assert {old for old, _ in config.MOVED_KEYS} == {"train"}
    assert {key for _, key in config.MOVED_KEYS} == set(MOVED_VALUES)
    # the defaults did not move with the keys
    cfg = config.RunConfig()
    assert (cfg.compute.device, cfg.compute.precision, cfg.parallel.zero_stage,
            cfg.parallel.grad_accum, cfg.parallel.dist_timeout_s, cfg.cpu.threads,
            cfg.cpu.flush_denormal) == ("auto", "fp32", 0, 1, 300, 1, True)


def test_a_run_saved_with_the_old_flat_train_section_loads_into_the_new_sections(tmp_path):
    cfg = new_style()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old_layout(cfg), sort_keys=False))
    assert "precision: bf16_mixed" in path.read_text() and "compute" not in path.read_text()
    loaded = config.load(path)
    assert loaded == cfg
    for (_, key), (section, _) in config.MOVED_KEYS.items():
        assert getattr(getattr(loaded, section), key) == MOVED_VALUES[key], key
    # saved again, it is written in the new sections
    config.save(loaded, tmp_path / "again.yaml")
    saved = yaml.safe_load((tmp_path / "again.yaml").read_text())
    assert saved["compute"] == {"device": "cpu", "precision": "bf16_mixed"}
    assert "precision" not in saved["train"]


def test_resuming_a_run_saved_before_the_split_reports_no_differences(tmp_path):
    cfg = new_style()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old_layout(cfg), sort_keys=False))
    saved = config.load(path)
    assert config.differences(saved, cfg) == []
    # ... while a real change, moved key or not, is still reported (and a resumable one is not)
    changed = new_style(compute={"device": "cpu", "precision": "fp32"},
                        train={"steps": 99, "progress": False})
    assert config.differences(saved, changed) == ["compute.precision: 'bf16_mixed' -> 'fp32'"]
    assert config.differences(saved, new_style(cpu={"threads": 3, "flush_denormal": True})) == [
        "cpu.flush_denormal: False -> True"]
    assert config.differences(saved, new_style(cpu={"threads": 1, "flush_denormal": False})) == []


def test_old_and_new_override_names_give_the_same_config():
    for old, new in (("train.precision=bf16_mixed", "compute.precision=bf16_mixed"),
                     ("train.threads=2", "cpu.threads=2"),
                     ("train.flush_denormal=false", "cpu.flush_denormal=false"),
                     ("train.device=cpu", "compute.device=cpu"),
                     ("train.zero_stage=2", "parallel.zero_stage=2"),
                     ("train.grad_accum=4", "parallel.grad_accum=4"),
                     ("train.dist_timeout_s=30", "parallel.dist_timeout_s=30")):
        by_old = config.resolve("cmnist", 1, "disent", config.parse_overrides([old]))
        by_new = config.resolve("cmnist", 1, "disent", config.parse_overrides([new]))
        assert by_old == by_new != config.resolve("cmnist", 1, "disent"), old
    # the same name given twice with one value is fine
    both = config.parse_overrides(["train.precision=bf16_mixed", "compute.precision=bf16_mixed"])
    assert config.resolve("cmnist", 1, "disent", both).compute.precision == "bf16_mixed"


def test_an_old_name_in_a_layer_above_overrides_a_new_name_below():
    """A preset layer says compute.precision: auto (cifar10c-fast); --set train.precision=fp32
    over it is the same key set again, not two names of one key."""
    assert config.resolve("cifar10c-fast", 1, "disent").compute.precision == "auto"
    cfg = config.resolve("cifar10c-fast", 1, "disent",
                         config.parse_overrides(["train.precision=fp32"]))
    assert cfg.compute.precision == "fp32"


@pytest.mark.parametrize("data, where", [
    ({"train": {"precision": "bf16_mixed"}, "compute": {"precision": "fp32"}}, "--set"),
    ({"train": {"threads": 2}, "cpu": {"threads": 4}}, "--set"),
])
def test_one_key_under_its_old_and_new_name_with_two_values_is_an_error(data, where, tmp_path):
    with pytest.raises(DfaError) as error:
        config.resolve("cmnist", 1, "disent", data)
    message = str(error.value)
    old_key = next(f"train.{k}" for k in data["train"])
    new_section = next(s for s in data if s != "train")
    new_key = f"{new_section}.{next(iter(data[new_section]))}"
    assert message.startswith(f"{where}: ") and old_key in message and new_key in message
    assert len(message.splitlines()) == 1
    # in a saved file too, naming the file
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DfaError, match=f"{re.escape(str(path))}: {old_key}=.* and {new_key}="):
        config.load(path)


def test_unknown_keys_are_still_errors_in_every_section():
    with pytest.raises(DfaError, match="unknown config key train.precisionn"):
        config.resolve("cmnist", 1, "disent", {"train": {"precisionn": "fp32"}})
    with pytest.raises(DfaError, match="unknown config key compute.threads; expected one of "
                                       "device, precision"):
        config.resolve("cmnist", 1, "disent", {"compute": {"threads": 1}})
    with pytest.raises(DfaError, match=r"compute.precision='fp64' is not valid; expected one of"):
        config.resolve("cmnist", 1, "disent", {"train": {"precision": "fp64"}})


def cli_args(*argv):
    return build_parser().parse_args(["train", *argv])


def test_the_command_line_reads_old_and_new_names_the_same(cmnist_full, tmp_path):
    common = ["--preset", "cmnist", "--ratio", "1", "--method", "disent",
              "--data", str(cmnist_full), "--out", str(tmp_path / "run")]
    by_old = train_config(cli_args(*common, "--set", "train.precision=bf16_mixed"))
    by_new = train_config(cli_args(*common, "--set", "compute.precision=bf16_mixed"))
    assert by_old == by_new and by_new.compute.precision == "bf16_mixed"
    with pytest.raises(DfaError, match="train.precision='bf16_mixed' and compute.precision="):
        train_config(cli_args(*common, "--set", "train.precision=bf16_mixed",
                              "--set", "compute.precision=fp32"))


def test_resume_overrides_apply_to_an_old_style_saved_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = new_style()
    (run / "config.yaml").write_text(yaml.safe_dump(old_layout(cfg), sort_keys=False))
    for name in ("train.precision", "compute.precision"):
        resumed = train_config(cli_args("--resume", str(run), "--set", f"{name}=fp32"))
        assert resumed.compute.precision == "fp32"
        assert config.differences(config.load(run / "config.yaml"), resumed) == [
            "compute.precision: 'bf16_mixed' -> 'fp32'"]
    with pytest.raises(DfaError, match="unknown config section 'optimizer'"):
        train_config(cli_args("--resume", str(run), "--set", "optimizer.lr=1"))


def test_a_real_run_saved_in_the_old_layout_resumes(cmnist_full, tmp_path):
    from dfa_fast.trainer import Trainer
    cfg = config.resolve("cmnist", 1, "vanilla", {
        "data": {"path": str(cmnist_full / "1pct")}, "compute": {"device": "cpu"},
        "train": {"steps": 4, "eval_every": 4, "log_every": 2, "ckpt_every": 2,
                  "progress": False}})
    run = tmp_path / "run"
    Trainer(cfg, run).run()
    saved = config.load(run / "config.yaml")
    (run / "config.yaml").write_text(yaml.safe_dump(old_layout(saved), sort_keys=False))
    more = dataclasses.replace(saved, train=dataclasses.replace(saved.train, steps=6))
    resumed = Trainer(more, run, resume=True)  # only a resumable change: no error
    assert resumed.start_step == 4 and resumed.run()["steps"] == 6
    other = dataclasses.replace(saved, cpu=dataclasses.replace(saved.cpu, flush_denormal=False))
    with pytest.raises(DfaError, match=r"different config \(cpu.flush_denormal: True -> False\)"):
        Trainer(other, run, resume=True)


# ------------------------------------------------------------------ checks across keys
def test_the_batch_must_split_into_ranks_and_micro_batches():
    message = ("data.batch_size=256 is not divisible into 1 rank(s) x parallel.grad_accum=3 "
               "micro-batches")
    with pytest.raises(DfaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.resolve("cmnist", 1, "disent", {"parallel": {"grad_accum": 3}})
    with pytest.raises(DfaError, match="parallel.grad_accum=3"):
        config.resolve("cmnist", 1, "disent", {"train": {"grad_accum": 3}})  # the old name
    cfg = config.resolve("cmnist", 1, "disent", {"parallel": {"grad_accum": 2}})
    assert config.validate(cfg, world_size=4) is cfg  # 256 = 4 ranks x 2 x 32
    with pytest.raises(DfaError, match=r"not divisible into 3 rank\(s\) x parallel.grad_accum=2"):
        config.validate(cfg, world_size=3)
    # the engine's ds_config takes the same check
    from dfa_fast.engine import build_ds_config
    assert build_ds_config(cfg, 4)["train_micro_batch_size_per_gpu"] == 32
    with pytest.raises(DfaError, match=r"not divisible into 3 rank\(s\)"):
        build_ds_config(cfg, 3)


def test_quasi_random_order_needs_a_single_rank():
    cfg = config.resolve("cmnist", 1, "disent", {"data": {"order": "quasi_random"}})
    assert config.validate(cfg, world_size=1) is cfg
    with pytest.raises(DfaError, match=r"^data.order=quasi_random is not supported with 2 ranks "
                                       r"\(FFCV cannot split it across ranks\); use "
                                       r"data.order=random$"):
        config.validate(cfg, world_size=2)


def test_fp16_needs_a_gpu():
    message = r"^compute.precision=fp16 needs a CUDA GPU"
    with pytest.raises(DfaError, match=message):
        config.resolve("cmnist", 1, "disent", {"compute": {"device": "cpu", "precision": "fp16"}})
    # device auto: decided when the device is known
    cfg = config.resolve("cmnist", 1, "disent", {"compute": {"precision": "fp16"}})
    assert config.validate(cfg, device_type="cuda") is cfg
    with pytest.raises(DfaError, match=message):
        config.validate(cfg, device_type="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_the_trainer_validates_with_the_device_it_resolved(cmnist_full, tmp_path):
    from dfa_fast.trainer import Trainer
    cfg = config.resolve("cmnist", 1, "disent", {"data": {"path": str(cmnist_full / "1pct")},
                                                 "compute": {"precision": "fp16"}})
    with pytest.raises(DfaError, match="compute.precision=fp16 needs a CUDA GPU"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_lr_decay_needs_the_step_schedule():
    with pytest.raises(DfaError, match="optim.lr_decay=true is the step schedule's decay"):
        config.resolve("cmnist", 1, "disent", {"optim": {"schedule": "cosine"}})


# ------------------------------------------------------------------ choice lists
def test_choice_lists_are_defined_once():
    from dfa_fast import methods, report
    from dfa_fast.data.folder import NUM_CLASSES
    assert config.METHODS[:3] == list(config.BUILTIN_METHODS)
    # methods.py implements exactly the built-in names (a test may register more after them)
    assert tuple(methods.METHODS)[:3] == config.BUILTIN_METHODS
    assert list(report.METHOD_ORDER) == list(config.BUILTIN_METHODS)
    parser = build_parser()
    prepare = next(a for a in parser._subparsers._group_actions[0].choices["prepare"]._actions
                   if a.dest == "kind")
    folder = prepare.choices["folder"]
    dataset = next(a for a in folder._actions if a.dest == "dataset")
    assert tuple(dataset.choices) == config.DATASETS == tuple(NUM_CLASSES)
    for preset in config.available_presets():  # every preset's built-in methods exist
        spec = config.load_preset(preset)
        assert set(spec["methods"]) <= set(config.BUILTIN_METHODS), preset
