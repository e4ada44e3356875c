#!/usr/bin/env bash
# Several nodes with torchrun; run it once on every node. Rendezvous through the environment:
#
#   MASTER_ADDR=node0 MASTER_PORT=29500 NNODES=4 NODE_RANK=<0..3> GPUS_PER_NODE=8 \
#     bash launch/torchrun_multi.sh --config launch/configs/base_500L-500L.yaml
#
# The resolved layout for NNODES x GPUS_PER_NODE processes is printed first (megabranch-train --dry-run) and a
# layout that does not fit them is refused on every node before anything starts. DRY_RUN=1 stops after printing.
# The run continues from the save directory's latest checkpoint when it has one (--resume auto); SIGTERM and
# SIGUSR1 reach every worker (each saves and stops); MAX_RESTARTS / SHUTDOWN_TIMEOUT: launch/common.sh.
set -euo pipefail
source "$(dirname "$0")/common.sh"
for v in MASTER_ADDR MASTER_PORT NNODES NODE_RANK; do
  [ -n "${!v:-}" ] || mb_die "$v is not set (needed: MASTER_ADDR MASTER_PORT NNODES NODE_RANK [GPUS_PER_NODE])"
done
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
mb_need_int NNODES "$NNODES"
mb_need_int GPUS_PER_NODE "$GPUS_PER_NODE"
mb_need_int MASTER_PORT "$MASTER_PORT"
case "$NODE_RANK" in '' | *[!0-9]*) mb_die "NODE_RANK='$NODE_RANK' must be an integer in 0..$((NNODES - 1))" ;; esac
[ "$NODE_RANK" -lt "$NNODES" ] || mb_die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"
[ $# -gt 0 ] || mb_die "usage: ... bash $0 --config CONFIG.yaml [megabranch-train options]"
WORLD=$((NNODES * GPUS_PER_NODE))
echo "# torchrun_multi: node $NODE_RANK of $NNODES x $GPUS_PER_NODE processes, rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
mb_check_layout "$WORLD" "$@"
mb_auto_resume "$@"
mb_run env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "${MB_TORCHRUN[@]}" \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${MB_TORCHRUN_FAULT[@]}" -m megabranch.train "${MB_ARGS[@]}"
