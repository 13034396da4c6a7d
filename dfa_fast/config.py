"""Run configuration: a dataclass tree, YAML presets for every published setting, overrides.

A run is resolved as: preset base <- method section <- ratio section <- (method, ratio) section <-
``--set section.key=value`` overrides. Unknown keys and bad values are errors that name the key and
what was expected. The resolved config is saved in every run directory (`config.yaml`).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from dfa_fast.errors import DfaError
from dfa_fast.kernels.reference import GCE_FORMS

DATASETS = ("cmnist", "cifar10c", "bffhq")
# The method names a config accepts: the built-in ones, and those `methods.register` adds (with the
# preset settings they get where a preset does not name them: `EXTRA_METHODS`).
METHODS = ["vanilla", "lff", "disent"]
EXTRA_METHODS: dict[str, dict] = {}


def add_method(name: str, settings: Optional[dict] = None) -> None:
    """Accept the method ``name`` in configs; a preset without a ``methods:`` entry for it gives
    it ``settings`` (config sections over the preset's base; by default none)."""
    if name not in METHODS:
        METHODS.append(name)
    EXTRA_METHODS[name] = settings or {}
SCHEDULES = ("step", "cosine", "linear")
PRESETS = Path(__file__).parent / "presets"


def _choice(name: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise DfaError(f"{name}={value!r} is not valid; expected one of {options}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise DfaError(f"{name}={value!r} is not valid; expected a {'non-negative' if allow_zero else 'positive'} number")


TRAIN_ORDERS = ("random", "quasi_random")  # FFCV's orders for training (data.order)


@dataclass
class DataConfig:
    """Which prepared split to read and how batches are made."""
    dataset: str = "cmnist"       # cmnist | cifar10c | bffhq (a faces set built from UTKFace is bffhq)
    path: str = ""                # ratio folder with train/valid/test .beton (set by --data)
    ratio_pct: float = 1.0        # bias-conflicting percentage of the training split
    batch_size: int = 256         # images per optimizer step, all ranks together
    eval_batch_size: int = 1024   # images per evaluation batch and rank
    num_workers: int = 1          # FFCV decoding threads (clamped to the usable cores)
    loader_process: bool = True   # CPU runs: the train loader in a child process (no GIL contention)
    order: str = "random"         # random | quasi_random (single process only)
    crop_padding: int = 0         # random crop with this zero padding (0 = no crop)
    flip: bool = False            # random horizontal flip
    resize: int = 0               # resize to resize x resize first (0 = keep)
    normalize: str = "none"       # none (pixels in [0, 1]) | cifar (mean/std: docs/method.md)
    channels_last: bool = False   # NHWC memory format for convolutions
    valid_split: str = "valid"    # split used for model selection
    test_split: str = "test"      # split reported as test

    def __post_init__(self):
        _choice("data.dataset", self.dataset, DATASETS)
        _choice("data.order", self.order, TRAIN_ORDERS)
        _choice("data.normalize", self.normalize, ("none", "cifar"))
        for name in ("batch_size", "eval_batch_size"):
            _positive(f"data.{name}", getattr(self, name))
        _positive("data.ratio_pct", self.ratio_pct)
        _positive("data.crop_padding", self.crop_padding, allow_zero=True)
        _positive("data.resize", self.resize, allow_zero=True)


@dataclass
class ModelConfig:
    """The encoders (docs/method.md, "Models")."""
    arch: str = "mlp"             # mlp (Colored MNIST) | resnet18
    input_scale: float = 1.0      # multiplies the [0, 1] pixels; 1/255 reproduces the reference MLP
    stem: str = "imagenet"        # resnet18 stem: imagenet (7x7 + max-pool, published) | cifar (3x3)

    def __post_init__(self):
        _choice("model.arch", self.arch, ("mlp", "resnet18"))
        _choice("model.stem", self.stem, ("imagenet", "cifar"))
        _positive("model.input_scale", self.input_scale)


@dataclass
class MethodConfig:
    """The training method and its loss hyperparameters (docs/method.md, "Losses")."""
    name: str = "disent"          # vanilla | lff | disent
    q: float = 0.7                # GCE exponent
    ema_alpha: float = 0.7        # per-sample loss EMA decay
    gce_form: str = "reference"   # reference (extra factor q, published) | textbook
    lambda_dis: float = 10.0      # weight of the bias branch's GCE in L_dis
    lambda_swap_b: float = 10.0   # weight of the swapped bias branch's GCE in L_swap
    lambda_swap: float = 1.0      # weight of L_swap
    swap_start: int = 10000       # feature swapping from steps strictly greater than this

    def __post_init__(self):
        _choice("method.name", self.name, tuple(METHODS))
        _choice("method.gce_form", self.gce_form, GCE_FORMS)
        if not 0 < self.q <= 1:
            raise DfaError(f"method.q={self.q!r} is not valid; expected 0 < q <= 1")
        if not 0 <= self.ema_alpha < 1:
            raise DfaError(f"method.ema_alpha={self.ema_alpha!r} is not valid; expected 0 <= alpha < 1")
        for name in ("lambda_dis", "lambda_swap_b", "lambda_swap", "swap_start"):
            _positive(f"method.{name}", getattr(self, name), allow_zero=True)


@dataclass
class OptimConfig:
    """Adam (plain, weight decay 0 in the published runs) and the delayed step decay."""
    lr: float = 1e-2
    weight_decay: float = 0.0     # L2 added to the gradient (Adam), not decoupled (AdamW)
    lr_decay: bool = False        # step decay by lr_gamma every lr_decay_step steps ...
    lr_gamma: float = 0.5
    lr_decay_step: int = 10000
    lr_decay_start: int = 10000   # ... counted from this step (first decay at start + step)
    grad_clip: float = 0.0        # global gradient-norm clipping (0 = off)
    # step (the delayed step decay above, when lr_decay) | cosine | linear (to lr_min_factor over
    # the steps after the warm-up); see dfa_fast/schedule.py
    schedule: str = "step"
    warmup_steps: int = 0         # linear warm-up of the learning rate over these steps (any schedule)
    lr_min_factor: float = 0.0    # cosine and linear end at lr x this

    def __post_init__(self):
        _positive("optim.lr", self.lr)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optim.lr_gamma", self.lr_gamma)
        _positive("optim.lr_decay_step", self.lr_decay_step)
        _positive("optim.lr_decay_start", self.lr_decay_start, allow_zero=True)
        _positive("optim.grad_clip", self.grad_clip, allow_zero=True)
        _choice("optim.schedule", self.schedule, SCHEDULES)
        _positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        if not 0 <= self.lr_min_factor <= 1:
            raise DfaError(f"optim.lr_min_factor={self.lr_min_factor!r} is not valid; expected a "
                           "number in [0, 1]")
        if self.lr_decay and self.schedule != "step":
            raise DfaError(f"optim.lr_decay=true is the step schedule's decay; with "
                           f"optim.schedule={self.schedule} expected optim.lr_decay=false")


PRECISIONS = ("fp32", "bf16", "fp16", "bf16_mixed", "auto")


@dataclass
class TrainConfig:
    """The loop: length, evaluation and logging cadence, device, precision, parallelism."""
    steps: int = 50000
    seed: int = 0
    eval_every: int = 500         # evaluate valid and test every this many steps (and at the end)
    log_every: int = 100          # read device metrics and write a metrics line this often
    ckpt_every: int = 5000        # checkpoint this often (and at the end)
    # The run length that method.swap_start, optim.warmup_steps and optim.lr_decay_* are written
    # for; they are scaled by steps / schedule_length (0 = taken as written). dfa_fast/schedule.py
    schedule_length: int = 0
    preset: str = ""              # the preset the config was resolved from (for `report`)
    device: str = "auto"          # auto | cpu | cuda
    threads: int = 1              # torch CPU threads per process
    flush_denormal: bool = True   # flush subnormal floats to zero on the CPU (see trainer.py)
    # fp32 | bf16 (DeepSpeed: bf16 weights, fp32 master copy) | fp16 (GPU) | bf16_mixed (fp32
    # weights and Adam; the networks' layers in bf16 through torch.autocast, losses in fp32) |
    # auto (bf16_mixed where the device multiplies bf16 natively, else fp32; the run saves which)
    precision: str = "fp32"
    zero_stage: int = 0           # DeepSpeed ZeRO stage 0, 1 or 2
    grad_accum: int = 1           # micro-batches per optimizer step and rank
    report_metric: str = "unbiased"  # test metric of the tables: unbiased | conflicting (BFFHQ)
    dist_timeout_s: int = 300     # a collective waiting longer fails (a rank died): no hang
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "eval_every", "log_every", "ckpt_every", "threads", "grad_accum",
                     "dist_timeout_s"):
            _positive(f"train.{name}", getattr(self, name))
        _positive("train.schedule_length", self.schedule_length, allow_zero=True)
        _choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _choice("train.precision", self.precision, PRECISIONS)
        _choice("train.zero_stage", self.zero_stage, (0, 1, 2))
        _choice("train.report_metric", self.report_metric, ("unbiased", "conflicting"))


@dataclass
class RunConfig:
    """Everything that defines a run."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        """Return the config as plain nested dicts."""
        return dataclasses.asdict(self)


# Fields that may differ when a run is resumed: how long it runs, how it is displayed, and
# whether the CPU loader runs in a child process.
RESUMABLE_CHANGES = {("train", "steps"), ("train", "progress"), ("train", "tensorboard"),
                     ("data", "loader_process")}  # the same batches either way


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Return ``value`` as the field type ``kind``, or raise naming the key."""
    if typing.get_origin(kind) is typing.Union:  # Optional[...]
        inner = [k for k in typing.get_args(kind) if k is not type(None)][0]
        return None if value is None else _coerce(key, value, inner)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    article = "an" if kind.__name__[0] in "aeiou" else "a"
    raise DfaError(f"{key}={value!r} is not valid; expected {article} {kind.__name__}")


def _merge(base: dict, update: dict, where: str) -> dict:
    merged = dict(base)
    for section, values in (update or {}).items():
        if not isinstance(values, dict):
            raise DfaError(f"{where}: section {section!r} must be a mapping of keys to values")
        merged[section] = {**merged.get(section, {}), **values}
    return merged


def check_keys(data: dict, where: str) -> dict:
    """Raise on an unknown section or key of nested config dicts; return RunConfig's type hints."""
    hints = typing.get_type_hints(RunConfig)
    for section, values in data.items():
        if section not in hints:
            raise DfaError(f"{where}: unknown config section {section!r}; expected one of "
                           f"{tuple(hints)}")
        if values is not None and not isinstance(values, dict):
            raise DfaError(f"{where}: section {section!r} must be a mapping of keys to values")
        fields = typing.get_type_hints(hints[section])
        for key in values or {}:
            if key not in fields:
                raise DfaError(f"{where}: unknown config key {section}.{key}; expected one of "
                               f"{', '.join(fields)}")
    return hints


def from_dict(data: dict, where: str = "config") -> RunConfig:
    """Return the RunConfig of nested dicts; unknown sections/keys and bad values are errors."""
    hints = check_keys(data, where)
    sections = {}
    for section, values in data.items():
        fields = typing.get_type_hints(hints[section])
        sections[section] = hints[section](**{k: _coerce(f"{section}.{k}", v, fields[k])
                                              for k, v in (values or {}).items()})
    return RunConfig(**sections)


def parse_overrides(items: list[str]) -> dict:
    """Return nested dicts from ``section.key=value`` strings (values parsed as YAML scalars)."""
    result: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise DfaError(f"override {item!r} is not section.key=value (e.g. optim.lr=1e-3)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        result.setdefault(section, {})[name] = value
    return result


def available_presets() -> list[str]:
    """Return the names of the bundled presets (the published ones and the fast ones)."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_preset(name: str) -> dict:
    """Return a bundled preset file as dicts (sections base, methods, ratios, overrides).

    A preset with ``extends: PARENT`` is its parent with the child's base, method and ratio
    sections merged over the parent's, key by key."""
    if name not in available_presets():
        raise DfaError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
    spec = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())
    parent = spec.pop("extends", None)
    if parent is None:
        return spec
    base = load_preset(parent)
    merged = {"base": _merge(base.get("base", {}), spec.get("base", {}), name)}
    for part in ("methods", "ratios"):
        ours, theirs = spec.get(part, {}), base.get(part, {})
        merged[part] = {k: _merge(theirs.get(k, {}), ours.get(k, {}), name)
                        for k in {**theirs, **ours}}
    merged["overrides"] = {**base.get("overrides", {}), **spec.get("overrides", {})}
    return merged


def ratio_key(ratio_pct: float) -> str:
    """Return the preset key of a percentage (1.0 -> "1", 0.5 -> "0.5")."""
    return f"{float(ratio_pct):g}"


def check_selection(preset: str, ratio_pct: float, method: str) -> dict:
    """Return the preset's spec after checking it has ``ratio_pct`` and ``method`` (errors list the
    available ones)."""
    spec = load_preset(preset)
    ratios = spec.get("ratios", {})
    key = ratio_key(ratio_pct)
    if key not in ratios:
        raise DfaError(f"preset {preset} has no ratio {key}%; available: "
                       f"{', '.join(ratios)}")
    methods = {**EXTRA_METHODS, **spec.get("methods", {})}
    if method not in methods:
        raise DfaError(f"preset {preset} has no method {method!r}; available: "
                       f"{', '.join(methods)}")
    return {**spec, "methods": methods}


def resolve(preset: str, ratio_pct: float, method: str,
            overrides: Optional[dict] = None) -> RunConfig:
    """Return the config of (preset, ratio, method) with ``overrides`` applied on top."""
    spec = check_selection(preset, ratio_pct, method)
    ratios, key = spec["ratios"], ratio_key(ratio_pct)
    check_keys(overrides or {}, "--set")
    merged = _merge(spec.get("base", {}), spec["methods"][method], preset)
    merged = _merge(merged, ratios[key], preset)
    merged = _merge(merged, spec.get("overrides", {}).get(method, {}).get(key, {}), preset)
    merged = _merge(merged, {"data": {"ratio_pct": float(ratio_pct)},
                             "method": {"name": method}, "train": {"preset": preset}}, preset)
    merged = _merge(merged, overrides or {}, "--set")
    return from_dict(merged, where=f"preset {preset}")


def save(cfg: RunConfig, path) -> None:
    """Write the resolved config as YAML; returns None."""
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load(path) -> RunConfig:
    """Return the config saved in a run directory."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise DfaError(f"{path}: cannot read the run config ({err})") from None
    return from_dict(data, where=str(path))


def differences(old: RunConfig, new: RunConfig) -> list[str]:
    """Return "section.key: old -> new" for every field that differs and may not change on resume."""
    changes = []
    for section, values in old.to_dict().items():
        for key, value in values.items():
            other = new.to_dict()[section][key]
            if value != other and (section, key) not in RESUMABLE_CHANGES:
                changes.append(f"{section}.{key}: {value!r} -> {other!r}")
    return changes
