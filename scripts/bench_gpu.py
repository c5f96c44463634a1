"""GPU cost of quantization-aware training: step time, peak memory and host syncs, each quantizer against float.

One process; every model of a setting is built through qrun's own API (qrun.models.get_model,
qrun.quant.quantize_model, qrun.quant.initialize_from_data), so this measures what `qrun` trains. One step is
forward, cross-entropy, backward and SGD step, in channels_last, fp32 or under bf16 autocast. Settings: resnet20
b128 32x32 (launch-bound) and resnet18 b256 224x224 (bandwidth-bound). Configs: float, each qrun quantizer at W4A4
with quantize_input=true (xnor at its only width W1A1, twn at W2 on weights only), and as the peer reference on
the very same layers (qrun's quantizer slots swapped for torch.ao modules) torch.ao's fused
FusedMovingAvgObsFakeQuantize (per-tensor 4-bit, observer on, as in torch.ao QAT) and _LearnableFakeQuantize
(LSQ, scale and zero point learned after a static estimate).

Timing: after warm-up, >= 30 interleaved rounds, each running one step of every config in an order rotated per
round, timed with CUDA events (perf_counter on CPU); a config's ratio is the median over rounds of its step time
over the same round's float step, which cancels clock and neighbour drift. Memory: torch.cuda.max_memory_allocated
during one step (weights, gradients and optimizer state included), over float's. Host syncs per step: a
TorchDispatchMode counting scalar reads (`_local_scalar_dense`: .item(), float(t), bool(t)), data-dependent shapes
(nonzero, masked_select, unique) and device-to-host copies, plus host-to-device copies; on CUDA also the
synchronisations torch.cuda.set_sync_debug_mode reports. Data share: the in-memory data path (uint8 batch from
qrun.data.InMemoryImages through the loader, pinned copy, device crop+flip) against a float step.

    python scripts/bench_gpu.py [--rounds 30] [--warmup 5] [--models resnet20 resnet18] [--precisions fp32 bf16]
                                [--only lsq dsq ...] [--compile] [--json results.json]
    python scripts/bench_gpu.py --cpu-smoke     # tiny sizes on CPU: keeps the script working in CI
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when qrun is not installed

from qrun.data import EpochLoader, InMemoryImages, batch_augmentation  # noqa: E402
from qrun.engine import to_device  # noqa: E402
from qrun.models import get_model  # noqa: E402
from qrun.quant import QuantizedLayer, initialize_from_data, quantize_model  # noqa: E402
from qrun.quant.base import quantizer_class  # noqa: E402

SETTINGS = {  # model: (batch, image size, classes)
    "resnet20": (128, 32, 10),
    "resnet18": (256, 224, 1000),
}
SMOKE_SETTINGS = {"resnet20": (4, 8, 10), "resnet18": (4, 16, 10)}
QUANTIZERS = ["uniform", "lsq", "pact", "dorefa", "dsq", "xnor", "twn", "affine"]
PEERS = ["ao-fq", "ao-lsq"]
# Targets of issue 11 (bf16 AMP, channels_last, H200); informative elsewhere.
TIME_TARGETS = {"resnet18": {"dsq": 1.20, "*": 1.10}, "resnet20": {"*": 1.30}}
MEMORY_TARGET = 1.15
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique_dim", "_unique2", "_unique", "item"}


@dataclass
class Config:
    label: str
    quantizer: str  # "none", a qrun quantizer, or a torch.ao peer
    w_bits: int = 32
    a_bits: int = 32
    quantize_input: bool = False


def configs(only: Optional[list[str]]) -> list[Config]:
    out = [Config("float", "none")]
    for name in QUANTIZERS + PEERS:
        if only and name not in only:
            continue
        if name in PEERS:
            out.append(Config(name, name, 4, 4, True))
            continue
        cls = quantizer_class(name)
        bits = min(max(4, cls.min_bits), cls.max_bits)
        quantize_input = "act" in cls.supported_kinds
        label = name if bits == 4 and quantize_input else f"{name} W{bits}" + (f"A{bits}" if quantize_input else "")
        out.append(Config(label, name, bits, bits, quantize_input))
    return out


# ------------------------------------------------------------------------------------------ torch.ao peer modules
class AoSlot(nn.Module):
    """A torch.ao fake-quantize module sitting in a qrun layer's quantizer slot (same layers as qrun's)."""

    scales_output = False
    grad_in_place = False

    def __init__(self, fake_quant: nn.Module) -> None:
        super().__init__()
        self.fake_quant = fake_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero_point = getattr(self.fake_quant, "zero_point", None)
        if isinstance(zero_point, nn.Parameter):
            # _LearnableFakeQuantize learns its zero point by SGD and never clamps it: once a step moves it out of
            # [quant_min, quant_max] its kernel raises. A user clamps it, as qrun projects DSQ's bounds.
            with torch.no_grad():
                zero_point.clamp_(self.fake_quant.quant_min, self.fake_quant.quant_max)
        # torch.ao's fake-quant kernels take float32 only: under autocast a user casts in and out, as here.
        return self.fake_quant(x.float()).to(x.dtype)

    def quantize_bias(self, bias: torch.Tensor, input_quantizer: Optional[nn.Module]) -> torch.Tensor:
        return bias


def ao_fake_quant(peer: str, kind: str, bits: int) -> nn.Module:
    from torch.ao.quantization import FusedMovingAvgObsFakeQuantize, MovingAverageMinMaxObserver
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    if kind == "weight":  # signed, symmetric: [-8, 7] at 4 bits
        qmin, qmax, dtype, scheme = -2 ** (bits - 1), 2 ** (bits - 1) - 1, torch.qint8, torch.per_tensor_symmetric
    else:  # unsigned, affine: [0, 15]
        qmin, qmax, dtype, scheme = 0, 2 ** bits - 1, torch.quint8, torch.per_tensor_affine
    if peer == "ao-fq":
        return FusedMovingAvgObsFakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=qmin, quant_max=qmax,
                                             dtype=dtype, qscheme=scheme)
    return _LearnableFakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=qmin, quant_max=qmax,
                                  use_grad_scaling=True, dtype=dtype, qscheme=scheme)


def swap_in_peer(model: nn.Module, peer: str, bits: int) -> list[nn.Module]:
    """Replace every qrun quantizer by the torch.ao module; returns the torch.ao modules."""
    modules = []
    for layer in model.modules():
        if isinstance(layer, QuantizedLayer):
            for slot, kind in (("weight_quantizer", "weight"), ("input_quantizer", "act")):
                if getattr(layer, slot) is not None:
                    fake_quant = ao_fake_quant(peer, kind, bits)
                    setattr(layer, slot, AoSlot(fake_quant))
                    modules.append(fake_quant)
    return modules


@torch.no_grad()
def initialize_peer(model: nn.Module, modules: list[nn.Module], peer: str, batches: list[torch.Tensor]) -> None:
    """Observers see the calibration batches; LSQ then learns its scale from that static estimate."""
    if peer == "ao-lsq":
        for fake_quant in modules:
            fake_quant.enable_static_estimate()
    for batch in batches:
        model(batch)
    if peer == "ao-lsq":
        for fake_quant in modules:
            fake_quant.enable_param_learning()


# ------------------------------------------------------------------------------------------------ building steps
def build_step(config: Config, model_name: str, setting: tuple[int, int, int], precision: str,
               device: torch.device, data: tuple[torch.Tensor, torch.Tensor], compile_model: bool) -> Callable:
    batch, size, classes = setting
    torch.manual_seed(0)
    model = get_model(model_name, num_classes=classes, in_channels=3)
    qrun_name = "uniform" if config.quantizer in PEERS else config.quantizer
    quantize_model(model, qrun_name, config.w_bits, config.a_bits, config.quantize_input)
    model.to(device).to(memory_format=torch.channels_last).train()
    x, y = data
    calibration = [x[: max(4, batch // 4)]]
    if config.quantizer in PEERS:
        initialize_peer(model, swap_in_peer(model, config.quantizer, config.w_bits), config.quantizer, calibration)
    else:
        initialize_from_data(model, calibration)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    forward = torch.compile(model) if compile_model else model
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()

    return step


# -------------------------------------------------------------------------------------------------- measurements
class SyncCounter(TorchDispatchMode):
    """Host syncs seen at the dispatcher: scalar reads, data-dependent shapes, device-to-host copies; and
    host-to-device copies (each a pageable copy the CPU waits on). On a GPU, reads of CPU tensors cost no sync
    and are not counted; on CPU (the smoke run, a stand-in for the path CUDA takes) every read is."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.on_cpu = device.type == "cpu"
        self.syncs = 0
        self.h2d = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            first = args[0] if args else None
            self.syncs += self.on_cpu or not isinstance(first, torch.Tensor) or first.device.type != "cpu"
        elif name in ("_to_copy", "copy_", "to"):
            src = args[1] if name == "copy_" else args[0]
            dst_device = args[0].device if name == "copy_" else kwargs.get("device")
            if isinstance(src, torch.Tensor) and dst_device is not None:
                dst = torch.device(dst_device)
                if src.device.type != "cpu" and dst.type == "cpu":
                    self.syncs += 1
                elif src.device.type == "cpu" and dst.type != "cpu" and src.numel() > 0:
                    self.h2d += 1
        return func(*args, **kwargs)


