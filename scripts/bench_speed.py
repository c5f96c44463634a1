"""Cost of fake-quant training: time and peak memory of one full training step, quantized vs float.

resnet20 on 32x32 inputs, batch 128, one step = forward + backward + SGD step. Full precision and each quantizer
at W4A4 with quantize_input=true (xnor at W1A1 and twn at W2 for information). All models live in one process and
are timed interleaved: each round runs one step of every config, in an order rotated from round to round, and a
config's ratio is the median over rounds of its step time over the float step of the same round. Pairing within
a round cancels the drift of a shared machine (its speed here wanders by 1.5x within minutes), which a ratio of
separate medians does not.

Rounds: a single step's ratio scatters widely on a shared machine (interquartile range about 1.05 to 1.22 for
ratios whose median is 1.12, measured over 40 rounds here), so the median of 15 rounds still moves by about 0.04
from run to run; the default of 40 rounds halves that. The q1-q3 column shows each config's spread.

Clocks: the default is wall time with torch's default threads. On a machine shared with other jobs, wall time of
a 2-thread step mostly measures scheduling (every parallel region waits for a descheduled thread), so
`--threads 1 --clock cpu` measures process CPU time of a single-threaded step instead: it counts the work done,
though cache contention from other jobs still adds noise (repeat, or raise --reps).

Memory: on CPU there is no allocator high-water mark, so a child process measures the growth of its peak
resident set (VmHWM, reset through /proc/self/clear_refs) during one step over the resident set before it. The
child runs with glibc's MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB so every tensor buffer is mmapped and returned on
free: the peak then tracks live tensors (activations, gradients, temporaries), not allocator caching. (That
setting slows allocation, which is why timing happens in the parent, with the default allocator.)
On CUDA it uses torch.cuda.max_memory_allocated in the same process instead.

    python scripts/bench_speed.py [--reps 40] [--threads N] [--clock wall|cpu] [--device cpu|cuda] [--compile]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import json
import subprocess

import torch
from torch import nn

from qrun.models import get_model
from qrun.quant import initialize_from_data, quantize_model, quantizer_parameters

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"

CONFIGS = [  # (label, quantizer, bits, quantize_input)
    ("float", "none", 32, False),
    ("uniform", "uniform", 4, True),
    ("lsq", "lsq", 4, True),
    ("pact", "pact", 4, True),
    ("dorefa", "dorefa", 4, True),
    ("dsq", "dsq", 4, True),
    ("xnor W1A1", "xnor", 1, True),
    ("twn W2", "twn", 2, False),
]
TARGETS = {"uniform": 1.15, "lsq": 1.15, "pact": 1.15, "dorefa": 1.15, "dsq": 1.35}
MEMORY_TARGET = 1.3


def build(quantizer: str, bits: int, quantize_input: bool, device: torch.device,
          data: torch.Tensor) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10, in_channels=3)
    quantize_model(model, quantizer, bits, bits, quantize_input)
    model.to(device).train()
    initialize_from_data(model, [data[:32]])
    quant_ids = {id(p) for p in quantizer_parameters(model)}
    groups = [{"params": [p for p in model.parameters() if id(p) not in quant_ids], "weight_decay": 5e-4},
              {"params": [p for p in model.parameters() if id(p) in quant_ids], "weight_decay": 0.0}]
    return model, torch.optim.SGD(groups, lr=0.01, momentum=0.9)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_step_memory(step, device: torch.device) -> float:
    """Bytes by which one step raises peak memory over what was resident before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status_kib("VmRSS")
    step()
    return float(_status_kib("VmHWM") - before) * 1024


def measure_memory(runs: dict, device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {label: peak_step_memory(step, device) for label, step in runs.items()}
    env = dict(os.environ, **{MMAP_ENV: "65536"})
    argv = [a for a in sys.argv[1:] if a not in ("--memory-child", "--clock", "cpu", "wall")]
    argv = [a for i, a in enumerate(argv) if a != "--reps" and (i == 0 or argv[i - 1] != "--reps")]
    out = subprocess.run([sys.executable, __file__, *argv, "--memory-child", "--warmup", "2"], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (float included)")
    parser.add_argument("--only", nargs="*", help="labels to run (float is always included)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time, robust to other jobs sharing the machine (use with --threads 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    configs = [c for c in CONFIGS if c[0] == "float" or not args.only or c[0] in args.only]

    runs = {}
    for label, quantizer, bits, quantize_input in configs:
        model, optimizer = build(quantizer, bits, quantize_input, device, x)
        forward = torch.compile(model) if args.compile else model
        runs[label] = (lambda m=forward, o=optimizer: train_step(m, o, x, y))
        for _ in range(args.warmup):
            runs[label]()
        _sync(device)

    if args.memory_child:
        print(json.dumps({label: peak_step_memory(step, device) for label, step in runs.items()}))
        return
    memory = {label: float("nan") for label in runs} if args.no_memory else measure_memory(runs, device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {label: [] for label in runs}
    labels = list(runs)
    for round_index in range(args.reps):
        shift = round_index % len(labels)
        for label in labels[shift:] + labels[:shift]:  # one step of each config, order rotated per round
            _sync(device)
            start = clock()
            runs[label]()
            _sync(device)
            times[label].append(clock() - start)

    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} reps={args.reps} "
          f"compile={args.compile} clock={args.clock} torch={torch.__version__}")
    print("memory: peak growth during one step " + ("(CUDA allocator)" if device.type == "cuda"
                                                     else "(VmHWM - VmRSS, mmapped tensors)"))
    base_t, base_m = statistics.median(times["float"]), memory["float"]
    print(f"{'config':<12}{'median ms':>11}{'time x':>9}{'target':>8}{'q1-q3':>14}{'(medians)':>11}{'peak MiB':>10}"
          f"{'mem x':>8}")
    for label in runs:
        ratios = [t / f for t, f in zip(times[label], times["float"])]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        target = f"<={TARGETS[label]:.2f}" if label in TARGETS else ""
        median = statistics.median(times[label])
        print(f"{label:<12}{median * 1e3:>11.1f}{statistics.median(ratios):>9.3f}{target:>8}{q1:>8.3f}-{q3:<5.3f}"
              f"{median / base_t:>11.3f}{memory[label] / 2**20:>10.1f}{memory[label] / base_m:>8.3f}")
    print("time x: median over rounds of (step time / the same round's float step); q1-q3: quartiles of those "
          "per-round ratios; (medians): ratio of the medians")
    print(f"memory target: <= {MEMORY_TARGET:.2f}x")


if __name__ == "__main__":
    main()
