#!/usr/bin/env bash
# Build the Grand Challenge image and save it as a gzipped archive; optionally the model archive.
set -euo pipefail
REPO="$(cd "$(dirname "$0")" && pwd)"

abspath() {  # a path given relative to the caller's working directory, made absolute
    case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac
}

TAG="fusemycells:latest"
OUT="fusemycells.tar.gz"
MODEL_ARCHIVE=""
MODEL_ONLY=0
RESOURCES="resources"

usage() {
    cat <<'USAGE'
Usage: ./save.sh [--tag NAME] [--out FILE] [--model-archive FILE] [--model-only] [--resources DIR]

  --tag NAME            image tag (default fusemycells:latest)
  --out FILE            image archive to write (default fusemycells.tar.gz): docker save | gzip
  --model-archive FILE  also write FILE (.tar.gz) with manifest.json and the weights from
                        --resources (default resources/), for Grand Challenge's model upload;
                        mounted at /opt/ml/model, where inference.py prefers it over resources/
  --model-only          write only the model archive (needs no Docker engine)
  -h, --help            this text

Relative FILE/DIR arguments are taken from the current directory; the defaults lie in the
repository. Builds with `docker build --platform=linux/amd64`. Exit 3 when no Docker engine is
reachable.
USAGE
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --tag) TAG="$2"; shift 2 ;;
        --out) OUT="$(abspath "$2")"; shift 2 ;;
        --model-archive) MODEL_ARCHIVE="$(abspath "$2")"; shift 2 ;;
        --model-only) MODEL_ONLY=1; shift ;;
        --resources) RESOURCES="$(abspath "$2")"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "save.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done
cd "$REPO"  # after the arguments: the defaults and the build context are the repository's

if [[ "$MODEL_ONLY" == 1 && -z "$MODEL_ARCHIVE" ]]; then
    MODEL_ARCHIVE="model.tar.gz"
fi

if [[ -n "$MODEL_ARCHIVE" ]]; then
    if [[ ! -f "$RESOURCES/manifest.json" ]]; then
        echo "save.sh: $RESOURCES/manifest.json not found: export weights first (./export.sh)" >&2
        exit 2
    fi
    # Verify checksums before packing: a broken archive would only fail on Grand Challenge.
    python3 -c "
import sys
from pathlib import Path
from fusemycells.config import load_manifest, verify_files
problems = verify_files(load_manifest(Path(sys.argv[1])), require_all=True)
if problems:
    sys.exit('save.sh: refusing to pack broken weights:\n' + '\n'.join(problems))" "$RESOURCES"
    files=(manifest.json)
    while IFS= read -r f; do files+=("$f"); done < <(python3 -c "
import json, sys
m = json.load(open(sys.argv[1]))
names = sorted({f['path'] for ch in m['channels'].values() for st in ('global_stage', 'patch_stage') for f in ch[st]['files'].values()})
print('\n'.join(names))" "$RESOURCES/manifest.json")
    tar -C "$RESOURCES" -czf "$MODEL_ARCHIVE" "${files[@]}"
    echo "model archive: $MODEL_ARCHIVE (${#files[@]} files, $(du -h "$MODEL_ARCHIVE" | cut -f1))"
fi
[[ "$MODEL_ONLY" == 1 ]] && exit 0

if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
    echo "save.sh: no Docker engine reachable ('docker info' failed): build and save on a machine with Docker running." >&2
    exit 3
fi
docker build --platform=linux/amd64 -t "$TAG" .
docker save "$TAG" | gzip -c > "$OUT"
echo "image archive: $OUT ($(du -h "$OUT" | cut -f1)) for tag $TAG"
