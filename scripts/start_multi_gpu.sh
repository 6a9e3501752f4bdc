#!/usr/bin/env bash
# One TTS sidecar per visible GPU behind HAProxy, on one host.
#
#   scripts/start_multi_gpu.sh
#
# Sidecar i runs with CUDA_VISIBLE_DEVICES=<i-th visible GPU> on 127.0.0.1:$TTS_PORT_BASE+i;
# HAProxy (deploy/haproxy/haproxy.cfg, with those sidecars as its servers) serves the public port,
# so clients use ws://HOST:$TTS_PORT/v1/stream/tts exactly as with one sidecar.
#
# Signals:
#   SIGTERM/SIGINT  every sidecar drains (no new calls, open calls finish for up to
#                   TTS_DRAIN_SECONDS), then HAProxy stops; a second one stops the sidecars at once
#   SIGHUP          re-writes HAProxy's configuration and reloads it without dropping calls
# A sidecar that exits on its own is restarted after 2 s (TTS_RESTART=0: left down).
#
# Settings (environment; every other TTS_* variable reaches the sidecars unchanged):
#   NUM_SIDECARS       how many sidecars [one per visible GPU: CUDA_VISIBLE_DEVICES, or
#                      nvidia-smi]; with no GPU it must be given (they then run the piper engine
#                      on the CPU unless TTS_ENGINE says otherwise), e.g.
#                      TTS_ENGINE=piper NUM_SIDECARS=3 scripts/start_multi_gpu.sh
#   TTS_HOST, TTS_PORT public address [0.0.0.0, 8002] (TTS_LB_BIND overrides both)
#   TTS_PORT_BASE      first sidecar port [8100]
#   TTS_SIDECAR_HOST   interface the sidecars listen on [127.0.0.1]
#   TTS_LB             0: start only the sidecars (HAProxy runs elsewhere) [1]
#   TTS_LB_*           HAProxy settings, see deploy/haproxy/haproxy.cfg
#   TTS_RUN_DIR        rendered haproxy.cfg, pid files, each process's output, HAProxy's
#                      runtime API socket haproxy.sock [run/multi]
#   TTS_LOG_DIR        sidecar i logs to $TTS_LOG_DIR/sidecar<i>/tts.log [logs]
#   TTS_PYTHON         Python that runs the sidecars [.venv/bin/python, set up by start_tts.sh]
#   HAPROXY            the haproxy binary [haproxy]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

log() { echo "start_multi_gpu: $*" >&2; }
die() { log "error: $*"; exit 2; }

# --- which GPUs, how many sidecars ----------------------------------------------------------
gpus=()
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=',' read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
elif command -v nvidia-smi >/dev/null 2>&1; then
  mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null || true)
fi
for k in "${!gpus[@]}"; do gpus[k]=$(echo "${gpus[k]}" | tr -d '[:space:]'); done
if [ -n "${NUM_SIDECARS:-}" ]; then
  [[ "$NUM_SIDECARS" =~ ^[1-9][0-9]*$ ]] || die "NUM_SIDECARS must be a positive integer"
  count=$NUM_SIDECARS
  if [ "${#gpus[@]}" -gt 0 ] && [ "$count" -gt "${#gpus[@]}" ]; then
    die "NUM_SIDECARS=$count but only ${#gpus[@]} GPUs are visible (one sidecar per GPU)"
  fi
