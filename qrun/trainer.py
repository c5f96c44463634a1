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
from typing import Any, Callable, NoReturn, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qrun import (
    checkpoint, complexity, distill, distributed, guard, lock, preempt, progress, quant, resources, runconfig, schedule,
    weights,
)
from qrun.config import effective_bits, mode_name, validate
from qrun.data import DataSplits, EpochLoader, build_datasets, epoch_seed, first_batches, resolve_num_classes
from qrun.guard import Diverged
from qrun.engine import evaluate, to_device, train_one_epoch
from qrun.errors import QrunError
from qrun.int8 import modes as int8_modes
from qrun.models import get_model
from qrun.optim import build_optimizer
from qrun.results import read_results
from qrun.steps import EpochSteps
from qrun.tb import Logger, hparams_of

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


def run(cfg: DictConfig, overrides: Optional[list[str]] = None) -> dict[str, Any]:
    """Validate, set up, and run the requested mode; returns what was written to results.json.

    `overrides`: what the user typed (Hydra's task overrides are used under the CLI); a resume or evaluation
    takes every other key from the checkpoint's stored config (qrun.runconfig).
    """
    validate(cfg)
    # ImageFolder layouts: one output per class folder found. Before the run's stored config is compared (a
    # re-run job's null must read as the count its checkpoint holds) and again after it filled in the root.
    resolve_num_classes(cfg.dataset, needs_root=False)
    resources.configure_threads(cfg.threads)
    mode = mode_name(cfg)
    if mode not in MODES:
        raise QrunError(f"mode={mode} is not implemented; accepted: {', '.join(MODES)}")
    device = select_device(cfg.device)
    dist_info = distributed.setup(device, cfg.dist_backend)
    try:
        # Every rank writes into rank 0's folder: a timestamped run dir may resolve differently on other ranks.
        folder = Path(distributed.broadcast_object(str(output_dir(cfg)), dist_info))
        with lock.held(folder, enabled=dist_info.is_main):
            cfg = runconfig.for_run(cfg, folder, overrides)
            resolve_num_classes(cfg.dataset)
            context = RunContext(cfg=cfg, output_dir=folder, device=distributed.device_for(device, dist_info),
                                 started=time.perf_counter(), dist=dist_info)
            progress.start_run(cfg, context.device, context.output_dir)
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
    """(train, test) loaders. Under DDP each rank loads its shard with its share of the (global) batch sizes."""
    pin = device.type == "cuda"
    train = EpochLoader(data.train, distributed.per_rank_batch(cfg.batch_size, dist_info), shuffle=True,
                        workers=cfg.workers, seed=cfg.seed, pin_memory=pin,
                        sampler_factory=distributed.train_sampler_factory(dist_info, epoch_seed(cfg.seed, 0)))
    return train, eval_loader(cfg, data.test, device, dist_info)


