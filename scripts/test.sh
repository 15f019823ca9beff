#!/usr/bin/env bash
# Set up from scratch (idempotent) and run the whole test suite, real-engine tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest tests -v --durations=25 "$@"
