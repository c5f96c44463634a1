"""Typed configuration schema, registered with Hydra so that wrong types and enum values fail at compose time.

The YAML files under configs/ fill this schema; range checks that a type cannot express live in `validate`.
This module never imports torch: the CLI validates here, in a fraction of a second, before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, ListConfig, OmegaConf

from qrun.errors import QrunError, choice_error

MIN_BITS, MAX_BITS = 1, 16
FULL_PRECISION_BITS = 32


class Mode(Enum):
    train = "train"
    evaluate = "evaluate"
    calibrate = "calibrate"  # post-training quantization of a float checkpoint (qrun.int8.modes)
    export = "export"  # ONNX QDQ + float ONNX, both evaluated in onnxruntime (qrun.int8.modes)


class Device(Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class ModelConfig:
    name: str = MISSING
    options: dict[str, Any] = field(default_factory=dict)
    # torchvision's ImageNet weights (resnet18/34/50) through its weights API and cache (TORCH_HOME).
    pretrained: bool = False


@dataclass
class DatasetConfig:
    name: str = MISSING
    root: Optional[str] = None
    train_samples: Optional[int] = None
    # A seeded subset of the test split (the name predates val_split; it never touches the validation set).
    val_samples: Optional[int] = None
    # Held out of the training data to choose best.pt: a count (>= 1) or a fraction (0 < f < 1); null: none,
    # best.pt is then chosen on the test split. Carved before train_samples is drawn (qrun.data).
    val_split: Optional[float] = None
    download: bool = False
    augment: bool = False
    # Subsets (train_samples/val_samples) are drawn with this seed, not the training seed, so runs compare fairly.
    subset_seed: int = 0
    # null (ImageFolder layouts): the number of class folders found under root/train.
    num_classes: Optional[int] = MISSING
    in_channels: int = MISSING
    image_size: int = MISSING
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)


@dataclass
class QuantConfig:
    name: str = "none"
    # Policy for the first conv and the last linear layer: "fp" keeps them float (DSQ paper), "8bit" quantizes
    # them at 8 bits (LSQ convention), "quantize" treats them like every other layer.
    first_last: str = "fp"
    # Per-layer overrides by fnmatch pattern on the module name, e.g. {"layer3.*": {w_bits: 8, a_bits: 8}}.
    layer_overrides: dict[str, Any] = field(default_factory=dict)
    # Quantizer-specific options, passed as keyword arguments to the quantizer's constructor.
    options: dict[str, Any] = field(default_factory=dict)
    # Batches used for data-dependent initialisation (activation ranges, LSQ steps) before the first epoch.
    init_batches: int = 4
    # Learning-rate multiplier for quantizer parameters (they live in their own group without weight decay).
    lr_scale: float = 1.0


@dataclass
class OptimizerConfig:
    name: str = MISSING
    lr: float = MISSING
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class SchedulerConfig:
    name: str = MISSING
    warmup_epochs: float = 0.0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    min_lr_ratio: float = 0.0


@dataclass
class DistillConfig:
    """Knowledge distillation from a trained qrun run (qrun.distill); off while `teacher` is null."""

    teacher: Optional[str] = None  # a qrun run directory or checkpoint file, usually the float run
    weight: float = 0.5  # w in (1 - w) CE + w T^2 KL
    temperature: float = 1.0


@dataclass
class PreemptConfig:
    # On these signals: finish the running step, write a mid-epoch checkpoint, exit 75 (qrun.preempt).
    # SIGUSR2 is submitit's requeue signal (the slurm preset's --signal=USR2@...): its handler runs after the save.
    enabled: bool = True
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGUSR2"])


@dataclass
class QrunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    mode: Mode = Mode.train
    resume: Optional[str] = None
    # Where the run writes; null means Hydra's run directory (the normal case on the command line).
    output_dir: Optional[str] = None
    # In a directory that already holds a finished results.json or a checkpoints/last.pt (a re-run sweep job),
    # skip or continue instead of starting over.
    auto_resume: bool = True
    bits: int = 4
    w_bits: int = II("bits")
    a_bits: int = II("bits")
    quantize_input: bool = False
    epochs: int = 8
    batch_size: int = 128
    eval_batch_size: int = 512
    label_smoothing: float = 0.0
    seed: int = 0
    deterministic: bool = False
    device: Device = Device.auto
    amp: bool = False
    # Autocast dtype under amp=true: bfloat16 (no loss scaling needed) or float16 (with a GradScaler).
    amp_dtype: str = "bfloat16"
    # DataLoader worker processes; null: 0 for in-memory data (MNIST family, CIFAR), several for image files on CUDA.
    workers: Optional[int] = None
    progress: bool = True
    # Off a terminal (no bar): a log line each time another log_every_percent % of an epoch is done, at most one
    # per log_every_s seconds; log_every_percent=0 turns the lines off.
    log_every_percent: float = 10.0
    log_every_s: float = 30.0
    compile: bool = False
    # NHWC tensors: oneDNN's CPU convolutions (and tensor cores) run markedly faster on them.
    channels_last: bool = True
    # Start training from another run's weights (a float checkpoint for QAT, or a calibrated one): a checkpoint
    # file or run directory; unlike resume=, the optimizer, schedule and epoch start afresh.
    init_from: Optional[str] = None
    # mode=calibrate: training batches (of batch_size) run through the observers.
    calib_batches: int = 32
    # Multirun folder name: sweeps land in multirun/<sweep>/<job>; the same name and command resume a sweep.
    sweep: str = "default"
    # CPU threads for this job; null: cores / parallel jobs (joblib n_jobs, SLURM cpus_per_task, torchrun ranks).
    threads: Optional[int] = None
    # Under torchrun: convert BatchNorm to SyncBatchNorm so statistics cover the global batch.
    sync_bn: bool = False
    # Under torchrun: null picks nccl on CUDA and gloo on CPU.
    dist_backend: Optional[str] = None
    preempt: PreemptConfig = field(default_factory=PreemptConfig)
    # Also write the mid-epoch checkpoint every N training steps (long epochs); null: at epoch ends only.
    checkpoint_every_steps: Optional[int] = None


def register_configs() -> None:
    """Register the schema (configs/config.yaml extends it via its defaults list) and qrun's resolvers."""
    ConfigStore.instance().store(name="qrun_schema", node=QrunConfig)
    from qrun import naming  # resolvers for run and job folder names

    naming.register_resolvers()



