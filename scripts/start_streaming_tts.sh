#!/usr/bin/env bash
# Like start_tts.sh, with streaming mode as the default for requests that do not say.
set -euo pipefail
export TTS_STREAMING="${TTS_STREAMING:-true}"
exec "$(dirname "$0")/start_tts.sh" "$@"