def count_syncs(step: Callable, device: torch.device, compiled: bool) -> dict[str, float]:
    counts: dict[str, float] = {}
    if not compiled:  # a dispatch mode would run a compiled graph differently (or not at all)
        with SyncCounter(device) as counter:
            step()
        counts.update(syncs=counter.syncs, h2d=counter.h2d)
    if device.type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts["sync_debug"] = sum("synchroniz" in str(w.message) for w in caught)
        torch.cuda.synchronize()
    return counts


def peak_memory(step: Callable, device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")  # no allocator high-water mark on CPU (scripts/bench_speed.py measures RSS instead)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated())


class Timer:
    """CUDA events on a GPU (device time of the enqueued step, idle gaps of a launch-bound step included)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time(self, step: Callable) -> float:
        if not self.cuda:
            start = time.perf_counter()
            step()
            return time.perf_counter() - start
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def data_path_time(setting: tuple[int, int, int], device: torch.device, batches: int, timer: Timer) -> float:
    """Seconds per batch of qrun's in-memory path: loader fetch, pinned non_blocking copy, device crop+flip."""
    batch, size, _ = setting
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch * (batches + 2), size, size, 3), dtype=np.uint8)
    cfg = argparse.Namespace(augment=True, mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26], image_size=size,
                             name="cifar10")
    dataset = InMemoryImages(images, np.zeros(len(images)), cfg.mean, cfg.std, batch_augmentation(cfg))
    loader = EpochLoader(dataset, batch, shuffle=True, workers=None, seed=0, pin_memory=device.type == "cuda")
    epoch = loader.epoch(1)
    iterator = iter(epoch)

    def fetch() -> None:
        images_, targets_ = next(iterator)
        to_device(images_, targets_, device, True, epoch.batch_augment)

    fetch()
    return statistics.median(timer.time(fetch) for _ in range(batches))


