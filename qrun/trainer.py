"""run(cfg): the table of contents of a qrun job. Modes dispatch to short functions built from small helpers.

The trainer never knows which quantizer it runs: it calls the `qrun.quant` API (swap layers, initialise from
data, list learned values) and treats everything else as an ordinary nn.Module.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qrun import checkpoint, complexity, distill, distributed, quant, resources, weights
from qrun.config import effective_bits, mode_name, validate
from qrun.data import DataSplits, EpochLoader, build_datasets, epoch_seed, first_batches
from qrun.engine import evaluate, to_device, train_one_epoch
from qrun.errors import QrunError
from qrun.int8 import modes as int8_modes
from qrun.models import get_model
from qrun.optim import build_optimizer, build_scheduler
from qrun.tb import Logger

log = logging.getLogger(__name__)
RESULTS_FILE = "results.json"
LEARNED_PARAMS_FILE = "learned_params.md"


@dataclass
class RunContext:
    """Where the run writes and what it runs on."""

    cfg: DictConfig
    output_dir: Path
    device: torch.device
    started: float
    dist: distributed.DistInfo = distributed.SINGLE

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate, set up, and run the requested mode; returns what was written to results.json."""
    validate(cfg)
    resources.configure_threads(cfg.threads)
    mode = mode_name(cfg)
    if mode not in MODES:
        raise QrunError(f"mode={mode} is not implemented; accepted: {', '.join(MODES)}")
    device = select_device(cfg.device)
    dist_info = distributed.setup(device, cfg.dist_backend)
    try:
        # Every rank writes into rank 0's folder: a timestamped run dir may resolve differently on other ranks.
        context = RunContext(cfg=cfg, output_dir=Path(distributed.broadcast_object(str(output_dir(cfg)), dist_info)),
                             device=distributed.device_for(device, dist_info), started=time.perf_counter(),
                             dist=dist_info)
        configure_determinism(cfg.seed, cfg.deterministic)
        return MODES[mode](context)
    finally:
        distributed.teardown(dist_info)


