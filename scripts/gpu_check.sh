#!/usr/bin/env bash
# The one prepared command for a GPU machine (the device tool's `run`), under 8 minutes, no network.
#
#   1. installs the carried hydra-core / omegaconf / antlr4 wheels from .gpu/wheels (scripts/gpu_prepare.sh fills
#      .gpu/ here) into /tmp, and makes the checkout importable: PYTHONPATH plus a link qrun/configs -> configs,
#      the mapping pyproject's package-dir gives an installed qrun (nothing is pip-installed into the image);
#   2. pytest -m gpu          the CUDA tests (Triton kernels vs eager, AMP levels, compile, NCCL, GPU<->CPU resume)
#   3. scripts/bench_gpu.py   step time, memory and host syncs of every quantizer vs float (resnet18 first)
#   4. a real 2-epoch Fashion-MNIST training of resnet20 (quant=lsq W4A4, inputs quantized) with amp=true
#   5. one summary table (also in $OUT/summary.md, beside the logs, bench.json and the run's results.json)
#
#   bash scripts/gpu_check.sh [--quick | --compiled | --cpu-rehearsal] [--dry-run]
#     --quick          a rerun that fits in ~3 minutes: bench resnet18 bf16 only, 1 training epoch
#     --compiled       the launch-bound target with compile=true, ~4 minutes: bench resnet20 bf16 of float, uniform,
#                      lsq and dsq, every model torch.compile'd (inductor); no tests, no training
#     --cpu-rehearsal  the same plumbing on CPU with tiny sizes (checks this script on a machine without a GPU)
#     --dry-run        print what would run, run nothing
# Each step has its own time limit (seconds: GPU_CHECK_PYTEST_S, GPU_CHECK_BENCH_S, GPU_CHECK_TRAIN_S); a step
# that fails or runs out of time is reported and the next one still runs.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
MODE="full"; DRY=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        --quick) MODE="quick" ;;
        --compiled) MODE="compiled" ;;
        --cpu-rehearsal) MODE="cpu" ;;
        *) echo "gpu_check.sh: error: unknown argument '$arg'; accepted: --quick, --compiled, --cpu-rehearsal, --dry-run" >&2
           exit 2 ;;
    esac
done
PY="${PYTHON:-python3}"
RESULTS="${OUT:-$ROOT/.gpu/out}"  # the device tool's $OUT comes back to the caller
SITE="${GPU_CHECK_SITE:-/tmp/qrun-site}"
WORK="${GPU_CHECK_WORK:-/tmp/qrun-gpu-check}"
PYTEST_S="${GPU_CHECK_PYTEST_S:-170}"; BENCH_S="${GPU_CHECK_BENCH_S:-200}"; TRAIN_S="${GPU_CHECK_TRAIN_S:-80}"
export PYTHONUNBUFFERED=1

BENCH_ARGS=(--models resnet18 resnet20 --precisions bf16 fp32 --rounds 30)
PYTEST_ARGS=(-q -m gpu -p no:cacheprovider tests)
EPOCHS=2; DEVICE=cuda; SUBSET=(); RUN_TESTS=1; RUN_TRAINING=1
case "$MODE" in
    quick) BENCH_ARGS=(--models resnet18 --precisions bf16 --rounds 30); EPOCHS=1 ;;
    compiled) BENCH_ARGS=(--models resnet20 --precisions bf16 --compile --only uniform lsq dsq --rounds 30)
              BENCH_S="${GPU_CHECK_BENCH_S:-240}"; RUN_TESTS=""; RUN_TRAINING="" ;;
    cpu) BENCH_ARGS=(--cpu-smoke --only lsq ao-fq); EPOCHS=1; DEVICE=cpu
         SUBSET=(dataset.train_samples=512 dataset.val_samples=256)
         PYTEST_ARGS=(-q -m gpu -p no:cacheprovider tests/test_distributed_devices.py) ;;
esac
TRAIN_ARGS=(model=resnet20 dataset=fashion_mnist dataset.root="$ROOT/.gpu/fashion-mnist" "${SUBSET[@]}" quant=lsq
            bits=4 quantize_input=true amp=true epochs="$EPOCHS" batch_size=128 device="$DEVICE" progress=false
            log_every_percent=25 log_every_s=0 output_dir="$WORK/train" hydra.run.dir="$WORK/hydra")

STEPS=(); STATUS=(); SECONDS_TAKEN=()
step() {  # step NAME LIMIT_S LOG COMMAND...: run with a time limit, log to $RESULTS/LOG, record the outcome
    local name="$1" limit="$2" log="$3"; shift 3
    echo; echo "=== $name (limit ${limit}s): $*"
    if [ -n "$DRY" ]; then return 0; fi
    local start=$SECONDS rc
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee "$RESULTS/$log"
    rc=${PIPESTATUS[0]}
    STEPS+=("$name"); SECONDS_TAKEN+=($((SECONDS - start)))
    if [ "$rc" -eq 0 ]; then STATUS+=("ok"); elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then STATUS+=("TIMEOUT");
    else STATUS+=("FAILED rc=$rc"); fi
}

