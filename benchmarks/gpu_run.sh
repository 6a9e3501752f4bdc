#!/usr/bin/env bash
# The GPU measurement plan of issue 12, one device call per step (each fits the 10-minute limit).
#
# Here, once, in a copy of this checkout inside the repository that `run` sends (a git-ignored
# folder, e.g. /work/main/.gpu_wt12), build the wheels the GPU machine lacks into .whl/:
#   bash ../shared/gpu/wheels.sh tokenizers loguru websockets==17.4 num2words prometheus-client pyloudnorm \
#     pytest pytest-asyncio pytest-timeout iniconfig pluggy && rm -f .whl/pipecat_chatterbox-*.whl
# and, for the baseline, the sidecar of the commit to compare with:
#   git archive 1edc6db sidecar | tar -x -C baseline
# On the device machine (run's command, carry that folder):
#   bash benchmarks/gpu_run.sh profile  # CUDA tests; server at 1/16/64 streams; profile 16 and 64
#   bash benchmarks/gpu_run.sh table    # the table: server levels, new engine and baseline
# Extra arguments go to the server gpu_bench.py call. Logs and JSON land in $OUT.
set -uo pipefail
step=${1:?profile or table}
shift
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/sidecar:$PWD/plugin:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv
run() {  # run SECONDS NAME COMMAND...: its log under $OUT
  local seconds=$1 name=$2
  shift 2
  echo "=== $name ($(date +%T))"
  timeout "$seconds" "$@" 2>&1 | grep -v "INFO\|Warn\|warn(" | tee "$OUT/$name.log" | tail -40
}
case "$step" in
  profile)
    run 100 tests python3 -m pytest -q -p no:cacheprovider -x tests/chatterbox/test_t3_cuda.py
    run 230 server python3 benchmarks/gpu_bench.py --out "$OUT/server.json" --sections server \
      --server-levels 1,16,64 --server-seconds 30 --server-timeout 200 "$@"
    run 150 profile16 python3 benchmarks/load_profile.py --streams 16 --seconds 25 \
      --profile-seconds 3 --out "$OUT/profile16.json"
    run 150 profile64 python3 benchmarks/load_profile.py --streams 64 --seconds 25 \
      --profile-seconds 2 --out "$OUT/profile64.json"
    ;;
  profile-only)
    run 150 profile16 python3 benchmarks/load_profile.py --streams 16 --seconds 15 \
      --profile-seconds 2 --out "$OUT/profile16.json" "$@"
    run 150 profile64 python3 benchmarks/load_profile.py --streams 64 --seconds 15 \
      --profile-seconds 2 --out "$OUT/profile64.json" "$@"
    ;;
  check)  # the new engine: CUDA tests, server at 1/16/64 (30 s), batch mode, profile at 16
    run 90 tests python3 -m pytest -q -p no:cacheprovider -x tests/chatterbox/test_s3gen_batch.py \
      -k "cuda"
    run 300 server python3 benchmarks/gpu_bench.py --out "$OUT/server.json" --sections server \
      --server-levels 1,16,64 --server-seconds 30 --server-timeout 280 \
      --server-batch-streams 32 "$@"
    run 110 profile16 python3 benchmarks/load_profile.py --streams 16 --seconds 20 \
      --profile-seconds 2 --out "$OUT/profile16.json"
    ;;
  trace)  # issue 12's trace of the new engine (16 and 64 streams, a first-chunk variant) and
    # issue 13's registration profile
    run 120 voice python3 benchmarks/voice_profile.py --seconds 10 --rounds 4 \
      --out "$OUT/voice_profile.json"
    run 130 profile16 python3 benchmarks/load_profile.py --streams 16 --seconds 20 \
      --profile-seconds 2 --out "$OUT/profile16.json" "$@"
    run 130 profile16_first12 python3 benchmarks/load_profile.py --streams 16 --seconds 20 \
      --profile-seconds 0 --engine-config '{"first_chunk_size": 12}' \
      --out "$OUT/profile16_first12.json" "$@"
    run 130 profile64 python3 benchmarks/load_profile.py --streams 64 --seconds 20 \
      --profile-seconds 2 --out "$OUT/profile64.json" "$@"
    ;;
  levers)  # T3 prefill graphs checked; first chunk 7 vs 12 at 1 and 16 streams; issue 13
    run 120 tests python3 -m pytest -q -p no:cacheprovider -x tests/chatterbox/test_t3_cuda.py
    run 60 voice python3 benchmarks/voice_profile.py --seconds 10 --rounds 2 \
      --out "$OUT/voice_profile.json"
    run 200 first_chunk python3 benchmarks/load_profile.py --variants 7:1,12:1,7:16,12:16 \
      --seconds 20 --profile-seconds 0 --out "$OUT/first_chunk.json" "$@"
    run 230 voice_bench python3 benchmarks/voice_bench.py --streams 16 --seconds 40 \
      --voices 10 --out "$OUT/voice_bench.json"
    ;;
  table2)  # issue 12's table after the levers: 1/4/8/16/64 streams x 60 s, batch mode
    run 580 table python3 benchmarks/gpu_bench.py --out "$OUT/table.json" --sections server \
      --server-levels 1,4,8,16,64 --server-seconds 60 --server-timeout 420 \
      --server-batch-streams 32 "$@"
    ;;
  final)  # what one last call can hold: the new engine at 1/16/32/64 streams x 35 s, batch mode
    run 345 table python3 benchmarks/gpu_bench.py --out "$OUT/table.json" --sections server \
      --server-levels 1,16,32,64 --server-seconds 35 --server-timeout 330 \
      --server-batch-streams 32 "$@"
    ;;
  table)  # the table: new engine 1/16/32/64 x 60 s + batch mode; baseline 16/64 x 30 s
    run 420 table python3 benchmarks/gpu_bench.py --out "$OUT/table.json" --sections server \
      --server-levels 1,16,32,64 --server-seconds 60 --server-timeout 400 \
      --server-batch-streams 32 "$@"
    run 150 baseline python3 benchmarks/gpu_bench.py --out "$OUT/baseline.json" \
      --sections server --server-levels 16,64 --server-seconds 30 --server-timeout 140 \
      --server-runs "baseline=$PWD/baseline/sidecar"
    ;;
  multi)  # issue 15 on nvidia-h200-x2: CUDA tests (T3, Turbo), then start_multi_gpu.sh measured
    # one GPU against the fleet through HAProxy (.haproxy/: Debian's haproxy with its libraries)
    run 150 tests python3 -m pytest -q -p no:cacheprovider tests/chatterbox/test_t3_cuda.py \
      tests/chatterbox/test_turbo_cuda.py
    run 430 multi python3 benchmarks/multi_gpu_bench.py --haproxy "$PWD/.haproxy/haproxy.sh" \
      --out "$OUT/multi.json" "$@"
    cp -r "$OUT/multi/logs" "$OUT/sidecar_logs" 2>/dev/null
    ;;
  models)  # issue 16: Turbo beside the Original through the websocket, same run and client
    run 570 models python3 benchmarks/model_bench.py --levels 1,4,16 --seconds 25 \
      --out "$OUT/models.json" "$@"
    ;;
  capacity)  # issue 16: Turbo's gap-free capacity beside the Original's, and what each calibrates
    run 560 models python3 benchmarks/model_bench.py --models chatterbox-turbo,chatterbox \
      --levels-of chatterbox-turbo=16,24,32,48,64 --levels-of chatterbox=4,8,16 --seconds 25 \
      --timeout 400 --out "$OUT/capacity.json" "$@"
    ;;
  multilingual)  # issue 16: Multilingual (the Original's T3 size, 2454 text tokens) on the GPU
    run 400 models python3 benchmarks/model_bench.py --models chatterbox-multilingual,chatterbox \
      --levels 1,4,16 --seconds 25 --timeout 200 --out "$OUT/multilingual.json" "$@"
    ;;
  voices)  # issue 13: registration under a 16-stream load (the GIL switch interval 5 vs 0.5 ms
    # was measured with a TTS_GIL_SWITCH_MS setting since removed: no effect, see NOTES.md)
    run 230 voice_bench python3 benchmarks/voice_bench.py --streams 16 --seconds 30 \
      --voices 10 --out "$OUT/voice_bench.json"
    run 230 voice_bench_gil python3 benchmarks/voice_bench.py --streams 16 --seconds 30 \
      --voices 10 --env TTS_GIL_SWITCH_MS=0.5 --name _gil05 --out "$OUT/voice_bench_gil05.json"
    ;;
  align)  # issue 17: T3's CUDA tests (the alignment recording graphed = eager = a full pass),
    # then what recording the alignment heads costs a decode step, a step() and a prefill
    run 200 tests python3 -m pytest -q -p no:cacheprovider tests/chatterbox/test_t3_cuda.py
    run 300 align python3 benchmarks/alignment_cost.py --out "$OUT/alignment_cost.json" "$@"
    ;;
  voices-align)  # issues 13 and 17 in one call: the voices step at 25 s, then the align step
    # (as run on 2026-11-30, before TTS_GIL_SWITCH_MS was removed)
    run 190 voice_bench python3 benchmarks/voice_bench.py --streams 16 --seconds 25 \
      --voices 10 --out "$OUT/voice_bench.json"
    run 190 voice_bench_gil python3 benchmarks/voice_bench.py --streams 16 --seconds 25 \
      --voices 10 --env TTS_GIL_SWITCH_MS=0.5 --name _gil05 --out "$OUT/voice_bench_gil05.json"
    run 110 tests python3 -m pytest -q -p no:cacheprovider tests/chatterbox/test_t3_cuda.py
    run 100 align python3 benchmarks/alignment_cost.py --out "$OUT/alignment_cost.json"
    ;;
  *)
    echo "unknown step $step (profile or table)" >&2
    exit 2
    ;;
esac
echo "=== done ($(date +%T))"
