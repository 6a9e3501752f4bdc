#!/usr/bin/env bash
# Set up (first run) and start the TTS sidecar.
#   scripts/start_tts.sh            batch mode by default (TTS_STREAMING=false), as in the guide
#   scripts/start_streaming_tts.sh  streaming mode by default
# A request's own "streaming" flag always wins. Any TTS_* variable set in the environment is kept.
# Prints "ready: ws://..." once the sidecar answers /health/ready (the engine is loaded).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
make_venv
extras="cpu"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extras="cpu,gpu"
fi
if [ "${TTS_MODEL:-}" = "chatterbox-multilingual" ]; then
  extras="$extras,multilingual"  # Japanese kana and Chinese word segmentation
fi
stamp=$(venv_stamp "$extras" pyproject.toml)
# scripts/test.sh installs a superset of the cpu extra.
test_stamp=$(venv_stamp test pyproject.toml scripts/test.sh scripts/_venv.sh)
if [ -f "$stamp" ] || { [ "$extras" = cpu ] && [ -f "$test_stamp" ]; }; then
  step "using .venv (pipecat-chatterbox[$extras] installed)"
else
  step "first run (or pyproject.toml changed): installing into .venv, a few minutes"
  pip_install "pip (upgrade)" --upgrade pip
  pip_install "pipecat-chatterbox[$extras] from this clone" -e ".[$extras]"
  touch "$stamp"
fi
# TTS_SETUP_ONLY=1: install and stop here (scripts/start_multi_gpu.sh, before its sidecars start)
[ "${TTS_SETUP_ONLY:-0}" = 1 ] && exit 0
export TTS_STREAMING="${TTS_STREAMING:-false}"
step "starting the sidecar (engine: ${TTS_ENGINE:-auto}); it prints 'ready: ...' once loaded"
# Watches /health/ready and prints the ready line; it ends with the server or once ready.
.venv/bin/python scripts/wait_ready.py --pid $$ &
# exec: SIGTERM from systemd or the shell reaches the server itself (and keeps this PID)
exec .venv/bin/python -m chatterbox_sidecar "$@"
