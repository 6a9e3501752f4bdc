#!/usr/bin/env python3
"""Issue 15's scale-out run: ``scripts/start_multi_gpu.sh`` on a machine with several GPUs.

The script starts one chatterbox sidecar per visible GPU (full-size random weights written by
``gpu_bench.write_model``) behind HAProxy, then measures in the same run, with
``scripts/bench_tts.py`` over the websocket:

- one GPU: sidecar 0's own port, at ``--single-levels`` streams (the other sidecar idle);
- the fleet: HAProxy's public port, at ``--fleet-levels`` streams, with HAProxy's per-sidecar
  session counts (its ``/stats;csv``) before and after each level, so the spread is shown.

Aggregate capacity is about N times one GPU's when the fleet at N x k streams keeps the gap-free
share one GPU keeps at k. ``TTS_MAX_STREAMS`` is set past every level so that the levels measure
what the GPUs do, not what the sidecars admit (``busy`` answers would hide it); the calibrated
capacity each sidecar would enforce is read from its start log.

    python benchmarks/multi_gpu_bench.py --haproxy /path/to/haproxy --out $OUT/multi.json
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from gpu_bench import bench_tts_command, write_model  # noqa: E402
from gpu_sampler import GpuSampler  # noqa: E402


def http_status(url: str) -> int:
    """GET ``url``; returns its HTTP status, 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def wait_ready(
    urls: list[str], timeout: float, launcher: subprocess.Popen, pid_files: list[Path]
) -> float:
    """Wait until every URL answers 200; returns the seconds waited.

    Raises:
        RuntimeError: The launcher or a sidecar exited first (a sidecar's pid file is removed
            when it exits).
    """
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if launcher.poll() is not None:
            raise RuntimeError(f"start_multi_gpu.sh exited ({launcher.returncode})")
        if time.perf_counter() - started > 5 and not all(f.exists() for f in pid_files):
            raise RuntimeError("a sidecar exited while starting: see its .out file")
        if all(http_status(u) == 200 for u in urls):
            return time.perf_counter() - started
        time.sleep(1)
    raise TimeoutError(f"not ready within {timeout} s: {urls}")


def server_sessions(stats_url: str) -> dict[str, int]:
    """HAProxy's total sessions per sidecar (the ``stot`` column of ``/stats;csv``)."""
    with urllib.request.urlopen(stats_url, timeout=3) as r:
        text = r.read().decode().lstrip("# ")
    rows = csv.DictReader(io.StringIO(text))
    return {row["svname"]: int(row["stot"]) for row in rows if row["svname"].startswith("sidecar")}


