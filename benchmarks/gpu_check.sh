#!/usr/bin/env bash
# One-call GPU verification (issue #13): environment and CUDA route, the CUDA test subset (pytest -m cuda),
# TorchScript fp16 / ONNX Runtime CUDA (IOBinding) parity against the CPU, the VRAM budget with all stages
# loaded, and end to end on a generated 309x1920x1920 stack (seconds per stage, the non-network seconds, i.e.
# total less the forward passes (issue #16, goal <= 15 s), peak VRAM, degradation).
#
#   bash benchmarks/gpu_check.sh OUT_DIR [--device cuda|cpu] [--quick] [--total SECONDS] [--vram-budget GiB]
#
# Writes OUT_DIR/gpu_check.json and OUT_DIR/summary.md (also printed), step logs in OUT_DIR/logs/.
# Every step runs under its own timeout and records its exit status in OUT_DIR/steps/, so a failing or
# hanging step never stops the others. The stack is generated in the background from the start; the end-to-end
# run comes last and gets what remains of --total (default 450 s; the whole check ends by --total + 5 s),
# started as the image starts it (python -m fusemycells.runtime.cuda_support --exec inference.py), with a --time-budget
# 25 s shorter than its limit, so that the pipeline degrades and writes instead of being killed. Before it, the
# faults step runs inference.py on a small stack with a real CUDA fault injected (FUSEMYCELLS_INJECT_DEVICE_FAULT,
# fusemycells/runtime/faults.py: global stage, second patch batch, output filter): each must still write its output.
# Outputs are the default uint16.
# --device cpu --quick is the CPU dry run on a small stack (what test/test_gpu_check.py runs).
set -uo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

OUT=""
DEVICE="cuda"
QUICK=0
TOTAL=""
VRAM_BUDGET="2"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --total) TOTAL="$2"; shift 2 ;;
        --vram-budget) VRAM_BUDGET="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
        *) OUT="$1"; shift ;;
    esac
done
if [[ -z "$OUT" || ( "$DEVICE" != cuda && "$DEVICE" != cpu ) ]]; then
    usage >&2
    exit 2
fi
REPO="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
for old in steps logs case gpu_check.json env.json parity.json vram_torchscript.json vram_onnx.json faults.json faults_case e2e_report.json \
           pytest_cuda.xml vram_samples.csv summary.md resources_full_path; do
    rm -rf "${OUT:?}/$old"  # only what an earlier check left here
done
mkdir -p "$OUT/steps" "$OUT/logs"
cd "$REPO" || exit 2
PY="${PYTHON:-python3}"
export MALLOC_ARENA_MAX=1  # as in the image

QUICK_FLAG=()
if [[ "$QUICK" == 1 ]]; then  # dry run: small stack, one channel, one test file
    TOTAL="${TOTAL:-300}"; SHAPE=(16 128 128); PYTEST_SELECT=(test/test_cuda_support.py); QUICK_FLAG=(--quick)
else
    TOTAL="${TOTAL:-450}"; SHAPE=(309 1920 1920); PYTEST_SELECT=(test)
fi
START=$(date +%s)
remaining() { echo $(( TOTAL - ($(date +%s) - START) )); }

# run_step NAME TIMEOUT CMD...: run under `timeout`, log to logs/NAME.log, record steps/NAME.json.
run_step() {
    local name="$1" limit="$2"; shift 2
    local t0 seconds rc timed_out=false
    t0=$(date +%s.%N)
    timeout --kill-after=5 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
    rc=$?
    seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    [[ $rc == 124 || $rc == 137 ]] && timed_out=true
    printf '{"name": "%s", "rc": %d, "seconds": %s, "timeout_s": %d, "timed_out": %s, "log": "logs/%s.log"}\n' \
        "$name" "$rc" "$seconds" "$limit" "$timed_out" "$name" >"$OUT/steps/$name.json"
    echo "gpu_check: $name rc=$rc ($seconds s)" >&2
}

# The stack, generated in the background while the other steps run.
run_step make_case 240 "$PY" benchmarks/make_large_case.py --out "$OUT/case/input" --shape "${SHAPE[@]}" &
CASE_PID=$!

run_step env 45 "$PY" benchmarks/gpu_check.py env --device "$DEVICE" --out "$OUT/env.json"
run_step pytest_cuda 120 "$PY" -m pytest -q -m cuda -p no:cacheprovider --junitxml "$OUT/pytest_cuda.xml" "${PYTEST_SELECT[@]}"
run_step parity 75 "$PY" benchmarks/gpu_check.py parity --device "$DEVICE" --out "$OUT/parity.json" "${QUICK_FLAG[@]}"
for backend in torchscript onnx; do
    run_step "vram_$backend" 45 "$PY" benchmarks/gpu_check.py vram --device "$DEVICE" --backend "$backend" \
        --vram-budget "$VRAM_BUDGET" --out "$OUT/vram_$backend.json" "${QUICK_FLAG[@]}"
done

run_step faults 90 "$PY" benchmarks/gpu_check.py faults --device "$DEVICE" --out "$OUT/faults.json" "${QUICK_FLAG[@]}"

wait "$CASE_PID"
# The steps above end within 450 s (their limits + 5 s each to kill; in practice far less: the end-to-end run
# gets what they leave); the end-to-end run ends 25 s before
# --total and the summary takes at most 30 s: the whole check ends by --total + 5 s (455 s by default).
E2E_LIMIT=$(( $(remaining) - 30 ))
if (( E2E_LIMIT >= 30 )); then
    SAMPLER=""
    if [[ "$DEVICE" == cuda ]] && command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$OUT/vram_samples.csv" 2>/dev/null &
        SAMPLER=$!
    fi
    # the whole pipeline whatever trust decides on the generated stack (the worst case for the time limit)
    "$PY" benchmarks/gpu_check.py full-path-resources --resources "$REPO/resources" --out "$OUT/resources_full_path" >/dev/null
    run_step e2e "$E2E_LIMIT" "$PY" -m fusemycells.runtime.cuda_support --exec inference.py --input "$OUT/case/input" --output "$OUT/case/output" \
        --resources "$OUT/resources_full_path" --report "$OUT/e2e_report.json" --device "$DEVICE" --time-budget $(( E2E_LIMIT - 25 ))
    [[ -n "$SAMPLER" ]] && kill "$SAMPLER" 2>/dev/null
else
    echo "gpu_check: no time left for the end-to-end run ($E2E_LIMIT s)" >&2
fi
rm -rf "$OUT/case/input" "$OUT/case/output"  # 2 x 2.1 GiB

timeout 30 "$PY" benchmarks/gpu_check.py summarize "$OUT" --device "$DEVICE" "${QUICK_FLAG[@]}" \
    --elapsed $(( $(date +%s) - START )) --total "$TOTAL"
rc=$?
if [[ $rc != 0 ]]; then  # no Python summary: keep the step records in gpu_check.json all the same
    { printf '{"summary_error": %d, "steps": [' "$rc"; cat "$OUT"/steps/*.json | paste -sd, -; printf ']}\n'; } >"$OUT/gpu_check.json"
    cat "$OUT/gpu_check.json"
fi
echo "gpu_check: $(( $(date +%s) - START )) s in all; $OUT/gpu_check.json" >&2
exit $rc
