#!/usr/bin/env python3
"""What one long piper call leaves in memory: the worker's settings against the old ones.

Loads the bundled voice the way a piper worker does (``piper_worker.load_voice``), speaks a short
warm-up sentence, then a 200-letter spelled-out run ("A B C ... "; one 62-68 s piece when uncut)
and prints the process's resident memory before and after, for five settings: the worker's
(phonemes cut into pieces of at most ``MAX_PHONEMES``, onnxruntime's memory arena off, the freed
heap given back after the job as ``piper_worker.serve`` does), the same without giving it back,
arena on, no cut, and both as before issue 18 (arena on, no cut). Each setting runs in its own
process.

    python benchmarks/piper_memory.py --json benchmarks/results/cpu_piper_memory_2026-11-30.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

SETTINGS = {
    "worker (cut, no arena, trim)": {"arena": False, "cut": True, "trim": True},
    "cut, no arena, no trim": {"arena": False, "cut": True, "trim": False},
    "arena on, cut": {"arena": True, "cut": True, "trim": False},
    "no arena, no cut": {"arena": False, "cut": False, "trim": False},
    "before (arena on, no cut)": {"arena": True, "cut": False, "trim": False},
}

_CHILD = r"""
import json, sys
import onnxruntime
from chatterbox_sidecar.engines import piper_worker as pw
from chatterbox_sidecar.engines.piper import bundled_voice_path

setting = json.loads(sys.argv[1])

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

if setting["arena"]:
    class Options(onnxruntime.SessionOptions):
        def __setattr__(self, key, value):
            super().__setattr__(key, True if key == "enable_cpu_mem_arena" else value)
    onnxruntime.SessionOptions = Options
if not setting["cut"]:
    pw.split_phonemes.__defaults__ = (10**9,)
path = bundled_voice_path()
voice = pw.load_voice(path, json.load(open(f"{path}.json")))
for _ in pw.synthesize(voice, "Hello there, how are you today?"):
    pass
warm = rss_mib()
samples = sum(len(a) for a in pw.synthesize(voice, " ".join(chr(65 + i % 26) for i in range(200))))
if setting["trim"]:
    pw._return_freed_memory()
print(json.dumps({"audio_s": samples / 22050, "warm_mib": warm, "after_mib": rss_mib()}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    rows = {}
    print(f"{'setting':<30} {'audio s':>8} {'warm MiB':>9} {'after MiB':>10} {'growth':>7}")
    for name, setting in SETTINGS.items():
        out = (
            subprocess.run(
                [sys.executable, "-c", _CHILD, json.dumps(setting)],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        row = json.loads(out)
        row["growth_mib"] = row["after_mib"] - row["warm_mib"]
        rows[name] = row
        print(
            f"{name:<30} {row['audio_s']:>8.1f} {row['warm_mib']:>9.0f} {row['after_mib']:>10.0f}"
            f" {row['growth_mib']:>+7.0f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.platform(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