@dataclass
class Result:
    model: str
    precision: str
    config: Config
    times: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    memory: float = float("nan")
    syncs: dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None


def bench_setting(model_name: str, setting: tuple[int, int, int], precision: str, args: argparse.Namespace,
                  device: torch.device) -> list[Result]:
    batch, size, classes = setting
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=generator).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), generator=generator).to(device)
    results, steps = [], {}
    for config in configs(args.only):
        result = Result(model_name, precision, config)
        results.append(result)
        try:
            step = build_step(config, model_name, setting, precision, device, (x, y), args.compile)
            for _ in range(args.warmup):
                step()
            result.syncs = count_syncs(step, device, args.compile)
            result.memory = peak_memory(step, device)
            steps[config.label] = step
        except Exception as error:  # one broken config must not hide the others' numbers
            result.error = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    if "float" not in steps:
        return results
    timer, labels = Timer(device), list(steps)
    by_label = {r.config.label: r for r in results}
    for round_index in range(args.rounds):
        shift = round_index % len(labels)
        round_times = {}
        for label in labels[shift:] + labels[:shift]:
            try:
                round_times[label] = timer.time(steps[label])
            except Exception as error:  # e.g. torch.ao's learned zero point leaving [quant_min, quant_max]
                by_label[label].error = (f"round {round_index}: {type(error).__name__}: "
                                         f"{str(error).splitlines()[0][:100]}")
        labels = [label for label in labels if by_label[label].error is None]
        if "float" not in round_times:
            break
        for label in labels:
            by_label[label].times.append(round_times[label])
            by_label[label].ratios.append(round_times[label] / round_times["float"])
    return results


def target_for(result: Result) -> Optional[float]:
    targets = TIME_TARGETS.get(result.model, {})
    if result.config.quantizer in PEERS or result.config.quantizer == "none":
        return None
    return targets.get(result.config.quantizer, targets.get("*"))