# ------------------------------------------------------------------------------------------------- 1. set-up
if [ -z "$DRY" ]; then
    mkdir -p "$RESULTS" "$WORK"
    ls .gpu/wheels/*.whl >/dev/null 2>&1 || { echo "gpu_check.sh: error: no wheels in $ROOT/.gpu/wheels; run scripts/gpu_prepare.sh here and carry .gpu" >&2; exit 2; }
    [ -f .gpu/fashion-mnist/train-images-idx3-ubyte.gz ] || { echo "gpu_check.sh: error: no .gpu/fashion-mnist; run scripts/gpu_prepare.sh and carry .gpu" >&2; exit 2; }
fi
echo "+ $PY -m pip install --no-index --no-deps --target $SITE .gpu/wheels/*.whl"
if [ -z "$DRY" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu/wheels/*.whl \
        || { echo "gpu_check.sh: error: installing the carried wheels failed" >&2; exit 1; }
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
LINKED=""
if [ ! -e qrun/configs ]; then
    echo "+ ln -s ../configs qrun/configs"
    if [ -z "$DRY" ]; then ln -s ../configs qrun/configs && LINKED=1; fi
fi
cleanup() { [ -n "$LINKED" ] && rm -f "$ROOT/qrun/configs"; }
trap cleanup EXIT
if [ -z "$DRY" ]; then
    "$PY" - <<'EOF' 2>&1 | tee "$RESULTS/environment.log"
import hydra, omegaconf, torch, triton, qrun.configs
print(f"torch {torch.__version__}, triton {triton.__version__}, hydra {hydra.__version__}, omegaconf {omegaconf.__version__}")
print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check.sh: error: the environment does not import (see above)" >&2; exit 1; }
fi

# ------------------------------------------------------------------------------------------ 2.-4. the checks
[ -n "$RUN_TESTS" ] && step "pytest -m gpu" "$PYTEST_S" pytest.log "$PY" -m pytest "${PYTEST_ARGS[@]}"
step "bench_gpu.py" "$BENCH_S" bench.log "$PY" scripts/bench_gpu.py "${BENCH_ARGS[@]}" --json "$RESULTS/bench.json"
[ -n "$RUN_TRAINING" ] && step "train resnet20 fashion_mnist amp" "$TRAIN_S" train.log "$PY" -m qrun "${TRAIN_ARGS[@]}"
[ -n "$DRY" ] && exit 0
[ -n "$RUN_TRAINING" ] && [ -f "$WORK/train/results.json" ] && cp "$WORK/train/results.json" "$RESULTS/train_results.json"

# ------------------------------------------------------------------------------------------------ 5. summary
{
    printf '| step | status | seconds |\n|---|---|---:|\n'
    for i in "${!STEPS[@]}"; do printf '| %s | %s | %s |\n' "${STEPS[$i]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}"; done
    "$PY" - "$RESULTS" <<'EOF'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
log = out / "pytest.log"
if log.is_file():
    last = [l for l in log.read_text().splitlines() if re.search(r"passed|failed|skipped|error|no tests", l)]
    print(f"\npytest -m gpu: {last[-1].strip('= ') if last else 'no summary line'}")
bench = out / "bench.json"
if bench.is_file():
    rows = json.loads(bench.read_text())
    print("\n| model | precision | config | time x float | peak mem x | host syncs/step | error |")
    print("|---|---|---|---:|---:|---:|---|")
    floats = {(r["model"], r["precision"]): r for r in rows if r["quantizer"] == "none"}
    for r in rows:
        base = floats.get((r["model"], r["precision"]), {})
        mem = (f"{r['peak_bytes'] / base['peak_bytes']:.3f}" if r.get("peak_bytes") and base.get("peak_bytes")
               else "")
        ratio = f"{r['time_ratio']:.3f}" if r.get("time_ratio") else ""
        print(f"| {r['model']} | {r['precision']} | {r['config']} | {ratio} | {mem} | {r.get('syncs', '')} | "
              f"{r.get('error') or ''} |")
results = out / "train_results.json"
if results.is_file():
    r = json.loads(results.read_text())
    epochs = r.get("history") or []
    times = ", ".join(f"{h.get('epoch_time_s', 0):.1f}s (data {100 * h.get('data_share', 0):.0f}%)" for h in epochs)
    print(f"\ntraining {r.get('model')} {r.get('quant')} W{r.get('w_bits')}A{r.get('a_bits')} on {r.get('device')}: "
          f"top1 {r.get('top1')}, epochs {r.get('epoch')}, epoch times {times}, wall {r.get('wall_time_s')}s")
elif (out / "train.log").is_file():
    print("\ntraining: no results.json (see train.log)")
EOF
} | tee "$RESULTS/summary.md"
for s in "${STATUS[@]}"; do [ "$s" = "ok" ] || exit 1; done
exit 0
