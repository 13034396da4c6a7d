"""The run-length schedule options: warm-up, cosine and linear learning rates, the step decay and
DisEnt's swap start scaled by train.schedule_length, and the fast presets built on the published."""
import math

import pytest

from dfa_fast import config, schedule
from dfa_fast.errors import DfaError


def cfg_with(steps, **optim):
    length = optim.pop("length", 0)
    return config.resolve("cifar10c", 1, "disent", {"optim": optim, "train": {
        "steps": steps, "schedule_length": length}})


@pytest.mark.parametrize("step, factor", [(0, 0.1), (9, 1.0), (10, 1.0), (55, 0.5), (99, None)])
def test_cosine_with_warmup(step, factor):
    cfg = cfg_with(100, lr_decay=False, schedule="cosine", warmup_steps=10)
    expected = factor if factor is not None else 0.5 * (1 + math.cos(math.pi * 89 / 90))
    assert schedule.lr_factor(cfg, step) == pytest.approx(expected)


def test_linear_ends_at_the_floor():
    cfg = cfg_with(100, lr_decay=False, schedule="linear", lr_min_factor=0.2)
    assert schedule.lr_factor(cfg, 0) == 1.0
    assert schedule.lr_factor(cfg, 50) == pytest.approx(0.6)
    assert schedule.lr_factor(cfg, 100) == pytest.approx(0.2)


def test_step_decay_and_swap_start_scale_with_the_run_length():
    cfg = cfg_with(3000, length=50000)  # the published 10,000 / 10,000 at 3,000 of 50,000 steps
    assert schedule.swap_start(cfg) == 600
    assert [schedule.lr_factor(cfg, s) for s in (0, 1199, 1200, 1800, 2999)] == \
        [1.0, 1.0, 0.5, 0.25, 0.125]
    unscaled = cfg_with(3000)
    assert schedule.swap_start(unscaled) == 10000 and schedule.lr_factor(unscaled, 2999) == 1.0


def test_bad_schedule_settings_are_errors():
    with pytest.raises(DfaError, match="optim.schedule='poly'"):
        cfg_with(10, lr_decay=False, schedule="poly")
    with pytest.raises(DfaError, match="optim.lr_decay=true is the step schedule"):
        cfg_with(10, schedule="cosine")  # the disent preset decays by steps
    with pytest.raises(DfaError, match="lr_min_factor"):
        cfg_with(10, lr_decay=False, schedule="linear", lr_min_factor=2)


@pytest.mark.parametrize("fast, published", [("cifar10c-fast", "cifar10c"), ("bffhq-fast", "bffhq")])
def test_fast_presets_extend_the_published_ones(fast, published):
    ratio = 1 if published == "cifar10c" else 0.5
    for method in ("vanilla", "lff", "disent"):
        short, full = (config.resolve(p, ratio, method) for p in (fast, published))
        assert short.train.preset == fast and full.train.preset == published
        assert short.method == full.method  # lambdas, q, EMA, swap start (scaled)
        if fast == "bffhq-fast" and method == "disent":  # constant LR (docs/fast-schedules.md)
            assert full.optim.lr_decay and not short.optim.lr_decay
            full.optim.lr_decay = False
        assert short.optim == full.optim  # lr, decay
        assert short.train.steps == 3000 and short.train.schedule_length == 50000
        assert full.train.steps == 50000 and full.train.schedule_length == 0
    assert schedule.swap_start(config.resolve(fast, ratio, "disent")) == 600