def report(results: list[Result], float_data: Optional[float], device: torch.device, smoke: bool) -> None:
    first = results[0]
    print(f"\n## {first.model} {first.precision}  (device {device}, torch {torch.__version__})")
    base = next((r for r in results if r.config.quantizer == "none"), None)
    peer_fq = next((r for r in results if r.config.label == "ao-fq" and r.ratios), None)
    print(f"{'config':<13}{'median ms':>10}{'time x':>8}{'q1-q3':>13}{'peak MiB':>10}{'mem x':>7}{'syncs':>7}"
          f"{'h2d':>5}{'dbg':>5}  target")
    for r in results:
        if r.error or not r.ratios:
            print(f"{r.config.label:<13} failed: {r.error or 'float failed'}")
            continue
        q1, _, q3 = statistics.quantiles(r.ratios, n=4, method="inclusive") if len(r.ratios) > 1 else r.ratios * 3
        ratio = statistics.median(r.ratios)
        memory_x = r.memory / base.memory if base and base.memory == base.memory else float("nan")
        verdict = ""
        target = target_for(r)
        if target is not None and not smoke:
            ok = ratio <= target and (memory_x <= MEMORY_TARGET or r.model != "resnet18")
            ok = ok and (peer_fq is None or r.model != "resnet18" or ratio <= statistics.median(peer_fq.ratios))
            syncs = r.syncs.get("syncs", r.syncs.get("sync_debug", 0))
            ok = ok and (syncs == 0 or r.model != "resnet20")
            verdict = f"<={target:.2f} {'ok' if ok else 'MISS'}"
        debug = r.syncs.get("sync_debug")
        print(f"{r.config.label:<13}{statistics.median(r.times) * 1e3:>10.2f}{ratio:>8.3f} {f'{q1:.3f}-{q3:.3f}':>12}"
              f"{r.memory / 2 ** 20:>10.1f}{memory_x:>7.3f}{r.syncs.get('syncs', '-'):>7}{r.syncs.get('h2d', '-'):>5}"
              f"{'' if debug is None else debug:>5}  {verdict}")
    if float_data is not None and base and base.times:
        step = statistics.median(base.times)
        print(f"data path (in-memory, batch crop+flip on {device.type}): {float_data * 1e3:.2f} ms/batch = "
              f"{100 * float_data / (float_data + step):.0f}% of a float step + data")


def to_json(results: list[Result]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        rows.append({"model": r.model, "precision": r.precision, "config": r.config.label,
                     "quantizer": r.config.quantizer, "error": r.error,
                     "median_ms": statistics.median(r.times) * 1e3 if r.times else None,
                     "time_ratio": statistics.median(r.ratios) if r.ratios else None,
                     "peak_bytes": None if r.memory != r.memory else r.memory, **r.syncs})
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--only", nargs="*", help="quantizers / peers to run (float always runs)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (float included)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, 3 rounds, on CPU: a working check")
    args = parser.parse_args(argv)
    settings = SETTINGS
    if args.cpu_smoke:
        args.device, args.rounds, args.warmup, settings = "cpu", min(args.rounds, 2), 1, SMOKE_SETTINGS
        torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and CI machines are shared)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"bench_gpu: device={device} rounds={args.rounds} warmup={args.warmup} compile={args.compile} "
          f"channels_last=True torch={torch.__version__}"
          + (f" gpu={torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    everything: list[Result] = []
    for model_name in args.models:
        setting = settings[model_name]
        print(f"\n# {model_name}: batch {setting[0]}, {setting[1]}x{setting[1]}, {setting[2]} classes")
        data = data_path_time(setting, device, 3 if args.cpu_smoke else 20, Timer(device)) \
            if model_name == "resnet20" else None
        for precision in args.precisions:
            results = bench_setting(model_name, setting, precision, args, device)
            report(results, data, device, args.cpu_smoke)
            everything.extend(results)
            if args.json:  # after every setting: a run cut short by a time limit keeps what it measured
                args.json.write_text(json.dumps(to_json(everything), indent=1))
    print("\ntime x: median over rounds of step time / the same round's float step; q1-q3: quartiles of those "
          "ratios; mem x: peak allocated during a step / float's; syncs: host syncs per step (dispatcher count); "
          "h2d: host-to-device copies per step; dbg: syncs torch.cuda.set_sync_debug_mode reports (CUDA only)")
    return 0 if all(r.error is None for r in everything if r.config.quantizer == "none") else 1


if __name__ == "__main__":
    sys.exit(main())