def eval_loader(cfg: DictConfig, dataset: Any, device: torch.device,
                dist_info: distributed.DistInfo = distributed.SINGLE) -> EpochLoader:
    return EpochLoader(dataset, max(1, cfg.eval_batch_size // dist_info.world_size), shuffle=False,
                       workers=cfg.workers, seed=cfg.seed, pin_memory=device.type == "cuda",
                       sampler_factory=distributed.eval_sampler_factory(dist_info))


# ---------------------------------------------------------------------------------------------------- train mode
@dataclass
class TrainingState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: Optional[torch.amp.GradScaler]
    steps_per_epoch: int = 1
    epoch: int = 0  # epochs completed
    best_top1: float = float("-inf")
    best_epoch: Optional[int] = None
    history: list[dict[str, float]] | None = None
    # The lr plan: [first step, epochs] segments (qrun.schedule); more than one after a resume changed epochs.
    segments: list[list[int]] | None = None
    # A mid-epoch checkpoint's place: {"epoch", "batch", "sampler_seed"} and each rank's StepTracker state.
    position: Optional[dict[str, int]] = None
    tracker_states: Optional[list[dict[str, Any]]] = None


def train(context: RunContext) -> dict[str, Any]:
    cfg = context.cfg
    finished = finished_results(context)
    if finished is not None:
        log.info("already finished in %s (epoch %d); nothing to do", context.output_dir, finished["epoch"])
        return finished
    with preempt.installed(cfg.preempt.signals, cfg.preempt.enabled) as stop:
        prepare_checkpoint_dir(context)
        data = build_datasets(cfg.dataset)
        train_loader, test_loader = build_loaders(cfg, data, context.device, context.dist)
        val_loader = eval_loader(cfg, data.val, context.device, context.dist) if data.val is not None else None
        state = build_training_state(cfg, context, len(train_loader))
        resume_path = resume_checkpoint(cfg, context)
        if resume_path is not None:
            restore_training_state(state, resume_path, cfg, context)
        else:
            initialize_weights(state, context, data)
        state.model = distributed.prepare_model(state.model, context.dist, cfg.sync_bn)
        try:
            metrics = fit(state, context, train_loader, test_loader, val_loader, stop)
        except Diverged as error:
            record_divergence(state, context, error)
            raise
    return finish_training(state, context, metrics)


def build_training_state(cfg: DictConfig, context: RunContext, steps_per_epoch: int) -> TrainingState:
    model = place_model(build_model(cfg), context)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.quant.lr_scale)
    segments = [[0, int(cfg.epochs)]]
    scheduler = schedule.build(optimizer, cfg.scheduler, segments, steps_per_epoch)
    fp16 = cfg.get("amp_dtype") == "float16"  # only float16 autocast needs loss scaling
    scaler = torch.amp.GradScaler(context.device.type, enabled=fp16) if cfg.amp else None
    return TrainingState(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                         steps_per_epoch=steps_per_epoch, history=[], segments=segments)


def initialize_weights(state: TrainingState, context: RunContext, data: DataSplits) -> None:
    """A fresh run: another run's weights if init_from= names one, then data-dependent quantizer values."""
    cfg = context.cfg
    if cfg.model.pretrained:
        weights.load_pretrained(state.model, cfg.model.name)
    if cfg.init_from:
        path = checkpoint.resolve(cfg.init_from, prefer=checkpoint.BEST, key="init_from")
        load_initial_weights(state.model, weights.read_initial(path), cfg, path)
    batches = (to_device(b, b, context.device, cfg.channels_last)[0]
               for b in first_batches(data.train, cfg.quant.init_batches, cfg.batch_size, cfg.seed))
    used = quant.initialize_from_data(state.model, batches)
    if used:
        log.info("initialised quantizers from %d training batches", used)


def prepare_checkpoint_dir(context: RunContext) -> None:
    """Under the folder lock: drop temporary files of interrupted writes, and make best.pt agree with last.pt."""
    if not context.dist.is_main:
        return
    for stale in checkpoint.remove_stale_temporaries(context.checkpoint_dir):
        log.warning("removed %s, left by an interrupted checkpoint write", stale)
    last = context.checkpoint_dir / checkpoint.LAST
    if last.is_file():
        repaired = checkpoint.repair_best(checkpoint.load(last, mmap=True), last,
                                          context.checkpoint_dir / checkpoint.BEST)
        if repaired:
            log.warning("%s", repaired)


