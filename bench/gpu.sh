#!/usr/bin/env bash
# The project on a CUDA machine in one go, meant to finish within 8 minutes on one GPU (the tests stage
# gets what is left of --budget), or its reduced form on CPU (about 2 minutes on 2 cores):
#
#   bash bench/gpu.sh                      # CUDA: the paper's batch 60 at 224 px
#   bash bench/gpu.sh --device cpu         # reduced form: proves the script, its figures mean nothing
#   bash bench/gpu.sh --logs /tmp/gpu_logs # keep every stage's full output
#
# The reduced form: stacked tail at batch 2 and 64 px; training steps at batch 4 and 64 px, 1 warm-up and
# 1 timed step; only the gloo DDP run; only the CPU side of the tests that take `device`.
#
# Stages (bench/gpu.py, one process each, so that one stage's crash leaves the others' figures):
#   stacked-tail  StackedBatchNorm2d and the stacked tail of resnet50 and ABE_M against the per-head path
#                 (models/reference.py's ReferenceStyle): embeddings in train and eval mode and BatchNorm running
#                 statistics, float32 with TF32 off, contiguous and channels_last
#   train         se_resnet50 + MSLoss + SGD on random images, batch 60, 224 px: float32 (contiguous and
#                 --channels-last), bf16 autocast and fp16 autocast with GradScaler (--channels-last);
#                 images/s (median step, CUDA synchronised, after warm-up) and torch.cuda.max_memory_allocated
#   ddp           train.py se_resnet50 MSLoss, 2 epochs on synthetic images, under torchrun: NCCL over the
#                 GPUs present (--amp fp16 --channels-last, 60 images per step in all); with fewer than 2
#                 GPUs, also DDP over gloo with 2 CPU processes
#   tests         pytest -m "not slow": the tests that take `device` (tests/conftest.py) run on CUDA too;
#                 the reduced form runs only those tests' CPU side (-k "cpu or cuda")
#
# Output: one Markdown table (device name, torch/CUDA/cuDNN versions, date, a row per figure) on stdout
# and in <out>/gpu_results.md (CUDA) or <out>/gpu_results_cpu.md (reduced form), where <out> is --out,
# else $OUT when set (the device machine's returned folder), else bench/. Exit status 0 when every row is
# ok, 1 when some stage failed (the table still lists what worked), 2 for a bad argument.
set -u -o pipefail

usage() {
    cat <<'EOF'
usage: bash bench/gpu.sh [--device cuda|cpu] [--out DIR] [--logs DIR] [--tests "PYTEST ARGS"]
                         [--stages "STAGE ..."] [--budget SECONDS]

  --device cuda|cpu    cuda: the full bench; cpu: its reduced form (default: cuda)
  --out DIR            folder of gpu_results.md / gpu_results_cpu.md (default: $OUT if set, else bench)
  --logs DIR           keep each stage's output as DIR/<stage>.log (default: a temporary folder, removed)
  --tests "ARGS"       pytest arguments of the tests stage (default: -m "not slow" tests on cuda;
                       -m "not slow" -k "cpu or cuda" tests on cpu)
  --stages "LIST"      stages to run, in the order given (default: stacked-tail train ddp tests)
  --budget SECONDS     the tests stage gets what is left of this after the other stages (default: 480)
EOF
}

fail() {
    echo "error: $*" >&2
    exit 2
}

COMMAND="bash bench/gpu.sh $*"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
DEVICE=cuda
OUT_DIR="${OUT:-$REPO/bench}"
LOGS=""
TESTS=""
STAGES="stacked-tail train ddp tests"
BUDGET=480
while [ $# -gt 0 ]; do
    case "$1" in
        --device) [ $# -ge 2 ] || fail "--device needs a value: cuda or cpu"; DEVICE="$2"; shift 2 ;;
        --out) [ $# -ge 2 ] || fail "--out needs a folder"; OUT_DIR="$2"; shift 2 ;;
        --logs) [ $# -ge 2 ] || fail "--logs needs a folder"; LOGS="$2"; shift 2 ;;
        --tests) [ $# -ge 2 ] || fail "--tests needs pytest arguments in one quoted string"; TESTS="$2"; shift 2 ;;
        --stages) [ $# -ge 2 ] || fail "--stages needs a list, e.g. \"train ddp\""; STAGES="$2"; shift 2 ;;
        --budget) [ $# -ge 2 ] || fail "--budget needs a number of seconds"; BUDGET="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) fail "unknown argument $1; see bash bench/gpu.sh --help" ;;
    esac
done
case "$DEVICE" in
    cuda|cpu) ;;
    *) fail "--device $DEVICE: expected cuda or cpu" ;;
