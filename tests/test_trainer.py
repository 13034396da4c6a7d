"""The training loop on real Colored MNIST: it learns, resumes exactly, stops on NaN, checks input."""
import json
import shutil

import pytest
import torch

from dfa_fast import config
from dfa_fast.cli import main
from dfa_fast.errors import DfaError
from dfa_fast.trainer import Trainer, evaluate_run, train


def run_config(data_dir, method_name="disent", **sections):
    overrides = {"data": {"path": str(data_dir)}, "train": {"progress": False}}
    for section, values in sections.items():
        overrides.setdefault(section, {}).update(values)
    return config.resolve("cmnist", 1, method_name, overrides)


def test_short_run_learns(cmnist_full, tmp_path):
    cfg = run_config(cmnist_full / "1pct", "vanilla",
                     train={"steps": 300, "eval_every": 100, "log_every": 50, "ckpt_every": 300},
                     model={"input_scale": 1.0})
    summary = train(cfg, tmp_path / "run")
    valid = summary["final"]["valid"]
    assert valid["aligned"] > 90  # the colour shortcut is learnt at once ...
    assert valid["accuracy"] > 20  # ... and well above chance (10%) on the balanced valid split
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if l["kind"] == "eval"] == [0, 100, 200, 299]
    train_lines = [l for l in lines if l["kind"] == "train"]
    assert len(train_lines) == 6 and train_lines[-1]["loss"] < train_lines[0]["loss"]
    assert all(l["images_per_s"] > 0 and 0 <= l["data_share"] <= 1 for l in train_lines)
    assert (tmp_path / "run" / "config.yaml").is_file()
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["selected"]["valid"]["unbiased"] == max(
        l["valid"]["unbiased"] for l in lines if l["kind"] == "eval")
    again = evaluate_run(tmp_path / "run", ["valid"], "latest")
    assert again["valid"] == pytest.approx(valid)


def test_disent_with_the_published_preset_learns_the_digits(cmnist_full, tmp_path):
    # The cmnist preset as published (the reference's [0, 1/255] inputs, lr 1e-2), 1,000 steps.
    cfg = run_config(cmnist_full / "1pct", train={"steps": 1000, "eval_every": 500,
                                                  "log_every": 250, "ckpt_every": 1000})
    summary = train(cfg, tmp_path / "run")
    valid = summary["final"]["valid"]
    # Well above chance (10%) on the balanced valid split, bias-conflicting cells included.
    assert valid["unbiased"] > 25 and valid["conflicting"] > 20, valid


def test_the_step_runs_with_train_threads(cmnist_full, tmp_path, monkeypatch):
    """FFCV sets PyTorch's thread count when first imported, when a loader is made and at every
    epoch (evaluation included); the training step must keep cpu.threads all the same."""
    before = torch.get_num_threads()
    try:
        cfg = run_config(cmnist_full / "1pct", train={"steps": 30, "eval_every": 20,
                                                      "log_every": 10, "ckpt_every": 30},
                         cpu={"threads": 2}, data={"num_workers": 1})
        trainer = Trainer(cfg, tmp_path / "run")
        seen, step = [], trainer.method.step
        monkeypatch.setattr(trainer.method, "step", lambda batch, i: (
            seen.append(torch.get_num_threads()), step(batch, i))[1])
        trainer.run()
        assert len(seen) == 30 and set(seen) == {2}
    finally:
        torch.set_num_threads(before)


def disent_cfg(data_dir, steps):
    # Swap from step 10 and the first LR decay at step 30, so a resume crosses both.
    return run_config(data_dir, train={"steps": steps, "eval_every": 20, "log_every": 10,
                                       "ckpt_every": 25},
                      method={"swap_start": 10},
                      optim={"lr_decay_start": 15, "lr_decay_step": 15})


