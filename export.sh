#!/usr/bin/env bash
# Export trained checkpoints (training/) to TorchScript + ONNX and write resources/manifest.json.
set -euo pipefail
cd "$(dirname "$0")"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    cat <<'USAGE'
Usage: ./export.sh [--checkpoints DIR] [--out DIR] [--channels nucleus membrane]
                   [--output-gaussian-sigma CH=SIGMA ...] [--postprocess FILE] [--tolerance 1e-4]
                   [--time-budget SECONDS]

Reads DIR/<channel>/global.pt and patch.pt (written by `python -m training.train`), traces both
stages to TorchScript, exports them to ONNX, checks eager vs TorchScript vs ONNX Runtime on a
random input of a shape the networks were not traced at (max abs difference <= tolerance), and
writes the weights plus manifest.json (sha256 of every file, all inference parameters) to OUT.
--postprocess FILE merges per-channel post-processing settings (the shipped noise-adaptive policy:
training/policy/postprocess.json). Defaults: --checkpoints work_dirs/ckpt --out resources.
USAGE
    exit 0
fi
exec python3 -m training.export "$@"
