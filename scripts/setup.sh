#!/usr/bin/env bash
# One-step set-up on a fresh Debian machine: the real Fashion-MNIST files, a venv with the pinned torch build,
# qrun with every extra (sweeps, deployment, tests); then, unless --no-run, the default experiment.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[all]"
if [ "${1:-}" != "--no-run" ]; then
    .venv/bin/qrun
fi