def fit(state: TrainingState, context: RunContext, train_loader: EpochLoader, test_loader: EpochLoader,
        val_loader: Optional[EpochLoader] = None, stop: Optional[preempt.StopRequest] = None) -> dict[str, float]:
    """Epochs from the saved position to cfg.epochs. A checkpoint pair after each epoch; between two steps the
    preemption flag, the divergence guard and checkpoint_every_steps (see between_steps): a kill costs at most
    the running epoch, a preemption the running step.

    Every epoch scores the test split and, when there is one, the validation split; best.pt and best_top1 follow
    the validation split (the test split without one: `best_selected_on` in results.json says which).
    """
    cfg = context.cfg
    stop = stop or preempt.StopRequest()
    criterion = distill.wrap_criterion(nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), cfg,
                                       context.device, build_model)  # a teacher when distill.teacher is set
    # Only float16 AMP has a GradScaler that skips non-finite steps; under bf16 a non-finite loss is divergence.
    tracker = guard.StepTracker(criterion, amp=cfg.amp and cfg.get("amp_dtype") == "float16")
    step_model = distributed.wrap(state.model, context.dist, context.device)
    step_model = torch.compile(step_model) if cfg.compile else step_model
    logger = Logger(context.output_dir / "tb" if context.dist.is_main else None)
    logger.hparams(hparams_of(cfg))
    metrics: dict[str, float] = dict(state.history[-1]) if state.history else {}
    try:
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            quant.on_epoch_start(state.model, epoch)  # observer / BN-statistics freezing schedules
            start = start_epoch(state, tracker, epoch, context)
            batches = EpochSteps(train_loader.epoch(epoch, start), start,
                                 between_steps(state, context, tracker, stop, epoch, start))
            lr = epoch_start_lr(state, epoch)
            train_metrics = train_epoch(step_model, tracker, state, context, batches, epoch)
            if batches.stopped:
                preempted(state, context, tracker, stop, epoch, batches.batch, start)
            train_metrics = epoch_train_metrics(tracker, train_metrics, context, epoch, state.steps_per_epoch)
            test_metrics = score(step_model, test_loader, epoch, context)
            val_metrics = score(step_model, val_loader, epoch, context) if val_loader is not None else None
            metrics = epoch_metrics(epoch, lr, train_metrics, test_metrics, val_metrics)
            is_best = record_epoch(state, metrics)
            log_epoch(logger, state.model, metrics)
            distill.log_epoch(tracker.criterion, logger, epoch)
            save_checkpoints(state, context, metrics, is_best=is_best)
            if stop.should_stop(0):
                preempted(state, context, tracker, stop, epoch, state.steps_per_epoch, state.steps_per_epoch)
    finally:
        logger.close()
    return metrics


def epoch_start_lr(state: TrainingState, epoch: int) -> float:
    """The lr of the epoch's first step, as LambdaLR computes it (also for an epoch resumed mid-way)."""
    scheduler = state.scheduler
    return scheduler.base_lrs[0] * scheduler.lr_lambdas[0]((epoch - 1) * state.steps_per_epoch)


def start_epoch(state: TrainingState, tracker: guard.StepTracker, epoch: int, context: RunContext) -> int:
    """The batch this epoch starts at: a mid-epoch checkpoint's position (its sums restored), else 0."""
    if state.position is not None and int(state.position["epoch"]) == epoch:
        start = int(state.position["batch"])
        tracker.load_state(state.tracker_states[context.dist.rank], context.device)
        state.position = state.tracker_states = None
        return start
    tracker.reset(context.device)
    return 0


def between_steps(state: TrainingState, context: RunContext, tracker: guard.StepTracker,
                  stop: preempt.StopRequest, epoch: int, start: int) -> Callable[[int], bool]:
    """What runs after each step (before the next batch is fetched); returns True to stop the epoch there."""
    every = context.cfg.checkpoint_every_steps

    def between(batch: int) -> bool:
        done_here = batch - start
        tracker.after_step(state.scaler)
        if done_here and batch % guard.CHECK_EVERY == 0:
            tracker.check(epoch, state.steps_per_epoch, last_good_checkpoint(context))
        if stop.should_stop(batch):
            return True
        if every and done_here and batch % every == 0 and batch < state.steps_per_epoch:
            save_position(state, context, tracker, epoch, batch)
        return False

    return between


def train_epoch(step_model: nn.Module, tracker: guard.StepTracker, state: TrainingState, context: RunContext,
                batches: EpochSteps, epoch: int) -> dict[str, float]:
    """One epoch's steps; a quantizer whose range collapsed (a host-side division by zero) is divergence too."""
    cfg = context.cfg
    try:
        return train_one_epoch(step_model, tracker, state.optimizer, state.scheduler, batches, context.device,
                               epoch, cfg.progress, state.scaler, cfg.channels_last)
    except (ZeroDivisionError, OverflowError, FloatingPointError) as error:
        raise Diverged(f"training diverged at epoch {epoch} step {tracker.step + 1} of {state.steps_per_epoch}: "
                       f"{type(error).__name__}: {error} (a learned quantizer range collapsed); last good "
                       f"checkpoint: {last_good_checkpoint(context)}; lower optimizer.lr") from None