# ------------------------------------------------------------------------------------------------------- set-up
def output_dir(cfg: DictConfig) -> Path:
    """Hydra's run directory (never chdir), or `output_dir` when given (tests, scripts calling run())."""
    if cfg.get("output_dir"):
        path = Path(cfg.output_dir)
    else:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise QrunError("no output directory: run through the qrun CLI or set output_dir=<folder>")
        path = Path(HydraConfig.get().runtime.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def select_device(requested: Any) -> torch.device:
    name = getattr(requested, "value", requested)
    if name == "cuda" and not torch.cuda.is_available():
        raise QrunError("device=cuda but no CUDA device is available; accepted here: auto, cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def configure_determinism(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Set both ways: a reused process (a joblib worker, a test session) must not inherit the previous job's mode.
    if deterministic:
        # cuBLAS needs this workspace setting to be deterministic; it must be set before the first matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def architecture(cfg: DictConfig) -> dict[str, Any]:
    """The identity of a model: what a checkpoint must share with the config that loads it."""
    w_bits, a_bits = effective_bits(cfg)
    return {"model": cfg.model.name, "dataset": cfg.dataset.name, "quant": cfg.quant.name, "w_bits": w_bits,
            "a_bits": a_bits, "quantize_input": bool(cfg.quantize_input) and cfg.quant.name != quant.FULL_PRECISION}


def build_model(cfg: DictConfig) -> nn.Module:
    """The float network from the registry, then quantized in place under the configured layer policy."""
    model = get_model(cfg.model.name, num_classes=cfg.dataset.num_classes, in_channels=cfg.dataset.in_channels,
                      **OmegaConf.to_container(cfg.model.options, resolve=True))
    return quant.quantize_model(model, cfg.quant.name, w_bits=cfg.w_bits, a_bits=cfg.a_bits,
                                quantize_input=cfg.quantize_input, first_last=cfg.quant.first_last,
                                layer_overrides=OmegaConf.to_container(cfg.quant.layer_overrides, resolve=True),
                                **OmegaConf.to_container(cfg.quant.options, resolve=True))


def place_model(model: nn.Module, context: RunContext) -> nn.Module:
    model = model.to(context.device)
    return model.to(memory_format=torch.channels_last) if context.cfg.channels_last else model


def network_parameters(model: nn.Module) -> int:
    """Parameters of the network itself; quantizer scalars are excluded so counts compare across quantizers."""
    quant_ids = {id(p) for p in quant.quantizer_parameters(model)}
    return sum(p.numel() for p in model.parameters() if id(p) not in quant_ids)


def build_loaders(cfg: DictConfig, data: DataSplits, device: torch.device,
                  dist_info: distributed.DistInfo = distributed.SINGLE) -> tuple[EpochLoader, EpochLoader]:
    """Under DDP each rank loads its shard with its share of the (global) batch sizes."""
    pin = device.type == "cuda"
    train = EpochLoader(data.train, distributed.per_rank_batch(cfg.batch_size, dist_info), shuffle=True,
                        workers=cfg.workers, seed=cfg.seed, pin_memory=pin,
                        sampler_factory=distributed.train_sampler_factory(dist_info, epoch_seed(cfg.seed, 0)))
    val = EpochLoader(data.val, max(1, cfg.eval_batch_size // dist_info.world_size), shuffle=False,
                      workers=cfg.workers, seed=cfg.seed, pin_memory=pin,
                      sampler_factory=distributed.eval_sampler_factory(dist_info))
    return train, val


# ---------------------------------------------------------------------------------------------------- train mode
@dataclass
class TrainingState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: Optional[torch.amp.GradScaler]
    epoch: int = 0
    best_top1: float = float("-inf")
    history: list[dict[str, float]] | None = None


def train(context: RunContext) -> dict[str, Any]:
    cfg = context.cfg
    finished = finished_results(context)
    if finished is not None:
        log.info("already finished in %s (epoch %d); nothing to do", context.output_dir, finished["epoch"])
        return finished
    data = build_datasets(cfg.dataset)
    train_loader, val_loader = build_loaders(cfg, data, context.device, context.dist)
    state = build_training_state(cfg, context, len(train_loader))
    resume_path = resume_checkpoint(cfg, context)
    if resume_path is not None:
        restore_training_state(state, resume_path, cfg)
        log.info("resumed from %s at epoch %d", resume_path, state.epoch + 1)
    else:
        if cfg.model.pretrained:
            weights.load_pretrained(state.model, cfg.model.name)
        if cfg.init_from:
            path = checkpoint.resolve(cfg.init_from, prefer=checkpoint.BEST)
            load_initial_weights(state.model, weights.read_initial(path), cfg, path)
        used = quant.initialize_from_data(state.model, (to_device(b, b, context.device, cfg.channels_last)[0]
                                                        for b in first_batches(
            data.train, cfg.quant.init_batches, cfg.batch_size, cfg.seed)))
        if used:
            log.info("initialised quantizers from %d training batches", used)
    state.model = distributed.prepare_model(state.model, context.dist, cfg.sync_bn)
    metrics = fit(state, context, train_loader, val_loader)
    return finish_training(state, context, metrics)


def build_training_state(cfg: DictConfig, context: RunContext, steps_per_epoch: int) -> TrainingState:
    model = place_model(build_model(cfg), context)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.quant.lr_scale)
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.epochs, steps_per_epoch)
    scaler = torch.amp.GradScaler(context.device.type) if cfg.amp else None
    return TrainingState(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, history=[])


def fit(state: TrainingState, context: RunContext, train_loader: EpochLoader,
        val_loader: EpochLoader) -> dict[str, float]:
    """Epochs from the one after `state.epoch` to cfg.epochs; a checkpoint after each, so a kill costs one epoch."""
    cfg = context.cfg
    criterion = distill.wrap_criterion(nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), cfg,
                                       context.device, build_model)  # a teacher when distill.teacher is set
    step_model = distributed.wrap(state.model, context.dist, context.device)
    step_model = torch.compile(step_model) if cfg.compile else step_model
    logger = Logger(context.output_dir / "tb" if context.dist.is_main else None)
    metrics: dict[str, float] = dict(state.history[-1]) if state.history else {}
    try:
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            quant.on_epoch_start(state.model, epoch)  # observer / BN-statistics freezing schedules
            lr = state.optimizer.param_groups[0]["lr"]
            train_metrics = train_one_epoch(step_model, criterion, state.optimizer, state.scheduler,
                                            train_loader.epoch(epoch), context.device, epoch, cfg.progress,
                                            state.scaler, cfg.channels_last)
            train_metrics = distributed.reduce_metrics(train_metrics, len(train_loader.loader.sampler),
                                                       context.dist, averaged=("loss", "top1"))
            val_metrics = evaluate(step_model, val_loader.epoch(epoch), context.device, progress=cfg.progress,
                                   channels_last=cfg.channels_last)
            val_metrics = distributed.reduce_metrics(val_metrics, val_metrics["samples"], context.dist,
                                                     averaged=("loss", "top1", "top5"))
            metrics = epoch_metrics(epoch, lr, train_metrics, val_metrics)
            state.epoch, state.best_top1 = epoch, max(state.best_top1, val_metrics["top1"])
            state.history.append(metrics)
            log_epoch(logger, state.model, metrics)
            distill.log_epoch(criterion, logger, epoch)
            if context.dist.is_main:
                save_checkpoints(state, context, metrics, is_best=val_metrics["top1"] >= state.best_top1)
    finally:
        logger.close()
    return metrics


