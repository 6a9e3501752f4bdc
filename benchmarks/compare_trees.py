#!/usr/bin/env python3
"""Time to first audio of two checkouts of the sidecar, measured in one run, interleaved.

Each block starts the sidecar of one checkout (``python -m chatterbox_sidecar`` with that
checkout's ``sidecar/`` first on ``PYTHONPATH``), runs ``scripts/bench_tts.py``'s levels against
it over the websocket, and stops it; blocks alternate between the baseline and the candidate so
that a loaded machine slows both alike. Prints p50/p95 TTFA per checkout and level and the
candidate/baseline ratio; ``--json`` writes every utterance.

    git worktree add /tmp/base 1edc6db
    python benchmarks/compare_trees.py --baseline /tmp/base --candidate . --blocks 3 \\
        --streams 1,4 --rounds 8 --json benchmarks/results/piper_ttfa_compare.json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import platform
import tempfile
import time
from pathlib import Path

from chatterbox_sidecar.process import SidecarProcess

ROOT = Path(__file__).resolve().parents[1]


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_tts", ROOT / "scripts" / "bench_tts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def _block(bench, tree: Path, levels: list[int], args) -> dict[int, list[float]]:
    env = {"PYTHONPATH": str(tree / "sidecar"), "TTS_LOG_LEVEL": "INFO"}
    if args.engine_concurrency:
        env["TTS_ENGINE_CONCURRENCY"] = str(args.engine_concurrency)
    with tempfile.TemporaryDirectory() as workdir:
        sidecar = SidecarProcess(Path(workdir), env).start()
        try:
            bench_args = argparse.Namespace(
                url=sidecar.url,
                api_key=None,
                rounds=args.rounds,
                sample_rate=24000,
                encoding="pcm_s16le",
                streaming="server",
                seconds=0.0,
                spread=1.0,
                texts="agent",
                gap_tolerance=bench.GAP_TOLERANCE_S,
                busy_backoff=0.2,
            )
            await bench.run_level(bench_args, 1)  # warm-up
            out = {}
            for streams in levels:
                level = await bench.run_level(bench_args, streams)
                out[streams] = [r["ttfa_ms"] for r in level["raw"] if r["ttfa_ms"] is not None]
            return out
        finally:
            sidecar.stop()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", type=Path, required=True, help="checkout to compare against")
    p.add_argument("--candidate", type=Path, default=ROOT, help="checkout under test")
    p.add_argument("--blocks", type=int, default=3, help="blocks per checkout, interleaved")
    p.add_argument("--streams", default="1,4")
    p.add_argument("--rounds", type=int, default=8, help="utterances per stream and block")
    p.add_argument("--engine-concurrency", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    bench = _bench_module()
    levels = [int(s) for s in args.streams.split(",")]
    trees = {"baseline": args.baseline.resolve(), "candidate": args.candidate.resolve()}
    samples: dict[str, dict[int, list[float]]] = {k: {n: [] for n in levels} for k in trees}
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    for block in range(args.blocks):
        for name, tree in trees.items() if block % 2 == 0 else reversed(trees.items()):
            result = await _block(bench, tree, levels, args)
            for n, values in result.items():
                samples[name][n].extend(values)
            print(
                f"block {block} {name}: "
                + ", ".join(
                    f"{n} streams p50 {_percentile(v, 0.5):.0f} ms" for n, v in result.items()
                ),
                flush=True,
            )
    summary = {}
    print(f"\n{'streams':>7} {'baseline p50/p95':>18} {'candidate p50/p95':>19} {'ratio p50':>10}")
    for n in levels:
        b, c = samples["baseline"][n], samples["candidate"][n]
        row = {
            "baseline_p50_ms": _percentile(b, 0.5),
            "baseline_p95_ms": _percentile(b, 0.95),
            "candidate_p50_ms": _percentile(c, 0.5),
            "candidate_p95_ms": _percentile(c, 0.95),
            "utterances": [len(b), len(c)],
        }
        row["ratio_p50"] = row["candidate_p50_ms"] / row["baseline_p50_ms"]
        summary[n] = row
        print(
            f"{n:>7} {row['baseline_p50_ms']:>8.0f} / {row['baseline_p95_ms']:<7.0f}"
            f" {row['candidate_p50_ms']:>9.0f} / {row['candidate_p95_ms']:<7.0f}"
            f" {row['ratio_p50']:>10.2f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "started": started,
                    "machine": f"{platform.node()} {platform.machine()} {platform.processor()}",
                    "command": " ".join(
                        ["benchmarks/compare_trees.py", *map(str, vars(args).values())]
                    ),
                    "trees": {k: str(v) for k, v in trees.items()},
                    "summary": summary,
                    "samples": samples,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    asyncio.run(main())
