#!/usr/bin/env bash
# Check and time everything GPU-side in one command (docs/bench.md, "GPU check"):
#   bash scripts/gpu_check.sh OUT_DIR          on a GPU machine: about 6 minutes on one H200 (measured)
#   bash scripts/gpu_check.sh --cpu OUT_DIR    the same stages at toy shapes on CPU (kernels under TRITON_INTERPRET=1)
# Options: --stages env,build,...  run a subset (the others are reported as skipped)
#          --budget SECONDS        the whole check's time, 1 to 86400 (default 550 on a GPU, 420 with --cpu)
#          --work DIR              keep the scratch folder (sample data, runs, profiler traces) in DIR
# Each stage (bench/gpu_check.py) runs in its own process under its own timeout; a failed stage does not
# stop the later ones. Writes OUT_DIR/gpu_report.json, OUT_DIR/gpu_report.md and OUT_DIR/gpu_check.log;
# exits 0 when every selected stage is ok, 1 otherwise, 2 on bad arguments, 130 / 143 when stopped by Ctrl-C /
# SIGTERM (the report of the stages run so far is written first).
set -uo pipefail
ALL_STAGES="env build kernel_correctness kernel_timing train_step data summary"
USAGE="usage: bash scripts/gpu_check.sh [--cpu] [--stages a,b,...] [--budget SECONDS] [--work DIR] OUT_DIR"
usage() { echo "$USAGE" >&2; exit 2; }
help() {  # the header's comment block, the stage names and the environment it reads; exit 0
  echo "$USAGE"
  sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  echo "Stages, in order: $ALL_STAGES"
  echo "Environment: PYTHON runs the stages (default .venv/bin/python, else python3)"
  exit 0
}
bad() { echo "gpu_check: $*" >&2; exit 2; }
MODE=gpu SELECTED="" STAGES_SET=0 BUDGET="" BUDGET_SET=0 WORK="" WORK_SET=0 OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu; shift ;;
    --stages) [ $# -ge 2 ] || usage; SELECTED=$2; STAGES_SET=1; shift 2 ;;
    --budget) [ $# -ge 2 ] || usage; BUDGET=$2; BUDGET_SET=1; shift 2 ;;
    --work) [ $# -ge 2 ] || usage; WORK=$2; WORK_SET=1; shift 2 ;;
    -h|--help) help ;;
    -*) echo "gpu_check: unknown option $1" >&2; usage ;;
    *) [ -z "$OUT" ] || usage; OUT=$1; shift ;;
  esac
done
[ -n "$OUT" ] || usage
MAX_BUDGET=86400
if [ "$BUDGET_SET" = 1 ]; then
  digits=${BUDGET#"${BUDGET%%[!0]*}"}  # without leading zeros: 0090 is 90 s (not octal), 0 is none
  case "$digits" in ''|*[!0-9]*) digits=0 ;; esac
  # compared as text first: a number too long for bash's arithmetic would wrap around
  if [ "$digits" = 0 ] || [ "${#digits}" -gt ${#MAX_BUDGET} ] || [ "$digits" -gt "$MAX_BUDGET" ]; then
    bad "--budget takes whole seconds from 1 to $MAX_BUDGET, got '$BUDGET'"
  fi
  BUDGET=$digits
fi
if [ "$STAGES_SET" = 1 ]; then
  IFS=$', \t\n' read -rd '' -a names <<< "$SELECTED"  # split at commas and blanks, with no glob expansion
  stages=()
  for s in ${names[@]+"${names[@]}"}; do
    [ -n "$s" ] || continue
    case " $ALL_STAGES " in *" $s "*) stages+=("$s") ;; *) bad "unknown stage '$s'; stages: $ALL_STAGES" ;; esac
  done
  [ "${#stages[@]}" -gt 0 ] || bad "--stages names no stage; choose from ${ALL_STAGES// /,}"
  SELECTED=$(IFS=,; echo "${stages[*]}")