def epoch_metrics(epoch: int, lr: float, train_metrics: dict, val_metrics: dict) -> dict[str, float]:
    return {"epoch": epoch, "lr": lr, "train_loss": train_metrics["loss"], "train_top1": train_metrics["top1"],
            "data_share": train_metrics["data_share"], "epoch_time_s": train_metrics["time_s"],
            "val_loss": val_metrics["loss"], "top1": val_metrics["top1"], "top5": val_metrics["top5"]}


def log_epoch(logger: Logger, model: nn.Module, metrics: dict[str, float]) -> None:
    epoch = int(metrics["epoch"])
    logger.scalars({"train/loss": metrics["train_loss"], "train/top1": metrics["train_top1"],
                    "val/loss": metrics["val_loss"], "val/top1": metrics["top1"], "val/top5": metrics["top5"],
                    "lr": metrics["lr"]}, epoch)
    logger.scalars(quant.learned_values(model), epoch, prefix="quant/")
    log.info("epoch %d  train loss %.4f top1 %.2f | val loss %.4f top1 %.2f top5 %.2f | lr %.2e | %.1fs (data %.0f%%)",
             epoch, metrics["train_loss"], metrics["train_top1"], metrics["val_loss"], metrics["top1"],
             metrics["top5"], metrics["lr"], metrics["epoch_time_s"], 100 * metrics["data_share"])


def save_checkpoints(state: TrainingState, context: RunContext, metrics: dict[str, float], is_best: bool) -> None:
    cfg = context.cfg
    payload = checkpoint.build_payload(
        model_state=state.model.state_dict(), optimizer_state=state.optimizer.state_dict(),
        scheduler_state=state.scheduler.state_dict(), epoch=state.epoch, best_top1=state.best_top1,
        metrics=metrics, architecture=architecture(cfg), config=OmegaConf.to_container(cfg, resolve=True,
                                                                                       enum_to_str=True),
        scaler_state=state.scaler.state_dict() if state.scaler is not None else None)
    payload["history"] = list(state.history)
    checkpoint.atomic_save(payload, context.checkpoint_dir / checkpoint.LAST)
    if is_best:
        checkpoint.atomic_save(payload, context.checkpoint_dir / checkpoint.BEST)


def resume_checkpoint(cfg: DictConfig, context: RunContext) -> Optional[Path]:
    """An explicit resume=, else (auto_resume) this run directory's own last checkpoint, else None."""
    if cfg.resume:
        return checkpoint.resolve(cfg.resume, prefer=checkpoint.LAST)
    own = context.checkpoint_dir / checkpoint.LAST
    return own if cfg.auto_resume and own.is_file() else None


def load_initial_weights(model: nn.Module, payload: dict[str, Any], cfg: DictConfig, path: Path) -> None:
    """Start from another run's weights (init_from=, mode=calibrate): same network and dataset, any quantizer."""
    saved = payload["architecture"]
    if saved is None:  # a plain state dict (torchvision .pth, DataParallel dict...): qrun.weights fits it
        weights.fit_state(model, payload["model"], path)
        log.info("weights from %s (a plain state dict)", path)
        return
    for key in ("model", "dataset"):
        if saved.get(key) != architecture(cfg)[key]:
            raise QrunError(f"checkpoint {path} is for {key}={saved.get(key)}, the config has {key}="
                            f"{architecture(cfg)[key]}; pass a checkpoint of the same {key}")
    quant.load_float_state(model, payload["model"])
    log.info("weights from %s (%s, quant=%s)", path, saved.get("model"), saved.get("quant"))


