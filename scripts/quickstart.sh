#!/usr/bin/env bash
# MLOC's main job on one machine: set up, then run batch inference with the bundled Gemma 3 270M
# through the whole system (embedded Redis, orchestrator, worker) and print the outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mloc run "${1:-templates/inference_gemma3_270m.yaml}"
