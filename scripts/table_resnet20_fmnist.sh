#!/usr/bin/env bash
# The ResNet-20 / Fashion-MNIST table of issue 12: float baselines, then QAT sweeps from the float checkpoint
# under one recipe (configs/experiment/fmnist_resnet20_*.yaml) and the default layer policy, then qrun-report.
#
#   nohup scripts/table_resnet20_fmnist.sh > table.log 2>&1 &      # the full table (hours on a 2-core CPU)
#   scripts/table_resnet20_fmnist.sh --lanes 2                       # the same jobs as two single-thread lanes
#   scripts/table_resnet20_fmnist.sh --smoke                         # every command on 256 images, 1 epoch
#   scripts/table_resnet20_fmnist.sh --w3 device=cuda epochs=...     # W3A3 too; other words are qrun overrides
#
# Resumable: every run and sweep folder is stable (multirun/<root>/...), so re-running the same command skips
# finished jobs and continues interrupted ones from their last checkpoint (auto_resume). The QAT jobs need the
# float runs finished first: a failed float run stops the script. A QAT sweep with a failed or diverged job
# (its results.json says so, and the report lists it) does not stop the others; the script then exits 1 after
# the report.
# --lanes 2: on a small CPU two single-thread processes get more done than one two-thread process (a ResNet-20 on
# 28x28 images does not keep two threads busy); the float runs go side by side, then the QAT jobs in two lanes of
# about equal length, each process with OMP_NUM_THREADS=1. The jobs, their folders and results are the same.
# QRUN / QRUN_REPORT name the executables (default: qrun and qrun-report on PATH, e.g. an activated venv).
set -euo pipefail
cd "$(dirname "$0")/.."
QRUN=${QRUN:-qrun}
QRUN_REPORT=${QRUN_REPORT:-qrun-report}

ROOT=fmnist_resnet20          # multirun/$ROOT holds every job of the table (and nothing else)
REPORT_DIR=docs/resnet20-fmnist
BITS_A=4                      # lane A's bit widths for the five main quantizers
BITS_B=2                      # lane B's
LANES=1
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) ROOT=smoke_fmnist_resnet20; REPORT_DIR=multirun/smoke_fmnist_resnet20_report
             EXTRA+=(dataset.train_samples=256 dataset.val_samples=128 epochs=1 calib_batches=2) ;;
    --w3) BITS_A=4,3 ;;
    --lanes) LANES=$2; shift
             [[ $LANES == 1 || $LANES == 2 ]] || { echo "table: --lanes $LANES: accepted 1, 2" >&2; exit 2; } ;;
    *) EXTRA+=("$1") ;;
  esac
  shift
done
FLOAT=multirun/$ROOT/float
# xnor needs binary blocks (BN -> sign -> conv -> ReLU), a different network: its own float run, kept outside
# multirun/$ROOT so that the report's float baseline (the gap column) is the standard resnet20 alone.
FLOAT_BINARY=multirun/${ROOT}_binary_float
QAT=(+experiment=fmnist_resnet20_qat "init_from=$FLOAT")
COMMON=(progress=false "${EXTRA[@]}")

# Step 1: the float baselines (8 epochs, SGD lr 0.1, cosine).
float_standard() { $QRUN +experiment=fmnist_resnet20_float "hydra.run.dir=$FLOAT" "${COMMON[@]}"; }
float_binary() {
  $QRUN +experiment=fmnist_resnet20_float model.options.block=binary "hydra.run.dir=$FLOAT_BINARY" "${COMMON[@]}"
}

# Step 2: QAT from the float checkpoint (3 epochs, SGD lr 0.01, cosine), weights and activations quantized.
main_quantizers() { $QRUN -m "sweep=$ROOT/qat" "${QAT[@]}" quant=uniform,lsq,dsq,pact,dorefa "bits=$1" "${COMMON[@]}"; }
twn() { $QRUN -m "sweep=$ROOT/qat" "${QAT[@]}" quant=twn bits=2 quantize_input=false "${COMMON[@]}"; }
affine_qat() { $QRUN -m "sweep=$ROOT/qat" "${QAT[@]}" quant=affine bits=8 "${COMMON[@]}"; }
xnor() {
  $QRUN -m "sweep=$ROOT/qat" +experiment=fmnist_resnet20_qat "init_from=$FLOAT_BINARY" model.options.block=binary \
    quant=xnor bits=1 "${COMMON[@]}"
}
# W2A2 with knowledge distillation from the float run (LSQ section 3.6: T = 1, equal weights). A sweep of its
# own: job folder names leave out the teacher's path, so in the qat sweep these would collide with the plain jobs.
distilled() {
  $QRUN -m "sweep=$ROOT/kd" "${QAT[@]}" quant=lsq,dsq bits=2 "distill.teacher=$FLOAT" distill.weight=0.5 \
    distill.temperature=1 "${COMMON[@]}"
}
# Post-training quantization of the float checkpoint: affine W8A8 observers on calib_batches training batches.
ptq() {
  $QRUN -m "sweep=$ROOT/ptq" +experiment=fmnist_resnet20_qat mode=calibrate "resume=$FLOAT" quant=affine bits=8 \
    "${COMMON[@]}"
}
# Each sweep runs whatever the previous one returned (qrun -m exits 1 when one of its jobs failed or diverged).
all_of() {
  local failed=0
  for step in "$@"; do "$step" || failed=1; done
  return $failed
}
bits_a() { main_quantizers "$BITS_A"; }
bits_b() { main_quantizers "$BITS_B"; }
lane_a() { all_of bits_a twn affine_qat xnor ptq; }
lane_b() { all_of bits_b distilled; }

# Runs its arguments (shell functions) side by side with one thread each; fails if any of them failed.
side_by_side() {
  local pids=() failed=0
  for step in "$@"; do OMP_NUM_THREADS=1 "$step" & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  return $failed
}

set -x
QAT_FAILED=0
if [[ $LANES == 2 ]]; then
  side_by_side float_standard float_binary || exit 1
  side_by_side lane_a lane_b || QAT_FAILED=1
else
  float_standard || exit 1
  float_binary || exit 1
  all_of lane_a lane_b || QAT_FAILED=1
fi

# Step 3: the table and its plots, from the jobs' own results.json files.
$QRUN_REPORT "multirun/$ROOT" --out "$REPORT_DIR"
exit $QAT_FAILED