def restore_training_state(state: TrainingState, path: Path, cfg: DictConfig) -> None:
    payload = checkpoint.load(path)
    checkpoint.check_architecture(payload["architecture"], architecture(cfg), path)
    state.model.load_state_dict(payload["model"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    if state.scaler is not None and payload.get("scaler"):
        state.scaler.load_state_dict(payload["scaler"])
    state.epoch, state.best_top1 = payload["epoch"], payload["best_top1"]
    state.history = list(payload.get("history", []))
    checkpoint.restore_rng_state(payload["rng"])


def finish_training(state: TrainingState, context: RunContext, metrics: dict[str, float]) -> dict[str, Any]:
    table = quant.learned_table(state.model)
    if table and context.dist.is_main:
        (context.output_dir / LEARNED_PARAMS_FILE).write_text(f"# Learned quantizer parameters\n\n{table}")
        log.info("learned quantizer parameters:\n%s", table)
    results = base_results(context, state.model)
    results.update(top1=metrics.get("top1"), top5=metrics.get("top5"), best_top1=state.best_top1,
                   epoch=state.epoch, train_loss=metrics.get("train_loss"), history=state.history)
    return write_results(context, results)


# ------------------------------------------------------------------------------------------------- evaluate mode
def evaluate_checkpoint(context: RunContext) -> dict[str, Any]:
    """Load a checkpoint (a run directory means its best.pt), check it matches the config, evaluate only."""
    cfg = context.cfg
    path = checkpoint.resolve(cfg.resume, prefer=checkpoint.BEST)
    payload = checkpoint.load(path)
    checkpoint.check_architecture(payload["architecture"], architecture(cfg), path)
    model = place_model(build_model(cfg), context)
    model.load_state_dict(payload["model"])
    data = build_datasets(cfg.dataset)
    _, val_loader = build_loaders(cfg, data, context.device, context.dist)
    metrics = evaluate(model, val_loader.epoch(0), context.device, progress=cfg.progress,
                       channels_last=cfg.channels_last)
    metrics = distributed.reduce_metrics(metrics, metrics["samples"], context.dist, averaged=("loss", "top1", "top5"))
    log.info("evaluated %s: top1 %.2f top5 %.2f (checkpoint recorded top1 %.2f at epoch %d)", path,
             metrics["top1"], metrics["top5"], payload["metrics"].get("top1", float("nan")), payload["epoch"])
    results = base_results(context, model)
    results.update(top1=metrics["top1"], top5=metrics["top5"], best_top1=payload["best_top1"],
                   epoch=payload["epoch"], checkpoint=str(path), checkpoint_top1=payload["metrics"].get("top1"))
    return write_results(context, results)


# ------------------------------------------------------------------------------------------------------- results
def base_results(context: RunContext, model: nn.Module) -> dict[str, Any]:
    cfg = context.cfg
    arch = architecture(cfg)
    return {"status": "finished", "mode": mode_name(cfg), **arch, "bits": cfg.bits,
            "params": network_parameters(model), **complexity.measure(model, cfg.dataset),
            "device": str(context.device), "world_size": context.dist.world_size,
            "threads": torch.get_num_threads(), "seed": cfg.seed, "output_dir": str(context.output_dir)}


def write_results(context: RunContext, results: dict[str, Any]) -> dict[str, Any]:
    """results.json, written atomically, with the wall time of this invocation."""
    results["wall_time_s"] = round(time.perf_counter() - context.started, 3)
    if not context.dist.is_main:
        return results
    path = context.output_dir / RESULTS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, path)
    return results


def finished_results(context: RunContext) -> Optional[dict[str, Any]]:
    """Stored results of this very directory when a previous invocation already trained all epochs."""
    cfg = context.cfg
    path = context.output_dir / RESULTS_FILE
    if cfg.resume or not cfg.auto_resume or not path.is_file():
        return None
    results = json.loads(path.read_text())
    done = results.get("status") == "finished" and results.get("mode") == "train"
    return results if done and results.get("epoch", 0) >= cfg.epochs else None


MODES: dict[str, Callable[[RunContext], dict[str, Any]]] = {
    "train": train,
    "evaluate": evaluate_checkpoint,
    "calibrate": int8_modes.calibrate,
    "export": int8_modes.export,
}