# ---------------------------------------------------------------------------------------------- fixed choices
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("cosine", "multistep", "constant")
FIRST_LAST_POLICIES = ("fp", "8bit", "quantize")
DIST_BACKENDS = ("gloo", "nccl")
PRETRAINED_MODELS = ("resnet18", "resnet34", "resnet50")  # torchvision ImageNet weights (qrun.weights)
CIFAR_RESNET_BLOCKS = ("basic", "binary")  # = qrun.models.resnet_cifar.BLOCKS
AMP_DTYPES = ("bfloat16", "float16")
LAYER_OVERRIDE_KEYS = ("w_bits", "a_bits", "quantize_input", "skip")  # = qrun.quant.policy.OVERRIDE_KEYS
MAX_SEED = 2**32 - 1  # numpy's limit


@dataclass(frozen=True)
class DatasetFacts:
    """What a dataset fixes: split sizes (None: known only at load) and the shape of its images and labels."""

    train_size: Optional[int]
    test_size: Optional[int]
    num_classes: Optional[int]
    in_channels: Optional[int]
    image_size: Optional[int]


DATASETS: dict[str, DatasetFacts] = {
    "fashion_mnist": DatasetFacts(60_000, 10_000, 10, 1, 28),
    "mnist": DatasetFacts(60_000, 10_000, 10, 1, 28),
    "cifar10": DatasetFacts(50_000, 10_000, 10, 3, 32),
    "cifar100": DatasetFacts(50_000, 10_000, 100, 3, 32),
    # ImageFolder: sizes and classes come from the folders (checked at load).
    "imagenet": DatasetFacts(None, None, None, 3, None),
    # Synthetic: train_samples/val_samples *are* the sizes, any shape goes.
    "fake": DatasetFacts(None, None, None, None, None),
}
NEEDS_ROOT = ("cifar10", "cifar100", "imagenet")

# Keyword options each model builder / quantizer constructor takes, so that `model.options` and `quant.options`
# are checked without importing torch (2-4 s). tests/test_bad_input.py checks both tables against the real
# signatures, so a new option that is missing here fails a test instead of being refused silently.
_CNN_OPTIONS = ("widths", "image_size")
_CIFAR_RESNET_OPTIONS = ("shortcut", "block")
_TORCHVISION_RESNET_OPTIONS = ("zero_init_residual", "groups", "width_per_group", "replace_stride_with_dilation",
                               "norm_layer")
