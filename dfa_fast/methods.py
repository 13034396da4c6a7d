"""Vanilla, LfF and DisEnt: each builds its modules and computes ``loss, stats = step(batch, step)``
and ``logits = predict(x)`` (docs/design.md rule 1). Losses go through `dfa_fast.ops` (Triton
kernels on CUDA, the fused head on CPUs, the PyTorch reference when forced). Nothing here
synchronises with the host: statistics stay on the device, permutations are drawn on the device.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from dfa_fast import config, ops, schedule
from dfa_fast.config import RunConfig
from dfa_fast.distributed import global_swap, rank_and_world
from dfa_fast.data.loaders import Batch
from dfa_fast.ema import SampleLossEMA
from dfa_fast.kernels.reference import Linear, LossSettings, Swap
from dfa_fast.models import Classifier, DisEntModel, LfFModel


def input_dtype(precision: str) -> torch.dtype:
    """Return the dtype the networks take their input in under ``compute.precision``."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16,
            "bf16_mixed": torch.bfloat16}.get(precision, torch.float32)


class Method:
    """The common interface; ``model`` is the one module that DeepSpeed wraps."""

    name = "method"

    def __init__(self, cfg: RunConfig, num_classes: int, device: torch.device):
        self.cfg = cfg
        self.num_classes = num_classes
        self.device = device
        self.model = self.build_model().to(device)
        self.ema: Optional[SampleLossEMA] = None
        self.dtype = input_dtype(cfg.compute.precision)
        self.mixed = cfg.compute.precision == "bf16_mixed"

    def run_net(self, fn, x: torch.Tensor):
        """Return ``fn(x)`` (one output or a tuple) for a network ``fn`` in the run's precision:
        the input in `dtype`; under ``bf16_mixed`` inside bf16 autocast (fp32 weights cast per
        use, matmuls and convolutions in bf16) with the outputs back in float32, so that the
        heads, losses and EMA buffers stay float32."""
        x = x.to(self.dtype)
        if not self.mixed:
            return fn(x)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            out = fn(x)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    def build_model(self) -> nn.Module:
        """Return the method's module (all trainable parts)."""
        raise NotImplementedError

    def attach(self, train_labels: torch.Tensor, train_biases: Optional[torch.Tensor] = None
               ) -> None:
        """Give the method the labels of every training sample (the EMA methods need them) and
        their biases (for the logged weight statistics)."""

    def distribute(self, gather) -> None:
        """Run data-parallel: ``gather(index, ce_i, ce_b)`` returns the global batch's, so that
        every rank applies the same EMA update (`distributed.all_gather_batch`)."""
        if self.ema is not None:
            self.ema.gather = gather

    def log_stats(self) -> dict:
        """Return statistics of the method's state for the training log (floats; may read the
        device): the EMA methods' mean weight of aligned and of conflicting samples."""
        return self.ema.group_weights() if self.ema is not None else {}

    def step(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
        """Return the loss of one batch (scalar with gradient) and detached statistics."""
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Return the prediction logits (B, C)."""
        return self.run_net(self.model, x)

    def state_dict(self) -> dict:
        """Return the method's non-parameter state (EMA buffers), for checkpoints."""
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Restore state saved by `state_dict`."""
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


class Vanilla(Method):
    """One network, mean cross-entropy."""

    name = "vanilla"

    def build_model(self) -> nn.Module:
        return Classifier(self.cfg.model, self.num_classes)

    def step(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
        loss = ops.cross_entropy(self.run_net(self.model, batch.image), batch.label).mean()
        return loss, {"ce": loss.detach()}


class _EMAMethod(Method):
    def attach(self, train_labels: torch.Tensor, train_biases: Optional[torch.Tensor] = None
               ) -> None:
        self.ema = SampleLossEMA(train_labels, self.num_classes, self.cfg.method.ema_alpha,
                                 self.device, train_biases)

    @functools.cached_property
    def settings(self) -> LossSettings:
        """The heads' loss hyperparameters, from the method's config (built once)."""
        m = self.cfg.method
        return LossSettings(q=m.q, gce_form=m.gce_form, lambda_dis=m.lambda_dis,
                            lambda_swap_b=m.lambda_swap_b, lambda_swap=m.lambda_swap)


class LfF(_EMAMethod):
    """Learning from Failure: a GCE-trained biased network re-weights the debiased one."""

    name = "lff"

    def build_model(self) -> nn.Module:
        return LfFModel(self.cfg.model, self.num_classes)

    def step(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
        model = self.model
        logits_d, logits_b = self.run_net(lambda x: (model.debiased(x), model.biased(x)),
                                          batch.image)
        return ops.lff_head(logits_d, logits_b, batch.label, batch.index, self.ema,
                            self.settings)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_net(self.model.debiased, x)


class DisEnt(_EMAMethod):
    """Disentangled feature augmentation (docs/method.md, "One step of each method")."""

    name = "disent"

    def __init__(self, cfg: RunConfig, num_classes: int, device: torch.device):
        super().__init__(cfg, num_classes, device)
        # Permutations for the feature swap, drawn on the device; the same on every rank.
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(cfg.train.seed + 1)
        self.swap_start = schedule.swap_start(cfg)

    def build_model(self) -> nn.Module:
        return DisEntModel(self.cfg.model, self.num_classes)

    def step(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
        model = self.model
        z_i, z_b = self.run_net(model.features, batch.image)
        swap = None
        if step > self.swap_start:
            if rank_and_world()[1] > 1:  # swap across the whole global batch
                swap = Swap(*global_swap(z_b, batch.label, self.generator))
            else:
                swap = Swap(torch.randperm(len(batch), device=self.device,
                                           generator=self.generator))
        return ops.disent_head(z_i, z_b, batch.label, batch.index,
                               Linear(model.fc_i.weight, model.fc_i.bias),
                               Linear(model.fc_b.weight, model.fc_b.bias), self.ema, swap,
                               self.settings)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        # C_i over [z_i, z_b] with the classifier as in training (float32 under bf16_mixed).
        return self.model.fc_i(torch.cat(self.run_net(self.model.features, x), 1))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])


# The built-in methods; config.BUILTIN_METHODS is the one list of their names that configs accept
# (tests/test_config_sections.py keeps the two equal).
METHODS = {cls.name: cls for cls in (Vanilla, LfF, DisEnt)}


def register(cls: type, settings: Optional[dict] = None) -> type:
    """Add a `Method` subclass under ``cls.name`` (usable as a decorator): `train --method NAME`
    and every preset accept it, a preset without a ``methods:`` entry for it giving it
    ``settings`` (config sections, e.g. ``{"method": {"q": 0.8}}``) over its base (docs/design.md,
    "Where to add a method")."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or cls.name == Method.name:
        raise TypeError(f"register takes a Method subclass with its own name, not {cls!r}")
    METHODS[cls.name] = cls
    config.add_method(cls.name, settings)
    return cls


def build_method(cfg: RunConfig, num_classes: int, device: torch.device) -> Method:
    """Return the configured method with its modules on ``device``."""
    return METHODS[cfg.method.name](cfg, num_classes, device)
