#!/usr/bin/env bash
# The main job on the embedded defaults (packaged models, shared data, a local Ray cluster):
# evaluate -> gold preference data -> router -> thresholds -> Serve graph -> real requests -> report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT="${1:-runs/main}"
.venv/bin/rayeval data inspect ../shared/data/mmlu --json > /dev/null
.venv/bin/rayeval pipeline pipeline_small --out "$OUT"
echo "report: $OUT/report.md"
