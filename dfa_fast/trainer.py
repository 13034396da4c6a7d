"""The one training loop for every method, on a DeepSpeed engine, from one CPU core to many GPUs.

    dfa-fast train --preset cmnist --ratio 1 --method disent --data data/cmnist --out runs/c1
    deepspeed --num_gpus 8 --module dfa_fast train --preset bffhq --ratio 0.5 ...   (several GPUs)

Per step: next batch (FFCV, on the device) -> ``method.step`` -> ``engine.backward`` ->
``engine.step`` (Adam + LR schedule). Statistics accumulate on the device and are read every
``log_every`` steps (the only host synchronisation besides evaluation and checkpoints). Every
``eval_every`` steps and at the end: valid and test metrics; the model is selected on valid
unbiased accuracy; the maximum test number is kept as the "paper protocol". Rank 0 writes
``metrics.jsonl``, ``summary.json`` and the progress bar; checkpoints hold everything a resume needs.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dfa_fast import config as config_mod
from dfa_fast import schedule
from dfa_fast.config import RunConfig
from dfa_fast.data.augment import CIFAR_MEAN, CIFAR_STD, ImageTransform
from dfa_fast.data.beton import load_sidecar, read_int_field, write_json_atomic
from dfa_fast.data.info import thin_cell_note
from dfa_fast.data.loaders import make_eval_loader, make_train_loader
from dfa_fast.data.process_loader import load_in_child
from dfa_fast.data.splits import ratio_tag
from dfa_fast.distributed import all_gather_batch, average_over_ranks, rank_and_world
from dfa_fast.engine import (apply_optim_config, initialize, load_ds_config, prepare_environment,
                             resolve_device, world_size)
from dfa_fast.environment import machine, native_bf16, resolve_precision, versions
from dfa_fast.errors import DfaError
from dfa_fast.evaluate import evaluate
from dfa_fast.methods import build_method, input_dtype
from dfa_fast.run_dir import (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, Checkpoints, Record,
                              rng_state, set_rng_state)

# Data sets a preset accepts (a faces set built from UTKFace stands in for BFFHQ).
DATASET_SOURCES = {"cmnist": ("cmnist",), "cifar10c": ("cifar10c",), "bffhq": ("bffhq", "faces")}


def resolve_data_dir(data: Path, ratio_pct: float) -> Path:
    """Return the folder holding train/valid/test.beton: ``data`` itself or ``data/<ratio>pct``."""
    for candidate in (data, data / ratio_tag(ratio_pct / 100)):
        if (candidate / "train.beton").is_file():
            return candidate
    raise DfaError(f"{data}: no train.beton here or in {ratio_tag(ratio_pct / 100)}/; expected "
                   "the output of `dfa-fast prepare` (e.g. data/cmnist or data/cmnist/1pct)")


def check_data(cfg: RunConfig) -> dict[str, dict]:
    """Return the sidecars of the splits a run reads, after checking they fit the config."""
    folder = Path(cfg.data.path)
    metas = {}
    for split in ("train", cfg.data.valid_split, cfg.data.test_split):
        meta = load_sidecar(folder / f"{split}.beton")
        if meta.get("dataset") not in DATASET_SOURCES[cfg.data.dataset]:
            raise DfaError(f"{folder / split}.beton holds data set {meta.get('dataset')!r}, but "
                           f"the run is for {cfg.data.dataset} (expected one of "
                           f"{DATASET_SOURCES[cfg.data.dataset]})")
        metas[split] = meta
    ratio = metas["train"].get("ratio")
    if ratio is not None and abs(ratio * 100 - cfg.data.ratio_pct) > 0.05 * cfg.data.ratio_pct:
        raise DfaError(f"{folder}/train.beton has {ratio * 100:g}% bias-conflicting samples but "
                       f"the run is for {cfg.data.ratio_pct:g}%; pass the matching --ratio/--data")
    return metas


def build_transform(cfg: RunConfig) -> ImageTransform:
    """Return the on-device image preparation of the config (augmentation in training only)."""
    d = cfg.data
    normal = (CIFAR_MEAN, CIFAR_STD) if d.normalize == "cifar" else (None, None)
    return ImageTransform(cfg.model.input_scale / 255.0, *normal, resize=d.resize or None,
                          crop_padding=d.crop_padding, flip=d.flip,
                          channels_last=d.channels_last,
                          dtype=input_dtype(cfg.compute.precision))


def environment_info(device: torch.device) -> dict:
    """Return the machine, library versions and the run's device and threads."""
    return {**machine(), **versions(), "torch_threads": torch.get_num_threads(),
            "device": str(device)}


