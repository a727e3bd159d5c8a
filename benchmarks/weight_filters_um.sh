#!/usr/bin/env bash
# Quality of the weight-map filters in µm against the shipped ones in diff-grid voxels (README,
# "Weight-map filters stay in diff-grid voxels"): simulates the held-out validation set, runs the
# container twice (shipped manifest; a copy with weight_filter_unit "um") and scores both.
#   bash benchmarks/weight_filters_um.sh [WORKDIR] [MAX_FILTER_UM] [SIGMA_UM]     (≈ 15 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-work_dirs/weight_filters_um}
MAX_UM=${2:-3.6}  # the shipped 9 voxels at the simulator's median Y/X extent (176 px × 0.2925 µm / 128)
SIGMA_UM=${3:-1.2}  # the shipped σ 3 voxels there
mkdir -p "$W"
[ -d "$W/sim" ] || python3 -m training.simulate --out "$W/sim" --n 8 --seed 900000 --study validation
IN="$W/in/images/fluorescence-lightsheet-3D-microscopy"
mkdir -p "$IN" "$W/gt"
find "$W/sim" -name "*_angle.tif" -exec cp {} "$IN/" \;
find "$W/sim" -name "*_fused.tif" -exec cp {} "$W/gt/" \;
rm -rf "$W/res_um" && cp -r resources "$W/res_um"
python3 - "$W/res_um/manifest.json" "$MAX_UM" "$SIGMA_UM" <<'PY'
import json, sys
path, max_um, sigma_um = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
manifest = json.load(open(path))
for channel in manifest["channels"].values():
    channel["postprocess"].update(weight_max_filter=max_um, weight_sigma=sigma_um, weight_filter_unit="um")
json.dump(manifest, open(path, "w"), indent=2)
PY
for variant in voxels um; do
  res=resources; [ "$variant" = um ] && res="$W/res_um"
  python3 inference.py --input "$W/in" --output "$W/out_$variant" --resources "$res" --report "$W/report_$variant.json"
  python3 -m fusemycells.evaluate --input "$IN" --pred "$W/out_$variant" --gt "$W/gt" --json "$W/scores_$variant.json"
done
