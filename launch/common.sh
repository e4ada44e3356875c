# Shared by the launch scripts (sourced, not run): how to call megabranch-train, and the layout check that every
# script runs before it starts anything.
#
#   PYTHON           interpreter for `python -m ...` (default: the repo's .venv/bin/python, else python3)
#   MEGABRANCH_TRAIN the training command (default: megabranch-train when installed, else $PYTHON -m megabranch.train)
#   DRY_RUN=1        print the resolved layout and the command that would run, then exit 0
#   MAX_RESTARTS     torchrun --max-restarts: restart every worker this many times after one fails (default 0);
#                    the restarted run continues from the latest checkpoint (--resume auto)
#   SHUTDOWN_TIMEOUT seconds torchrun gives the workers, after forwarding SIGTERM / SIGUSR1, to finish their step and
#                    save before it kills them (default 300)

_MB_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$_MB_ROOT/.venv/bin/python" ]; then PYTHON="$_MB_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if [ -z "${MEGABRANCH_TRAIN:-}" ]; then
  if command -v megabranch-train >/dev/null 2>&1; then
    MEGABRANCH_TRAIN="megabranch-train"
  else
    MEGABRANCH_TRAIN="$PYTHON -m megabranch.train"
    export PYTHONPATH="$_MB_ROOT${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi

mb_die() {  # one-line error, exit 2
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

mb_need_int() {  # mb_need_int NAME VALUE
  case "$2" in
    '' | *[!0-9]* | 0) mb_die "$1='$2' must be a positive integer" ;;
  esac
}

# mb_check_layout WORLD_SIZE TRAIN_ARGS...: prints the --dry-run report (stage layout, parameters per stage,
# memory plan, effective batch) for this many processes; refuses (exit 2, the trainer's one-line reason) a layout
# that does not fit them.
mb_check_layout() {
  local world="$1"
  shift
  local out
  # shellcheck disable=SC2086
  if ! out="$($MEGABRANCH_TRAIN "$@" --dry-run --world-size "$world" 2>&1)"; then
    mb_die "the parallel layout does not fit $world processes: $(printf '%s\n' "$out" | grep -m1 'error:' | sed 's/^.*error: //')"
  fi
  printf '%s\n' "$out"
}

# mb_auto_resume ARGS...: MB_ARGS=(ARGS... --resume auto), unless ARGS already say --resume: a restarted or requeued
# run continues from the save directory's latest checkpoint, a first run starts fresh
mb_auto_resume() {
  MB_ARGS=("$@")
  local a
  for a in "$@"; do
    case "$a" in --resume | --resume=*) return 0 ;; esac
  done
  MB_ARGS+=(--resume auto)
}

# torchrun's options for a run that survives preemption and failures: SIGUSR1 (SLURM's warning before the time
# limit) is forwarded to the workers like SIGTERM, each worker gets SHUTDOWN_TIMEOUT seconds to finish its step and
# save, and a failed worker restarts the job MAX_RESTARTS times
case "${MAX_RESTARTS:-0}" in '' | *[!0-9]*) mb_die "MAX_RESTARTS='${MAX_RESTARTS}' must be an integer >= 0" ;; esac
mb_need_int SHUTDOWN_TIMEOUT "${SHUTDOWN_TIMEOUT:-300}"
MB_TORCHRUN_FAULT=(--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
  --shutdown-timeout "${SHUTDOWN_TIMEOUT:-300}" --max-restarts "${MAX_RESTARTS:-0}")
# torchrun itself: launch/torchrun.py, which exits 75 (not torchrun's traceback and exit 1) when every worker
# saved a checkpoint and stopped to be requeued (SIGTERM / SIGUSR1, --exit-duration-mins)
MB_TORCHRUN=("$PYTHON" "$_MB_ROOT/launch/torchrun.py")
# torchrun shares its rendezvous store with the workers by default, and a restarted worker then reads the
# addresses of the previous attempt's peers and cannot connect (pytorch/pytorch#135712): give each attempt its own
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"

# mb_run CMD...: runs it, or with DRY_RUN=1 prints it
mb_run() {
  if [ "${DRY_RUN:-0}" = "1" ]; then
    echo "DRY_RUN: $*"
    return 0
  fi
  echo "+ $*" >&2
  exec "$@"
}

# mb_prepare_wmt SRC TGT DEST VOCAB: the WMT recipes (launch/prepare_wmt*.sh). $RAW holds train/valid(/test).{SRC,TGT}
# (plain or .gz); a joint sentencepiece BPE of VOCAB entries; DEST, VOCAB, MAX_LEN, WORKERS and INPUT_SENTENCE_SIZE
# from the environment override the defaults; OVERWRITE=1 replaces what DEST already holds (refused otherwise).
mb_prepare_wmt() {
  local src="$1" tgt="$2" f
  [ -n "${RAW:-}" ] || mb_die "set RAW=/path/to/text holding train.{$src,$tgt}, valid.{$src,$tgt}, test.{$src,$tgt}"
  for f in "train.$src" "train.$tgt" "valid.$src" "valid.$tgt"; do
    [ -e "$RAW/$f" ] || [ -e "$RAW/$f.gz" ] || mb_die "$RAW/$f(.gz) not found"
  done
  local test=()
  if [ -e "$RAW/test.$src" ] || [ -e "$RAW/test.$src.gz" ]; then test=(--testpref "$RAW/test"); fi
  mb_run "$PYTHON" -m megabranch.data.preprocess --source-lang "$src" --target-lang "$tgt" \
    --trainpref "$RAW/train" --validpref "$RAW/valid" "${test[@]}" \
    --destdir "${DEST:-$3}" --joint --model-type bpe --vocab-size "${VOCAB:-$4}" \
    --max-len "${MAX_LEN:-256}" --input-sentence-size "${INPUT_SENTENCE_SIZE:-2000000}" --workers "${WORKERS:-8}" \
    ${OVERWRITE:+--overwrite}
}