def epoch_train_metrics(tracker: guard.StepTracker, engine_metrics: dict[str, float], context: RunContext,
                        epoch: int, steps_per_epoch: int) -> dict[str, float]:
    """The epoch's loss and top-1 from the tracker's sums (they survive a mid-epoch resume), over all ranks."""
    tracker.check(epoch, steps_per_epoch, last_good_checkpoint(context))
    own = tracker.metrics()
    merged = {**engine_metrics, "loss": own["loss"], "top1": own["top1"]}
    return distributed.reduce_metrics(merged, own["samples"], context.dist, averaged=("loss", "top1"))


def record_epoch(state: TrainingState, metrics: dict[str, float]) -> bool:
    """Advance the state by one finished epoch; True when it is the best so far (ties go to the later epoch)."""
    epoch = int(metrics["epoch"])
    selected = metrics[selection_key("val_top1" in metrics)]  # validation top-1 when there is a split
    is_best = selected >= state.best_top1
    state.epoch = epoch
    if is_best:
        state.best_top1, state.best_epoch = selected, epoch
    state.history.append(metrics)
    return is_best


def last_good_checkpoint(context: RunContext) -> str:
    last = context.checkpoint_dir / checkpoint.LAST
    return str(last) if last.is_file() else "none (no checkpoint was written yet)"


def score(model: nn.Module, loader: EpochLoader, epoch: int, context: RunContext) -> dict[str, float]:
    """Loss, top-1 and top-5 of one evaluation split, summed over the ranks."""
    cfg = context.cfg
    metrics = evaluate(model, loader.epoch(epoch), context.device, progress=cfg.progress,
                       channels_last=cfg.channels_last)
    return distributed.reduce_metrics(metrics, metrics["samples"], context.dist, averaged=("loss", "top1", "top5"))


def selection_key(has_val: bool) -> str:
    """The history key best.pt is chosen on: validation top-1 when a split exists, else (test) top-1."""
    return "val_top1" if has_val else "top1"


def epoch_metrics(epoch: int, lr: float, train_metrics: dict, test_metrics: dict,
                  val_metrics: Optional[dict] = None) -> dict[str, float]:
    """One history entry: `top1`/`top5`/`test_loss` are the test split, `val_*` the validation split."""
    metrics = {"epoch": epoch, "lr": lr, "train_loss": train_metrics["loss"], "train_top1": train_metrics["top1"],
               "data_share": train_metrics["data_share"], "epoch_time_s": train_metrics["time_s"],
               "test_loss": test_metrics["loss"], "top1": test_metrics["top1"], "top5": test_metrics["top5"]}
    if val_metrics is not None:
        metrics.update(val_loss=val_metrics["loss"], val_top1=val_metrics["top1"], val_top5=val_metrics["top5"])
    return metrics


def log_epoch(logger: Logger, model: nn.Module, metrics: dict[str, float]) -> None:
    epoch = int(metrics["epoch"])
    scalars = {"train/loss": metrics["train_loss"], "train/top1": metrics["train_top1"],
               "test/loss": metrics["test_loss"], "test/top1": metrics["top1"], "test/top5": metrics["top5"],
               "lr": metrics["lr"]}
    val = ""
    if "val_top1" in metrics:
        scalars.update({"val/loss": metrics["val_loss"], "val/top1": metrics["val_top1"],
                        "val/top5": metrics["val_top5"]})
        val = f" | val loss {metrics['val_loss']:.4f} top1 {metrics['val_top1']:.2f}"
    logger.scalars(scalars, epoch)
    logger.scalars(quant.learned_values(model), epoch, prefix="quant/")
    log.info("epoch %d  train loss %.4f top1 %.2f%s | test loss %.4f top1 %.2f top5 %.2f | lr %.2e | %.1fs "
             "(data %.0f%%)", epoch, metrics["train_loss"], metrics["train_top1"], val, metrics["test_loss"],
             metrics["top1"], metrics["top5"], metrics["lr"], metrics["epoch_time_s"], 100 * metrics["data_share"])