MODEL_OPTIONS: dict[str, tuple[str, ...]] = {
    "cnn": _CNN_OPTIONS, "cnn_bn": _CNN_OPTIONS, "nin": ("dropout",),
    **{f"resnet{depth}": _CIFAR_RESNET_OPTIONS for depth in (20, 32, 44, 56)},
    **{f"resnet{depth}": _TORCHVISION_RESNET_OPTIONS for depth in (18, 34, 50)},
}
QUANT_OPTIONS: dict[str, tuple[str, ...]] = {
    "none": (),
    "affine": ("per_channel", "averaging_constant", "observer_epochs", "fold_bn", "bn_stats_epochs"),
    "dorefa": ("g_bits",), "dsq": ("alpha", "grad_scale"), "lsq": (), "pact": ("init_alpha",), "twn": (),
    "uniform": ("momentum",), "xnor": ("k_scaling",),
}


# ------------------------------------------------------------------------------------------------------ ranges
@dataclass(frozen=True)
class Range:
    """One numeric key's accepted interval. Add a row to RANGES for a new key; absent keys are skipped."""

    key: str
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    nullable: bool = False
    note: str = ""  # what null means, or another word on the accepted values

    def accepted(self) -> str:
        if self.integer and not self.low_open and self.high == math.inf and self.low in (0, 1):
            text = "a positive integer" if self.low == 1 else "an integer >= 0"
        else:
            text = "an integer" if self.integer else "a finite number"
            lo = f"{_num(self.low)} {'<' if self.low_open else '<='} " if self.low > -math.inf else ""
            hi = f" {'<' if self.high_open else '<='} {_num(self.high)}" if self.high < math.inf else ""
            if lo and not hi:  # "value > 0" reads better than "0 < value"
                lo, hi = "", f" {'>' if self.low_open else '>='} {_num(self.low)}"
            if lo or hi:
                text = f"{text}, {lo}value{hi}"
        if self.nullable:
            return f"null{' (' + self.note + ')' if self.note else ''} or {text}"
        return f"{text} ({self.note})" if self.note else text

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not float(value).is_integer():
            return False
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


RANGES: list[Range] = [
    Range("bits", MIN_BITS, MAX_BITS, integer=True),
    Range("w_bits", MIN_BITS, MAX_BITS, integer=True),
    Range("a_bits", MIN_BITS, MAX_BITS, integer=True),
    Range("epochs", 1, integer=True),
    Range("batch_size", 1, integer=True),
    Range("eval_batch_size", 1, integer=True),
    Range("calib_batches", 1, integer=True),
    Range("threads", 1, integer=True, nullable=True, note="automatic"),
    Range("workers", 0, integer=True, nullable=True, note="automatic"),
    Range("log_every_percent", 0, 100, note="0: no progress lines"),
    Range("log_every_s", 0),
    Range("seed", 0, MAX_SEED, integer=True),
    Range("label_smoothing", 0, 1, high_open=True),
    Range("dataset.train_samples", 1, integer=True, nullable=True, note="all"),
    Range("dataset.val_samples", 1, integer=True, nullable=True, note="all"),
    Range("dataset.subset_seed", 0, MAX_SEED, integer=True),
    Range("dataset.num_classes", 1, integer=True, nullable=True, note="ImageFolder: the class folders found"),
    Range("dataset.in_channels", 1, integer=True),
    Range("dataset.image_size", 1, integer=True),
    Range("quant.init_batches", 0, integer=True),
    Range("quant.lr_scale", 0, low_open=True),
    Range("optimizer.lr", 0, low_open=True),
    Range("optimizer.momentum", 0, 1, high_open=True),
    Range("optimizer.weight_decay", 0),
    Range("scheduler.warmup_epochs", 0),
    Range("scheduler.gamma", 0, 1, low_open=True, note="the factor at each milestone"),
    Range("scheduler.min_lr_ratio", 0, 1),
    Range("checkpoint_every_steps", 1, integer=True, nullable=True, note="at epoch ends only"),
    Range("distill.weight", 0, 1, note="w in (1 - w) CE + w T^2 KL"),
    Range("distill.temperature", 0, low_open=True),
]
# Quantizer options with a range (the quantizers check them too, but only once torch and the model are built).
QUANT_OPTION_RANGES: dict[str, list[Range]] = {
    "dsq": [Range("alpha", 0, 0.5, low_open=True)],
    "pact": [Range("init_alpha", 0, low_open=True, nullable=True, note="from calibration data")],
    "uniform": [Range("momentum", 0, 1)],
    "dorefa": [Range("g_bits", 1, 32, integer=True, note="32 = full-precision gradients")],
    "affine": [Range("averaging_constant", 0, 1, low_open=True),
               Range("observer_epochs", 0, integer=True, nullable=True, note="never freeze"),
               Range("bn_stats_epochs", 0, integer=True, nullable=True, note="never freeze")],
}
BOOL_OPTIONS = {"affine": ("per_channel", "fold_bn"), "xnor": ("k_scaling",), "dsq": ("grad_scale",)}


