#!/usr/bin/env bash
# Run HERE (with a network to the package registry), before scripts/gpu_check.sh runs on a GPU machine.
#
# The GPU machine of the device tool has torch, triton, torchvision, tensorboard, tqdm and PyYAML, but neither
# hydra-core, omegaconf nor antlr4 (omegaconf's parser), no Fashion-MNIST and no network. This fills the folder
# .gpu/ (ignored by git; the device tool carries it when `carry` names it) with:
#   .gpu/wheels/          hydra-core, omegaconf and antlr4-python3-runtime wheels, the versions this venv runs
#                         (antlr4 4.9.3 exists only as an sdist: it is built into a pure-Python wheel here)
#   .gpu/fashion-mnist/   the four idx .gz files (about 30 MB)
#
#   scripts/gpu_prepare.sh [--dry-run]      # --dry-run: print the commands, change nothing
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DRY=""
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "gpu_prepare.sh: error: unknown argument '$1'; accepted: --dry-run" >&2; exit 2 ;;
esac
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
FASHION_MNIST="${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
DEST="$ROOT/.gpu"
FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

run() { echo "+ $*"; [ -n "$DRY" ] || "$@"; }
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

for f in "${FILES[@]}"; do
    [ -f "$FASHION_MNIST/$f" ] || { echo "gpu_prepare.sh: error: $FASHION_MNIST/$f is missing; set FASHION_MNIST=<folder> or apt-get install dataset-fashion-mnist" >&2; exit 2; }
done
HYDRA="$(version hydra-core)"; OMEGACONF="$(version omegaconf)"; ANTLR="$(version antlr4-python3-runtime)"

run rm -rf "$DEST/wheels" "$DEST/fashion-mnist"
run mkdir -p "$DEST/wheels" "$DEST/fashion-mnist"
# Pure-Python wheels: any platform; the GPU machine's python3 is 3.12.
run "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    -d "$DEST/wheels" "hydra-core==$HYDRA" "omegaconf==$OMEGACONF"
run "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST/wheels" "antlr4-python3-runtime==$ANTLR"
for f in "${FILES[@]}"; do
    run cp "$FASHION_MNIST/$f" "$DEST/fashion-mnist/$f"
done
[ -n "$DRY" ] || { ls -l "$DEST/wheels"; du -sh "$DEST"; }
echo "ready: pass carry=[\".gpu\"] and command 'bash scripts/gpu_check.sh' to the device tool (see DEVELOPERS.md)"
