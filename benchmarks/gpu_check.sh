#!/usr/bin/env bash
# One call on a machine with a CUDA GPU: the test suite, the loss benchmark and the training
# benchmark on the device, in under 8 minutes, with a short summary.
#
#     bash benchmarks/gpu_check.sh                      # writes under $OUT (./gpu_check_out)
#     SMOKE=1 PY=.venv/bin/python bash benchmarks/gpu_check.sh   # a CPU rehearsal, ~3 min
#
# Stages, each under its own time limit, each run whatever the earlier ones did (their exit
# codes go into the summary):
#   1. install the wheels of .whl/ into $SITE (--no-index --no-deps) and put a `deepmetric`
#      command on PATH (a shim running `$PY -m deepmetric`); PYTHONPATH=$SITE:$PWD/src
#   2. the GPU, its driver, torch and CUDA versions
#   3. the test suite (pytest -n 12, no page test: no Chromium there)        <= TESTS_S
#   4. benchmarks/losses.py --device cuda: floor and ours at B = 4096, 16384, 65536, PML at
#      4096 and 16384                                                      <= LOSSES_S
#   5. benchmarks/train.py --device cuda: B = 160 and 640, float32 and fp16 <= TRAIN_S
# Outputs (7 files) under $OUT: summary.md (read this first), pytest.log, losses.md,
# losses.json, losses.log, train.md, train.log.
#
# Overridable from the environment: OUT, PY, SITE, BIN_DIR, WHEELS, TESTS_S, LOSSES_S, TRAIN_S,
# TEST_ARGS, LOSSES_ARGS, TRAIN_ARGS; SMOKE=1 sets CPU-sized defaults for all of them.

