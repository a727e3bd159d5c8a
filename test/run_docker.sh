#!/usr/bin/env bash
# Local end-to-end test of the image, run like Grand Challenge runs it:
# no network, /input read-only, /output writable, /tmp writable and empty, memory limit, GPU when present.
# Then checks every output (name, shape, spacing) and scores it when ground truth is present.
# The checks run on the HOST: python3 with numpy and tifffile (scoring also scipy), i.e.
# pip install -r requirements.txt. They import fusemycells from this repository, whatever the
# caller's working directory.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"

abspath() {  # a path given relative to the caller's working directory, made absolute
    case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac
}

TAG="fusemycells:latest"
INPUT="$REPO/test/input"
GT="$REPO/test/ground-truth"
MEMORY="16g"
BUILD=auto

usage() {
    cat <<'USAGE'
Usage: test/run_docker.sh [--tag NAME] [--input DIR] [--gt DIR] [--memory 16g] [--build|--no-build]

Runs the image on DIR (default test/input, the Grand Challenge input root that holds
images/fluorescence-lightsheet-3D-microscopy/) with --rm --network none, /input read-only,
a fresh output volume, a writable /tmp, the memory limit and --gpus all when nvidia-smi works.
Builds the image first when it does not exist (or with --build). Then checks that every input
has an output of the same shape and spacing, and runs python -m fusemycells.evaluate when
ground truth (default test/ground-truth) exists. These checks run on the host and need python3
with numpy and tifffile (pip install -r requirements.txt); exit 4 when they are missing.
Exit 3 when no Docker engine is reachable.
USAGE
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --tag) TAG="$2"; shift 2 ;;
        --input) INPUT="$(cd "$2" && pwd)"; shift 2 ;;
        --gt) GT="$(abspath "$2")"; shift 2 ;;
        --memory) MEMORY="$2"; shift 2 ;;
        --build) BUILD=yes; shift ;;
        --no-build) BUILD=no; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run_docker.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done

if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
    echo "run_docker.sh: no Docker engine reachable ('docker info' failed); the engine-free image test is test/test_image.py." >&2
    exit 3
fi
if ! python3 -c "import numpy, tifffile" 2>/dev/null; then  # checked before a long build and run
    echo "run_docker.sh: the output checks need host python3 with numpy and tifffile (pip install -r requirements.txt)" >&2
    exit 4
fi
if [[ "$BUILD" == yes ]] || { [[ "$BUILD" == auto ]] && ! docker image inspect "$TAG" >/dev/null 2>&1; }; then
    docker build --platform=linux/amd64 -t "$TAG" "$REPO"
fi

OUTPUT="$(mktemp -d "${TMPDIR:-/tmp}/fusemycells-output.XXXXXX")"
chmod 777 "$OUTPUT"  # the image runs as a non-root user
GPU=()
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    GPU=(--gpus all)
fi

echo "running $TAG on $INPUT -> $OUTPUT"
# ${GPU[@]+...}: an empty array under `set -u` is an error in bash < 4.4
docker run --rm --platform=linux/amd64 --network none ${GPU[@]+"${GPU[@]}"} \
    --memory "$MEMORY" --memory-swap "$MEMORY" --shm-size 8g \
    -v "$INPUT":/input:ro -v "$OUTPUT":/output \
    --tmpfs /tmp:exec,size=8g \
    "$TAG"

cd "$REPO"  # the checks import fusemycells from this repository
python3 - "$INPUT" "$OUTPUT" <<'PY'
import sys
from pathlib import Path

from fusemycells.io.tiff import read_volume

inp = Path(sys.argv[1]) / "images/fluorescence-lightsheet-3D-microscopy"
out = Path(sys.argv[2]) / "images/fused-fluorescence-lightsheet-3D-microscopy"
bad = 0
for src in sorted(p for p in inp.iterdir() if p.suffix.lower() in (".tif", ".tiff")):
    dst = out / src.name
    if not dst.is_file():
        print(f"MISSING {dst}")
        bad += 1
        continue
    a, b = read_volume(src), read_volume(dst)
    ok = a.data.shape == b.data.shape and all(abs(x - y) < 1e-6 * max(x, 1) for x, y in zip(a.spacing, b.spacing))
    print(f"{'OK ' if ok else 'BAD'} {src.name}: shape {a.data.shape} -> {b.data.shape}, spacing {a.spacing} -> {b.spacing}")
    bad += not ok
sys.exit(1 if bad else 0)
PY

if [[ -d "$GT" ]]; then
    FIGURE=()  # the QC figure needs matplotlib (requirements-eval.txt); the scores do not
    if python3 -c "import matplotlib" 2>/dev/null; then
        FIGURE=(--png "$OUTPUT/qc.png")
    else
        echo "run_docker.sh: no QC figure without matplotlib (pip install -r requirements-eval.txt)" >&2
    fi
    python3 -m fusemycells.evaluate --input "$INPUT" --pred "$OUTPUT" --gt "$GT" ${FIGURE[@]+"${FIGURE[@]}"}
fi
echo "outputs kept in $OUTPUT"