def bench(url: str, levels: str, seconds: float, raw: Path, timeout: float) -> list[dict]:
    """``scripts/bench_tts.py`` at ``levels`` against ``url``; returns its levels."""
    command = bench_tts_command(url, levels, raw, seconds=seconds)
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    print(done.stdout[-3000:], done.stderr[-1500:], flush=True)
    return json.loads(raw.read_text())["levels"] if raw.exists() else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "multi.json")
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/cbx-bench"))
    p.add_argument("--haproxy", default="haproxy", help="the haproxy binary (or a wrapper)")
    p.add_argument("--single-levels", default="4,8", help="streams on one sidecar's own port")
    p.add_argument("--fleet-levels", default="8,16", help="streams through HAProxy")
    p.add_argument("--seconds", type=float, default=35.0, help="each level")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--port", type=int, default=8002)
    p.add_argument("--port-base", type=int, default=8100)
    p.add_argument("--engine", default="chatterbox", help="piper: check this script on a CPU")
    p.add_argument("--sidecars", type=int, default=0, help="how many [one per GPU]")
    args = p.parse_args()

    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = out_dir / "multi"
    on_gpu = args.engine == "chatterbox"
    written = write_model(args.model_dir, 30, 10.0) if on_gpu else 0.0
    most = max(int(x) for x in f"{args.single_levels},{args.fleet_levels}".split(","))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "sidecar"), str(ROOT / "plugin"), os.environ.get("PYTHONPATH", "")]
        ),
        "TTS_ENGINE": args.engine,
        "TTS_T3_BACKEND": "torch",
        "TTS_DEVICE": "cuda",
        "TTS_FLOW_STEPS": "10",
        "TTS_MAX_STREAMS": str(most),
        "TTS_OVERLOAD_HOLD_SECONDS": "0",  # nor the engine's falling-behind guard
        "TTS_ENGINE_CONCURRENCY": str(most),
        "TTS_MAX_CONNECTIONS": "1000",
        "TTS_PYTHON": sys.executable,
        "HAPROXY": args.haproxy,
        "TTS_HOST": "127.0.0.1",
        "TTS_PORT": str(args.port),
        "TTS_PORT_BASE": str(args.port_base),
        "TTS_RUN_DIR": str(run_dir),
        "TTS_LOG_DIR": str(run_dir / "logs"),
        "TTS_RESTART": "0",
        "TTS_LOG_LEVEL": "INFO",
    }
    gpus = ""
    if on_gpu:
        gpus = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    if on_gpu:
        env["TTS_MODEL_DIR"] = str(args.model_dir)
    if args.sidecars:
        env["NUM_SIDECARS"] = str(args.sidecars)
    result: dict = {
        "machine": gpus.splitlines() or [f"cpu {i}" for i in range(args.sidecars)],
        "model_written_s": round(written, 1),
        "command": " ".join(sys.argv),
    }
    n = len(result["machine"])
    launcher = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "start_multi_gpu.sh")],
        env=env,
        cwd=ROOT,
        stdout=open(out_dir / "start_multi_gpu.out", "w"),
        stderr=subprocess.STDOUT,
    )
    sampler = GpuSampler(500).start()
    public = f"ws://127.0.0.1:{args.port}/v1/stream/tts"
    single = f"ws://127.0.0.1:{args.port_base}/v1/stream/tts"
    stats_url = "http://127.0.0.1:8404/stats;csv"
    try:
        ready = [f"http://127.0.0.1:{args.port_base + i}/health/ready" for i in range(n)]
        ready.append(f"http://127.0.0.1:{args.port}/health/ready")
        pid_files = [run_dir / f"sidecar{i}.pid" for i in range(n)]
        waited = wait_ready(ready, args.start_timeout, launcher, pid_files)
        result["ready_s"] = round(waited, 1)
        print(f"=== {n} sidecars and HAProxy ready after {result['ready_s']} s", flush=True)
        time.sleep(3)  # HAProxy's checks have seen every sidecar up
        for i in range(n):
            log = (run_dir / "logs" / f"sidecar{i}" / "tts.log").read_text(errors="replace")
            found = re.findall(r"[Cc]apacity[^\n]*", log)
            result.setdefault("capacity_log", {})[f"sidecar{i}"] = found[-3:]
        result["single"] = bench(
            single, args.single_levels, args.seconds, out_dir / "single_raw.json", 400
        )
        fleet = []
        for level in args.fleet_levels.split(","):
            before = server_sessions(stats_url)
            levels = bench(public, level, args.seconds, out_dir / f"fleet{level}_raw.json", 400)
            after = server_sessions(stats_url)
            for lv in levels:
                lv["sessions_per_sidecar"] = {k: after[k] - before.get(k, 0) for k in after}
            fleet += levels
        result["fleet"] = fleet
        for lv in result["single"] + result["fleet"]:
            lv.update(sampler.window(lv["started_at_epoch"], lv["ended_at_epoch"]))
            lv.pop("raw", None)
    finally:
        sampler.stop()
        launcher.send_signal(signal.SIGTERM)
        try:
            result["stop_exit"] = launcher.wait(90)
        except subprocess.TimeoutExpired:
            launcher.kill()
            result["stop_exit"] = "killed after 90 s"
        args.out.write_text(json.dumps(result, indent=1))
    print("=== summary", flush=True)
    for name in ("single", "fleet"):
        for lv in result.get(name, []):
            print(
                f"{name:6} {lv['streams']:>3} streams: gap-free {100 * lv['gap_free_share']:.1f} %"
                f", TTFA p50/p95 {lv['ttfa_p50_ms']:.0f}/{lv['ttfa_p95_ms']:.0f} ms, "
                f"utterances {lv.get('utterances')}, busy {lv.get('busy')}, "
                f"GPU busy {lv.get('gpu_busy_mean_pct')} %, "
                f"spread {lv.get('sessions_per_sidecar', '-')}",
                flush=True,
            )


if __name__ == "__main__":
    main()