else
  SELECTED=${ALL_STAGES// /,}
fi
# OUT_DIR and --work must be folders (or not exist yet): checked before anything is written
[ ! -e "$OUT" ] || [ -d "$OUT" ] || bad "OUT_DIR $OUT is a file, not a folder"
if [ "$WORK_SET" = 1 ]; then
  [ -n "$WORK" ] || bad "--work is empty; give a folder for the scratch files"
  [ ! -e "$WORK" ] || [ -d "$WORK" ] || bad "--work $WORK is a file, not a folder"
fi
# A PYTHON path is the caller's too (made absolute before the cd to the checkout); one that cannot run failed
# every stage and the report, each with its own message, and exited 1
case "${PYTHON:-}" in /*|"") ;; */*) PYTHON=$PWD/$PYTHON ;; esac
if [ -n "${PYTHON:-}" ] && ! command -v "$PYTHON" > /dev/null; then
  bad "PYTHON $PYTHON is not a program that can be run; give an interpreter's path or leave PYTHON unset"
fi
# Seconds each stage may take at most (the remaining budget can cut it shorter).
if [ "$MODE" = gpu ]; then
  LIMITS="env:60 build:150 kernel_correctness:120 kernel_timing:150 train_step:270 data:60 summary:30"
  BUDGET=${BUDGET:-550}  # the measured stages: ~475 s on an H200 (docs/bench.md); give the command 600 s
  unset TRITON_INTERPRET  # the GPU check must run the compiled kernels
else
  # generous: the test command runs this beside another pytest worker on 2 cores
  LIMITS="env:60 build:180 kernel_correctness:150 kernel_timing:120 train_step:210 data:90 summary:30"
  BUDGET=${BUDGET:-420}
  export TRITON_INTERPRET=1
  # toy shapes gain nothing from threads, and on a loaded machine OpenMP's spinning threads make each
  # trainer step ~10x slower (measured on the 2-core dev machine: 0.6 s vs 5-10 s)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
# OUT_DIR and --work are the caller's: made absolute here, before the cd to the checkout
err=$(mkdir -p "$OUT" 2>&1) || bad "cannot create OUT_DIR $OUT (${err##*: })"
if [ "$WORK_SET" = 1 ]; then
  err=$(mkdir -p "$WORK/stages" "$WORK/data" 2>&1) || bad "cannot create the --work folder $WORK (${err##*: })"
fi
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
{ : > "$LOG"; } 2>/dev/null || { echo "gpu_check: cannot write $LOG; give a writable OUT_DIR" >&2; exit 2; }
if [ "$WORK_SET" = 0 ]; then
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX" 2>/dev/null) || bad "cannot create a scratch folder in ${TMPDIR:-/tmp}; give one with --work DIR"
  trap 'rm -rf "$WORK"' EXIT
  mkdir -p "$WORK/stages" "$WORK/data" || exit 2
