#!/usr/bin/env bash
# The GPU measurement plan of issue 6, one device call per step (each fits the 10-minute limit).
#
# Here, once: build the wheels the H100 machine lacks into .whl/ (git-ignored), then carry it:
#   ../shared/gpu/wheels.sh tokenizers loguru websockets==17.4 num2words pytest pytest-asyncio \
#     pytest-timeout iniconfig pluggy && rm -f .whl/pipecat_chatterbox-*.whl
# On the device machine (run's command, carry [".whl"]):
#   bash benchmarks/gpu_run.sh probe   # CUDA tests, T3 cache buckets, S3Gen variants, batcher hold
#   bash benchmarks/gpu_run.sh compile # T3 to the first chunk, S3Gen with the compiled flow
#   bash benchmarks/gpu_run.sh final   # CUDA T3 tests, the table (engine levels, server,
#                                      # naive baseline), T3 cache buckets
# Extra arguments go to the last gpu_bench.py call of the step. Logs and JSON land in $OUT.
set -uo pipefail
step=${1:?probe, compile or final}
shift
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/sidecar:$PWD/plugin:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
bench() {  # bench SECONDS NAME ARGS...: one gpu_bench.py run, its log and JSON under $OUT
  local seconds=$1 name=$2
  shift 2
  echo "=== $name ($(date +%T))"
  timeout "$seconds" python3 benchmarks/gpu_bench.py --out "$OUT/$name.json" "$@" 2>&1 \
    | grep -v "INFO\|Warn" | tee "$OUT/$name.log" | tail -30
}
case "$step" in
  probe)
    echo "=== tests ($(date +%T))"
    timeout 120 python3 -m pytest -q -p no:cacheprovider -x \
      tests/chatterbox/test_t3_cuda.py tests/chatterbox/test_s3gen_batch.py 2>&1 \
      | grep -v -i warn | tee "$OUT/tests.log" | tail -15
    bench 100 t3 --sections t3
    bench 190 s3gen --sections s3gen --s3gen-refs 4
    bench 150 engine16 --sections engine --levels 1,16 --first-chunk 7 --budget-s 140 \
      --variant 4:7:16:0.2 "$@"
    ;;
  final)
    echo "=== tests ($(date +%T))"
    timeout 90 python3 -m pytest -q -p no:cacheprovider -x tests/chatterbox/test_t3_cuda.py 2>&1 \
      | grep -v -i warn | tee "$OUT/tests.log" | tail -15
    bench 400 final --sections engine,server,baseline --server-levels 1,16,64 --budget-s 260 "$@"
    bench 85 t3 --sections t3
    ;;
  compile)
    bench 90 t3 --sections t3 --t3-kv-buckets 256
    bench 320 s3gen --sections s3gen --s3gen-refs 4 --compile-flow
    bench 160 engine_compiled --sections engine --levels 1,16 --engine-compile-flow \
      --budget-s 150 "$@"
    ;;
  *)
    echo "unknown step $step (probe or final)" >&2
    exit 2
    ;;
esac
echo "=== done ($(date +%T))"
