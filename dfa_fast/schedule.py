"""When things happen in a run: the learning-rate factor of every step and the start of DisEnt's
feature swap.

Step-valued settings (``method.swap_start``, ``optim.warmup_steps``, ``optim.lr_decay_start``,
``optim.lr_decay_step``) are written for a run of ``train.schedule_length`` steps and scaled to
``train.steps`` (0: taken as written). So a preset can keep the published 50,000-step settings and
run them at any length: at 3,000 steps the swap that starts after step 10,000 of 50,000 starts
after step 600.

Learning-rate schedules (``optim.schedule``), each after an optional linear warm-up:
- ``step``: the published delayed step decay (docs/method.md, "Optimiser and learning rate")
  when ``optim.lr_decay``, else constant;
- ``cosine``: half a cosine from 1 to ``optim.lr_min_factor`` over the steps after the warm-up;
- ``linear``: a straight line from 1 to ``optim.lr_min_factor`` over the same steps.
"""
from __future__ import annotations

import math

from dfa_fast.config import RunConfig


def scaled(cfg: RunConfig, value: int) -> int:
    """Return a step-valued setting at the run's length (see the module docstring)."""
    length = cfg.train.schedule_length
    return value if not length else int(round(value * cfg.train.steps / length))


def swap_start(cfg: RunConfig) -> int:
    """Return the step after which DisEnt swaps features (strictly greater steps swap)."""
    return scaled(cfg, cfg.method.swap_start)


def lr_factor(cfg: RunConfig, step: int) -> float:
    """Return the learning-rate multiplier used for the update of (0-based) ``step``."""
    o = cfg.optim
    warmup = scaled(cfg, o.warmup_steps)
    factor = (step + 1) / warmup if step < warmup else 1.0
    if o.schedule == "step":
        if o.lr_decay:
            start, every = scaled(cfg, o.lr_decay_start), max(1, scaled(cfg, o.lr_decay_step))
            factor *= o.lr_gamma ** (max(0, step - start) // every)
        return factor
    progress = min(1.0, max(0, step - warmup) / max(1, cfg.train.steps - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
    return factor * (o.lr_min_factor + (1 - o.lr_min_factor) * shape)


def depends_on_length(cfg: RunConfig) -> bool:
    """Whether changing ``train.steps`` moves the schedule (a resume with more steps does)."""
    return bool(cfg.train.schedule_length) or cfg.optim.schedule != "step"
