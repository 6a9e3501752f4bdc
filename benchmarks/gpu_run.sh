#!/usr/bin/env bash
# The GPU measurement plan of issue 6, one device call per step (each fits the 10-minute limit).
#
# Here, once: build the wheels the H100 machine lacks into .whl/ (git-ignored), then carry it:
#   ../shared/gpu/wheels.sh tokenizers loguru websockets==17.4 num2words pytest pytest-asyncio \
#     pytest-timeout iniconfig pluggy && rm -f .whl/pipecat_chatterbox-*.whl
# On the device machine (run's command, carry [".whl"]):
#   bash benchmarks/gpu_run.sh probe   # CUDA tests, S3Gen variants (compiled flow), T3 buckets
#   bash benchmarks/gpu_run.sh sweep   # engine levels, the websocket server, the naive baseline
# Extra arguments go to gpu_bench.py (e.g. --engine-compile-flow on the sweep).
set -euo pipefail
step=${1:?probe or sweep}
shift
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/sidecar:$PWD/plugin:$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
case "$step" in
  probe)
    timeout 170 python3 -m pytest -q -p no:cacheprovider -s \
      tests/chatterbox/test_t3_cuda.py tests/chatterbox/test_s3gen_batch.py 2>&1 \
      | grep -v -i warn | tail -25 || true
    timeout 380 python3 benchmarks/gpu_bench.py --out "$OUT/probe.json" \
      --sections s3gen,t3 --s3gen-refs 4 "$@" 2>&1 | grep -v "INFO\|Warn" | tail -40
    ;;
  sweep)
    timeout 560 python3 benchmarks/gpu_bench.py --out "$OUT/sweep.json" \
      --sections engine,server,baseline --levels 1,16,64 --budget-s 420 "$@" 2>&1 \
      | grep -v "INFO\|Warn" | tail -40
    ;;
  *)
    echo "unknown step $step (probe or sweep)" >&2
    exit 2
    ;;
esac
