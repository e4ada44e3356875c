#!/usr/bin/env bash
# One node, N processes (one per GPU) with torchrun --standalone.
#
#   GPUS=8 bash launch/torchrun_single.sh --config launch/configs/base_100L-100L.yaml
#   GPUS=2 bash launch/torchrun_single.sh --config my.yaml --set parallel.pp=2 --device cpu     # CPU / gloo
#
# GPUS defaults to the number of GPUs nvidia-smi lists (1 without one). Everything after the script name goes to
# megabranch-train (add --backend deepspeed --deepspeed_config launch/configs/ds_bf16.json for the DeepSpeed
# backend). The resolved layout is printed first (megabranch-train --dry-run); a layout that does not fit GPUS
# processes is refused before anything starts. DRY_RUN=1 stops after printing. The run continues from the save
# directory's latest checkpoint when it has one (--resume auto); MAX_RESTARTS / SHUTDOWN_TIMEOUT: launch/common.sh.
set -euo pipefail
source "$(dirname "$0")/common.sh"
if [ -z "${GPUS:-}" ]; then
  GPUS="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
  [ "$GPUS" -ge 1 ] 2>/dev/null || GPUS=1
fi
mb_need_int GPUS "$GPUS"
[ $# -gt 0 ] || mb_die "usage: GPUS=N bash $0 --config CONFIG.yaml [megabranch-train options]"
echo "# torchrun_single: 1 node x $GPUS processes" >&2
mb_check_layout "$GPUS" "$@"
mb_auto_resume "$@"
# shellcheck disable=SC2086
mb_run env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "${MB_TORCHRUN[@]}" --standalone \
  --nproc_per_node "$GPUS" "${MB_TORCHRUN_FAULT[@]}" -m megabranch.train "${MB_ARGS[@]}"
