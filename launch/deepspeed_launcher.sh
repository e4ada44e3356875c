#!/usr/bin/env bash
# The DeepSpeed launcher (pdsh/ssh to the hosts of a hostfile) with megabranch's DeepSpeed backend.
#
#   HOSTFILE=launch/hostfile.example DS_CONFIG=launch/configs/ds_bf16_zero1.json \
#     bash launch/deepspeed_launcher.sh --config launch/configs/base_250L-250L.yaml
#   NUM_GPUS=2 DS_CONFIG=launch/configs/ds_fp32.json bash launch/deepspeed_launcher.sh --config tiny.yaml  # local
#
# Without HOSTFILE it runs on this machine with NUM_GPUS processes. The world size is the sum of the hostfile's
# slots (or NUM_NODES x NUM_GPUS when set); the resolved layout is printed first and a layout that does not fit it
# is refused before anything starts. DRY_RUN=1 stops after printing. The run continues from the save directory's
# latest checkpoint when it has one (--resume auto). The deepspeed launcher passes SIGTERM (not SIGUSR1) on to the
# workers, one after another, and kills each after 30 s.
set -euo pipefail
source "$(dirname "$0")/common.sh"
DS_CONFIG="${DS_CONFIG:-$(dirname "$0")/configs/ds_bf16.json}"
[ -f "$DS_CONFIG" ] || mb_die "DS_CONFIG=$DS_CONFIG not found"
[ $# -gt 0 ] || mb_die "usage: [HOSTFILE=...] DS_CONFIG=ds.json bash $0 --config CONFIG.yaml [megabranch-train options]"
LAUNCH=()
if [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || mb_die "HOSTFILE=$HOSTFILE not found"
  # "host slots=N" lines; comments and blank lines ignored
  read -r HOSTS SLOTS <<<"$(awk '!/^[[:space:]]*(#|$)/ {n++; s=8; for (i=2;i<=NF;i++) if ($i ~ /^slots=/) {split($i,a,"="); s=a[2]}; t+=s} END {print n+0, t+0}' "$HOSTFILE")"
  [ "$HOSTS" -ge 1 ] || mb_die "HOSTFILE=$HOSTFILE lists no hosts"
  NUM_NODES="${NUM_NODES:-$HOSTS}"
  if [ -n "${NUM_GPUS:-}" ]; then WORLD=$((NUM_NODES * NUM_GPUS)); else WORLD=$((SLOTS * NUM_NODES / HOSTS)); fi
  LAUNCH=(--hostfile "$HOSTFILE" --num_nodes "$NUM_NODES")
  [ -z "${NUM_GPUS:-}" ] || LAUNCH+=(--num_gpus "$NUM_GPUS")
  [ -z "${MASTER_ADDR:-}" ] || LAUNCH+=(--master_addr "$MASTER_ADDR")
else
  NUM_GPUS="${NUM_GPUS:-1}"
  mb_need_int NUM_GPUS "$NUM_GPUS"
  WORLD="$NUM_GPUS"
  LAUNCH=(--num_gpus "$NUM_GPUS")
fi
[ -z "${MASTER_PORT:-}" ] || LAUNCH+=(--master_port "$MASTER_PORT")
echo "# deepspeed launcher: $WORLD processes${HOSTFILE:+ from $HOSTFILE}, config $DS_CONFIG" >&2
mb_check_layout "$WORLD" --backend deepspeed --deepspeed_config "$DS_CONFIG" "$@"
if ! command -v deepspeed >/dev/null 2>&1 && [ -x "$(dirname "$PYTHON")/deepspeed" ]; then
  PATH="$(dirname "$PYTHON"):$PATH"
fi
if [ "${DRY_RUN:-0}" != "1" ]; then
  command -v deepspeed >/dev/null 2>&1 || mb_die "the deepspeed launcher is not installed: pip install 'megabranch[deepspeed]'"
fi
mb_auto_resume "$@"
# --module: the launcher runs `python -u -m megabranch.train --local_rank=N ...` (megabranch-train accepts it)
mb_run deepspeed "${LAUNCH[@]}" --module megabranch.train \
  --backend deepspeed --deepspeed_config "$DS_CONFIG" "${MB_ARGS[@]}"