esac
case "$BUDGET" in
    ''|*[!0-9]*) fail "--budget $BUDGET: expected a whole number of seconds" ;;
esac
for stage in $STAGES; do
    case "$stage" in
        stacked-tail|train|ddp|tests) ;;
        *) fail "--stages: unknown stage $stage; choose among stacked-tail train ddp tests" ;;
    esac
done
[ -n "$STAGES" ] || fail "--stages is empty; name at least one of stacked-tail train ddp tests"

if [ "$DEVICE" = cuda ]; then
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || fail "--device cuda: torch sees no CUDA device here; run bash bench/gpu.sh --device cpu for the reduced form"
    RESULTS="$OUT_DIR/gpu_results.md"
    TAIL_ARGS=(--batch-size 8 --crop-size 224)
    TRAIN_ARGS=(--batch-size 60 --crop-size 224 --steps 20 --warmup 5)
    DDP_ARGS=(--crop-size 224 --amp fp16 --workers 4)
    [ -n "$TESTS" ] || TESTS='-m "not slow" tests'
else
    # Reduced form: the same code paths at sizes a laptop runs in a couple of minutes.
    export CUDA_VISIBLE_DEVICES=""
    RESULTS="$OUT_DIR/gpu_results_cpu.md"
    TAIL_ARGS=(--batch-size 2 --crop-size 64)
    TRAIN_ARGS=(--batch-size 4 --crop-size 64 --steps 1 --warmup 1)
    DDP_ARGS=(--workers 0)
    [ -n "$TESTS" ] || TESTS='-m "not slow" -k "cpu or cuda" tests'
fi
eval "PYTEST_ARGS=($TESTS)" 2>/dev/null && [ ${#PYTEST_ARGS[@]} -gt 0 ] || fail "--tests \"$TESTS\": not a valid list of arguments"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_bench.XXXXXX")" || fail "cannot create a temporary folder"
trap 'rm -rf "$WORK"' EXIT
if [ -z "$LOGS" ]; then
    LOGS="$WORK/logs"
fi
mkdir -p "$LOGS" "$WORK/rows" "$OUT_DIR" || fail "cannot create $LOGS or $OUT_DIR"

cd "$REPO"
STATUS=()
for stage in $STAGES; do
    rows="$WORK/rows/$stage.json"
    log="$LOGS/$stage.log"
    command=("$PYTHON" -m bench.gpu "$stage" --device "$DEVICE" --rows "$rows")
    case "$stage" in
        stacked-tail) command+=("${TAIL_ARGS[@]}") ;;
        train) command+=("${TRAIN_ARGS[@]}") ;;
        ddp) command+=(--work "$WORK/ddp" "${DDP_ARGS[@]}") ;;
        tests)
            left=$((BUDGET - SECONDS))
            [ "$left" -ge 60 ] || left=60
            command+=(--timeout "$left" -- "${PYTEST_ARGS[@]}") ;;
    esac
    started=$SECONDS
    echo "== $stage: ${command[*]}"
    "${command[@]}" >"$log" 2>&1
    rc=$?
    STATUS+=("$stage=$rc")
    if [ "$rc" -eq 0 ]; then
        echo "== $stage: ok in $((SECONDS - started)) s"
    else
        echo "== $stage: FAILED (exit status $rc) in $((SECONDS - started)) s; the end of $log:"
        tail -n 60 "$log"
    fi
done

"$PYTHON" -m bench.gpu report --device "$DEVICE" --rows-dir "$WORK/rows" --out "$RESULTS" \
    --status "${STATUS[@]}" --command "$COMMAND (${SECONDS} s in all)"
rc=$?
echo "wrote $RESULTS"
exit "$rc"
