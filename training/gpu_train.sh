#!/usr/bin/env bash
# One GPU session of at most ~9 minutes: simulate (or reuse) the domain-randomised training set,
# train both channels side by side on the GPU with a preset (default: paper), leave resumable
# checkpoints, train_log.json and logs in OUTDIR, and exit cleanly before the limit.
#
#   training/gpu_train.sh OUTDIR [PRESET]
#
# Run it again with the same OUTDIR to continue (each channel resumes from OUTDIR/<channel>/state.pt).
# Environment: N pairs per channel (64), LIMIT_S total seconds (540), STEPS_GLOBAL / STEPS_PATCH
# (per-channel schedule; defaults sized for one ~9-minute H200 session, unmeasured), DATA (OUTDIR/data),
# INIT (exported weights to start from, e.g. resources; only with a preset of the same widths).
set -euo pipefail
OUT=${1:?usage: training/gpu_train.sh OUTDIR [PRESET]}
PRESET=${2:-paper}
N=${N:-64}
LIMIT_S=${LIMIT_S:-540}
STEPS_GLOBAL=${STEPS_GLOBAL:-1500}
STEPS_PATCH=${STEPS_PATCH:-4000}
DATA=${DATA:-$OUT/data}
START=$(date +%s)
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true

# 1. data: the randomised simulator, seeds 200000+ (nucleus) / 250000+ (membrane), as the CPU run
if [ ! -f "$DATA/.complete" ]; then
  jobs=$(( $(nproc) > 2 ? $(nproc) / 2 : 1 ))
  per=$(( (N + jobs - 1) / jobs ))
  for ch in nucleus membrane; do
    for ((s = 0; s < N; s += per)); do
      n=$(( s + per > N ? N - s : per ))
      OMP_NUM_THREADS=1 python -m training.simulate --out "$DATA/$ch" --n "$n" --seed $((200000 + s)) \
        --channels "$ch" --study "dr_train_$s" --randomise > "$OUT/simulate_${ch}_$s.log" 2>&1 &
    done
  done
  wait
  touch "$DATA/.complete"
fi
echo "data ready after $(( $(date +%s) - START )) s"

# 2. both channels side by side on the GPU; the wall-clock cap leaves 30 s to write and exit
left=$(( LIMIT_S - ($(date +%s) - START) - 30 ))
if (( left < 60 )); then echo "not enough time left to train ($left s)"; exit 0; fi
minutes=$(python -c "print(round($left / 60, 2))")
pids=()
for ch in nucleus membrane; do
  resume=()
  [ -f "$OUT/$ch/state.pt" ] && resume=(--resume)
  init=()
  [ -n "${INIT:-}" ] && [ ! -f "$OUT/$ch/state.pt" ] && init=(--init "$INIT")
  python -m training.train --preset "$PRESET" --data "$DATA/$ch" --channel "$ch" --out "$OUT/$ch" \
    --steps-global "$STEPS_GLOBAL" --steps-patch "$STEPS_PATCH" --max-minutes "$minutes" \
    --workers "$(( $(nproc) / 4 > 1 ? $(nproc) / 4 : 1 ))" "${resume[@]}" "${init[@]}" > "$OUT/train_$ch.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
for ch in nucleus membrane; do
  python - "$OUT/$ch/train_log.json" <<'PY' || true
import json, sys
log = json.load(open(sys.argv[1]))
rates = [r for r in log["history"] if "steps_per_s" in r]
print(log["channel"], "complete" if log["complete"] else "to be resumed", "global", log["global_steps"], "patch", log["patch_steps"],
      "last rate", rates[-1]["stage"] if rates else None, rates[-1]["steps_per_s"] if rates else None, "steps/s", log["provenance"]["hardware"])
PY
done
echo "finished after $(( $(date +%s) - START )) s (exit $status)"
exit "$status"
