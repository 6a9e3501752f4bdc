#!/usr/bin/env bash
# Set up (first run) and start the TTS sidecar.
#   scripts/start_tts.sh            batch mode by default (TTS_STREAMING=false), as in the guide
#   scripts/start_streaming_tts.sh  streaming mode by default
# A request's own "streaming" flag always wins. Any TTS_* variable set in the environment is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv ..." >&2
  "$PYTHON" -m venv .venv
fi
extras="cpu"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extras="cpu,gpu"
fi
stamp=".venv/.installed-$extras-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "Installing pipecat-chatterbox[$extras] ..." >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi
# TTS_SETUP_ONLY=1: install and stop here (scripts/start_multi_gpu.sh, before its sidecars start)
[ "${TTS_SETUP_ONLY:-0}" = 1 ] && exit 0
export TTS_STREAMING="${TTS_STREAMING:-false}"
# exec: SIGTERM from systemd or the shell reaches the server itself
exec .venv/bin/python -m chatterbox_sidecar "$@"
