"""The DeepSpeed engine: process-group set-up (also without a launcher), ds_config, Adam, LR schedule.

`deepspeed.initialize` wraps the method's one module with one plain Adam (weight decay as L2, not
AdamW) and the delayed step decay of docs/method.md as a LambdaLR, from a ds_config
built from the run config (micro batch per rank, gradient accumulation, bf16/fp16, ZeRO stage,
gradient clipping) or read from a file and checked against the run config.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import socket
from pathlib import Path
from typing import Optional

import torch

from dfa_fast import compat
from dfa_fast import schedule as schedule_mod
from dfa_fast.config import RunConfig, micro_batch
from dfa_fast.errors import DfaError
from dfa_fast.optim import Adam


def free_port() -> int:
    """Return a TCP port that is free on this machine right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_device(name: str) -> torch.device:
    """Return the device of a run ("auto": this rank's GPU if there is one, else the CPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DfaError("compute.device=cuda but no CUDA GPU is available; use "
                           "compute.device=cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def prepare_environment(device: torch.device) -> None:
    """Set what DeepSpeed needs before it initialises; returns None.

    Without a launcher: RANK, LOCAL_RANK, WORLD_SIZE and a free MASTER_PORT for a single process.
    On CPUs: DeepSpeed's CPU accelerator (gloo) and `keep_freed_memory`. Always: skip DeepSpeed's
    shared-memory op build, which JIT-compiles for minutes and serves only inference all-reduce
    (docs/environment.md).
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        keep_freed_memory()
    compat.skip_shm_op_build()


# glibc's mallopt parameters (malloc.h) and the values set by `keep_freed_memory`.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 256 << 20
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process; return whether it was set.

    A CPU step allocates and frees tensors of 0.5-1.2 MB (bf16 weight copies, weight gradients,
    the input batch). By default glibc serves some of them with fresh mmaps or trims the heap
    after they are freed, and the next step faults the pages in again: 60-90 page faults a step
    at about 1.6 us each on these machines, 0.1-0.15 ms of a 4.5 ms bf16_mixed step. Allocations up
    to 32 MB from the heap and trimming only above 256 MB free stop that, at the cost of the
    process keeping its peak memory. Skipped where the user configured malloc through the
    environment (MALLOC_*_ or GLIBC_TUNABLES) and where the C library has no ``mallopt``.
    """
    if any(name in os.environ for name in MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def world_size() -> int:
    """Return the number of ranks of this job (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def build_ds_config(cfg: RunConfig, world: int) -> dict:
    """Return the ds_config of a run on ``world`` ranks."""
    parallel, precision = cfg.parallel, cfg.compute.precision
    return {
        "train_batch_size": cfg.data.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch(cfg.data.batch_size, world,
                                                      parallel.grad_accum),
        "gradient_accumulation_steps": parallel.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": parallel.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def check_ds_config(given: dict, expected: dict, path: Path) -> None:
    """Raise if a user's ds_config disagrees with the run config on what the run depends on."""
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu",
                "gradient_accumulation_steps"):
        if key in given and given[key] != expected[key]:
            raise DfaError(f"{path}: {key}={given[key]} but the run config needs {expected[key]} "
                           "(data.batch_size, parallel.grad_accum and the number of ranks)")
    for key in ("bf16", "fp16"):
        if bool(given.get(key, {}).get("enabled")) != expected[key]["enabled"]:
            raise DfaError(f"{path}: {key}.enabled disagrees with compute.precision")
    stage = given.get("zero_optimization", {}).get("stage", 0)
    if stage != expected["zero_optimization"]["stage"]:
        raise DfaError(f"{path}: zero_optimization.stage={stage} but parallel.zero_stage="
                       f"{expected['zero_optimization']['stage']}")
    if "optimizer" in given or "scheduler" in given:
        raise DfaError(f"{path}: remove 'optimizer'/'scheduler'; dfa-fast passes plain Adam and "
                       "the published LR schedule itself")


def load_ds_config(path: Optional[Path], cfg: RunConfig, world: int) -> dict:
    """Return the ds_config of a run: built from the run config, or a file checked against it."""
    expected = build_ds_config(cfg, world)
    if path is None:
        return expected
    try:
        given = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DfaError(f"{path}: cannot read the DeepSpeed config ({err})") from None
    check_ds_config(given, expected, Path(path))
    return {**expected, **given}


def initialize(model: torch.nn.Module, cfg: RunConfig, ds_config: dict):
    """Return the DeepSpeed engine of ``model`` with Adam and the run's LR schedule."""
    from datetime import timedelta

    import deepspeed
    if not torch.distributed.is_initialized():
        # A bounded timeout: if a rank dies, the others' collectives fail instead of waiting.
        deepspeed.init_distributed(timeout=timedelta(seconds=cfg.parallel.dist_timeout_s))
    # torch.optim.Adam's fused kernel (one pass over each parameter for the whole update, CPU
    # and CUDA), with a short step (`dfa_fast.optim`) where DeepSpeed steps it as given; ZeRO
    # accepts only its listed optimizer types (torch.optim.Adam itself) and steps its partitions.
    kind = Adam if cfg.parallel.zero_stage == 0 else functools.partial(torch.optim.Adam, fused=True)
    optimizer = kind(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                 functools.partial(schedule_mod.lr_factor, cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=schedule, config=ds_config)
    if engine.dp_world_size == 1 and cfg.parallel.zero_stage == 0:
        # Nothing to average over one rank: skip the flatten/all-reduce/unflatten of every step.
        engine.enable_backward_allreduce = False
    compat.short_zero_grad(engine)
    return engine


def apply_optim_config(engine, cfg: RunConfig) -> None:
    """Set the engine's learning rate, schedule base and weight decay from ``cfg.optim`` after a
    checkpoint restored the optimizer and schedule (whose saved values they would keep otherwise:
    a forced resume with a new ``optim.lr`` must train with it); returns None."""
    schedule = engine.lr_scheduler
    groups = engine.optimizer.param_groups
    lr = cfg.optim.lr * schedule_mod.lr_factor(cfg, schedule.last_epoch)
    schedule.base_lrs = [cfg.optim.lr] * len(groups)
    for group in groups:
        group.update(lr=lr, initial_lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    schedule._last_lr = [lr] * len(groups)
