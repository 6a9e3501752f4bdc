"""GPU benchmark of the chatterbox engine: time to first audio, real-time factor, throughput.

Runs on a CUDA machine with the full-size architecture and random weights (written here with
the test suite's checkpoint writers): T3 Llama-520M (30 layers) through the engine's own torch
backend, the real S3Gen and HiFT. It drives the engine's own streaming API in-process
(``ChatterboxEngine.synthesize``), so every number includes T3, the S3Gen batcher, the
chunking and the event loop; only the websocket is left out (``scripts/bench_tts.py`` measures
that). Random weights never pick the stop token on purpose, so ``max_speech_tokens`` fixes each
reply's length (tokens >= 6561 that T3 samples are dropped, as in production, so a reply has a
little less audio than its budget).

Sections (each writes into one JSON under ``$OUT``):

1. ``s3gen``: one stream's chunk times of the S3Gen decoder, eager fp32 vs CUDA graphs fp32 vs
   graphs with a bf16 flow, with the 10 s and a capped reference; the bf16 error against fp32;
   batched steady-state chunks at 16 and 64 rows.
2. ``engine``: N = 1, 4, 16, 32, 64 concurrent streams, each speaking replies back to back
   (closed loop, start times spread over the first second): TTFA p50/p95, each reply's RTF,
   aggregate audio seconds per second, peak GPU memory.
3. ``t3``: T3 alone (the same backend) at 1, 16 and 64 requests: milliseconds per decode step.
4. ``server``: the sidecar itself (``python -m chatterbox_sidecar``, chatterbox engine, torch
   T3, the same model folder) driven over its websocket by ``scripts/bench_tts.py``: per level,
   the share of gap-free utterances and each one's longest gap (``--server-seconds`` of agent
   sentences back to back), TTFA against the server's own ``ttfb_ms``, and the GPU busy share
   (``nvidia-smi``); ``--server-batch-streams`` adds a batch-mode run of long texts and
   ``--server-runs`` other sidecars (a baseline checkout). Reply lengths are the sidecar's own
   per-text budgets (random weights never stop).
5. ``baseline``: the naive pipeline on the same inputs, as chatterbox-vllm and the public
   streaming fork run it: the same T3, then upstream's ``S3Gen.inference`` (eager, fp32,
   10 s reference) on the whole window of the last 50 + 25 new tokens every 25 tokens, one
   request at a time.

Usage (on the GPU machine)::

    python benchmarks/gpu_bench.py --out $OUT/gpu_bench.json --variant 4:7:1,16,64

``--variant REF:FIRST:LEVELS`` adds a second engine run with another reference cap and first
chunk; ``--device cpu --t3-layers 2 --flow-steps 1 --tokens 20 --prompt-seconds 1`` checks the
script on a CPU in about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "sidecar"), str(ROOT), str(ROOT / "benchmarks")]

from chatterbox_sidecar.engines.base import SynthesisParams  # noqa: E402
from chatterbox_sidecar.engines.chatterbox import (  # noqa: E402
    ChatterboxEngine,
    ChatterboxEngineConfig,
)
from chatterbox_sidecar.engines.chatterbox.conditionals import (  # noqa: E402
    VoiceConditionals,
    cap_reference,
)
from chatterbox_sidecar.engines.chatterbox.s3gen.loader import load_s3gen  # noqa: E402
from chatterbox_sidecar.engines.chatterbox.s3gen.stream import (  # noqa: E402
    SAMPLE_RATE,
    Reference,
    S3GenStreamDecoder,
    StreamConfig,
)
from chatterbox_sidecar.engines.chatterbox.t3.backend import T3Request  # noqa: E402

TEXT = (
    "Thanks for calling, I can help you with that right away. Your order shipped this "
    "morning and should arrive on Thursday. Is there anything else I can do for you today?"
)
TOKENS_PER_REPLY = 150
START = time.monotonic()
FLOW_STEPS = 10
# ``--device cpu`` runs the same code on a small model, to check the script without a GPU.
DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else 0.0


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1) if values else float("nan")


def write_model(model_dir: Path, t3_layers: int, prompt_seconds: float) -> float:
    from tests.chatterbox.s3gen_checkpoint import (
        write_random_conds,
        write_random_s3gen_checkpoint,
        write_random_ve_checkpoint,
    )
    from tests.chatterbox.t3_checkpoint import write_random_t3_checkpoint

    started = time.time()
    model_dir.mkdir(parents=True, exist_ok=True)
    if not (model_dir / "t3_cfg.safetensors").exists():
        write_random_s3gen_checkpoint(model_dir)
        write_random_ve_checkpoint(model_dir)
        write_random_conds(model_dir, prompt_seconds=prompt_seconds)  # the real one: 10 s
        write_random_t3_checkpoint(model_dir, n_layers=t3_layers)
    return time.time() - started


def sync_ms(fn, n: int = 5) -> float:
    n = n if DEVICE == "cuda" else 1
    fn()
    fn()  # CUDA graphs record a shape at its second call
    sync()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return round(1000 * float(np.median(times)), 2)


def s3gen_section(model_dir: Path, refs: list[float], compiled: bool) -> dict:
    """Chunk times of the decoder alone, per variant, and the bf16 (and compiled) error."""
    out: dict = {}
    gen = VoiceConditionals.load(model_dir / "conds.pt").gen
    g = torch.Generator().manual_seed(3)
    toks = torch.randint(0, 6561, (200,), generator=g).tolist()
    cfg = StreamConfig(chunk_size=25, first_chunk_size=10, context_window=50, flow_steps=FLOW_STEPS)
    variants = {
        "eager_fp32": dict(cuda_graphs=False, flow_dtype=torch.float32),
        "graphs_fp32": dict(cuda_graphs=True, flow_dtype=torch.float32),
        "graphs_bf16": dict(cuda_graphs=True, flow_dtype=torch.bfloat16),
    }
    if compiled:
        variants["compiled_bf16"] = dict(
            cuda_graphs=True, flow_dtype=torch.bfloat16, compile_flow=True
        )
    model = load_s3gen(model_dir / "s3gen.safetensors", DEVICE)
    decoders = {k: S3GenStreamDecoder(model, cfg, **v) for k, v in variants.items()}
    if compiled:  # compile once, outside the timings
        t = time.perf_counter()
        ref = Reference.from_gen(cap_reference(gen, refs[0]), torch.device(DEVICE), torch.float32)
        with torch.inference_mode():
            decoders["compiled_bf16"]._flow_mel(ref, toks[:78], 0, False)
        sync()
        out["compile_s"] = round(time.perf_counter() - t, 1)
        print(f"  flow estimator compiled in {out['compile_s']} s", flush=True)

    def steady_stream(dec, ref, played=75):
        st = dec.new_stream(ref)
        st.push(toks[: played + 28])
        st.played_tokens, st.chunks_decoded = played, 3
        st.mel_cache = torch.zeros(1, 80, 8, device=DEVICE)
        st.source_cache = torch.zeros(1, 1, 3840, device=DEVICE)
        st.speech_tail = torch.zeros(1, 3840, device=DEVICE)
        st.phase = torch.zeros(1, 9, device=DEVICE)
        return st

    for ref_s in refs:
        ref = Reference.from_gen(cap_reference(gen, ref_s), torch.device(DEVICE), torch.float32)
        row: dict = {}
        for name, dec in decoders.items():

            def first(dec=dec, ref=ref):
                st = dec.new_stream(ref)
                st.push(toks[:13])
                dec.decode_chunk(st, False)

            def steady(dec=dec, ref=ref):
                dec.decode_chunk(steady_stream(dec, ref), False)

            row[name] = {"first_chunk_ms": sync_ms(first), "steady_chunk_ms": sync_ms(steady)}
        # bf16 error: same chunk, flow mel and audio against eager fp32 (TF32 off)
        if DEVICE == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
        mel32 = decoders["eager_fp32"]._flow_mel(ref, toks[:78], 0, False)
        mel16 = decoders["graphs_bf16"]._flow_mel(ref, toks[:78], 0, False)
        row["bf16_mel_rel_err"] = float((mel16 - mel32).norm() / mel32.norm())
        a32 = decoders["eager_fp32"].decode_whole(ref, toks[:78])
        if DEVICE == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        a16 = decoders["graphs_bf16"].decode_whole(ref, toks[:78])
        row["bf16_audio_rel_rms"] = float(np.sqrt(np.mean((a16 - a32) ** 2) / np.mean(a32**2)))
        ag = decoders["graphs_fp32"].decode_whole(ref, toks[:78])
        row["graphs_fp32_audio_rel_rms"] = float(
            np.sqrt(np.mean((ag - a32) ** 2) / np.mean(a32**2))
        )
        if compiled:
            mel_c = decoders["compiled_bf16"]._flow_mel(ref, toks[:78], 0, False)
            row["compiled_mel_rel_err"] = float((mel_c - mel32).norm() / mel32.norm())
            row["compiled_vs_bf16_mel_rel_err"] = float((mel_c - mel16).norm() / mel16.norm())
        out[f"ref_{ref_s:g}s"] = row
    # batched steady chunks (rows = streams), bf16 graphs: whole decode and the flow alone
    batched = ["graphs_bf16"] + (["compiled_bf16"] if compiled else [])
    for name in batched:
        dec = decoders[name]
        for ref_s in refs:
            ref = Reference.from_gen(cap_reference(gen, ref_s), torch.device(DEVICE), torch.float32)
            for rows in (1, 16, 64) if DEVICE == "cuda" else (1, 2):

                def batch(rows=rows, ref=ref, dec=dec):
                    streams = [steady_stream(dec, ref) for _ in range(rows)]
                    dec.decode_chunks(streams, [False] * rows)

                def flow_only(rows=rows, ref=ref, dec=dec):
                    with torch.inference_mode():
                        dec._flow_mels([(ref, toks[25:103], 25, False)] * rows)

                tag = f"{name}_ref{ref_s:g}s_batch{rows}"
                out[f"{tag}_steady_ms"] = sync_ms(batch, 3)
                out[f"{tag}_flow_only_ms"] = sync_ms(flow_only, 3)
                print(f"  {tag}: {out[f'{tag}_steady_ms']} ms", flush=True)
        out[f"{name}_graphs_captured"] = dec.graphs.captures
    del decoders, model
    return out


async def one_reply(engine: ChatterboxEngine, seed: int) -> dict:
    async def segments():
        yield TEXT

    started = time.perf_counter()
    first = None
    samples = 0
    chunks = 0
    async for audio in engine.synthesize(segments(), SynthesisParams(seed=seed), None):
        if first is None and len(audio):
            first = time.perf_counter() - started
        samples += len(audio)
        chunks += 1
    wall = time.perf_counter() - started
    audio_s = samples / SAMPLE_RATE
    return {
        "ttfa_ms": 1000 * (first or wall),
        "wall_s": wall,
        "audio_s": audio_s,
        "rtf": wall / audio_s if audio_s else float("inf"),
        "chunks": chunks,
    }


async def engine_level(engine: ChatterboxEngine, n: int, replies: int) -> dict:
    """N streams, each speaking ``replies`` replies back to back; starts spread over 1 s."""
    rng = np.random.default_rng(n)
    offsets = np.sort(rng.uniform(0, 1.0, n)) if n > 1 else [0.0]
    results: list[dict] = []

    async def worker(k: int) -> None:
        await asyncio.sleep(float(offsets[k]))
        for r in range(replies):
            results.append(await one_reply(engine, seed=1000 * k + r))

    reset_peak()
    batcher = engine._scheduler
    b0, c0 = batcher.batches, batcher.chunks
    started = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(n)))
    wall = time.perf_counter() - started
    ttfa = [r["ttfa_ms"] for r in results]
    rtf = [r["rtf"] for r in results]
    return {
        "streams": n,
        "replies": len(results),
        "ttfa_p50_ms": pct(ttfa, 50),
        "ttfa_p95_ms": pct(ttfa, 95),
        "rtf_p50": round(float(np.median(rtf)), 3),
        "rtf_max": round(float(np.max(rtf)), 3),
        "audio_s_per_reply": round(float(np.mean([r["audio_s"] for r in results])), 2),
        "aggregate_audio_s_per_s": round(sum(r["audio_s"] for r in results) / wall, 2),
        "peak_gpu_gib": peak_gib(),
        "s3gen_mean_batch": round((batcher.chunks - c0) / max(1, batcher.batches - b0), 2),
        "raw": results,
    }


async def engine_section(
    model_dir: Path,
    levels: list[int],
    reference_seconds: float,
    first_chunk_size: int = ChatterboxEngineConfig.first_chunk_size,
    deadline: float = float("inf"),
    compile_flow: bool = False,
) -> dict:
    config = ChatterboxEngineConfig(
        compile_flow=compile_flow,
        model_dir=model_dir,
        device=DEVICE,
        t3_backend="torch",
        max_concurrency=max(levels),
        max_speech_tokens=TOKENS_PER_REPLY,
        reference_seconds=reference_seconds,
        first_chunk_size=first_chunk_size,
        flow_steps=FLOW_STEPS,
        warmup=True,
    )
    engine = ChatterboxEngine(config)
    t = time.perf_counter()
    await engine.start()
    out: dict = {
        "start_s": round(time.perf_counter() - t, 1),
        "reference_seconds": reference_seconds,
        "first_chunk_size": first_chunk_size,
        "compile_flow": compile_flow,
        "capacity": engine.info.capacity,
        "calibration": engine.calibration,
        "levels": [],
    }
    try:
        for n in levels:
            if time.monotonic() > deadline:
                print(f"  skipping {n} streams: out of time", flush=True)
                continue
            # warm-up at this concurrency: records the CUDA graphs of new batch shapes
            await engine_level(engine, n, 1)
            replies = max(2, 16 // n)
            out["levels"].append(await engine_level(engine, n, replies))
            lv = out["levels"][-1]
            print(
                f"  {n:>3} streams: TTFA p50 {lv['ttfa_p50_ms']} p95 {lv['ttfa_p95_ms']} ms, "
                f"RTF p50 {lv['rtf_p50']} max {lv['rtf_max']}, "
                f"{lv['aggregate_audio_s_per_s']} audio s/s, batch {lv['s3gen_mean_batch']}",
                flush=True,
            )
        out["graphs_captured"] = engine._decoder.graphs.captures
    finally:
        await engine.close()
    return out


def _reply_request(request_id: str, conds, max_new_tokens: int, seed: int) -> T3Request:
    """One benchmark reply for T3: upstream's English sampling defaults (T3Request's own)."""
    return T3Request(
        request_id=request_id,
        text=TEXT,
        conditionals=conds.t3,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )


async def t3_section(model_dir: Path, levels: list[int], kv_bucket: int) -> dict:
    """T3 alone (the engine's torch backend, CUDA graphs): decode time per step at N requests.

    ``kv_bucket`` is the decode graphs' cache-length step; 1536 (the whole cache) is how the
    graphs attended before they were bucketed.
    """
    from chatterbox_sidecar.engines.chatterbox.t3.torch_backend import TorchT3Backend

    conds = VoiceConditionals.load(model_dir / "conds.pt")
    t3 = TorchT3Backend(model_dir, device=DEVICE, max_batch_size=max(levels), kv_bucket=kv_bucket)
    started = time.perf_counter()
    await t3.start()
    out: dict = {"kv_bucket": kv_bucket, "start_s": round(time.perf_counter() - started, 1)}

    first_tokens = ChatterboxEngineConfig.first_chunk_size + 3  # the first chunk + lookahead
    to_first_chunk: list[float] = []

    async def run(k: int, n: int) -> int:
        request = _reply_request(f"t3-{n}-{k}", conds, TOKENS_PER_REPLY, seed=k)
        count = 0
        started = time.perf_counter()
        async for delta in t3.generate(request):
            count += len(delta)
            if n == 1 and count >= first_tokens and len(to_first_chunk) < k + 1:
                to_first_chunk.append(1000 * (time.perf_counter() - started))
        return count

    try:
        await run(0, 0)
        for k in range(5):  # one request alone: prefill + the first chunk's tokens
            await run(k, 1)
        out[f"ms_to_{first_tokens}_tokens_alone"] = round(float(np.median(to_first_chunk)), 1)
        for n in levels:
            started = time.perf_counter()
            counts = await asyncio.gather(*(run(k, n) for k in range(n)))
            wall = time.perf_counter() - started
            out[f"{n}_requests"] = {
                "ms_per_step": round(1000 * wall / TOKENS_PER_REPLY, 2),
                "speech_tokens": sum(counts),
            }
    finally:
        await t3.close()
    return out


async def baseline_section(model_dir: Path, replies: int = 3) -> dict:
    """The naive pipeline: same T3, upstream ``S3Gen.inference`` on 50 + 25 tokens per chunk."""
    from chatterbox_sidecar.engines.chatterbox.model_files import speech_token_budget
    from chatterbox_sidecar.engines.chatterbox.t3.torch_backend import TorchT3Backend

    s3gen = load_s3gen(model_dir / "s3gen.safetensors", DEVICE)  # eager, fp32, weight norm on
    conds = VoiceConditionals.load(model_dir / "conds.pt")
    ref_dict = {
        k: (v.to(DEVICE) if torch.is_tensor(v) else v)
        for k, v in cap_reference(conds.gen, 10).items()
    }
    t3 = TorchT3Backend(model_dir, device=DEVICE, max_batch_size=1)
    await t3.start()
    results = []
    try:
        for r in range(replies + 1):
            budget = min(TOKENS_PER_REPLY, speech_token_budget(TEXT))
            request = _reply_request(f"naive-{r}", conds, budget, seed=r)
            started = time.perf_counter()
            tokens: list[int] = []
            played = 0
            first = None
            samples = 0
            done = False
            stream = t3.generate(request)
            while not done:
                try:
                    delta = await anext(stream)
                    tokens.extend(t for t in delta if t < 6561)
                except StopAsyncIteration:
                    done = True
                while len(tokens) - played >= 25 or (done and len(tokens) > played):
                    new = min(25, len(tokens) - played)
                    ctx = tokens[max(0, played - 50) : played]
                    window = torch.tensor([ctx + tokens[played : played + new]], device=DEVICE)
                    wav, _ = await asyncio.to_thread(
                        s3gen.inference,
                        window,
                        ref_dict=ref_dict,
                        finalize=True,
                        n_timesteps=FLOW_STEPS,
                    )
                    sync()
                    keep = wav.shape[1] * new // (len(ctx) + new)
                    samples += keep
                    played += new
                    if first is None:
                        first = time.perf_counter() - started
            wall = time.perf_counter() - started
            if r == 0:
                continue  # warm-up
            audio_s = samples / SAMPLE_RATE
            results.append(
                {"ttfa_ms": 1000 * first, "wall_s": wall, "audio_s": audio_s, "rtf": wall / audio_s}
            )
    finally:
        await t3.close()
    ttfa = [r["ttfa_ms"] for r in results]
    return {
        "ttfa_p50_ms": pct(ttfa, 50),
        "ttfa_p95_ms": pct(ttfa, 95),
        "rtf_p50": round(float(np.median([r["rtf"] for r in results])), 3),
        "raw": results,
    }


def bench_tts_command(
    url: str, streams: str, raw: Path, *, seconds: float = 0.0, rounds: int = 0
) -> list[str]:
    """``scripts/bench_tts.py`` at ``streams`` (levels, comma-separated) against ``url``, for
    ``seconds`` a level or, without them, ``rounds`` replies a stream; raw results to ``raw``."""
    command = [sys.executable, str(ROOT / "scripts" / "bench_tts.py"), "--url", url]
    command += ["--streams", streams, "--encoding", "pcm_f32le", "--json", str(raw)]
    return command + (["--seconds", str(seconds)] if seconds else ["--rounds", str(rounds)])


def server_section(
    model_dir: Path,
    levels: str,
    rounds: int,
    timeout: float,
    compile_flow: bool,
    seconds: float = 0.0,
    sidecar_root: Path = ROOT / "sidecar",
    extra_env: dict | None = None,
    name: str = "bench_tts",
    batch_streams: int = 0,
    batch_timeout: float = 60.0,
) -> dict:
    """The sidecar over its websocket, measured by ``scripts/bench_tts.py``.

    ``sidecar_root`` picks the sidecar code (another checkout's ``sidecar/`` runs a baseline
    with this checkout's client); ``extra_env`` adds settings. GPU utilization is sampled by
    ``nvidia-smi`` and reported per level.
    """
    import subprocess

    from chatterbox_sidecar.process import SidecarProcess
    from gpu_sampler import GpuSampler

    out_dir = Path(os.environ.get("OUT", "/tmp"))
    workdir = out_dir / f"sidecar_{name}"
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        "PYTHONPATH": os.pathsep.join(
            [str(sidecar_root), str(ROOT / "plugin"), os.environ.get("PYTHONPATH", "")]
        ),
        "TTS_ENGINE": "chatterbox",
        "TTS_T3_BACKEND": "torch",
        "TTS_DEVICE": DEVICE,
        "TTS_MODEL_DIR": str(model_dir),
        "TTS_FLOW_STEPS": str(FLOW_STEPS),
        "TTS_COMPILE_FLOW": str(compile_flow).lower(),
        "TTS_ENGINE_CONCURRENCY": str(max(int(x) for x in levels.split(","))),
        "TTS_MAX_CONNECTIONS": "1000",
        # Measure past the engine's own capacity: the levels are what the GPU does, not what
        # the server admits (`busy` answers would hide it).
        "TTS_MAX_STREAMS": str(max(int(x) for x in levels.split(","))),
        "TTS_OVERLOAD_HOLD_SECONDS": "0",  # nor would the engine's falling-behind guard
        "TTS_LOG_LEVEL": "INFO",
        **(extra_env or {}),
    }
    started = time.perf_counter()
    sidecar = SidecarProcess(workdir, env).start(timeout)
    out: dict = {"start_s": round(time.perf_counter() - started, 1), "env": extra_env or {}}
    out["sidecar_root"] = str(sidecar_root)
    sampler = GpuSampler(500).start()
    try:
        raw = out_dir / f"{name}.json"  # written by bench_tts as soon as the levels end
        command = bench_tts_command(sidecar.url, levels, raw, seconds=seconds, rounds=rounds)
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        print(done.stdout[-3000:], done.stderr[-2000:], flush=True)
        out["command"] = " ".join(command[1:])
        if raw.exists():
            out["levels"] = json.loads(raw.read_text())["levels"]
            for lv in out["levels"]:
                lv.update(sampler.window(lv["started_at_epoch"], lv["ended_at_epoch"]))
                print(
                    f"  {lv['streams']} streams: GPU busy {lv.get('gpu_busy_mean_pct')} %, "
                    f"samples under 20 %: {lv.get('gpu_busy_under_20pct_share')}",
                    flush=True,
                )
            (out_dir / f"{name}_levels.json").write_text(json.dumps(out["levels"], indent=1))
        if batch_streams:
            raw_batch = out_dir / f"{name}_batch.json"
            # batch mode: every client sends one ~1,455-character text with streaming off
            batch = command[:2] + [
                "--url",
                sidecar.url,
                "--streams",
                str(batch_streams),
                "--rounds",
                "1",
                "--warmup",
                "0",
                "--streaming",
                "off",
                "--texts",
                "long",
                "--encoding",
                "pcm_f32le",
                "--json",
                str(raw_batch),
            ]
            try:
                done = subprocess.run(batch, capture_output=True, text=True, timeout=batch_timeout)
                print(done.stdout[-1500:], done.stderr[-1000:], flush=True)
            except subprocess.TimeoutExpired:
                print(f"  batch mode: not done within {batch_timeout} s", flush=True)
            if raw_batch.exists():
                level = json.loads(raw_batch.read_text())["levels"][0]
                level.update(sampler.window(level["started_at_epoch"], level["ended_at_epoch"]))
                out["batch_mode"] = level
    finally:
        sampler.stop()
        sidecar.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_bench.json"))
    parser.add_argument("--model-dir", default="/tmp/cbx-bench")
    parser.add_argument("--levels", default="1,4,16,32,64")
    parser.add_argument("--reference-seconds", type=float, default=None)
    parser.add_argument("--sections", default="s3gen,engine,t3,server,baseline")
    parser.add_argument("--first-chunk", type=int, default=ChatterboxEngineConfig.first_chunk_size)
    parser.add_argument(
        "--variant",
        default="",
        help="a second engine run, REF_SECONDS:FIRST_CHUNK:LEVELS, e.g. 4:7:1,16,64",
    )
    parser.add_argument("--budget-s", type=float, default=480, help="skip levels after this")
    parser.add_argument("--device", default="cuda", help="cpu: check the script on a tiny run")
    parser.add_argument("--flow-steps", type=int, default=10)
    parser.add_argument("--t3-layers", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=150, help="speech tokens a reply")
    parser.add_argument("--prompt-seconds", type=float, default=10.0, help="reference in conds.pt")
    parser.add_argument("--s3gen-refs", default="10,4", help="reference caps of the s3gen section")
    parser.add_argument(
        "--compile-flow",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="s3gen section: add the torch.compile'd estimator as a variant (over 5 minutes of "
        "compile on the H100 machine)",
    )
    parser.add_argument(
        "--engine-compile-flow",
        action="store_true",
        help="engine and server sections: torch.compile the flow estimator (TTS_COMPILE_FLOW)",
    )
    parser.add_argument("--server-levels", default="1,16,64", help="server: stream counts")
    parser.add_argument("--server-rounds", type=int, default=2, help="server: replies a stream")
    parser.add_argument("--server-timeout", type=float, default=300, help="server: seconds")
    parser.add_argument(
        "--server-seconds", type=float, default=0.0, help="server: seconds a level (0: rounds)"
    )
    parser.add_argument(
        "--server-batch-streams", type=int, default=0, help="server: batch-mode clients after"
    )
    parser.add_argument(
        "--server-runs",
        default="",
        help="server: several sidecars in turn, NAME=SIDECAR_ROOT[+ENV=V...];... "
        "(empty: this checkout's sidecar, defaults)",
    )
    parser.add_argument(
        "--t3-kv-buckets", default="1536,256", help="t3 section: decode graphs' cache steps"
    )
    args = parser.parse_args()
    global DEVICE, FLOW_STEPS, TOKENS_PER_REPLY
    DEVICE, FLOW_STEPS, TOKENS_PER_REPLY = args.device, args.flow_steps, args.tokens
    sections = args.sections.split(",")
    model_dir = Path(args.model_dir)
    result: dict = {
        "card": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "tokens_per_reply": TOKENS_PER_REPLY,
    }
    out_path = Path(args.out)

    def save() -> None:
        out_path.write_text(json.dumps(result, indent=1))

    result["write_model_s"] = round(write_model(model_dir, args.t3_layers, args.prompt_seconds), 1)
    ref_s = args.reference_seconds
    if ref_s is None:
        ref_s = ChatterboxEngineConfig(device=DEVICE).resolved_reference_seconds()
    result["reference_seconds"] = ref_s
    if "s3gen" in sections:
        refs = [float(x) for x in args.s3gen_refs.split(",")]
        result["s3gen"] = s3gen_section(model_dir, refs, args.compile_flow)
        print(json.dumps(result["s3gen"], indent=1), flush=True)
        save()
    if "engine" in sections:
        levels = [int(x) for x in args.levels.split(",")]
        deadline = START + args.budget_s
        result["engine"] = asyncio.run(
            engine_section(
                model_dir, levels, ref_s, args.first_chunk, deadline, args.engine_compile_flow
            )
        )
        save()
        if args.variant:
            v_ref, v_first, v_levels = args.variant.split(":")[:3]
            result["engine_variant"] = asyncio.run(
                engine_section(
                    model_dir,
                    [int(x) for x in v_levels.split(",")],
                    float(v_ref),
                    int(v_first),
                    deadline,
                    args.engine_compile_flow,
                )
            )
            save()
    if "t3" in sections:
        import gc

        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        result["t3"] = {}
        for kv_bucket in [int(x) for x in args.t3_kv_buckets.split(",")]:
            t3 = asyncio.run(t3_section(model_dir, [1, 16, 64], kv_bucket))
            result["t3"][f"kv_bucket_{kv_bucket}"] = t3
            print(json.dumps(t3), flush=True)
            gc.collect()
            save()
    if "server" in sections:
        runs = [r for r in args.server_runs.split(";") if r] or ["server=" + str(ROOT / "sidecar")]
        for spec in runs:
            name, _, rest = spec.partition("=")
            root, *settings = rest.split("+")
            extra = dict(kv.split("=", 1) for kv in settings)
            result[name] = server_section(
                model_dir,
                args.server_levels,
                args.server_rounds,
                args.server_timeout,
                args.engine_compile_flow,
                args.server_seconds,
                Path(root) if root else ROOT / "sidecar",
                extra,
                name,
                args.server_batch_streams,
            )
            save()
    if "baseline" in sections:
        result["baseline"] = asyncio.run(baseline_section(model_dir))
        save()
    print("\n| streams | TTFA p50 | TTFA p95 | RTF p50 | RTF max | audio s/s | peak GiB | batch |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [("", lv) for lv in result.get("engine", {}).get("levels", [])]
    if "engine_variant" in result:
        v = result["engine_variant"]
        tag = f"ref {v['reference_seconds']:g} s, first {v['first_chunk_size']}: "
        rows += [(tag, lv) for lv in v["levels"]]
    for tag, lv in rows:
        print(
            f"| {tag}{lv['streams']} | {lv['ttfa_p50_ms']} | {lv['ttfa_p95_ms']} | "
            f"{lv['rtf_p50']} | {lv['rtf_max']} | {lv['aggregate_audio_s_per_s']} | "
            f"{lv['peak_gpu_gib']} | {lv['s3gen_mean_batch']} |"
        )
    if "baseline" in result:
        b = result["baseline"]
        print(f"| naive 1 | {b['ttfa_p50_ms']} | {b['ttfa_p95_ms']} | {b['rtf_p50']} | | | | |")


if __name__ == "__main__":
    main()
