#!/usr/bin/env bash
# Parallel vs single-process check: the same tiny deep model trained 20 steps on one process and on N torchrun
# processes must give the same per-step losses (relative 1e-5, float32, dropout off) and the same parameters.
#
#   bash launch/torchrun_check.sh 4 "tp=2 pp=2 vpp=2"
#   bash launch/torchrun_check.sh 4 "pp=4 vpp=2"
#   bash launch/torchrun_check.sh 4 "tp=4"
#   bash launch/torchrun_check.sh 8 "tp=2 pp=2 vpp=2 zero=1"        # data parallel = 8 / (tp*pp) = 2
#   bash launch/torchrun_check.sh 2 "pp=2 schedule=gpipe recompute=1 steps=5"
#
# Spec keys: see launch/torchrun_check.py. Runs on the CPU with gloo (a GPU machine works too: the check is
# about the arithmetic, not the speed). PYTHON picks the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC="${1:-4}"
SPEC="${2:-tp=2 pp=2 vpp=2}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "single-process reference: $SPEC" >&2
"$PY" launch/torchrun_check.py reference --nproc "$NPROC" --spec "$SPEC" --out "$tmp/ref.pt"
echo "torchrun --nproc_per_node $NPROC" >&2
OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" \
  launch/torchrun_check.py run --spec "$SPEC" --ref "$tmp/ref.pt"
