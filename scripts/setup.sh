#!/usr/bin/env bash
# One-step set-up on a fresh Debian machine: the real Fashion-MNIST files, a C compiler for qrun's fused quantizer
# kernels (built on first use; without one qrun runs, slower), a venv with the pinned torch build, qrun with every
# extra (sweeps, deployment, tests); then, unless --no-run, the default experiment.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || PACKAGES+=(dataset-fashion-mnist)
command -v cc >/dev/null || command -v gcc >/dev/null || PACKAGES+=(gcc)
if [ ${#PACKAGES[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq "${PACKAGES[@]}"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[all]"
if [ "${1:-}" != "--no-run" ]; then
    .venv/bin/qrun
fi
