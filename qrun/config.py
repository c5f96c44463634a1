"""Typed configuration schema, registered with Hydra so that wrong types and enum values fail at compose time.

The YAML files under configs/ fill this schema; range checks that a type cannot express live in `validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig

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
    val_samples: Optional[int] = None
    download: bool = False
    augment: bool = False
    # Subsets (train_samples/val_samples) are drawn with this seed, not the training seed, so runs compare fairly.
    subset_seed: int = 0
    num_classes: int = MISSING
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
    workers: int = 0
    progress: bool = True
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
    """Register the schema so that configs/config.yaml can extend it via its defaults list."""
    ConfigStore.instance().store(name="qrun_schema", node=QrunConfig)


OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("cosine", "multistep", "constant")
FIRST_LAST_POLICIES = ("fp", "8bit", "quantize")
DIST_BACKENDS = ("gloo", "nccl")
PRETRAINED_MODELS = ("resnet18", "resnet34", "resnet50")  # torchvision ImageNet weights (qrun.weights)


def validate(cfg: DictConfig) -> None:
    """Reject values that the schema's types cannot: ranges, names of fixed choices, mode-specific needs."""
    for key in ("bits", "w_bits", "a_bits"):
        value = cfg[key]
        if not MIN_BITS <= value <= MAX_BITS:
            raise QrunError(f"{key}={value} is out of range; accepted: integers {MIN_BITS}..{MAX_BITS}")
    _check_positive(cfg, ("epochs", "batch_size", "eval_batch_size", "calib_batches"))
    if cfg.get("threads") is not None and cfg.threads < 1:
        raise QrunError(f"threads={cfg.threads} is invalid; accepted: null (automatic) or a positive integer")
    if cfg.get("dist_backend") is not None and cfg.dist_backend not in DIST_BACKENDS:
        raise choice_error("dist_backend", cfg.dist_backend, DIST_BACKENDS)
    if cfg.get("preempt") is not None:
        from qrun.preempt import parse_signals  # the signal module only: no torch import here

        parse_signals(cfg.preempt.signals)
    every = cfg.get("checkpoint_every_steps")
    if every is not None and every < 1:
        raise QrunError(f"checkpoint_every_steps={every} is invalid; accepted: null (epoch ends only) or a positive integer")
    if cfg.workers < 0:
        raise QrunError(f"workers={cfg.workers} is negative; accepted: 0 or more")
    for key in ("train_samples", "val_samples"):
        value = cfg.dataset[key]
        if value is not None and value < 1:
            raise QrunError(f"dataset.{key}={value} is invalid; accepted: null (all) or a positive integer")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise QrunError(f"label_smoothing={cfg.label_smoothing} is out of range; accepted: 0 <= value < 1")
    if cfg.optimizer.name not in OPTIMIZERS:
        raise choice_error("optimizer.name", cfg.optimizer.name, OPTIMIZERS)
    if cfg.scheduler.name not in SCHEDULERS:
        raise choice_error("scheduler.name", cfg.scheduler.name, SCHEDULERS)
    if cfg.quant.first_last not in FIRST_LAST_POLICIES:
        raise choice_error("quant.first_last", cfg.quant.first_last, FIRST_LAST_POLICIES)
    _check_distill(cfg)
    if mode_name(cfg) != Mode.train.value and not cfg.resume:
        raise QrunError(f"mode={mode_name(cfg)} needs resume=<checkpoint file or run directory>")


def _check_distill(cfg: DictConfig) -> None:
    """distill.* ranges, and model.pretrained only where torchvision has weights (checked before any data loads)."""
    if cfg.model.get("pretrained") and cfg.model.name not in PRETRAINED_MODELS:
        raise QrunError(f"model.pretrained=true has no torchvision weights for model={cfg.model.name}; "
                        f"accepted: {', '.join(PRETRAINED_MODELS)}")
    distill = cfg.get("distill")
    if distill is None:
        return
    if not 0.0 <= distill.weight <= 1.0:
        raise QrunError(f"distill.weight={distill.weight} is out of range; accepted: 0 <= value <= 1")
    if not distill.temperature > 0.0:
        raise QrunError(f"distill.temperature={distill.temperature} is invalid; accepted: a positive number")


def _check_positive(cfg: DictConfig, keys: tuple[str, ...]) -> None:
    for key in keys:
        if cfg[key] < 1:
            raise QrunError(f"{key}={cfg[key]} is invalid; accepted: a positive integer")


def mode_name(cfg: DictConfig) -> str:
    """The mode as a plain string, whether the config holds the enum or its name."""
    mode = cfg.mode
    return mode.value if isinstance(mode, Enum) else str(mode)


def effective_bits(cfg: DictConfig) -> tuple[int, int]:
    """Weight and activation bits that actually apply: a full-precision run is 32/32 whatever `bits` says."""
    if cfg.quant.name == "none":
        return FULL_PRECISION_BITS, FULL_PRECISION_BITS
    return int(cfg.w_bits), int(cfg.a_bits)
