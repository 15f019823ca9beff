#!/usr/bin/env bash
# Set up from scratch (idempotent) and run the whole test suite, real-engine tests included.
#   bash scripts/test.sh            the full suite (what CI runs)
#   bash scripts/test.sh --fast     the pure tests only (no Ray, no real model): under a minute
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "--fast" ]; then
  shift
  exec .venv/bin/python -m pytest tests -q -m "not (engine or ray or serve or model or slow)" "$@"
fi
# The HTML report test renders in a real headless browser (Debian's chromium).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
    >/dev/null 2>&1 || echo "== chromium could not be installed: the browser test will skip"
fi
exec .venv/bin/python -m pytest tests -v --durations=25 "$@"
