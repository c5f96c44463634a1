#!/usr/bin/env bash
# The test suite on another torch release, on this machine (CPU): chiefly the GPU machine's torch 2.11 / triton 3.6,
# so a session without a GPU still finds what that torch does differently before device time is spent on it.
# (Found this way: torch 2.11's dynamo gave some autograd.Function outputs zero gradients under torch.compile.)
#
#   scripts/compat_torch.sh [TORCH_VERSION] [pytest args...]     # default 2.11.0, the whole suite
#
# The venv lives outside the checkout (default /tmp/qrun-torch-VERSION, QRUN_COMPAT_VENV to change), with
# python3.12 when there is one (the GPU machine's), torch's CUDA wheel from the registry (it runs on CPU), numpy
# below 2.4 for triton 3.6's interpreter (it converts 1-element arrays with int(), which numpy 2.4 refuses), the
# project's dependencies, and this checkout installed editable. CI does not run this: it is a few GB of wheels.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TORCH="${1:-2.11.0}"
[ $# -gt 0 ] && shift
case "$TORCH" in
    2.11.0) VISION=0.26.0 ;;
    2.12.0) VISION=0.27.0 ;;
    2.12.1) VISION=0.27.1 ;;
    2.13.0) VISION=0.28.0 ;;
    2.14.1) VISION=0.29.1 ;;
    *) [ -n "${TORCHVISION:-}" ] || { echo "compat_torch.sh: error: no torchvision known for torch '$TORCH'; accepted: 2.11.0, 2.12.0, 2.12.1, 2.13.0, 2.14.1 (or set TORCHVISION=<version>)" >&2; exit 2; }
       VISION="$TORCHVISION" ;;
esac
VISION="${TORCHVISION:-$VISION}"
VENV="${QRUN_COMPAT_VENV:-/tmp/qrun-torch-$TORCH}"
PYTHON_BIN="$(command -v python3.12 2>/dev/null || true)"
if [ -n "$PYTHON_BIN" ] && ! "$PYTHON_BIN" --version >/dev/null 2>&1; then PYTHON_BIN=""; fi  # a pyenv shim
[ -n "$PYTHON_BIN" ] || PYTHON_BIN="$(ls -d /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1 || true)"
[ -n "$PYTHON_BIN" ] || PYTHON_BIN=python3
if [ ! -x "$VENV/bin/python" ]; then
    echo "+ $PYTHON_BIN -m venv $VENV"
    "$PYTHON_BIN" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" "torch==$TORCH" "torchvision==$VISION" "numpy<2.4"
"${PIP[@]}" "hydra-core>=1.3,<1.4" "omegaconf>=2.3" "tensorboard>=2.14" "tqdm>=4.60" "pytest>=7" \
    "hydra-joblib-launcher>=1.2" "matplotlib>=3.7" "onnx>=1.15" "onnxruntime>=1.17" onnxscript setuptools wheel
"${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" -c "import torch, triton, numpy; print(f'torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}')"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