fi
WORK=$(cd "$WORK" && pwd)
rm -f "$WORK"/stages/*
cd "$(dirname "$0")/.." || exit 2
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# The checkout's packages under their import names, importable before (and whether or not) `build` installs them.
SHIM="$WORK/pythonpath"
mkdir -p "$SHIM"
ln -sfn "$PWD/terrafm" "$SHIM/terrafm"
ln -sfn "$PWD/kernels" "$SHIM/terrafm_kernels"
ln -sfn "$PWD/bench" "$SHIM/terrafm_bench"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
echo "gpu_check ($MODE): $PYTHON, stages $SELECTED, budget ${BUDGET} s, work $WORK" | tee -a "$LOG"
START=$(date +%s)
DEADLINE=$((START + BUDGET))

PREP_PID=""
case ",$SELECTED," in
  *,train_step,*|*,data,*)  # the sample sets are generated in the background while the kernel stages run
    timeout -k 5 "$BUDGET" "$PYTHON" -m terrafm_bench.gpu_check prepare-data --work "$WORK" --mode "$MODE" \
      > "$WORK/prepare-data.log" 2>&1 &
    PREP_PID=$! ;;
esac

# Seconds kept back for a later stage when an earlier one is cut to the budget: what it needs to report
# something (data measured 20 s on an H200 for all its paths; its rows are saved one by one), 15 s otherwise.
RESERVE="data:30 summary:10"
left_after() {  # seconds kept back for the selected stages after $1
  local after=0 seen=0 s r
  for s in $ALL_STAGES; do
    if [ "$seen" = 1 ] && [[ ",$SELECTED," == *",$s,"* ]]; then
      r=15
      for kv in $RESERVE; do [ "${kv%%:*}" = "$s" ] && r=${kv#*:}; done
      after=$((after + r))
    fi
    [ "$s" = "$1" ] && seen=1
  done
  echo "$after"
}
# Ctrl-C or SIGTERM (a job's time limit, an outer timeout) stops the running stage, which keeps what it had written,
# runs no more stages and writes the report; exit 130 / 143. Each stage runs under timeout in its own process group,
# which a terminal's Ctrl-C does not reach: the stage ran on to its limit and the check went on to the next one.
STOPPED=0
trap 'STOPPED=130' INT
trap 'STOPPED=143' TERM
for stage in $ALL_STAGES; do
  [[ ",$SELECTED," == *",$stage,"* ]] || continue
  if [ "$STOPPED" != 0 ]; then
    echo "== $stage: not run, the check was interrupted" | tee -a "$LOG"
    echo "$stage" >> "$WORK/stages/interrupted"
    continue
  fi
  limit=$(for kv in $LIMITS; do [ "${kv%%:*}" = "$stage" ] && echo "${kv#*:}"; done)
  left=$((DEADLINE - $(date +%s) - $(left_after "$stage")))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "== $stage: not run, the budget of ${BUDGET} s is spent" | tee -a "$LOG"
    continue
  fi
  t0=$(date +%s)
  # in the background: a trap runs only once a foreground command has ended, and `wait` returns at a signal; the
  # log's tee ignores the signals so that the stopped stage's last lines still reach the log
  timeout -k 10 "$limit" "$PYTHON" -m terrafm_bench.gpu_check stage "$stage" --work "$WORK" --mode "$MODE" \
    --budget "$limit" > >(trap '' INT TERM; exec tee -a "$LOG") 2>&1 &
  pid=$!
  while wait "$pid"; rc=$?; [ "$STOPPED" != 0 ] && kill -0 "$pid" 2>/dev/null; do
    kill -s "$((STOPPED - 128))" "$pid"  # timeout passes it on to the stage's process group
  done
  echo "$rc $(($(date +%s) - t0)) $limit" > "$WORK/stages/$stage.exit"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "== $stage: timed out after $limit s" | tee -a "$LOG"
done

if [ -n "$PREP_PID" ]; then
  kill "$PREP_PID" 2>/dev/null
  wait "$PREP_PID" 2>/dev/null
  { echo "== prepare-data (background)"; cat "$WORK/prepare-data.log"; } >> "$LOG"
fi
# the report takes seconds: written whole whatever signal comes now (a Ctrl-C here failed it with exit 130)
(trap '' INT TERM; exec "$PYTHON" -m terrafm_bench.gpu_check report --work "$WORK" --out "$OUT" --mode "$MODE" \
  --selected "$SELECTED") > >(trap '' INT TERM; exec tee -a "$LOG") 2>&1
rc=$?
wait "$!" 2>/dev/null  # the log's tee, so that the report's last lines are out before the script ends
[ "$rc" -le 1 ] || { echo "gpu_check: writing the report failed (exit $rc)" >&2; exit 1; }
[ "$STOPPED" = 0 ] || { echo "gpu_check: interrupted; $OUT/gpu_report.md has the stages run before it" >&2; exit "$STOPPED"; }
exit "$rc"