class Trainer:
    """Builds a run (data, method, engine) and runs its loop; see the module docstring."""

    def __init__(self, cfg: Optional[RunConfig], run_dir: Path, *, resume: bool = False,
                 force: bool = False, ds_config: Optional[Path] = None, restore: bool = True):
        """``resume`` continues the run in ``run_dir`` (config from there unless ``cfg`` is given);
        ``restore=False`` only rebuilds it (for evaluation) without touching its files."""
        self.run_dir = Path(run_dir)
        if resume:
            cfg = self._resume_config(cfg, force)
        elif (self.run_dir / CONFIG_FILE).exists():
            raise DfaError(f"{self.run_dir} already holds a run; pass --resume {self.run_dir} to "
                           "continue it, or another --out")
        self.cfg = cfg
        t, compute = cfg.train, cfg.compute
        torch.set_num_threads(cfg.cpu.threads)
        # Subnormal floats (Adam's second moments of the tiny gradients that the reference's
        # [0, 1/255] inputs give) make x86 arithmetic up to 2x slower as a run goes on; flushing
        # them to zero changes no result above 1e-38.
        torch.set_flush_denormal(cfg.cpu.flush_denormal)
        self.device = resolve_device(compute.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        prepare_environment(self.device)
        compute.precision = resolve_precision(compute.precision, self.device)  # saved resolved
        # The checks across keys again, now with the job's ranks and the resolved device.
        config_mod.validate(cfg, world_size=world_size(), device_type=self.device.type)
        if (self.device.type == "cpu" and compute.precision in ("bf16", "bf16_mixed")
                and not native_bf16()):
            warnings.warn(f"compute.precision={compute.precision} on a CPU without native bf16 "
                          "(AVX-512 or Arm BF16): its bf16 products are emulated, up to 10x "
                          "slower than fp32; compute.precision=auto picks fp32 there")
        self.metas = check_data(cfg)
        for seed_fn in (torch.manual_seed, np.random.seed, random.seed):
            seed_fn(t.seed)

        train_meta = self.metas["train"]
        self.num_classes, self.num_biases = train_meta["num_classes"], train_meta["num_biases"]
        self.method = build_method(cfg, self.num_classes, self.device)
        folder = Path(cfg.data.path)
        self.method.attach(*(torch.from_numpy(read_int_field(folder / "train.beton", field).copy())
                             for field in ("label", "bias")))
        self.engine = initialize(self.method.model, cfg, load_ds_config(ds_config, cfg,
                                                                        world_size()))
        self.rank, self.world = rank_and_world()
        self.is_main = self.rank == 0
        thin = thin_cell_note(self.metas[cfg.data.valid_split]["counts"])
        if thin and self.is_main:
            print(f"dfa-fast: warning: {folder / cfg.data.valid_split}.beton: {thin}; the "
                  "valid-selected checkpoint rests on them (docs/data.md)", file=sys.stderr)
        if self.world > 1:
            self.method.distribute(all_gather_batch)

        transform = build_transform(cfg)
        micro = config_mod.micro_batch(cfg.data.batch_size, self.world, cfg.parallel.grad_accum)
        self.train_loader = make_train_loader(folder / "train.beton", micro, seed=t.seed,
                                              device=self.device, order=cfg.data.order,
                                              distributed=self.world > 1, transform=transform,
                                              num_workers=cfg.data.num_workers)
        if cfg.data.loader_process:
            self.train_loader = load_in_child(self.train_loader)
        self.eval_loaders = {name: split_loader(self, split, transform) for name, split in
                             (("valid", cfg.data.valid_split), ("test", cfg.data.test_split))}
        self.record = Record(t.report_metric)
        self.checkpoints = Checkpoints(self.run_dir, self.rank)
        self.start_step = 0
        self.wall_before = 0.0
        # Device sums of the step statistics since the last log line (saved with checkpoints so
        # that a resumed run logs exactly what an uninterrupted one does).
        self.stat_sums: dict[str, torch.Tensor] = {}
        self.stat_count = 0
        if self.is_main and restore:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            config_mod.save(cfg, self.run_dir / CONFIG_FILE)
        if resume and restore:
            self._restore()

    # ------------------------------------------------------------------------------ resume
    def _resume_config(self, cfg: Optional[RunConfig], force: bool) -> RunConfig:
        saved_path = self.run_dir / CONFIG_FILE
        if not saved_path.is_file():
            raise DfaError(f"{self.run_dir}: no {CONFIG_FILE}; expected a run directory written "
                           "by `dfa-fast train`")
        saved = config_mod.load(saved_path)
        if cfg is None:
            return saved
        changes = config_mod.differences(saved, cfg)
        if cfg.train.steps != saved.train.steps and schedule.depends_on_length(cfg):
            warnings.warn(f"train.steps {saved.train.steps} -> {cfg.train.steps} moves this run's "
                          "schedule (optim.schedule or train.schedule_length depend on the run "
                          "length): the resumed steps follow the new length")
        if changes and not force:
            raise DfaError(f"resuming {self.run_dir} with a different config ({'; '.join(changes)})"
                           "; pass --force to resume anyway")
        return cfg

    def _restore(self) -> None:
        if self.checkpoints.rewind() is None:
            # Stopped before its first checkpoint: nothing to continue, so the run starts over
            # (everything was built from the seed exactly as for a new run).
            if self.is_main:
                print(f"dfa-fast: {self.run_dir} has no checkpoint yet; starting it over from "
                      "step 0", file=sys.stderr)
        else:
            client = self.checkpoints.load(self.engine, "latest")
            self.start_step = client["step"]
            self.method.load_state_dict(client["method"])
            self.train_loader.load_state_dict(client["loader"])
            set_rng_state(client["rng"])
            self.record.load_state_dict(client["record"])
            self.wall_before = client.get("wall_seconds", 0.0)
            self.stat_sums = {k: v.to(self.device) for k, v in client["stat_sums"].items()}
            self.stat_count = client["stat_count"]
            self.checkpoints.session = client.get("session", 0) + 1
            # The optimizer state came from the checkpoint; its learning rate and weight decay
            # follow the run's config (which a forced resume may have changed).
            apply_optim_config(self.engine, self.cfg)
        if self.is_main:  # drop metrics logged after the checkpoint: they will be logged again
            path = self.run_dir / METRICS_FILE
            if path.is_file():
                kept = [line for line in path.read_text().splitlines()
                        if json.loads(line)["step"] < self.start_step]
                path.write_text("".join(line + "\n" for line in kept))

    # -------------------------------------------------------------------------------- loop
    def _client_state(self, step: int, wall: float) -> dict:
        return {"step": step, "method": self.method.state_dict(),
                "loader": self.train_loader.state_dict(),
                "rng": rng_state(), "record": self.record.state_dict(),
                "wall_seconds": wall, "stat_count": self.stat_count,
                "session": self.checkpoints.session,
                "stat_sums": {k: v.cpu() for k, v in self.stat_sums.items()}}

    def _log(self, entry: dict) -> None:
        if self.is_main:
            with open(self.run_dir / METRICS_FILE, "a") as handle:
                handle.write(json.dumps(entry) + "\n")

    def _evaluate(self, step: int) -> bool:
        results = {name: evaluate(self.method, loader, self.num_classes, self.num_biases)
                   for name, loader in self.eval_loaders.items()}
        self._log({"kind": "eval", "step": step, **results})
        return self.record.add(step, results["valid"], results["test"])

    def run(self) -> dict:
        """Train from the current step to ``train.steps``; return the summary."""
        from tqdm import tqdm
        t = self.cfg.train
        engine, method = self.engine, self.method
        stream = self.train_loader.stream()
        sums = self.stat_sums
        first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        # Timing of the current log window; evaluation time is taken out of it.
        window = {"start": time.perf_counter(), "data": 0.0, "steps": 0, "eval": 0.0}
        wall_start = time.perf_counter()
        last_valid = float("nan")
        bar = tqdm(total=t.steps, initial=self.start_step, disable=not (t.progress and self.is_main),
                   unit="step", dynamic_ncols=True)
        writer = self._tensorboard() if t.tensorboard and self.is_main else None
        step = self.start_step
        # DeepSpeed divides the loss by the accumulation steps; by 1 that is a no-op autograd node.
        scale = self.cfg.parallel.grad_accum > 1
        try:
            for step in range(self.start_step, t.steps):
                finite = None  # every micro-batch's loss finite (one device tensor, no sync)
                for _ in range(self.cfg.parallel.grad_accum):
                    before = time.perf_counter()
                    batch = next(stream)
                    window["data"] += time.perf_counter() - before
                    loss, stats = method.step(batch, step)
                    engine.backward(loss, scale_wrt_gas=scale)
                    engine.step()
                    stats["loss"] = loss.detach()
                    for key, value in stats.items():
                        sums[key] = sums.get(key, 0) + value.float()
                    self.stat_count += 1
                    ok = torch.isfinite(stats["loss"])
                    finite = ok if finite is None else finite & ok
                first_bad = torch.where(finite | (first_bad >= 0), first_bad, step)
                window["steps"] += 1
                bar.update(1)
                done = step + 1
                if done % t.log_every == 0 or done == t.steps:
                    entry = self._flush(step, window, first_bad)
                    bar.set_postfix(img_s=f"{entry['images_per_s']:.0f}",
                                    loss=f"{entry['loss']:.4f}", valid=f"{last_valid:.2f}")
                    if writer:
                        for key, value in entry.items():
                            if isinstance(value, (int, float)) and key != "step":
                                writer.add_scalar(f"train/{key}", value, step)
                if step % t.eval_every == 0 or done == t.steps:
                    eval_start = time.perf_counter()
                    improved = self._evaluate(step)
                    last_valid = self.record.final["valid"]["unbiased"]
                    if writer:
                        for split in ("valid", "test"):
                            for key, value in self.record.final[split].items():
                                writer.add_scalar(f"{split}/{key}", value, step)
                    if improved:
                        self._check_finite(first_bad)
                        self._save("best", done, wall_start)
                    window["eval"] += time.perf_counter() - eval_start
                if done % t.ckpt_every == 0 or done == t.steps:
                    self._check_finite(first_bad)
                    self._save("latest", done, wall_start)
        finally:
            self.train_loader.close()
            bar.close()
            if writer:
                writer.close()
        return self._summary(wall_start)

    def _save(self, name: str, done: int, wall_start: float) -> None:
        wall = self.wall_before + time.perf_counter() - wall_start
        self.checkpoints.save(self.engine, name, done, self._client_state(done, wall))

    def _check_finite(self, first_bad: torch.Tensor) -> None:
        # The earliest bad step over all ranks, so that every rank stops together.
        never = torch.iinfo(torch.int64).max
        bad = torch.where(first_bad < 0, never, first_bad)
        if self.world > 1:
            bad = bad.clone()
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
        bad = int(bad) if int(bad) != never else -1
        if bad >= 0:
            last = self.checkpoints.pointer("latest")
            kept = f"the last good checkpoint is step {last['step']}" if last else \
                "no checkpoint was written yet"
            raise DfaError(f"the loss became NaN or infinite at step {bad}; training stopped "
                           f"({kept}). Lower optim.lr or check the data")

    def _flush(self, step: int, window: dict, first_bad: torch.Tensor) -> dict:
        """Read the window's device statistics (one sync), log them and return the entry."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._check_finite(first_bad)
        elapsed = time.perf_counter() - window["start"] - window["eval"]
        steps = max(window["steps"], 1)
        names = sorted(self.stat_sums)
        means = average_over_ranks(torch.stack([self.stat_sums[k] for k in names])
                                   / self.stat_count).tolist() if names else []
        entry = {"kind": "train", "step": step, **dict(zip(names, means)),
                 "lr": self.engine.get_lr()[0],
                 "images_per_s": steps * self.cfg.data.batch_size / elapsed,
                 "data_share": window["data"] / elapsed,
                 "step_ms": 1000 * elapsed / steps, **self.method.log_stats()}
        if self.device.type == "cuda":
            entry["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        self._log(entry)
        self.stat_sums.clear()
        self.stat_count = 0
        window.update(start=time.perf_counter(), data=0.0, steps=0, eval=0.0)
        return entry

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise DfaError("train.tensorboard=true needs the tensorboard package "
                           "(pip install tensorboard)") from None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _summary(self, wall_start: float) -> dict:
        wall = self.wall_before + time.perf_counter() - wall_start
        train_lines = []
        if self.is_main and (self.run_dir / METRICS_FILE).is_file():
            train_lines = [e for e in map(json.loads,
                                          (self.run_dir / METRICS_FILE).read_text().splitlines())
                           if e["kind"] == "train"]
        cfg = self.cfg

        def mean(key):
            values = [e[key] for e in train_lines if key in e]
            return float(np.mean(values)) if values else float("nan")
        summary = {
            "dataset": cfg.data.dataset, "ratio_pct": cfg.data.ratio_pct,
            "method": cfg.method.name, "seed": cfg.train.seed, "steps": cfg.train.steps,
            "report_metric": cfg.train.report_metric,
            "selected": self.record.selected, "paper_protocol": self.record.paper,
            "final": self.record.final,
            "throughput": {"images_per_s": mean("images_per_s"), "data_share": mean("data_share"),
                           "step_ms": mean("step_ms")},
            "wall_seconds": wall, "world_size": self.world,
            "environment": environment_info(self.device),
        }
        if self.is_main:
            write_json_atomic(self.run_dir / SUMMARY_FILE, summary)
        return summary


def load_run(run_dir: Path, checkpoint: str = "best") -> "Trainer":
    """Return the trainer of a finished or interrupted run with ``checkpoint`` (best | latest) loaded."""
    trainer = Trainer(None, run_dir, resume=True, restore=False)
    trainer.checkpoints.load(trainer.engine, checkpoint)
    return trainer


def split_loader(trainer: "Trainer", split: str, transform: Optional[ImageTransform] = None):
    """Return the sequential (sharded when distributed) loader of a prepared split of the run,
    with the run's image preparation (``transform``, built from the config if not given)."""
    cfg = trainer.cfg
    return make_eval_loader(Path(cfg.data.path) / f"{split}.beton", cfg.data.eval_batch_size,
                            device=trainer.device, distributed=trainer.world > 1,
                            transform=build_transform(cfg) if transform is None else transform,
                            num_workers=cfg.data.num_workers)


def evaluate_run(run_dir: Path, splits: list[str], checkpoint: str = "best") -> dict:
    """Return {split: metrics} of a run's checkpoint (``best`` or ``latest``) on prepared splits."""
    trainer = load_run(run_dir, checkpoint)
    return {split: evaluate(trainer.method, split_loader(trainer, split), trainer.num_classes,
                            trainer.num_biases) for split in splits}


def headline(summary: dict) -> dict[str, float]:
    """Return the three test numbers of a run: valid-selected, paper protocol, final."""
    metric = summary["report_metric"]
    return {name: summary[key]["test"][metric] if summary.get(key) else math.nan
            for name, key in (("selected", "selected"), ("paper_protocol", "paper_protocol"),
                              ("final", "final"))}


def train(cfg: Optional[RunConfig], run_dir: Path, *, resume: bool = False, force: bool = False,
          ds_config: Optional[Path] = None) -> dict:
    """Train a run (or resume one) and return its summary."""
    return Trainer(cfg, run_dir, resume=resume, force=force, ds_config=ds_config).run()