def check_range(rule: Range, value: Any, prefix: str = "") -> None:
    if value is None and rule.nullable:
        return
    if not rule.contains(value):
        raise QrunError(f"{prefix}{rule.key}={_show(value)} is out of range; accepted: {rule.accepted()}")


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value).replace(" ", "")


def _get(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    """(present, value) of a dotted key; keys another part of qrun has not added yet are simply absent."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False, None
        node = node[part]
    return True, node


# ----------------------------------------------------------------------------------------------------- validate
def validate(cfg: DictConfig) -> None:
    """Reject every value the schema's types cannot: ranges, fixed choices, consistency, keys outside the schema.

    Pure Python on the composed config (no torch, no files read), so the CLI runs it before anything heavy.
    """
    check_closed(cfg)
    for rule in RANGES:
        present, value = _get(cfg, rule.key)
        if present:
            check_range(rule, value)
    for check in CHECKS:
        check(cfg)


def _check_choices(cfg: DictConfig) -> None:
    for key, label, accepted in (("amp_dtype", "amp_dtype", AMP_DTYPES), ("dist_backend", "dist_backend", DIST_BACKENDS),
                                 ("optimizer.name", "optimizer.name", OPTIMIZERS),
                                 ("scheduler.name", "scheduler.name", SCHEDULERS),
                                 ("quant.first_last", "quant.first_last", FIRST_LAST_POLICIES),
                                 ("model.name", "model", MODEL_OPTIONS), ("quant.name", "quantizer", QUANT_OPTIONS),
                                 ("dataset.name", "dataset", DATASETS)):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in accepted:
            raise choice_error(label, value, accepted)


def _check_preempt(cfg: DictConfig) -> None:
    if cfg.get("preempt") is not None:
        from qrun.preempt import parse_signals  # the signal module only: no torch import here

        parse_signals(cfg.preempt.signals)


def _check_mode(cfg: DictConfig) -> None:
    if mode_name(cfg) != Mode.train.value and not cfg.resume:
        raise QrunError(f"mode={mode_name(cfg)} needs resume=<checkpoint file or run directory>")


def _check_pretrained_and_block(cfg: DictConfig) -> None:
    """model.pretrained only where torchvision has weights; the CIFAR ResNets' block names."""
    if cfg.model.get("pretrained") and cfg.model.name not in PRETRAINED_MODELS:
        raise QrunError(f"model.pretrained=true has no torchvision weights for model={cfg.model.name}; "
                        f"accepted: {', '.join(PRETRAINED_MODELS)}")
    block = cfg.model.options.get("block") if "block" in MODEL_OPTIONS[cfg.model.name] else None
    if block is not None and block not in CIFAR_RESNET_BLOCKS:
        raise choice_error("model.options.block", block, CIFAR_RESNET_BLOCKS)


def _check_dataset(cfg: DictConfig) -> None:
    data = cfg.dataset
    facts = DATASETS[data.name]
    if data.name in NEEDS_ROOT and (OmegaConf.is_missing(data, "root") or not data.root):
        raise QrunError(f"dataset {data.name} needs dataset.root=<folder>; none was given")
    for key, fixed in (("num_classes", facts.num_classes), ("in_channels", facts.in_channels),
                       ("image_size", facts.image_size)):
        if fixed is not None and data[key] != fixed:
            raise QrunError(f"dataset.{key}={data[key]} contradicts dataset {data.name}; accepted: {fixed} "
                            f"(what {data.name} has)")
    for key, size, split in (("train_samples", facts.train_size, "training"), ("val_samples", facts.test_size,
                                                                               "test")):
        if size is not None and data[key] is not None and data[key] > size:
            raise QrunError(f"dataset.{key}={data[key]} exceeds the {size} {split} images of {data.name}; "
                            f"accepted: null (all) or 1..{size}")
    for key in ("mean", "std"):
        values = list(data[key])
        if len(values) != data.in_channels:
            raise QrunError(f"dataset.{key}={_show(data[key])} has {len(values)} value(s); accepted: one per input "
                            f"channel ({data.in_channels} for dataset.in_channels={data.in_channels})")
        if not all(math.isfinite(v) for v in values):
            raise QrunError(f"dataset.{key}={_show(data[key])} is not finite; accepted: finite numbers")
    if any(v <= 0 for v in data.std):
        raise QrunError(f"dataset.std={_show(data.std)} holds a value <= 0 (inputs are divided by it); "
                        "accepted: positive numbers")


def _check_optimizer(cfg: DictConfig) -> None:
    opt = cfg.optimizer
    if opt.name == "sgd" and opt.nesterov and opt.momentum <= 0:
        raise QrunError(f"optimizer.nesterov=true needs optimizer.momentum > 0 (it is {opt.momentum}); "
                        "accepted: a positive momentum, or optimizer.nesterov=false")
    betas = list(opt.betas)
    if len(betas) != 2 or not all(Range("b", 0, 1, high_open=True).contains(b) for b in betas):
        raise QrunError(f"optimizer.betas={_show(opt.betas)} is invalid; accepted: two numbers in [0, 1), "
                        "e.g. [0.9,0.999]")


def _check_scheduler(cfg: DictConfig) -> None:
    sched = cfg.scheduler
    if sched.warmup_epochs > cfg.epochs:
        raise QrunError(f"scheduler.warmup_epochs={sched.warmup_epochs} exceeds epochs={cfg.epochs}; "
                        f"accepted: 0..{cfg.epochs}")
    if sched.name != "multistep":
        return
    milestones = list(sched.milestones)
    if any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise QrunError(f"scheduler.milestones={_show(sched.milestones)} is not increasing; accepted: increasing "
                        f"epochs in 1..{cfg.epochs}")
    if any(not 1 <= m <= cfg.epochs for m in milestones):
        raise QrunError(f"scheduler.milestones={_show(sched.milestones)} lies outside the run's epochs; accepted: "
                        f"increasing epochs in 1..epochs={cfg.epochs}")


def _check_model_options(cfg: DictConfig) -> None:
    accepted = MODEL_OPTIONS[cfg.model.name]
    unknown = sorted(set(cfg.model.options) - set(accepted))
    if unknown:
        raise QrunError(f"unknown model.options key(s) {', '.join(unknown)} for model {cfg.model.name}; accepted: "
                        f"{', '.join(accepted) or 'none'}")


def _check_quant_options(cfg: DictConfig) -> None:
    name = cfg.quant.name
    options = cfg.quant.options
    accepted = QUANT_OPTIONS[name]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise QrunError(f"unknown quant.options key(s) {', '.join(unknown)} for quantizer {name!r}; accepted: "
                        f"{', '.join(accepted) or 'none'}")
    for rule in QUANT_OPTION_RANGES.get(name, []):
        if rule.key in options:
            check_range(rule, options[rule.key], prefix="quant.options.")
    for key in BOOL_OPTIONS.get(name, ()):
        if key in options and not isinstance(options[key], bool):
            raise QrunError(f"quant.options.{key}={_show(options[key])} is invalid; accepted: true or false")


def _check_layer_overrides(cfg: DictConfig) -> None:
    bits = Range("bits", MIN_BITS, MAX_BITS, integer=True)
    for pattern, values in cfg.quant.layer_overrides.items():
        where = f"quant.layer_overrides.{pattern}"
        if not isinstance(values, DictConfig):
            raise QrunError(f"{where}={_show(values)} is invalid; accepted: a mapping of "
                            f"{', '.join(LAYER_OVERRIDE_KEYS)}, e.g. {{{pattern}:{{w_bits:8}}}}")
        unknown = sorted(set(values) - set(LAYER_OVERRIDE_KEYS))
        if unknown:
            raise QrunError(f"unknown key(s) {', '.join(unknown)} in {where}; accepted: "
                            f"{', '.join(LAYER_OVERRIDE_KEYS)}")
        for key, value in values.items():
            if key in ("w_bits", "a_bits"):
                if not bits.contains(value):
                    raise QrunError(f"{where}.{key}={_show(value)} is invalid; accepted: {bits.accepted()}")
            elif not isinstance(value, bool):
                raise QrunError(f"{where}.{key}={_show(value)} is invalid; accepted: true or false")


def _check_paths(cfg: DictConfig) -> None:
    if cfg.get("output_dir"):
        check_writable_dir("output_dir", cfg.output_dir)
    for key in ("resume", "init_from", "distill.teacher"):
        value = OmegaConf.select(cfg, key)
        if value and not Path(str(value)).expanduser().exists():
            raise QrunError(f"{key}={value} does not exist; {key}= takes a checkpoint file or a qrun run directory")


def check_writable_dir(key: str, value: Any) -> None:
    """A folder qrun will create or write into: refuse a file in its place or an unwritable parent, early."""
    path = Path(str(value)).expanduser()
    if path.exists() and not path.is_dir():
        raise QrunError(f"{key}={value} is a file; accepted: a folder (existing or new)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise QrunError(f"{key}={value}: {existing} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise QrunError(f"{key}={value}: cannot write into {existing} (permission denied or read-only)")


def _check_val_split(cfg: DictConfig) -> None:
    """dataset.val_split: a count or a fraction of the training data; a count must leave training data where the
    dataset's size is known here (ImageFolder and fake data are checked at load, qrun.data.validation_size)."""
    data = cfg.dataset
    value = data.get("val_split")
    if value is None:
        return
    if not (0.0 < value < 1.0 or (value >= 1 and float(value).is_integer())):
        raise QrunError(f"dataset.val_split={_num(value)} is invalid; accepted: null (none), a fraction 0 < f < 1 "
                        "of the training data, or a whole number of samples >= 1")
    facts = DATASETS.get(data.name)
    size = facts.train_size if facts is not None else None
    if size is not None and value >= size:
        raise QrunError(f"dataset.val_split={_num(value)} holds out all {size} training images of {data.name}; "
                        f"accepted: a fraction 0 < f < 1 or a count 1..{size - 1}")


# The consistency checks `validate` runs after the range table; other modules' keys get their own function here.
CHECKS: list[Callable[[DictConfig], None]] = [
    _check_choices, _check_preempt, _check_mode, _check_dataset, _check_optimizer, _check_scheduler, _check_model_options,
    _check_quant_options, _check_layer_overrides, _check_paths, _check_pretrained_and_block,
    _check_val_split,
]


# ------------------------------------------------------------------------------------------------ closed schema
# Free-form mappings inside the schema: their keys are checked by the functions above, not against dataclasses.
FREE_MAPPINGS = ("model.options", "quant.options", "quant.layer_overrides")


def check_closed(cfg: DictConfig) -> None:
    """Every key must be a schema field: `+foo=1` or a typo in a YAML file is refused, not silently carried."""
    _check_node(cfg, QrunConfig, "")


def _check_node(node: DictConfig, schema: type, prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        path = f"{prefix}{key}"
        if key not in fields:
            raise QrunError(f"unknown key {path!r} (the config schema is closed); accepted"
                            f"{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(fields))}")
        sub = _dataclass_type(fields[key])
        if sub is not None and path not in FREE_MAPPINGS and isinstance(node[key], DictConfig):
            _check_node(node[key], sub, f"{path}.")


def _dataclass_type(schema_field: dataclasses.Field) -> Optional[type]:
    if schema_field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        made = schema_field.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(made):
            return type(made)
    return None


def mode_name(cfg: DictConfig) -> str:
    """The mode as a plain string, whether the config holds the enum or its name."""
    mode = cfg.mode
    return mode.value if isinstance(mode, Enum) else str(mode)


def effective_bits(cfg: DictConfig) -> tuple[int, int]:
    """Weight and activation bits that actually apply: a full-precision run is 32/32 whatever `bits` says."""
    if cfg.quant.name == "none":
        return FULL_PRECISION_BITS, FULL_PRECISION_BITS
    return int(cfg.w_bits), int(cfg.a_bits)