else
  count=${#gpus[@]}
  [ "$count" -gt 0 ] || die "no GPU visible; set NUM_SIDECARS (e.g. TTS_ENGINE=piper NUM_SIDECARS=2)"
fi

port_base=${TTS_PORT_BASE:-8100}
sidecar_host=${TTS_SIDECAR_HOST:-127.0.0.1}
server_host=$sidecar_host
[ "$sidecar_host" = "0.0.0.0" ] && server_host=127.0.0.1
[ "$sidecar_host" = "::" ] && server_host=::1
run_dir=${TTS_RUN_DIR:-run/multi}
log_root=${TTS_LOG_DIR:-logs}
use_lb=${TTS_LB:-1}
haproxy_bin=${HAPROXY:-haproxy}
export TTS_LB_BIND="${TTS_LB_BIND:-${TTS_HOST:-0.0.0.0}:${TTS_PORT:-8002}}"
export TTS_STREAMING="${TTS_STREAMING:-true}"
mkdir -p "$run_dir"
run_dir=$(cd "$run_dir" && pwd)
export TTS_LB_ADMIN_SOCKET="${TTS_LB_ADMIN_SOCKET:-$run_dir/haproxy.sock}"

if [ "$use_lb" = 1 ]; then
  command -v "$haproxy_bin" >/dev/null 2>&1 ||
    die "haproxy not found (Debian/Ubuntu: apt-get install haproxy; or set TTS_LB=0)"
fi
if [ -n "${TTS_PYTHON:-}" ]; then
  python=$TTS_PYTHON
else
  TTS_SETUP_ONLY=1 scripts/start_tts.sh  # creates .venv and installs the sidecar once
  python=$root/.venv/bin/python
fi

# --- HAProxy's configuration: the shipped one with these sidecars as its servers --------------
render_haproxy_cfg() {
  local servers="" i
  for ((i = 0; i < count; i++)); do
    servers+="    server sidecar$i $server_host:$((port_base + i))"$'\n'
  done
  awk -v servers="$servers" '
    /# BEGIN SERVERS/ { print; printf "%s", servers; skip = 1; next }
    /# END SERVERS/ { skip = 0 }
    !skip { print }
  ' deploy/haproxy/haproxy.cfg >"$run_dir/haproxy.cfg.new"
  if ! "$haproxy_bin" -c -q -f "$run_dir/haproxy.cfg.new"; then
    log "error: HAProxy rejects $run_dir/haproxy.cfg.new"
    return 1
  fi
  mv "$run_dir/haproxy.cfg.new" "$run_dir/haproxy.cfg"
}

# --- processes ----------------------------------------------------------------------------------
pids=()
haproxy_pid=""

start_sidecar() {
  local i=$1 gpu_env=()
  [ "${#gpus[@]}" -gt 0 ] && gpu_env=("CUDA_VISIBLE_DEVICES=${gpus[i]}")
  mkdir -p "$log_root/sidecar$i"
  env "${gpu_env[@]}" TTS_HOST="$sidecar_host" TTS_PORT=$((port_base + i)) \
    TTS_LOG_DIR="$log_root/sidecar$i" "$python" -m chatterbox_sidecar \
    >>"$run_dir/sidecar$i.out" 2>&1 &
  pids[i]=$!
  echo "${pids[i]}" >"$run_dir/sidecar$i.pid"
  log "sidecar $i: pid ${pids[i]}, port $((port_base + i))${gpus[i]:+, GPU ${gpus[i]}}"
}

start_haproxy() {
  # -W: master-worker, so SIGUSR2 reloads without dropping calls; -db: stay in the foreground
  "$haproxy_bin" -W -db -f "$run_dir/haproxy.cfg" >>"$run_dir/haproxy.log" 2>&1 &
  haproxy_pid=$!
  echo "$haproxy_pid" >"$run_dir/haproxy.pid"
  log "haproxy: pid $haproxy_pid, serving $TTS_LB_BIND (stats: ${TTS_LB_STATS_BIND:-127.0.0.1:8404}/stats)"
}

signal_sidecars() {  # send signal $1 to every sidecar still running
  local p
  for p in "${pids[@]}"; do
    if [ -n "$p" ]; then kill "-$1" "$p" 2>/dev/null || true; fi
  done
}

stopping=0
reload=0
# shellcheck disable=SC2317  # called by the trap below
on_stop() {
  if [ "$stopping" = 1 ]; then
    log "second stop signal: stopping the sidecars at once"
    signal_sidecars TERM
  fi
  stopping=1
}
trap on_stop TERM INT
trap 'reload=1' HUP

wait_for() {  # wait until child $1 exits, through interruptions by signals; sets $waited
  waited=0
  while kill -0 "$1" 2>/dev/null; do
    waited=0
    wait "$1" || waited=$?
  done
}

if [ "$use_lb" = 1 ]; then render_haproxy_cfg || exit 2; fi
for ((i = 0; i < count; i++)); do start_sidecar "$i"; done
[ "$use_lb" = 1 ] && start_haproxy

status=0
while [ "$stopping" = 0 ]; do
  exited=""
  code=0
  wait -n -p exited || code=$?
  if [ "$reload" = 1 ] && [ "$use_lb" = 1 ]; then
    reload=0
    if render_haproxy_cfg; then
      kill -USR2 "$haproxy_pid"
      log "haproxy: reloaded (open calls stay on the old worker until they end)"
    else
      log "haproxy: not reloaded; it keeps its running configuration"
    fi
  fi
  [ "$stopping" = 1 ] && break
  [ -z "$exited" ] && continue
  if [ "$exited" = "$haproxy_pid" ]; then
    log "haproxy exited ($code); stopping"
    status=1
    stopping=1
    break
  fi
  for ((i = 0; i < count; i++)); do
    [ "${pids[i]}" = "$exited" ] || continue
    log "sidecar $i exited ($code)"
    pids[i]=""
    rm -f "$run_dir/sidecar$i.pid"
    if [ "${TTS_RESTART:-1}" = 1 ]; then
      sleep 2 &
      wait $! || true
      [ "$stopping" = 1 ] || start_sidecar "$i"
    fi
  done
done

log "stopping: sidecars drain (up to TTS_DRAIN_SECONDS=${TTS_DRAIN_SECONDS:-30} s), then haproxy"
signal_sidecars TERM
for ((i = 0; i < count; i++)); do
  [ -n "${pids[i]}" ] || continue
  wait_for "${pids[i]}"
  log "sidecar $i exited ($waited)"
done
if [ -n "$haproxy_pid" ] && kill -0 "$haproxy_pid" 2>/dev/null; then
  kill -USR1 "$haproxy_pid" 2>/dev/null || true  # soft stop: lets what is left finish
  wait_for "$haproxy_pid"
  log "haproxy exited ($waited)"
fi
rm -f "$run_dir"/*.pid
exit "$status"
