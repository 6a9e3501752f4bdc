"""Where a stream's time goes under load: the chatterbox engine in-process, profiled.

N streams speak short agent sentences back to back through ``ChatterboxEngine.synthesize``
for ``--seconds``; every chunk's arrival is timed, so each utterance gets the client's
continuity figures (``scripts/bench_tts.continuity``: a player that starts at the first chunk).
Meanwhile it records, without changing the engine:

- each T3 decode step and prefill (host wall time, rows) and each S3Gen call (wall time,
  chunks, first chunks among them), by wrapping the engine's objects;
- ``nvidia-smi`` utilization every 200 ms;
- for ``--profile-seconds`` in the middle of the run, ``torch.profiler`` (CPU + CUDA): from its
  trace, the time each CUDA stream had a kernel running (T3 and S3Gen run on their own
  streams), the union of both (the GPU busy), and the top kernels; and the op table.

Output: one JSON (no trace file; the trace is summarised here).

    python benchmarks/load_profile.py --model-dir /tmp/cbx-bench --variants 7:1,7:16 --seconds 30 \
        --out $OUT/profile16.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "sidecar"), str(ROOT), str(ROOT / "scripts"), str(ROOT / "benchmarks")]

from bench_tts import AGENT_SENTENCES, continuity  # noqa: E402
from chatterbox_sidecar.engines.base import SynthesisParams  # noqa: E402
from chatterbox_sidecar.engines.chatterbox import (  # noqa: E402
    ChatterboxEngine,
    ChatterboxEngineConfig,
)
from gpu_sampler import GpuSampler  # noqa: E402

SAMPLE_RATE = 24_000


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


class Timings:
    """Wall times of wrapped calls: (start, end, size, extra) per call."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[float, float, int, int]]] = {}

    def wrap(self, obj, name: str, key: str, size, extra=lambda *a: 0) -> None:
        original = getattr(obj, name)
        calls = self.calls.setdefault(key, [])

        def wrapped(*args, **kwargs):
            n, more = size(*args), extra(*args)
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                calls.append((started, time.perf_counter(), n, more))

        setattr(obj, name, wrapped)

    def summary(self, key: str, start: float, end: float) -> dict:
        calls = [c for c in self.calls.get(key, []) if start <= c[0] and c[1] <= end]
        if not calls:
            return {"calls": 0}
        ms = [1000 * (b - a) for a, b, _, _ in calls]
        sizes = [s for _, _, s, _ in calls]
        out = {
            "calls": len(calls),
            "calls_per_s": round(len(calls) / (end - start), 1),
            "busy_share": round(sum(b - a for a, b, _, _ in calls) / (end - start), 3),
            "ms_p50": pct(ms, 50),
            "ms_p95": pct(ms, 95),
            "ms_max": round(max(ms), 1),
            "size_mean": round(float(np.mean(sizes)), 2),
            "extra_sum": sum(e for *_, e in calls),
        }
        by_size: dict[int, list[float]] = {}
        for m, s in zip(ms, sizes, strict=True):
            by_size.setdefault(s, []).append(m)
        out["ms_p50_by_size"] = {s: pct(v, 50) for s, v in sorted(by_size.items())}
        return out


