"""Issue 5's table: Fashion-MNIST cnn / cnn_bn, full precision, PTQ and QAT at 4/6/8 bits, next to seed 004.

Every number comes from a real `qrun` run on the full Fashion-MNIST test set:
  full precision   qrun model=M epochs=FP_EPOCHS
  PTQ              qrun model=M mode=calibrate quant=affine bits=B resume=<fp run>
  QAT              qrun model=M quant=affine bits=B init_from=<fp run> epochs=QAT_EPOCHS optimizer.lr=QAT_LR
                   (observers and BN statistics frozen for the last epoch)
  export           qrun mode=export ... resume=<PTQ or QAT run>: onnxruntime int8 top-1 and integer-only top-1
Runs whose results.json exists are skipped, so an interrupted table resumes.

    .venv/bin/python scripts/int8_table.py --root outputs/int8 [--fp-epochs 5 --qat-epochs 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SEED_004 = {  # the seed script's README, Fashion-MNIST, percent
    ("cnn", "ptq"): (71, 88, 90), ("cnn", "qat"): (81, 90, 91),
    ("cnn_bn", "ptq"): (52, 63, 59), ("cnn_bn", "qat"): (62, 71, 84),
}
SEED_004_FP = 90
BITS = (4, 6, 8)
MODELS = ("cnn", "cnn_bn")


def qrun(out: Path, *overrides: str) -> dict:
    """Run qrun once (skipped when out/results.json exists) and return its results."""
    results = out / "results.json"
    if not results.is_file():
        command = [sys.executable, "-m", "qrun", *overrides, f"output_dir={out}", "progress=false"]
        print("$", " ".join(command[2:]), flush=True)
        subprocess.run(command, check=True)
    return json.loads(results.read_text())


def run_grid(root: Path, fp_epochs: int, qat_epochs: int, qat_lr: float) -> dict:
    table: dict = {}
    for model in MODELS:
        fp_dir = root / f"fp_{model}"
        table[(model, "fp")] = qrun(fp_dir, f"model={model}", f"epochs={fp_epochs}")
        for bits in BITS:
            ptq_dir = root / f"ptq_{model}_{bits}"
            qrun(ptq_dir, f"model={model}", "mode=calibrate", "quant=affine", f"bits={bits}", f"resume={fp_dir}")
            qat_dir = root / f"qat_{model}_{bits}"
            frozen = max(qat_epochs - 1, 0)
            qrun(qat_dir, f"model={model}", "quant=affine", f"bits={bits}", f"init_from={fp_dir}",
                 f"epochs={qat_epochs}", f"optimizer.lr={qat_lr}", f"quant.options.observer_epochs={frozen}",
                 f"quant.options.bn_stats_epochs={frozen}")
            for kind, run_dir in (("ptq", ptq_dir), ("qat", qat_dir)):
                table[(model, kind, bits)] = qrun(root / f"export_{kind}_{model}_{bits}", f"model={model}",
                                                  "mode=export", "quant=affine", f"bits={bits}",
                                                  f"resume={run_dir}")
    return table


def markdown(table: dict) -> str:
    lines = ["| model | scheme | 4 bit | 6 bit | 8 bit | seed 004 (4/6/8) |", "|---|---|---:|---:|---:|---|"]
    for model in MODELS:
        fp = table[(model, "fp")]["top1"]
        lines.append(f"| {model} | full precision | {fp:.2f} | {fp:.2f} | {fp:.2f} | {SEED_004_FP} |")
        for kind in ("ptq", "qat"):
            cells = [f"{table[(model, kind, b)]['top1']:.2f} ({table[(model, kind, b)]['top1'] - fp:+.2f})"
                     for b in BITS]
            seed = "/".join(str(v) for v in SEED_004[(model, kind)])
            lines.append(f"| {model} | {kind.upper()} (PyTorch fake-quant) | {' | '.join(cells)} | {seed} |")
            onnx = [f"{table[(model, kind, b)]['onnx_int8_top1']:.2f}" for b in BITS]
            lines.append(f"| {model} | {kind.upper()} onnxruntime int8 | {' | '.join(onnx)} | |")
            integer = [_fmt(table[(model, kind, b)].get('integer_top1')) for b in BITS]
            lines.append(f"| {model} | {kind.upper()} integer-only reference | {' | '.join(integer)} | |")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("outputs/int8"))
    parser.add_argument("--fp-epochs", type=int, default=5)
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument("--qat-lr", type=float, default=2e-4)
    args = parser.parse_args()
    table = run_grid(args.root, args.fp_epochs, args.qat_epochs, args.qat_lr)
    print(markdown(table))


if __name__ == "__main__":
    main()
