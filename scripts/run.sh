#!/usr/bin/env bash
# The main job on the embedded defaults: packaged models, shared data, a local Ray cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT="${1:-runs/main}"
.venv/bin/rayeval data inspect ../shared/data/mmlu --json > /dev/null
exec .venv/bin/rayeval eval eval_small --out "$OUT/eval"