def trace_summary(path: Path) -> dict:
    """Kernel time per CUDA stream, their union, idle gaps and top kernels, from a trace."""
    trace = json.loads(path.read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    runtime = [e for e in events if e.get("cat") == "cuda_runtime" and "dur" in e]
    if not kernels:
        return {"kernels": 0}
    t0 = min(e["ts"] for e in kernels)
    t1 = max(e["ts"] + e["dur"] for e in kernels)

    def union(intervals: list[tuple[float, float]]) -> tuple[float, list[float]]:
        intervals.sort()
        total, gaps, end = 0.0, [], None
        for a, b in intervals:
            if end is None or a > end:
                if end is not None:
                    gaps.append(a - end)
                total += b - a
                end = b
            elif b > end:
                total += b - end
                end = b
        return total, gaps

    streams: dict[int, list] = {}
    for e in kernels:
        streams.setdefault(e.get("args", {}).get("stream", -1), []).append(e)
    span = t1 - t0
    all_busy, all_gaps = union([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    out: dict = {
        "span_ms": round(span / 1000, 1),
        "kernels": len(kernels),
        "gpu_busy_share": round(all_busy / span, 3),
        "idle_gaps_over_1ms": sum(g > 1000 for g in all_gaps),
        "idle_ms_in_gaps_over_1ms": round(sum(g for g in all_gaps if g > 1000) / 1000, 1),
        "streams": {},
    }
    for sid, evs in sorted(streams.items(), key=lambda kv: -len(kv[1])):
        busy, _ = union([(e["ts"], e["ts"] + e["dur"]) for e in evs])
        names: dict[str, float] = {}
        for e in evs:
            names[e["name"][:70]] = names.get(e["name"][:70], 0.0) + e["dur"]
        top = sorted(names.items(), key=lambda kv: -kv[1])[:8]
        out["streams"][str(sid)] = {
            "kernels": len(evs),
            "busy_share": round(busy / span, 3),
            "kernel_us_mean": round(float(np.mean([e["dur"] for e in evs])), 1),
            "top_kernels_ms": {k: round(v / 1000, 1) for k, v in top},
        }
    calls: dict[str, list[float]] = {}
    for e in runtime:
        calls.setdefault(e["name"], []).append(e["dur"])
    out["cuda_runtime"] = {
        k: {"calls": len(v), "total_ms": round(sum(v) / 1000, 1)}
        for k, v in sorted(calls.items(), key=lambda kv: -sum(kv[1]))[:10]
    }
    return out


def summarize_profile(prof, cuda: bool) -> dict:
    """The trace's summary (see :func:`trace_summary`) and the op table; no file is kept."""
    trace = Path("/tmp/load_profile_trace.json")
    prof.export_chrome_trace(str(trace))
    out = {"trace": trace_summary(trace)}
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    out["op_table"] = prof.key_averages().table(
        sort_by=sort, row_limit=25, max_name_column_width=60
    )
    trace.unlink()
    return out


async def run(args) -> dict:
    config = ChatterboxEngineConfig(
        model_dir=Path(args.model_dir),
        device=args.device,
        t3_backend="torch",
        max_concurrency=64,
        **json.loads(args.engine_config),
    )
    if args.device != "cpu":
        from gpu_bench import write_model

        write_model(Path(args.model_dir), 30, 10.0)
    engine = ChatterboxEngine(config)
    started = time.perf_counter()
    await engine.start()
    result: dict = {"start_s": round(time.perf_counter() - started, 1)}
    timings = Timings()
    t3 = engine._t3.decoder
    timings.wrap(t3, "step", "t3_step", lambda: len(t3.active_ids))
    timings.wrap(t3, "add_batch", "t3_prefill", lambda requests: len(requests))
    lanes = {"s3gen": engine._decoder, "s3gen_fast": getattr(engine, "_fast_decoder", None)}
    for key, lane_decoder in lanes.items():
        if lane_decoder is not None:
            timings.wrap(
                lane_decoder,
                "decode_chunks",
                key,
                lambda streams, *rest: len(streams),
                lambda streams, *rest: sum(s.chunks_decoded == 0 for s in streams),
            )
    # Per T3 request: when it was queued, and when its 1st and 10th tokens were sampled (the
    # first chunk needs 10: 7 new + 3 of look-ahead), to split time to first audio.
    t3_marks: dict[str, list[float | None]] = {}
    generate, advance = engine._t3.generate, t3._advance

    def timed_generate(request):
        t3_marks[request.request_id] = [time.perf_counter(), None, None]
        return generate(request)

    def timed_advance(states, picked, guided):
        now = time.perf_counter()
        for state in states:
            marks = t3_marks.get(state.request.request_id)
            if marks is not None and state.generated == 0:
                marks[1] = now
            elif marks is not None and state.generated == 9:
                marks[2] = now
        return advance(states, picked, guided)

    engine._t3.generate, t3._advance = timed_generate, timed_advance

    async def measure(streams: int, first_chunk: int) -> dict:
        """One level: ``streams`` speaking for ``args.seconds`` with this first chunk size."""
        engine._stream_config = dataclasses.replace(
            engine._stream_config, first_chunk_size=first_chunk
        )
        for calls in timings.calls.values():
            calls.clear()
        t3_marks.clear()
        result: dict = {"streams": streams, "first_chunk_size": first_chunk}
        records: list[dict] = []
        rate = SAMPLE_RATE * 4

        async def speak(k: int, deadline: float) -> None:
            await asyncio.sleep(k / streams)
            r = 0
            while time.perf_counter() < deadline:
                text = AGENT_SENTENCES[(k + r) % len(AGENT_SENTENCES)]
                r += 1

                async def one(text=text):
                    yield text

                t0 = time.perf_counter()
                arrivals = []
                params = SynthesisParams(seed=k * 1000 + r)
                async for audio in engine.synthesize(one(), params, None):
                    if len(audio):
                        arrivals.append((time.perf_counter(), len(audio) * 4))
                end = time.perf_counter()
                samples = sum(n for _, n in arrivals) / 4
                records.append(
                    {
                        "stream": k,
                        "t": t0,
                        "ttfa_ms": 1000 * (arrivals[0][0] - t0) if arrivals else None,
                        "audio_s": samples / SAMPLE_RATE,
                        "rtf": (end - t0) / (samples / SAMPLE_RATE) if samples else None,
                        "chunks": len(arrivals),
                        **continuity(arrivals, rate),
                    }
                )

        # warm-up: one utterance per stream at this concurrency (records new batch shapes)
        await asyncio.gather(*(speak(k, time.perf_counter() + 1.5) for k in range(streams)))
        records.clear()
        sampler = GpuSampler(200).start()
        t_start = time.perf_counter()
        epoch_start = time.time()
        deadline = t_start + args.seconds
        load = asyncio.gather(*(speak(k, deadline) for k in range(streams)))
        prof_window = None
        if args.profile_seconds > 0:
            await asyncio.sleep(max(0.0, (args.seconds - args.profile_seconds) / 2))
            from torch.profiler import ProfilerActivity, profile

            cuda = args.device.startswith("cuda")
            prof = profile(
                activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            )
            prof.start()
            p0 = time.perf_counter()
            await asyncio.sleep(args.profile_seconds)
            # No torch.cuda.synchronize(): the S3Gen thread may be recording a CUDA graph, and a
            # device-wide sync during a capture is an error; stop() collects what has finished.
            prof.stop()
            prof_window = (p0, time.perf_counter())
        await load
        t_end = time.perf_counter()
        sampler.stop()
        measured = [r for r in records if r["ttfa_ms"] is not None and r["t"] >= t_start]
        gaps = [r["longest_gap_s"] for r in measured]
        result["utterances"] = len(measured)
        result["gap_free_share"] = (
            round(sum(r["gap_free"] for r in measured) / len(measured), 3) if measured else None
        )
        result["longest_gap_p95_s"] = pct(gaps, 95)
        result["longest_gap_max_s"] = round(max(gaps), 2) if gaps else None
        result["ttfa_p50_ms"] = pct([r["ttfa_ms"] for r in measured], 50)
        result["ttfa_p95_ms"] = pct([r["ttfa_ms"] for r in measured], 95)
        result["rtf_p50"] = pct([r["rtf"] for r in measured if r["rtf"]], 50)
        result["audio_s_per_s"] = round(sum(r["audio_s"] for r in measured) / (t_end - t_start), 2)
        result["chunks_per_utterance"] = pct([r["chunks"] for r in measured], 50)
        result.update(sampler.window(epoch_start, time.time()))
        result["t3_step"] = timings.summary("t3_step", t_start, t_end)
        result["t3_prefill"] = timings.summary("t3_prefill", t_start, t_end)
        result["s3gen"] = timings.summary("s3gen", t_start, t_end)
        result["s3gen_fast"] = timings.summary("s3gen_fast", t_start, t_end)
        scheduler = getattr(engine, "_scheduler", None)
        if scheduler is not None:
            result["lanes"] = {
                name: {
                    "batches": st.batches,
                    "chunks": st.chunks,
                    "late_chunks": st.late_chunks,
                    "busy_seconds": round(st.busy_seconds, 2),
                    "mean_batch": round(st.chunks / max(1, st.batches), 2),
                }
                for name, st in scheduler.lanes.items()
            }
            result["capacity"] = engine.info.capacity
            result["calibration"] = engine.calibration
        if prof_window is not None:
            result["profile_window"] = {
                "t3_step": timings.summary("t3_step", *prof_window),
                "s3gen": timings.summary("s3gen", *prof_window),
                "s3gen_fast": timings.summary("s3gen_fast", *prof_window),
            }
            result.update(summarize_profile(prof, cuda))
        marks = [m for m in t3_marks.values() if m[0] >= t_start and m[2] is not None]
        result["t3_first_chunk_ms"] = {
            "queued_to_first_token_p50": pct([1000 * (m[1] - m[0]) for m in marks], 50),
            "queued_to_first_token_p95": pct([1000 * (m[1] - m[0]) for m in marks], 95),
            "first_to_tenth_token_p50": pct([1000 * (m[2] - m[1]) for m in marks], 50),
            "first_to_tenth_token_p95": pct([1000 * (m[2] - m[1]) for m in marks], 95),
        }
        result["raw"] = measured
        return result

    result["levels"] = []
    for variant in args.variants.split(","):
        first, streams = (int(x) for x in variant.split(":"))
        level = await measure(streams, first)
        result["levels"].append(level)
        brief = {k: v for k, v in level.items() if k not in ("raw", "op_table", "trace")}
        print(json.dumps(brief), flush=True)
    await engine.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="/tmp/cbx-bench")
    parser.add_argument(
        "--variants",
        default="7:16",
        help="levels, each FIRST_CHUNK:STREAMS, measured one after another on one engine",
    )
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--profile-seconds", type=float, default=3)
    parser.add_argument("--engine-config", default="{}", help="JSON of engine config fields")
    parser.add_argument("--device", default="cuda", help="cpu: check the script on a tiny model")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    result["command"] = " ".join(sys.argv)
    result["card"] = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "levels"}, indent=1))
    for level in result["levels"]:
        if "trace" in level:
            print(json.dumps(level["trace"], indent=1)[:4000])


if __name__ == "__main__":
    main()