def save_checkpoints(state: TrainingState, context: RunContext, metrics: dict[str, float], is_best: bool) -> None:
    """The epoch-end pair. last.pt is the commit point (it records best_epoch) and is written first; a kill
    before best.pt follows is repaired from last.pt at the next start (checkpoint.repair_best)."""
    ensure_finite(state, context, f"after epoch {state.epoch}")
    if not context.dist.is_main:
        return
    payload = state_payload(state, context, metrics)
    checkpoint.atomic_save(payload, context.checkpoint_dir / checkpoint.LAST)
    if is_best:
        checkpoint.atomic_save(payload, context.checkpoint_dir / checkpoint.BEST)


def save_position(state: TrainingState, context: RunContext, tracker: guard.StepTracker, epoch: int,
                  batch: int) -> Path:
    """A mid-epoch last.pt: the state after `batch` steps of `epoch`, the data position and every rank's sums."""
    tracker.check(epoch, state.steps_per_epoch, last_good_checkpoint(context))
    ensure_finite(state, context, f"at epoch {epoch} step {batch}")
    trackers = gather_tracker_states(tracker, context)
    path = context.checkpoint_dir / checkpoint.LAST
    if context.dist.is_main:
        position = {"epoch": epoch, "batch": batch, "sampler_seed": epoch_seed(context.cfg.seed, epoch)}
        metrics = dict(state.history[-1]) if state.history else {}
        checkpoint.atomic_save(state_payload(state, context, metrics, position=position, trackers=trackers), path)
    return path


def preempted(state: TrainingState, context: RunContext, tracker: guard.StepTracker, stop: preempt.StopRequest,
              epoch: int, batch: int, start: int) -> NoReturn:
    """Save where the epoch stands (unless nothing ran since the last checkpoint), say so, and leave."""
    path = context.checkpoint_dir / checkpoint.LAST
    if batch > start and batch < state.steps_per_epoch:
        save_position(state, context, tracker, epoch, batch)
        saved = f"checkpoint at epoch {epoch} batch {batch}/{state.steps_per_epoch} in {path}"
    elif path.is_file():
        saved = f"nothing ran since the checkpoint in {path}"
    else:
        saved = "no step ran yet, nothing to save"
    log.warning("preempted by %s: %s; the same command continues from there (exit %d)", stop.signal_name, saved,
                preempt.EXIT_CODE)
    distributed.barrier(context.dist)
    stop.hand_over()


def ensure_finite(state: TrainingState, context: RunContext, where: str) -> None:
    """No checkpoint with non-finite weights is ever written (one host sync per checkpoint)."""
    if not guard.all_finite(state.model):
        raise Diverged(f"training diverged: the weights are not finite {where}; last good checkpoint: "
                       f"{last_good_checkpoint(context)}; lower optimizer.lr or check the data")


def gather_tracker_states(tracker: guard.StepTracker, context: RunContext) -> list[dict[str, Any]]:
    """Every rank's epoch sums (rank 0 writes them all), so each rank resumes its own shard's numbers."""
    own = tracker.state()
    if not context.dist.enabled:
        return [own]
    import torch.distributed as dist

    device = context.device if dist.get_backend() == "nccl" else torch.device("cpu")
    packed = torch.cat([own["sums"], torch.tensor([own["step"], own["samples"]], dtype=torch.float64)]).to(device)
    gathered = [torch.zeros_like(packed) for _ in range(context.dist.world_size)]
    dist.all_gather(gathered, packed)
    return [{"sums": g[:2].cpu(), "step": int(g[2]), "samples": int(g[3])} for g in gathered]


