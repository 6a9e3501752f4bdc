#!/usr/bin/env bash
# Set up .venv with everything the tests need (first run), then run the test suite on every core
# (pytest-xdist, one test file per worker at a time) and list the 15 slowest tests.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/test_protocol_server.py -x
# (-n 0 runs in one process; -m "not slow" skips the slowest end-to-end tests).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
make_venv
stamp=$(venv_stamp test pyproject.toml scripts/test.sh scripts/_venv.sh)
if [ ! -f "$stamp" ]; then
  step "first run (or pyproject.toml changed): installing the test environment into .venv"
  step "about 6 GB, most of it torch's CUDA libraries; 5-15 minutes"
  pip_install "pip (upgrade)" --upgrade pip
  # torch pinned to the GPU machine's version (2.11); torchaudio must match it exactly
  pip_install "torch 2.11 and torchaudio (the chatterbox engine's CPU tests)" \
    "torch==2.11.0" "torchaudio==2.11.0"
  pip_install "pipecat-chatterbox[test,dev] from this clone" -e ".[test,dev]"
  # chatterbox-vllm pins vllm==0.10.0 (and an older torch); the tests use only its S3Gen, voice
  # encoder and S3 tokenizer, which import without vLLM, so it is installed without dependencies.
  pip_install "chatterbox-vllm 0.2.1 (without its vLLM pin)" --no-deps "chatterbox-vllm==0.2.1"
  touch "$stamp"
fi
step "running pytest $*"
exec .venv/bin/python -m pytest -n auto --dist loadfile --durations=15 "$@"
