"""`mode=calibrate` (post-training quantization) and `mode=export` (ONNX QDQ + onnxruntime evaluation).

Both reuse the trainer's helpers (model building, loaders, results.json); they are imported lazily because the
trainer's MODES table imports this module.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from omegaconf import OmegaConf
from torch import nn

from qrun import checkpoint, quant
from qrun.data import DataSplits, build_datasets, first_batches
from qrun.engine import evaluate, to_device
from qrun.errors import QrunError

log = logging.getLogger(__name__)
ONNX_FILE, ONNX_FP32_FILE = "model.onnx", "model_fp32.onnx"


def calibrate(context: Any) -> dict[str, Any]:
    """PTQ: load a float checkpoint into the quantized model, calibrate observers in eval mode, evaluate, save."""
    from qrun import trainer

    cfg = context.cfg
    if cfg.quant.name == quant.FULL_PRECISION:
        raise QrunError("mode=calibrate needs a quantizer, e.g. quant=affine; got quant=none")
    path = checkpoint.resolve(cfg.resume, prefer=checkpoint.BEST)
    payload = checkpoint.load(path)
    if payload["architecture"].get("quant") != quant.FULL_PRECISION:
        raise QrunError(f"mode=calibrate takes a float checkpoint; {path} was trained with "
                        f"quant={payload['architecture'].get('quant')} (accepted: quant=none)")
    model = trainer.place_model(trainer.build_model(cfg), context)
    trainer.load_initial_weights(model, payload, cfg, path)
    data = build_datasets(cfg.dataset)
    from qrun.int8.ptq import calibrate_model

    batches = (to_device(b, b, context.device, cfg.channels_last)[0]
               for b in first_batches(data.train, cfg.calib_batches, cfg.batch_size, cfg.seed))
    used = calibrate_model(model, batches)
    metrics = _evaluate(model, data, cfg, context)
    float_top1 = payload["metrics"].get("top1")
    log.info("calibrated on %d batches: top1 %.2f (float checkpoint %s)", used, metrics["top1"], float_top1)
    payload_out = checkpoint.build_payload(
        model_state=model.state_dict(), optimizer_state={}, scheduler_state={}, epoch=0,
        best_top1=metrics["top1"], metrics=metrics, architecture=trainer.architecture(cfg),
        config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    for name in (checkpoint.LAST, checkpoint.BEST):
        checkpoint.atomic_save(payload_out, context.checkpoint_dir / name)
    results = trainer.base_results(context, model)
    results.update(top1=metrics["top1"], top5=metrics["top5"], best_top1=metrics["top1"], calib_batches=used,
                   checkpoint=str(path), float_top1=float_top1, epoch=0)
    return trainer.write_results(context, results)


def export(context: Any) -> dict[str, Any]:
    """Write model.onnx (QDQ) and model_fp32.onnx, evaluate both in onnxruntime next to PyTorch's fake quant."""
    from qrun import trainer
    from qrun.int8.export import count_ops, export_onnx, ort_evaluate

    cfg = context.cfg
    if cfg.quant.name == quant.FULL_PRECISION:
        raise QrunError("mode=export writes a Q/DQ model and needs a quantized run (quant=affine, uniform or lsq); "
                        "got quant=none")
    path = checkpoint.resolve(cfg.resume, prefer=checkpoint.BEST)
    payload = checkpoint.load(path)
    checkpoint.check_architecture(payload["architecture"], trainer.architecture(cfg), path)
    model = trainer.build_model(cfg).to(context.device)
    model.load_state_dict(payload["model"])
    model.eval()
    data = build_datasets(cfg.dataset)
    torch_metrics = _evaluate(model, data, cfg, context)
    example = next(iter(_plain_batches(data, cfg)))[0][:1]
    int8_path = export_onnx(model.cpu(), context.output_dir / ONNX_FILE, example, quantize=True)
    fp32_path = export_onnx(model, context.output_dir / ONNX_FP32_FILE, example, quantize=False)
    int8 = ort_evaluate(int8_path, _plain_batches(data, cfg))
    fp32 = ort_evaluate(fp32_path, _plain_batches(data, cfg))
    integer_top1, integer_note = _integer_top1(model, data, cfg)
    log.info("top1: pytorch fake-quant %.2f | onnxruntime int8 %.2f, fp32 %.2f | integer reference %s",
             torch_metrics["top1"], int8["top1"], fp32["top1"], integer_note)
    results = trainer.base_results(context, model)
    results.update(top1=torch_metrics["top1"], top5=torch_metrics["top5"], onnx_int8_top1=int8["top1"],
                   onnx_fp32_top1=fp32["top1"], integer_top1=integer_top1, integer_note=integer_note,
                   onnx_int8=str(int8_path), onnx_fp32=str(fp32_path), onnx_int8_bytes=int8_path.stat().st_size,
                   onnx_fp32_bytes=fp32_path.stat().st_size, onnx_int8_ops=count_ops(int8_path),
                   checkpoint=str(path), epoch=payload["epoch"], best_top1=payload["best_top1"])
    return trainer.write_results(context, results)


def _evaluate(model: nn.Module, data: DataSplits, cfg: Any, context: Any) -> dict[str, float]:
    from qrun import trainer

    _, val_loader = trainer.build_loaders(cfg, data, context.device)
    return evaluate(model, val_loader.epoch(0), context.device, progress=cfg.progress,
                    channels_last=cfg.channels_last)


def _plain_batches(data: DataSplits, cfg: Any) -> Any:
    return torch.utils.data.DataLoader(data.test, batch_size=cfg.eval_batch_size, shuffle=False)


def _integer_top1(model: nn.Module, data: DataSplits, cfg: Any) -> tuple[Optional[float], str]:
    """Top-1 of the integer-only reference, or None with the reason when the network is not a supported chain."""
    from qrun.int8.integer import to_integer

    try:
        integer_model = to_integer(model.cpu().eval())
    except QrunError as error:
        return None, f"not converted: {error}"
    hits = samples = 0
    with torch.no_grad():
        for images, targets in _plain_batches(data, cfg):
            hits += int(integer_model(images).argmax(1).eq(targets).sum())
            samples += targets.numel()
    top1 = 100.0 * hits / max(samples, 1)
    return top1, f"{top1:.2f}"