def state_payload(state: TrainingState, context: RunContext, metrics: dict[str, float],
                  position: Optional[dict[str, int]] = None,
                  trackers: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    cfg = context.cfg
    return checkpoint.build_payload(
        model_state=state.model.state_dict(), optimizer_state=state.optimizer.state_dict(),
        scheduler_state=state.scheduler.state_dict(), epoch=state.epoch, best_top1=state.best_top1,
        metrics=metrics, architecture=architecture(cfg), config=runconfig.plain(cfg),
        scaler_state=state.scaler.state_dict() if state.scaler is not None else None,
        best_epoch=state.best_epoch, history=list(state.history), schedule=state.segments, position=position,
        trackers=trackers, world_size=context.dist.world_size)


def resume_checkpoint(cfg: DictConfig, context: RunContext) -> Optional[Path]:
    """This run directory's own last.pt (auto_resume), else an explicit resume=, else None."""
    return runconfig.train_source(cfg, context.output_dir)[0]


def without_quantizer_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model state without its quantizers' tensors (steps, ranges, observers): another quantizer's are no use."""
    return {k: v for k, v in state.items() if not any(part.endswith("_quantizer") for part in k.split(".")[:-1])}


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
    try:
        quant.load_float_state(model, without_quantizer_state(payload["model"]))
    except RuntimeError as error:  # same names, other shapes: the model's options (widths) differ
        first_line = (str(error).strip().splitlines() or [""])[-1].strip()
        raise QrunError(f"checkpoint {path} does not fit this model ({first_line}); its model.options were "
                        f"{(payload.get('config') or {}).get('model', {}).get('options')}") from None
    log.info("weights from %s (%s, quant=%s; its quantizer state dropped)", path, saved.get("model"),
             saved.get("quant"))


def restore_training_state(state: TrainingState, path: Path, cfg: DictConfig, context: RunContext) -> None:
    payload = checkpoint.load(path)
    checkpoint.check_architecture(payload["architecture"], architecture(cfg), path)
    position = payload.get("position")
    reached = int(position["epoch"]) if position else int(payload["epoch"])
    if reached > cfg.epochs:
        raise QrunError(f"checkpoint {path} is at epoch {reached}; epochs={cfg.epochs} asks for fewer: pass "
                        f"epochs>={reached}, or evaluate it with mode=evaluate")
    if position and len(payload.get("trackers") or []) != context.dist.world_size:
        raise QrunError(f"checkpoint {path} was written mid-epoch by {payload.get('world_size')} processes; resume "
                        f"it with as many (this run has {context.dist.world_size})")
    state.model.load_state_dict(payload["model"])
    state.optimizer.load_state_dict(payload["optimizer"])
    restore_schedule(state, payload, cfg)
    if state.scaler is not None and payload.get("scaler"):
        state.scaler.load_state_dict(payload["scaler"])
    state.epoch, state.best_top1 = payload["epoch"], payload["best_top1"]
    state.best_epoch = payload.get("best_epoch")
    state.history = list(payload.get("history", []))
    state.position, state.tracker_states = position, payload.get("trackers")
    if context.dist.is_main and path.parent != context.checkpoint_dir:
        carried = checkpoint.carry_best(payload, path, context.checkpoint_dir / checkpoint.BEST)
        if carried:
            log.info("%s", carried)
    checkpoint.restore_rng_state(payload["rng"])
    where = f"epoch {position['epoch']} batch {position['batch']}/{state.steps_per_epoch}" if position else \
        f"epoch {state.epoch + 1}"
    log.info("resumed from %s at %s", path, where)


def restore_schedule(state: TrainingState, payload: dict[str, Any], cfg: DictConfig) -> None:
    """The stored lr plan, extended by qrun.schedule's rule when epochs changed; the lr of the next step set."""
    stored = payload.get("schedule") or [[0, int(payload.get("config", {}).get("epochs", cfg.epochs))]]
    steps_taken = int(payload["scheduler"]["last_epoch"])
    state.segments = schedule.extend(stored, steps_taken, int(cfg.epochs))
    state.scheduler = schedule.build(state.optimizer, cfg.scheduler, state.segments, state.steps_per_epoch)
    state.scheduler.load_state_dict(payload["scheduler"])
    schedule.apply_current(state.scheduler)
    if state.segments != stored:
        lr = state.optimizer.param_groups[0]["lr"]
        log.info("epochs %d -> %d: the lr goes on from %.3e at step %d (%s schedule rebuilt for the new total, "
                 "no restart)", int(stored[-1][1]), cfg.epochs, lr, steps_taken, cfg.scheduler.name)
        if lr == 0.0:
            log.warning("the lr is 0 (the schedule reached its floor): the extra epochs will not change the "
                        "weights; for more training start a new schedule with init_from=<this run>")


def record_divergence(state: TrainingState, context: RunContext, error: Diverged) -> None:
    """results.json says the run diverged and why (a sweep lists it as such; qrun-report skips it)."""
    cfg = context.cfg
    results = {"status": "diverged", "error": str(error), "mode": "train", **architecture(cfg), "bits": cfg.bits,
               "seed": cfg.seed, "epoch": state.epoch, "best_top1": state.best_top1, "history": state.history,
               "output_dir": str(context.output_dir)}
    write_results(context, results)


def finish_training(state: TrainingState, context: RunContext, metrics: dict[str, float]) -> dict[str, Any]:
    table = quant.learned_table(state.model)
    if table and context.dist.is_main:
        (context.output_dir / LEARNED_PARAMS_FILE).write_text(f"# Learned quantizer parameters\n\n{table}")
        log.info("learned quantizer parameters:\n%s", table)
    results = base_results(context, state.model)
    results.update(top1=metrics.get("top1"), top5=metrics.get("top5"), best_top1=state.best_top1,
                   epoch=state.epoch, train_loss=metrics.get("train_loss"), **split_results(state.history),
                   history=state.history)
    return write_results(context, results)


def split_results(history: list[dict[str, float]]) -> dict[str, Any]:
    """Which split each number of results.json comes from, and the selected epoch's scores on both."""
    has_val = bool(history) and "val_top1" in history[-1]
    key = selection_key(has_val)
    # The last epoch at the maximum: fit() overwrites best.pt on ties.
    best = max(reversed(history), key=lambda entry: entry.get(key, float("-inf"))) if history else {}
    return {"top1_split": "test", "best_selected_on": "val" if has_val else "test", "best_epoch": best.get("epoch"),
            "best_test_top1": best.get("top1"), "val_top1": history[-1].get("val_top1") if has_val else None,
            "val_top5": history[-1].get("val_top5") if has_val else None}


# ------------------------------------------------------------------------------------------------- evaluate mode
def evaluate_checkpoint(context: RunContext) -> dict[str, Any]:
    """Load a checkpoint (a run directory means its best.pt) and evaluate only. The config is the run's own
    (runconfig.for_run); the full test split unless dataset.val_samples was typed."""
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
    run_samples = (payload.get("config") or {}).get("dataset", {}).get("val_samples")
    log.info("evaluated %s (epoch %d) on %d test samples: top1 %.2f top5 %.2f (the run recorded top1 %.2f on %s)",
             path, payload["epoch"], metrics["samples"], metrics["top1"], metrics["top5"],
             payload["metrics"].get("top1", float("nan")),
             f"{run_samples} test samples" if run_samples else "the full test split")
    results = base_results(context, model)
    results.update(top1=metrics["top1"], top5=metrics["top5"], best_top1=payload["best_top1"],
                   epoch=payload["epoch"], checkpoint=str(path), checkpoint_top1=payload["metrics"].get("top1"),
                   top1_split="test", best_selected_on=split_results(payload.get("history", []))["best_selected_on"],
                   evaluated={"split": "test", "samples": metrics["samples"], "checkpoint": str(path),
                              "epoch": payload["epoch"]})
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
    # Strict JSON: a non-finite number is written as null, never as a bare NaN.
    text = json.dumps(guard.json_safe(results), indent=2, default=str, allow_nan=False)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise QrunError(f"cannot write {path}: {error.strerror or error}") from None
    return results


def finished_results(context: RunContext) -> Optional[dict[str, Any]]:
    """Stored results of this very directory when a previous invocation already trained all epochs."""
    cfg = context.cfg
    path = context.output_dir / RESULTS_FILE
    if not cfg.auto_resume or not path.is_file():
        return None
    results = read_results(path)  # empty, corrupt or unreadable: a warning, then "not finished"
    if results is None or results.get("status") != "finished" or results.get("mode") != "train":
        return None
    # The stored config already matched the requested one (runconfig.for_run); only epochs may differ.
    epoch = int(results.get("epoch") or 0)
    if epoch > cfg.epochs:
        raise QrunError(f"{context.output_dir} holds a run finished at epoch {epoch}; epochs={cfg.epochs} asks "
                        "for fewer: use another folder, or evaluate that run with mode=evaluate")
    return results if epoch == cfg.epochs else None


MODES: dict[str, Callable[[RunContext], dict[str, Any]]] = {
    "train": train,
    "evaluate": evaluate_checkpoint,
    "calibrate": int8_modes.calibrate,
    "export": int8_modes.export,
}