def interrupt_at(trainer, stop_step, monkeypatch):
    """Run ``trainer`` as if the machine went down during step ``stop_step``; return it."""
    real_step = trainer.method.step

    def interrupted(batch, step):
        if step == stop_step:
            raise KeyboardInterrupt
        return real_step(batch, step)
    monkeypatch.setattr(trainer.method, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    return trainer


def test_resumed_run_matches_an_uninterrupted_one(cmnist_full, tmp_path, monkeypatch):
    data = cmnist_full / "1pct"
    full = Trainer(disent_cfg(data, 50), tmp_path / "full")
    full_summary = full.run()
    interrupt_at(Trainer(disent_cfg(data, 50), tmp_path / "part"), 33, monkeypatch)
    resumed = Trainer(disent_cfg(data, 50), tmp_path / "part", resume=True)
    assert resumed.start_step == 25
    resumed_summary = resumed.run()
    lines = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("full", "part")]
    strip = lambda text: [{k: v for k, v in json.loads(l).items()  # noqa: E731
                           if k not in ("images_per_s", "data_share", "step_ms")} for l in text]
    assert strip(lines[0]) == strip(lines[1])
    for a, b in zip(full.method.model.parameters(), resumed.method.model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(full.method.ema.ema_i, resumed.method.ema.ema_i)
    assert torch.equal(full.method.ema.ema_b, resumed.method.ema.ema_b)
    assert full_summary["final"] == resumed_summary["final"]
    assert full_summary["selected"] == resumed_summary["selected"]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(cmnist_full, tmp_path,
                                                                      monkeypatch):
    cfg = run_config(cmnist_full / "1pct", train={"steps": 20, "eval_every": 100,
                                                 "log_every": 4, "ckpt_every": 5})
    trainer = Trainer(cfg, tmp_path / "run")
    real_step = trainer.method.step

    def poisoned(batch, step):
        loss, stats = real_step(batch, step)
        return (loss * float("nan") if step == 7 else loss), stats
    monkeypatch.setattr(trainer.method, "step", poisoned)
    with pytest.raises(DfaError, match="NaN or infinite at step 7.*last good checkpoint is step 5"):
        trainer.run()
    assert trainer.checkpoints.pointer("latest")["step"] == 5
    resumed = Trainer(None, tmp_path / "run", resume=True)
    assert resumed.start_step == 5


def test_a_nan_in_any_micro_batch_of_an_accumulated_step_stops_the_run(cmnist_full, tmp_path,
                                                                        monkeypatch):
    cfg = run_config(cmnist_full / "1pct", train={"steps": 6, "eval_every": 100, "log_every": 2,
                                                 "ckpt_every": 2}, parallel={"grad_accum": 2})
    trainer = Trainer(cfg, tmp_path / "run")
    real_step, calls = trainer.method.step, []

    def poisoned(batch, step):  # the first of step 3's two micro-batches only
        loss, stats = real_step(batch, step)
        calls.append(step)
        return (loss * float("nan") if calls.count(3) == 1 and step == 3 else loss), stats
    monkeypatch.setattr(trainer.method, "step", poisoned)
    with pytest.raises(DfaError, match="NaN or infinite at step 3.*last good checkpoint is step 2"):
        trainer.run()


def test_resume_with_a_different_config_is_refused_unless_forced(cmnist_full, tmp_path):
    data = cmnist_full / "1pct"
    train(run_config(data, train={"steps": 5, "eval_every": 5, "ckpt_every": 5}), tmp_path / "r")
    changed = run_config(data, train={"steps": 10, "eval_every": 5, "ckpt_every": 5},
                         optim={"lr": 0.5})
    with pytest.raises(DfaError, match="optim.lr: 0.01 -> 0.5.*--force"):
        Trainer(changed, tmp_path / "r", resume=True)
    longer = run_config(data, train={"steps": 10, "eval_every": 5, "ckpt_every": 5})
    assert Trainer(longer, tmp_path / "r", resume=True).start_step == 5  # more steps is fine
    more_threads = run_config(data, train={"steps": 10, "eval_every": 5, "ckpt_every": 5},
                              cpu={"threads": 2})
    assert Trainer(more_threads, tmp_path / "r", resume=True).cfg.cpu.threads == 2
    with pytest.raises(DfaError, match="already holds a run"):
        Trainer(longer, tmp_path / "r")
    forced = Trainer(changed, tmp_path / "r", resume=True, force=True)
    assert forced.start_step == 5 and forced.cfg.optim.lr == 0.5
    assert forced.engine.get_lr() == [0.5]  # the checkpoint's optimizer state held lr 0.01
    forced.run()
    lines = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [l["lr"] for l in lines if l["kind"] == "train"] == [0.01, 0.5]


def test_forced_resume_takes_the_new_learning_rate_at_its_place_in_the_schedule(cmnist_full,
                                                                                tmp_path):
    data = cmnist_full / "1pct"
    train(disent_cfg(data, 40), tmp_path / "r")  # last checkpoint after 25 steps, one decay
    changed = run_config(data, train={"steps": 50, "eval_every": 20, "log_every": 10,
                                      "ckpt_every": 25},
                         method={"swap_start": 10},
                         optim={"lr_decay_start": 15, "lr_decay_step": 15, "lr": 0.004,
                                "weight_decay": 1e-4})
    changed.train.steps = 40
    resumed = Trainer(changed, tmp_path / "r", resume=True, force=True)
    assert resumed.start_step == 40
    assert resumed.engine.get_lr() == [pytest.approx(0.004 * 0.5 ** 1)]  # step 40: 1 decay
    groups = resumed.engine.optimizer.param_groups
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    resumed.engine.lr_scheduler.step()  # the schedule goes on from the new base
    assert resumed.engine.get_lr() == [pytest.approx(0.004 * 0.5 ** 1)]


def test_resuming_a_run_stopped_before_its_first_checkpoint_starts_it_over(cmnist_full, tmp_path,
                                                                          monkeypatch):
    data = cmnist_full / "1pct"
    cfg = run_config(data, train={"steps": 12, "eval_every": 4, "log_every": 4,
                                  "ckpt_every": 100})
    full = train(cfg, tmp_path / "full")
    part = interrupt_at(Trainer(cfg, tmp_path / "part"), 9, monkeypatch)
    assert part.checkpoints.pointer("latest") is None and part.checkpoints.pointer("best")
    resumed = Trainer(None, tmp_path / "part", resume=True)
    assert resumed.start_step == 0 and resumed.checkpoints.pointer("best") is None
    assert not list((tmp_path / "part" / "checkpoints").glob("best-*"))
    assert resumed.run()["final"] == full["final"]
    lines = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("full", "part")]
    assert len(lines[0]) == len(lines[1])


