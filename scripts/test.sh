#!/usr/bin/env bash
# Set up .venv with everything the tests need (first run), then run the test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/test_protocol_server.py -x
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-test-$(cat pyproject.toml scripts/test.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch pinned to the GPU machine's version (2.11); torchaudio must match it exactly
  .venv/bin/python -m pip install -q "torch==2.11.0" "torchaudio==2.11.0"
  .venv/bin/python -m pip install -q -e ".[test,dev]"
  # chatterbox-vllm pins vllm==0.10.0 (and an older torch); the tests use only its S3Gen, voice
  # encoder and S3 tokenizer, which import without vLLM, so it is installed without dependencies.
  .venv/bin/python -m pip install -q --no-deps "chatterbox-vllm==0.2.1"
  touch "$stamp"
fi
exec .venv/bin/python -m pytest "$@"