set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
SMOKE=${SMOKE:-0}
OUT=${OUT:-./gpu_check_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PY:-python3}
PY=$(command -v "$PY" || echo "$PY")
case "$PY" in /*) ;; *) PY=$ROOT/$PY ;; esac

if [ "$SMOKE" = 1 ]; then
    SITE=${SITE:-/tmp/site_smoke}
    BIN_DIR=${BIN_DIR:-/tmp/bin_smoke}
    WHEELS=${WHEELS:-$(ls .whl/pytorch_metric_learning-*.whl 2>/dev/null)}
    TESTS_S=${TESTS_S:-120}
    LOSSES_S=${LOSSES_S:-90}
    TRAIN_S=${TRAIN_S:-60}
    TEST_ARGS=${TEST_ARGS:--p no:cacheprovider -q -rfE tests/test_distances.py tests/test_pairs.py}
    LOSSES_ARGS=${LOSSES_ARGS:---device cpu --process-per batch --batch-sizes 128 256 --only floor ours pml --pml-max-batch 128 --repeats 2 --time-budget 5 --timeout 30}
    TRAIN_ARGS=${TRAIN_ARGS:---device cpu --batch 32 64 --k 4 --amp off fp16 --losses batch_all --steps 2 --warmup 1 --set model.backbone=small_cnn}
else
    SITE=${SITE:-/tmp/site}
    BIN_DIR=${BIN_DIR:-/tmp/bin}
    WHEELS=${WHEELS:-$(ls .whl/*.whl 2>/dev/null)}
    TESTS_S=${TESTS_S:-210}
    LOSSES_S=${LOSSES_S:-160}
    TRAIN_S=${TRAIN_S:-40}
    TEST_ARGS=${TEST_ARGS:--n 12 -p no:cacheprovider --ignore=tests/test_page.py -q --timeout 200 -rfE}
    LOSSES_ARGS=${LOSSES_ARGS:---device cuda --batch-sizes 4096 16384 65536 --only floor ours pml --pml-max-batch 16384 --repeats 5 --time-budget 10 --timeout 60}
    TRAIN_ARGS=${TRAIN_ARGS:---device cuda --batch 160 640 --amp off fp16 --losses batch_all batch_hard}
fi
DEADLINE=$((TESTS_S + LOSSES_S + TRAIN_S + 30)) # seconds from the start, whatever happens

SUMMARY=$OUT/summary.md
say() { printf '%s\n' "$*" >>"$SUMMARY"; }
log() { printf '[gpu_check %3ds] %s\n' "$SECONDS" "$*" >&2; }

# the time limit of a stage: its own, less what earlier stages overran, at least 10 s
limit() {
    local want=$1 reserve=$2 left
    left=$((DEADLINE - SECONDS - reserve))
    [ "$left" -lt "$want" ] && want=$left
    [ "$want" -lt 10 ] && want=10
    echo "$want"
}

# run with a time limit: SIGTERM (or $SIGNAL) to the command's process group, SIGKILL 10 s on
capped() {
    local seconds=$1
    shift
    if command -v timeout >/dev/null 2>&1; then
        timeout -s "${SIGNAL:-TERM}" -k 10 "$seconds" "$@"
    else
        "$@"
    fi
}

: >"$SUMMARY"
say "# GPU check$([ "$SMOKE" = 1 ] && echo ' (SMOKE: CPU rehearsal)')"
say ""
say "- $(date -u '+%Y-%m-%d %H:%M UTC'), host $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

# ----------------------------------------------------------------------------- 1. setup
log "installing wheels into $SITE"
mkdir -p "$SITE" "$BIN_DIR"
start=$SECONDS
if [ -n "$WHEELS" ]; then
    # shellcheck disable=SC2086  # one word per wheel
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" $WHEELS >/tmp/gpu_check_pip.log 2>&1
    rc=$?
else
    echo "no wheels in .whl/" >/tmp/gpu_check_pip.log
    rc=1
fi
export PYTHONPATH=$SITE:$ROOT/src
printf '#!/bin/sh\nexec "%s" -m deepmetric "$@"\n' "$PY" >"$BIN_DIR/deepmetric"
chmod +x "$BIN_DIR/deepmetric"
export PATH=$BIN_DIR:$PATH
say "- wheels: exit $rc ($(echo "$WHEELS" | wc -w) wheels into $SITE, $((SECONDS - start)) s); deepmetric: $(command -v deepmetric)"
[ "$rc" != 0 ] && { say '```'; tail -n 5 /tmp/gpu_check_pip.log >>"$SUMMARY"; say '```'; }

# PML imports tqdm and scipy at the top of its utils, using neither in the losses measured:
# stand-ins (for the loss benchmark only) where the machine lacks them
STUBS=/tmp/gpu_check_stubs
rm -rf "$STUBS"
stubbed=""
if ! "$PY" -c "import tqdm" >/dev/null 2>&1; then
    mkdir -p "$STUBS"
    printf 'def tqdm(iterable=None, *args, **kwargs):\n    return iterable\n' >"$STUBS/tqdm.py"
    stubbed="$stubbed tqdm"
fi
if ! "$PY" -c "import scipy.stats, scipy.special" >/dev/null 2>&1; then
    mkdir -p "$STUBS/scipy"
    : >"$STUBS/scipy/__init__.py"
    for sub in stats special; do
        printf 'def __getattr__(name):\n    raise AttributeError(f"scipy stand-in: no %s.{name}")\n' \
            "$sub" >"$STUBS/scipy/$sub.py"
    done
    stubbed="$stubbed scipy"
fi
LOSSES_PATH=$PYTHONPATH
[ -n "$stubbed" ] && LOSSES_PATH=$PYTHONPATH:$STUBS
[ -n "$stubbed" ] && say "- stand-ins for PML's imports (loss benchmark only):$stubbed"

# ----------------------------------------------------------------------------- 2. versions
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)
say "- GPU (nvidia-smi): ${gpu:-none}"
versions=$(capped 60 "$PY" -c '
import sys, torch
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if cuda else "-"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, cuda available: {cuda} ({torch.cuda.device_count()} devices: {name})")
' 2>&1 | tail -n 1)
say "- $versions"
log "$versions"
say ""
say "| stage | exit | seconds | limit |"
say "|---|---|---|---|"
STAGES=$OUT/.stages
: >"$STAGES"

# ----------------------------------------------------------------------------- 3. tests
T=$(limit "$TESTS_S" $((LOSSES_S + TRAIN_S)))
log "tests (limit $T s): pytest $TEST_ARGS"
start=$SECONDS
# SIGINT: pytest stops as on Ctrl-C and still prints its failures and counts so far
# shellcheck disable=SC2086
PYTHONUNBUFFERED=1 SIGNAL=INT capped "$T" "$PY" -m pytest $TEST_ARGS >"$OUT/pytest.log" 2>&1
rc=$?
echo "| tests | $rc | $((SECONDS - start)) | $T |" >>"$STAGES"
log "tests: exit $rc"

# ----------------------------------------------------------------------------- 4. losses
T=$(limit "$LOSSES_S" "$TRAIN_S")
B=$((T > 60 ? T - 25 : T * 2 / 3))
log "losses (limit $T s, budget $B s): losses.py $LOSSES_ARGS"
start=$SECONDS
# shellcheck disable=SC2086
PYTHONPATH=$LOSSES_PATH capped "$T" "$PY" benchmarks/losses.py $LOSSES_ARGS --budget "$B" \
    --json "$OUT/losses.json" >"$OUT/losses.md" 2>"$OUT/losses.log"
rc=$?
echo "| losses | $rc | $((SECONDS - start)) | $T |" >>"$STAGES"
log "losses: exit $rc"

# ----------------------------------------------------------------------------- 5. train
T=$(limit "$TRAIN_S" 0)
B=$((T > 30 ? T - 15 : T / 2))
log "train (limit $T s, budget $B s): train.py $TRAIN_ARGS"
start=$SECONDS
# shellcheck disable=SC2086
capped "$T" "$PY" benchmarks/train.py $TRAIN_ARGS --budget "$B" >"$OUT/train.md" 2>"$OUT/train.log"
rc=$?
echo "| train | $rc | $((SECONDS - start)) | $T |" >>"$STAGES"
log "train: exit $rc"

# ----------------------------------------------------------------------------- summary
cat "$STAGES" >>"$SUMMARY"
rm -f "$STAGES"
say ""
say "Exit 124/137: the stage ran out of time (its partial output is kept; the tests are"
say "interrupted as by Ctrl-C, so their counts are of the tests run until then)."
say ""
say "## Tests"
say ""
say '```'
line=$(grep -E '(passed|failed|errors?|skipped|deselected|no tests ran)[ ,].*in [0-9.]+s' "$OUT/pytest.log" | tail -n 1)
if [ -n "$line" ]; then
    say "$line"
else
    say "(no pytest summary line; the log ends:)"
    tail -n 5 "$OUT/pytest.log" | cut -c 1-300 >>"$SUMMARY"
fi
failed=$(grep -cE '^(FAILED|ERROR) ' "$OUT/pytest.log")
grep -E '^(FAILED|ERROR) ' "$OUT/pytest.log" | head -n 60 | cut -c 1-300 >>"$SUMMARY"
[ "$failed" -gt 60 ] && say "... $((failed - 60)) more in pytest.log"
say '```'
say ""
say "## Losses (benchmarks/losses.py; notes in losses.md)"
say ""
if grep -q '^| loss' "$OUT/losses.md"; then
    awk '/^(multi_similarity:|WARNING: multi_similarity|Device:)/ { on = 1 } /^Notes$/ { on = 0 } on' \
        "$OUT/losses.md" >>"$SUMMARY"
else
    say "(no table; losses.log ends:)"
    say '```'
    tail -n 15 "$OUT/losses.log" | cut -c 1-300 >>"$SUMMARY"
    say '```'
fi
say ""
say "## Training throughput (benchmarks/train.py)"
say ""
cat "$OUT/train.md" >>"$SUMMARY"
if [ -s "$OUT/train.log" ]; then
    say ""
    say '```'
    tail -n 8 "$OUT/train.log" | cut -c 1-300 >>"$SUMMARY"
    say '```'
fi
say ""
say "Total: $SECONDS s. Files: $(cd "$OUT" && ls | tr '\n' ' ')"
log "done in $SECONDS s: $SUMMARY"
