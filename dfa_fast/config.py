"""Run configuration: a dataclass tree, YAML presets for every published setting, overrides.

A run is resolved as: preset base <- method section <- ratio section <- (method, ratio) section <-
``--set section.key=value`` overrides. Unknown keys and bad values are errors that name the key and
what was expected; checks across keys are `validate`'s. The resolved config is saved in every run
directory (`config.yaml`).

Sections: ``data``, ``model``, ``method``, ``optim``, ``train`` (the loop), ``compute`` (device and
number format), ``parallel`` (data parallelism) and ``cpu`` (CPU tuning). The keys that moved out
of ``train`` when it was split (`MOVED_KEYS`) are still read under their old names, from saved runs,
presets and ``--set`` alike (`translate`).
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

# The choices of every key that has a fixed list: defined here once, used everywhere.
DATASETS = ("cmnist", "cifar10c", "bffhq")
# The built-in methods (dfa_fast/methods.py implements exactly these).
BUILTIN_METHODS = ("vanilla", "lff", "disent")
# The method names a config accepts: the built-in ones, and those `methods.register` adds (with the
# preset settings they get where a preset does not name them: `EXTRA_METHODS`).
METHODS = list(BUILTIN_METHODS)
EXTRA_METHODS: dict[str, dict] = {}
TRAIN_ORDERS = ("random", "quasi_random")  # FFCV's orders for training (data.order)
NORMALIZATIONS = ("none", "cifar")
ARCHS = ("mlp", "resnet18")
STEMS = ("imagenet", "cifar")
SCHEDULES = ("step", "cosine", "linear")
REPORT_METRICS = ("unbiased", "conflicting")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16", "bf16_mixed", "auto")
ZERO_STAGES = (0, 1, 2)
# (method.gce_form's GCE_FORMS is the kernels' reference definition, imported above.)
PRESETS = Path(__file__).parent / "presets"


def add_method(name: str, settings: Optional[dict] = None) -> None:
    """Accept the method ``name`` in configs; a preset without a ``methods:`` entry for it gives
    it ``settings`` (config sections over the preset's base; by default none)."""
    if name not in METHODS:
        METHODS.append(name)
    EXTRA_METHODS[name] = settings or {}


def _choice(name: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise DfaError(f"{name}={value!r} is not valid; expected one of {options}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise DfaError(f"{name}={value!r} is not valid; expected a {'non-negative' if allow_zero else 'positive'} number")



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
    order: str = "random"         # random | quasi_random (one rank only)
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
        _choice("data.normalize", self.normalize, NORMALIZATIONS)
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
        _choice("model.arch", self.arch, ARCHS)
        _choice("model.stem", self.stem, STEMS)
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


@dataclass
class TrainConfig:
    """The loop: length, seed, evaluation, logging and checkpoint cadence, what is reported."""
    steps: int = 50000
    seed: int = 0
    eval_every: int = 500         # evaluate valid and test every this many steps (and at the end)
    log_every: int = 100          # read device metrics and write a metrics line this often
    ckpt_every: int = 5000        # checkpoint this often (and at the end)
    # The run length that method.swap_start, optim.warmup_steps and optim.lr_decay_* are written
    # for; they are scaled by steps / schedule_length (0 = taken as written). dfa_fast/schedule.py
    schedule_length: int = 0
    preset: str = ""              # the preset the config was resolved from (for `report`)
    report_metric: str = "unbiased"  # test metric of the tables: unbiased | conflicting (BFFHQ)
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "eval_every", "log_every", "ckpt_every"):
            _positive(f"train.{name}", getattr(self, name))
        _positive("train.schedule_length", self.schedule_length, allow_zero=True)
        _choice("train.report_metric", self.report_metric, REPORT_METRICS)


@dataclass
class ComputeConfig:
    """Where a run computes and in which number format."""
    device: str = "auto"          # auto (this rank's GPU if there is one, else the CPU) | cpu | cuda
    # fp32 | bf16 (DeepSpeed: bf16 weights, fp32 master copy) | fp16 (GPU) | bf16_mixed (fp32
    # weights and Adam; the networks' layers in bf16 through torch.autocast, losses in fp32) |
    # auto (bf16_mixed where the device multiplies bf16 natively, else fp32; the run saves which)
    precision: str = "fp32"

    def __post_init__(self):
        _choice("compute.device", self.device, DEVICES)
        _choice("compute.precision", self.precision, PRECISIONS)


@dataclass
class ParallelConfig:
    """Data parallelism (DeepSpeed): how a step is split over ranks and micro-batches."""
    zero_stage: int = 0           # DeepSpeed ZeRO stage 0, 1 or 2
    grad_accum: int = 1           # micro-batches per optimizer step and rank
    dist_timeout_s: int = 300     # a collective waiting longer fails (a rank died): no hang

    def __post_init__(self):
        for name in ("grad_accum", "dist_timeout_s"):
            _positive(f"parallel.{name}", getattr(self, name))
        _choice("parallel.zero_stage", self.zero_stage, ZERO_STAGES)


@dataclass
class CpuConfig:
    """CPU tuning (no effect on what a GPU run computes)."""
    threads: int = 1              # torch CPU threads per process
    flush_denormal: bool = True   # flush subnormal floats to zero on the CPU (see trainer.py)

    def __post_init__(self):
        _positive("cpu.threads", self.threads)


@dataclass
class RunConfig:
    """Everything that defines a run."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cpu: CpuConfig = field(default_factory=CpuConfig)

    def __post_init__(self):
        validate(self)

    def to_dict(self) -> dict:
        """Return the config as plain nested dicts."""
        return dataclasses.asdict(self)


def micro_batch(batch_size: int, world_size: int, grad_accum: int) -> int:
    """Return the micro-batch of one rank (``batch_size`` split into ``world_size`` ranks x
    ``grad_accum`` micro-batches), or raise if it does not split evenly."""
    per_rank, rest = divmod(batch_size, world_size * grad_accum)
    if rest or per_rank < 1:
        raise DfaError(f"data.batch_size={batch_size} is not divisible into {world_size} "
                       f"rank(s) x parallel.grad_accum={grad_accum} micro-batches")
    return per_rank


def validate(cfg: RunConfig, world_size: int = 1, device_type: Optional[str] = None) -> RunConfig:
    """Return ``cfg`` after the checks that span several keys; raise a one-line error otherwise.

    Every RunConfig runs them for one rank and its configured device; the trainer runs them again
    with the job's number of ranks and the device it resolved (``compute.device=auto``). The
    checks within one key are the sections' own (``__post_init__``)."""
    if device_type is None and cfg.compute.device != "auto":
        device_type = cfg.compute.device
    micro_batch(cfg.data.batch_size, world_size, cfg.parallel.grad_accum)
    if cfg.data.order == "quasi_random" and world_size > 1:
        raise DfaError(f"data.order=quasi_random is not supported with {world_size} ranks (FFCV "
                       "cannot split it across ranks); use data.order=random")
    if cfg.compute.precision == "fp16" and device_type == "cpu":
        raise DfaError("compute.precision=fp16 needs a CUDA GPU (DeepSpeed's fp16 loss scaling); "
                       "on a CPU use fp32, bf16_mixed or auto")
    return cfg


# Keys that moved out of `train` when it was split into train, compute, parallel and cpu: old
# (section, key) -> new. Saved runs, presets and --set overrides may use either name (`translate`).
MOVED_KEYS = {
    ("train", "device"): ("compute", "device"),
    ("train", "precision"): ("compute", "precision"),
    ("train", "zero_stage"): ("parallel", "zero_stage"),
    ("train", "grad_accum"): ("parallel", "grad_accum"),
    ("train", "dist_timeout_s"): ("parallel", "dist_timeout_s"),
    ("train", "threads"): ("cpu", "threads"),
    ("train", "flush_denormal"): ("cpu", "flush_denormal"),
}


def translate(data: Optional[dict], where: str = "config") -> dict:
    """Return a copy of nested config dicts with every moved key under its new name (`MOVED_KEYS`).

    A key given under both names must have one value (else an error naming both); anything else
    (unknown keys, a section that is not a mapping) is left for `check_keys` to report."""
    out = {section: dict(values) if isinstance(values, dict) else values
           for section, values in (data or {}).items()}
    for (old_section, old_key), (new_section, new_key) in MOVED_KEYS.items():
        source, target = out.get(old_section), out.get(new_section)
        if not isinstance(source, dict) or old_key not in source or \
                not isinstance(target, (dict, type(None))):
            continue
        value = source.pop(old_key)
        target = out[new_section] = {} if target is None else target
        if new_key in target and target[new_key] != value:
            raise DfaError(f"{where}: {old_section}.{old_key}={value!r} and "
                           f"{new_section}.{new_key}={target[new_key]!r} are one setting "
                           f"({old_section}.{old_key} is the old name of {new_section}.{new_key}); "
                           "give it once")
        target[new_key] = value
    return out


# Fields that may differ when a run is resumed: how long it runs, how it is displayed, whether the
# CPU loader runs in a child process (the same batches either way) and how many CPU threads compute
# it (the same operations; a sum split over threads may round differently). New key names: an old
# saved config is read into the new sections before it is compared.
RESUMABLE_CHANGES = {("train", "steps"), ("train", "progress"), ("train", "tensorboard"),
                     ("data", "loader_process"), ("cpu", "threads")}


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Return ``value`` as the field type ``kind``, or raise naming the key."""
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
    merged = translate(base, where)
    for section, values in translate(update, where).items():
        if not isinstance(values, dict):
            raise DfaError(f"{where}: section {section!r} must be a mapping of keys to values")
        merged[section] = {**merged.get(section, {}), **values}
    return merged


def check_keys(data: dict, where: str) -> dict:
    """Raise on an unknown section or key of nested config dicts (moved keys are read under their
    old names too: `translate`); return RunConfig's type hints."""
    data = translate(data, where)
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
    """Return the RunConfig of nested dicts; unknown sections/keys and bad values are errors.

    Keys under their old names (a run saved before `train` was split) are read (`translate`)."""
    data = translate(data, where)
    hints = check_keys(data, where)
    sections = {}
    for section, values in data.items():
        fields = typing.get_type_hints(hints[section])
        sections[section] = hints[section](**{k: _coerce(f"{section}.{k}", v, fields[k])
                                              for k, v in (values or {}).items()})
    return RunConfig(**sections)


def override(cfg: RunConfig, overrides: dict, where: str = "--set") -> RunConfig:
    """Return ``cfg`` with nested-dict ``overrides`` (old key names read too) applied and checked."""
    return from_dict(_merge(cfg.to_dict(), overrides, where), where=where)


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