def test_checkpoint_tags_never_repeat_and_a_resume_rewinds_the_best_pointer(cmnist_full,
                                                                           tmp_path):
    trainer = Trainer(run_config(cmnist_full / "1pct", train={"steps": 5}), tmp_path / "run")
    ckpt, engine = trainer.checkpoints, trainer.engine
    folders = lambda: sorted(p.name for p in ckpt.folder.iterdir() if p.is_dir())  # noqa: E731
    ckpt.save(engine, "best", 1, {"step": 1})
    ckpt.save(engine, "latest", 1, {"step": 1})
    ckpt.save(engine, "best", 3, {"step": 3})
    ckpt.save(engine, "best", 5, {"step": 5})
    # best-1 stays while latest (which records it) is the checkpoint a resume would load
    assert folders() == ["best-step0000001", "best-step0000005", "latest-step0000001"]
    assert ckpt.pointer("latest")["best"] == {"tag": "best-step0000001", "step": 1}
    assert ckpt.rewind()["tag"] == "latest-step0000001"
    assert ckpt.pointer("best") == {"tag": "best-step0000001", "step": 1}
    assert folders() == ["best-step0000001", "latest-step0000001"]
    ckpt.session = 1  # a resumed session: its saves get tags of their own
    ckpt.save(engine, "best", 5, {"step": 5})
    assert folders() == ["best-step0000001", "best-step0000005-r1", "latest-step0000001"]
    ckpt.save(engine, "latest", 5, {"step": 5})
    assert folders() == ["best-step0000005-r1", "latest-step0000005-r1"]
    assert ckpt.load(engine, "best")["step"] == 5


