#!/usr/bin/env python3
"""Wait until a sidecar answers ``/health/ready`` and print one ``ready: ...`` line.

``scripts/start_tts.sh`` runs this beside the server it starts::

    scripts/wait_ready.py --pid 1234        # give up when process 1234 exits
    scripts/wait_ready.py --timeout 600     # or after 600 s (exit status 1)

Host and port come from ``TTS_HOST`` and ``TTS_PORT`` as the server reads them. Only the
standard library is used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

PATH = "/v1/stream/tts"


def poll(url: str) -> tuple[int, dict]:
    """GET ``url``; returns (HTTP status, JSON body), or (0, {}) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except ValueError:
            return e.code, {}
    except (OSError, ValueError):
        return 0, {}


def alive(pid: int | None) -> bool:
    """Returns: whether process ``pid`` still runs (always True without a pid)."""
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited process that its parent has not reaped yet is a zombie ("Z")
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def main(argv: list[str] | None = None) -> int:
    """Poll until ready; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pid", type=int, help="stop waiting when this process exits")
    p.add_argument("--timeout", type=float, help="stop waiting after this many seconds")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between polls")
    args = p.parse_args(argv)

    host = os.environ.get("TTS_HOST", "0.0.0.0")
    port = os.environ.get("TTS_PORT", "8002")
    # A server on every interface is reached on this machine as localhost.
    local = "localhost" if host in ("0.0.0.0", "::", "") else host
    health = f"http://{local}:{port}/health/ready"
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    while alive(args.pid) and (deadline is None or time.monotonic() < deadline):
        status, body = poll(health)
        if status == 200:
            print(
                f"ready: ws://{local}:{port}{PATH} (engine {body.get('engine', '?')}, "
                f"version {body.get('version', '?')}); HTTP http://{local}:{port}/v1/synthesize",
                flush=True,
            )
            return 0
        if body.get("status") == "failed":
            print(f"failed: the engine did not load: {body.get('error')}", file=sys.stderr)
            return 1
        time.sleep(args.interval)
    if alive(args.pid):
        print(f"not ready after {args.timeout:g} s: {health}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