def test_data_without_matching_sidecar_is_refused(cmnist_full, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(cmnist_full / "1pct", copy)
    (copy / "valid.json").unlink()
    with pytest.raises(DfaError, match="sidecar valid.json is missing"):
        Trainer(run_config(copy), tmp_path / "run")
    with pytest.raises(DfaError, match="5% bias-conflicting samples but the run is for 1%"):
        Trainer(run_config(cmnist_full / "5pct"), tmp_path / "run2")


@pytest.mark.parametrize("call, message", [
    (lambda: config.resolve("imagenet", 1, "disent"),
     "unknown preset 'imagenet'; available: bffhq, bffhq-fast, cifar10c, cifar10c-fast, cmnist"),
    (lambda: config.resolve("cmnist", 3, "disent"), "no ratio 3%; available: 0.5, 1, 2, 5"),
    (lambda: config.resolve("cmnist", 1, "jtt"), "no method 'jtt'; available: vanilla, lff, disent"),
    (lambda: config.resolve("cmnist", 1, "disent", {"optim": {"lrr": 1}}),
     "--set: unknown config key optim.lrr"),
    (lambda: config.resolve("cmnist", 1, "disent", {"train": {"steps": "many"}}),
     "train.steps='many' is not valid; expected an int"),
    (lambda: config.resolve("cmnist", 1, "disent", {"optimizer": {"lr": 1}}),
     "unknown config section 'optimizer'"),
    (lambda: config.resolve("cmnist", 1, "disent", {"optim": {"lr": "fast"}}),
     "optim.lr='fast' is not valid; expected a float"),
    (lambda: config.resolve("cmnist", 1, "disent", {"optim": {"lr": -1}}), "optim.lr=-1.0"),
    (lambda: config.resolve("cmnist", 1, "disent", {"parallel": {"zero_stage": 3}}),
     "parallel.zero_stage=3 is not valid"),
    (lambda: config.parse_overrides(["optim.lr"]), "is not section.key=value"),
])
def test_config_errors(call, message):
    with pytest.raises(DfaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


@pytest.mark.parametrize("args, message", [
    (["--preset", "cmnist", "--ratio", "3", "--method", "disent"],
     "preset cmnist has no ratio 3%; available: 0.5, 1, 2, 5"),
    (["--preset", "mnist", "--ratio", "1", "--method", "disent"],
     "unknown preset 'mnist'; available: bffhq, bffhq-fast, cifar10c, cifar10c-fast, cmnist"),
    (["--preset", "cmnist", "--ratio", "1", "--method", "jtt"], "unknown method 'jtt'"),
    (["--preset", "cmnist", "--ratio", "1", "--method", "disent", "--set", "optim.lrr=1"],
     "--set: unknown config key optim.lrr"),
])
def test_train_command_checks_its_choices_before_looking_for_the_data(args, message, tmp_path,
                                                                     capsys):
    out = tmp_path / "run"
    assert main(["train", *args, "--data", str(tmp_path / "none"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not out.exists()


def test_overrides_parse_yaml_scalars():
    parsed = config.parse_overrides(["optim.lr=1e-3", "train.tensorboard=true",
                                     "data.normalize=cifar", "train.steps=10"])
    cfg = config.resolve("cmnist", 1, "disent", parsed)
    assert (cfg.optim.lr, cfg.train.tensorboard, cfg.data.normalize, cfg.train.steps) == \
        (1e-3, True, "cifar", 10)
