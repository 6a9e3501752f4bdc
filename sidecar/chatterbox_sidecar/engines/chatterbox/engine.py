"""The ``chatterbox`` engine: T3 speech tokens streamed into chunked S3Gen decoding.

For each text piece of a context the engine sends one request to the T3 backend (``vllm`` or
``torch``) with a speech-token budget that follows the piece's length, feeds the tokens as they
arrive into a :class:`~.s3gen.stream.StreamState` and yields 24 kHz audio chunk by chunk
(``streaming=True``). In batch mode (``streaming=False``) every piece of the text is generated
at once and each is decoded whole, batched with other contexts' pieces.

Scheduling (``scheduler``): each stream knows when its listener runs dry (playback is taken to
start at its first chunk). It asks for a chunk when a full hop of tokens waits (hops grow
7 -> 25 -> 50 -> 100 tokens), or earlier, with a smaller hop, once the time left before it
runs dry comes within the scheduler's expected turnaround plus ``urgency_margin``. S3Gen
serves the earliest deadline first; first chunks take a lane of their own.

Falling behind: a chunk that reaches a playing listener more than ``LATE_TOLERANCE_S`` after
it ran dry, with the piece's text there before that (and ``PIECE_ALLOWANCE_S`` for a piece's
first chunk), is the engine's own lateness (T3 or S3Gen could not keep up; text that came late
from the client does not count, nor time a client that is behind held the engine at a yield).
After one, the engine reports :attr:`falling_behind` for ``overload_hold_seconds`` and the
server takes no new stream (``busy``), so that a GPU past what it can keep gap-free stops
adding calls that would make every call stutter, whatever the calibrated capacity said.

S3Gen (and the voice conditioning) run in worker threads, never on the event loop. Closing the
audio iterator aborts the T3 request; at most the chunk being decoded is finished first.

Word timestamps (a context that asks, on the torch T3 backend): each piece's T3 request streams
its attention alignment with its tokens, and the chunks come as :class:`AlignedAudio` carrying
the timings of the words that start in them (``word_timing``: how, and the latency it costs).
The vLLM backend exposes no attention probabilities: with it ``word_timestamps`` stays false.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, aclosing, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from loguru import logger

from chatterbox_sidecar.engines.base import (
    AlignedAudio,
    Engine,
    EngineError,
    EngineInfo,
    SynthesisParams,
    UnsupportedError,
)
from chatterbox_sidecar.engines.chatterbox.conditionals import (
    ConditioningConfig,
    VoiceConditionals,
    cap_reference,
    compute_conditionals,
    compute_conditionals_from_file,
)
from chatterbox_sidecar.engines.chatterbox.models import (
    MULTILINGUAL,
    ORIGINAL,
    TURBO,
    ModelSpec,
    model_spec,
    with_multilingual_weights,
)
from chatterbox_sidecar.engines.chatterbox.s3gen.stream import (
    LOOKAHEAD_TOKENS,
    SAMPLE_RATE,
    SAMPLES_PER_TOKEN,
    Reference,
    S3GenStreamDecoder,
    StreamConfig,
    StreamState,
)
from chatterbox_sidecar.engines.chatterbox.scheduler import ChunkScheduler
from chatterbox_sidecar.engines.chatterbox.t3.backend import T3Backend, T3Request
from chatterbox_sidecar.engines.chatterbox.word_timing import PieceTimer, piece_offsets
from chatterbox_sidecar.text import split_text
from chatterbox_sidecar.voices import Voice

T = TypeVar("T")
CONDS_FILE = "conds.pt"
# S3Gen reference cap on CUDA, in seconds. Every chunk's flow re-processes the prompt: on the
# H100, 4 s instead of 10 s halves a 64-stream S3Gen batch (1.32 s -> 0.64 s) and cuts a single
# chunk by ~6 ms (benchmarks/NOTES.md). The speaker embedding still comes from the whole clip;
# the effect on voice similarity is unmeasured (random weights): set 10 for upstream behaviour.
CUDA_REFERENCE_SECONDS = 4.0
# Most chunks in one fast-lane batch, and the largest chunk (new tokens) an urgent stream
# takes there (first chunks always go there).
FAST_MAX_BATCH = 16
FAST_MAX_TOKENS = 28
# A chunk this late after its listener ran dry is a gap the listener hears (the server's and
# bench_tts's measure: session.UNDERRUN_TOLERANCE_S).
LATE_TOLERANCE_S = 0.05
# A piece's first chunk may take this long after its text came before a listener who ran dry
# meanwhile counts it late (text that came just before the end of the audio cannot be spoken
# in no time): issue 12's first-audio target, p95.
PIECE_ALLOWANCE_S = 0.25
# How long the engine reports falling behind after a late chunk, on CUDA (see the docstring).
CUDA_OVERLOAD_HOLD_S = 5.0
ALIGNMENT_SOURCE = (
    "T3 text-speech attention (upstream's multilingual alignment heads; accuracy on the "
    "English model unmeasured)"
)


@dataclass(frozen=True)
class ChatterboxEngineConfig:
    """Configuration of the chatterbox engine.

    Parameters:
        model: The Chatterbox model served (``TTS_MODEL``; see ``models``): ``chatterbox``,
            ``chatterbox-turbo`` or ``chatterbox-multilingual``.
        multilingual_weights: Multilingual's T3 weights, ``v2`` or ``v3``
            (``TTS_MULTILINGUAL_WEIGHTS``; see ``models.MULTILINGUAL_WEIGHTS``).
        model_dir: Folder with the model's files (``TTS_MODEL_DIR``); None downloads them once
            from the Hugging Face Hub (see ``model_files.resolve_model_dir``).
        t3_model_dir: The vLLM model folder (``TTS_T3_MODEL_DIR``); None for
            ``~/.cache/pipecat-chatterbox/t3-model``. Only the vllm backend uses it.
        t3_backend: ``auto`` (torch), ``vllm`` or ``torch``.
        device: ``cuda`` (or ``cuda:N``) or ``cpu``.
        dtype: T3 dtype for the torch backend (None: bfloat16 on CUDA, float32 on CPU).
        s3gen_dtype: S3Gen dtype (upstream runs it in float32).
        flow_dtype: Dtype of S3Gen's flow estimator (None: bfloat16 on CUDA, else
            ``s3gen_dtype``); the encoder and vocoder stay in ``s3gen_dtype``.
        cuda_graphs: Replay S3Gen as CUDA graphs at bucketed shapes (None: on CUDA).
        compile_flow: ``torch.compile`` S3Gen's flow estimator (CUDA only; experimental: on
            an H100 machine the compile had not finished after 320 s, and its speed-up is
            unmeasured).
        s3gen_max_batch: Most streams whose chunks share one S3Gen call (bulk lane).
        fast_lane: Decode first chunks in a lane of their own (a second S3Gen decoder with its
            own thread, CUDA graphs and high-priority CUDA stream), so that they never wait
            behind a long batch (None: on CUDA).
        urgency_margin: Seconds of audio a stream keeps in hand beyond the scheduler's
            expected turnaround before it asks for a smaller hop than its schedule's.
        max_streams: Streams the engine keeps gap-free (its ``info.capacity``); None
            calibrates on CUDA at start (see ``_calibrate``) and leaves it unknown on CPU.
        gpu_share: Share of GPU time the calibration's cost model lets the streams' work take
            (calibrated against what an H200 kept gap-free; see ``_calibrate``).
        overload_hold_seconds: After a chunk reached a playing listener late, how long
            :attr:`ChatterboxEngine.falling_behind` stays true (the server answers ``busy``
            meanwhile); 0: never. None: ``CUDA_OVERLOAD_HOLD_S`` on CUDA, 0 on CPU (slower
            than real time there: every stream would hold it).
        chunk_size: New speech tokens of the second chunk (``TTS_CHUNK_SIZE``); later hops
            double up to ``max_chunk_size``.
        max_chunk_size: Largest hop (fewer context and prompt frames re-decoded per second of
            audio).
        first_chunk_size: New tokens of the first chunk (smaller: earlier first audio; >= 7).
        context_window: Tokens of left context per chunk (``TTS_CONTEXT_WINDOW``).
        flow_steps: S3Gen flow-matching steps (None: the model's, 10 or Turbo's 2).
        streaming_default: Mode for requests that do not say (the server resolves it).
        max_concurrency: Contexts generated at once (T3 batch size).
        max_text_chars_per_piece: Longest text piece sent to T3; longer segments are split.
        reference_seconds: Cap on the S3Gen reference prompt, in seconds (upstream: 10); every
            chunk re-processes the prompt, so a shorter one makes S3Gen cheaper. None: 10 on
            CPU, ``CUDA_REFERENCE_SECONDS`` on CUDA.
        t3_reference_seconds: Seconds of reference tokenized for T3's prompt (None: the
            model's, 6 or Turbo's 15).
        top_p: T3 nucleus sampling threshold (None: the model's, 1.0 or Turbo's 0.95).
        min_p: T3 minimum relative probability (None: the model's; Turbo has none).
        repetition_penalty: T3 repetition penalty (None: the model's, 1.2).
        max_speech_tokens: Cap on one piece's speech tokens.
        max_model_len: vLLM context length; None derives it from the piece length and budget.
        gpu_memory_utilization: vLLM's share of GPU memory (leave room for S3Gen).
        enforce_eager: Disable vLLM CUDA graphs.
        cfg_scale: vLLM backend's global guidance scale (chatterbox-vllm reads it once).
        warmup: Decode a few tokens at start so the first request does not pay for it.
    """

    model: str = "chatterbox"
    multilingual_weights: str = "v2"
    model_dir: Path | None = None
    t3_model_dir: Path | None = None
    t3_backend: Literal["auto", "vllm", "torch"] = "auto"
    device: str = "cuda"
    dtype: str | None = None
    s3gen_dtype: str = "float32"
    flow_dtype: str | None = None
    cuda_graphs: bool | None = None
    compile_flow: bool = False
    s3gen_max_batch: int = 64
    fast_lane: bool | None = None
    urgency_margin: float = 0.3
    max_streams: int | None = None
    # Between what the model predicts for the measured gap-free level on an H200 (1 stream:
    # 0.12) and for the first level measured with gaps (16 streams: 0.23); BENCHMARKS.md.
    gpu_share: float = 0.15
    overload_hold_seconds: float | None = None
    chunk_size: int = 25
    max_chunk_size: int = 100
    first_chunk_size: int = 12
    context_window: int = 50
    flow_steps: int | None = None
    streaming_default: bool = True
    max_concurrency: int = 8
    max_text_chars_per_piece: int = 300
    reference_seconds: float | None = None
    t3_reference_seconds: float | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_speech_tokens: int = 1000
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.4
    enforce_eager: bool = True
    cfg_scale: float = 0.5
    warmup: bool = True

    @property
    def spec(self) -> ModelSpec:
        """Returns: the served model's spec (Multilingual's with its chosen T3 weights)."""
        spec = model_spec(self.model)
        if spec.name == MULTILINGUAL.name:
            return with_multilingual_weights(spec, self.multilingual_weights)
        return spec

    def resolved_flow_steps(self) -> int:
        """Returns: S3Gen's flow steps (the model's default when unset)."""
        return self.flow_steps or self.spec.flow_steps

    @property
    def on_cuda(self) -> bool:
        """Returns: whether the engine runs on a CUDA device."""
        return self.device.startswith("cuda")

    def resolved_overload_hold(self) -> float:
        """Returns: seconds ``falling_behind`` holds after a late chunk (0: never)."""
        if self.overload_hold_seconds is not None:
            return self.overload_hold_seconds
        return CUDA_OVERLOAD_HOLD_S if self.on_cuda else 0.0

    def resolved_reference_seconds(self) -> float:
        """Returns: the S3Gen reference cap in seconds (the device default when unset)."""
        if self.reference_seconds is not None:
            return self.reference_seconds
        return CUDA_REFERENCE_SECONDS if self.on_cuda else 10.0

    def stream_config(self) -> StreamConfig:
        """Returns: the S3Gen chunking configuration (validates the sizes)."""
        return StreamConfig(
            chunk_size=self.chunk_size,
            first_chunk_size=self.first_chunk_size,
            context_window=self.context_window,
            flow_steps=self.resolved_flow_steps(),
            max_chunk_size=self.max_chunk_size,
        )


@dataclass
class _CachedVoice:
    revision: str
    conds: VoiceConditionals
    reference: Reference


@dataclass
class _TokenPump:
    """Tokens of one T3 request, gathered on the event loop while S3Gen works."""

    buffer: list[int] = field(default_factory=list)
    timer: PieceTimer | None = None  # fed the tokens' alignment rows as they come
    done: bool = False
    error: BaseException | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Playback:
    """A context's listener as the engine sees it: playing in real time from its first chunk.

    A chunk that comes after the listener ran dry restarts playback from it (the listener
    waited), so a pause in the client's text is not carried into later deadlines.
    """

    started: float | None = None  # loop time playback (re)started from
    emitted: float = 0.0  # seconds of audio yielded since ``started``

    def dry_at(self, asked_at: float) -> float:
        """Loop time at which the listener runs out of audio (``asked_at`` before any)."""
        return asked_at if self.started is None else self.started + self.emitted

    def held(self, seconds: float) -> None:
        """Move the deadlines on by time the consumer held the engine at a yield.

        Args:
            seconds: How long (long only when the context's audio queue was full: the client
                is behind, not the engine).
        """
        if self.started is not None:
            self.started += seconds

    def emit(self, seconds: float, now: float, asked_at: float) -> float:
        """Account for a chunk yielded at ``now``.

        Args:
            seconds: Its audio.
            now: Loop time it was yielded.
            asked_at: Loop time its piece's text reached the engine.

        Returns:
            The engine's lateness: how long the listener waited for it past the later of when
            it ran dry and ``PIECE_ALLOWANCE_S`` after the piece's text came, if the text came
            before it ran dry (0 otherwise: the wait was the client's text).
        """
        late = 0.0
        if self.started is None:
            self.started = now
        else:
            dry = self.started + self.emitted
            if now > dry:
                if dry > asked_at:
                    late = max(0.0, now - max(dry, asked_at + PIECE_ALLOWANCE_S))
                self.started, self.emitted = now, 0.0
        self.emitted += seconds
        return late


def _alignment_reader(
    tokens: Any, timer: PieceTimer | None, request: T3Request
) -> Callable[[], None] | None:
    """Start ``timer`` on a T3 token stream; returns what feeds it the rows handed out so far.

    None without a timer, or when the stream carries no alignment (the timer then times
    nothing, and the session places the piece's words with the next timed ones).
    """
    if timer is None:
        return None
    timer.label = request.request_id
    take = getattr(tokens, "take_alignment", None)
    timer.begin(getattr(tokens, "text_tokens", None) if take is not None else None)
    return (lambda: timer.add(take())) if take is not None else None


class ChatterboxEngine(Engine):
    """Chatterbox (T3 + streamed S3Gen) behind the engine interface.

    Args:
        config: Engine configuration.
        t3_backend: A T3 backend to use instead of the one ``config.t3_backend`` names (it is
            started and closed by the engine).
    """

    def __init__(self, config: ChatterboxEngineConfig, *, t3_backend: T3Backend | None = None):
        self.config = config
        self._stream_config = config.stream_config()
        spec = self._spec = config.spec
        self._conditioning = ConditioningConfig(
            t3_reference_seconds=config.t3_reference_seconds or spec.t3_reference_seconds,
            t3_prompt_tokens=spec.t3_prompt_tokens,
            loudness_lufs=spec.reference_lufs,
        )
        self._conds_file = spec.conds_file
        self.info = EngineInfo(
            name="chatterbox",
            native_sample_rate=SAMPLE_RATE,
            can_clone=True,
            max_concurrency=config.max_concurrency,
            max_segment_chars=config.max_text_chars_per_piece,
            model=spec.name,
            languages=spec.languages,
            parameters=spec.parameters,
            tags=spec.tags,
        )
        self._t3: T3Backend | None = t3_backend
        self._s3_executor = ThreadPoolExecutor(1, thread_name_prefix="s3gen")
        self._fast_executor = ThreadPoolExecutor(1, thread_name_prefix="s3gen-fast")
        self._voice_executor = ThreadPoolExecutor(1, thread_name_prefix="voice-conds")
        self._voice_cuda_stream: Any = None  # created by the voice thread on first use
        self._model_dir: Path | None = None
        self._s3gen: Any = None
        self._ve: Any = None
        self._decoder: S3GenStreamDecoder | None = None
        self._fast_decoder: S3GenStreamDecoder | None = None
        self._scheduler: ChunkScheduler | None = None
        self.calibration: dict = {}
        self._default: _CachedVoice | None = None
        self._voices: dict[str, _CachedVoice] = {}
        self._voice_locks: dict[str, asyncio.Lock] = {}
        self._requests = 0
        self._late_chunks = 0
        self._behind_until = 0.0  # time.monotonic() until which falling_behind holds

    # ---- life cycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve the weights, load S3Gen, the voice encoder and T3, and warm up."""
        from chatterbox_sidecar.engines.chatterbox.model_files import resolve_model_dir

        cfg = self.config
        # Before librosa (and numba) are imported: compiled numba code outlives the process.
        os.environ.setdefault(
            "NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "pipecat-chatterbox" / "numba")
        )
        spec = self._spec
        try:
            self._model_dir = await asyncio.to_thread(
                functools.partial(
                    resolve_model_dir,
                    cfg.model_dir,
                    repo_id=spec.repo_id,
                    revision=spec.revision,
                    files=spec.files,
                )
            )
            await self._in_s3(self._load_s3gen)
            if cfg.warmup:
                await self._in_voice_thread(self._warm_up_voice_path)
            if self._t3 is None:
                self._t3 = self._make_t3_backend(self._model_dir)
            await self._t3.start()
            if cfg.warmup:
                assert self._default is not None
                await self._in_s3(self._warm_up, self._default.reference)
            capacity = cfg.max_streams
            if capacity is None and cfg.on_cuda and self._decoder.cuda_graphs:
                capacity = await self._in_s3(self._calibrate)
            # the multilingual tokenizer may lack a language's optional package
            languages = getattr(self._t3, "languages", None) or self.info.languages
            aligned = bool(getattr(self._t3, "word_alignment", False))
            self.info = dataclasses.replace(
                self.info,
                capacity=capacity,
                languages=languages,
                word_timestamps=aligned,
                alignment_source=ALIGNMENT_SOURCE if aligned else None,
                untimed_languages=self._spec.untimed_languages,
            )
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"chatterbox engine failed to start: {e}") from e
        logger.info(
            f"{self}: {spec.name} ready on {cfg.device} (T3 {type(self._t3).__name__} "
            f"{spec.t3_file}, hops "
            f"{'/'.join(map(str, self._stream_config.hops()))} tokens, "
            f"context {cfg.context_window}, "
            f"{cfg.resolved_flow_steps()} flow steps, "
            f"reference <= {cfg.resolved_reference_seconds():g} s, "
            f"S3Gen graphs {self._decoder.cuda_graphs}, flow {self._decoder.flow_dtype}, "
            f"fast lane {self._fast_decoder is not None}, capacity {self.info.capacity}, "
            f"word timestamps {self.info.word_timestamps})"
        )

    def _load_s3gen(self) -> None:
        import torch

        from chatterbox_sidecar.engines.chatterbox.s3gen.loader import (
            S3GEN_FILE,
            VE_FILE,
            load_s3gen,
            load_voice_encoder,
        )

        assert self._model_dir is not None
        dtype = getattr(torch, self.config.s3gen_dtype)
        if self._spec.meanflow:
            from chatterbox_sidecar.engines.chatterbox.turbo.s3gen import load_meanflow_s3gen

            path = self._model_dir / self._spec.s3gen_file
            self._s3gen = load_meanflow_s3gen(path, self.config.device, dtype)
        else:
            self._s3gen = load_s3gen(self._model_dir / S3GEN_FILE, self.config.device, dtype)
        self._ve = load_voice_encoder(self._model_dir / VE_FILE, self.config.device)
        flow_dtype = self.config.flow_dtype or (
            "bfloat16" if self.config.on_cuda else self.config.s3gen_dtype
        )

        def decoder(priority: int) -> S3GenStreamDecoder:
            return S3GenStreamDecoder(
                self._s3gen,
                self._stream_config,
                cuda_graphs=self.config.cuda_graphs,
                flow_dtype=getattr(torch, flow_dtype),
                compile_flow=self.config.compile_flow and self.config.on_cuda,
                stream_priority=priority,
            )

        self._decoder = decoder(0)
        fast = self.config.fast_lane
        if fast if fast is not None else self.config.on_cuda:
            self._fast_decoder = decoder(-1)
        self._scheduler = ChunkScheduler(
            self._decoder,
            self._in_s3,
            fast=self._fast_decoder,
            run_fast=self._in_fast,
            max_batch=self.config.s3gen_max_batch,
            fast_max_batch=FAST_MAX_BATCH,
            fast_max_tokens=FAST_MAX_TOKENS,
        )
        conds = VoiceConditionals.load(self._model_dir / CONDS_FILE)
        self._default = _CachedVoice("", conds, self._reference(conds))

    def _warm_up(self, reference: Reference) -> None:
        """Decode a few tokens so that the first request does not pay for lazy set-up.

        With CUDA graphs, a streamed utterance is decoded too: every chunk shape of one stream
        is met once and its graphs are recorded here rather than during the first request.
        """
        assert self._decoder is not None
        self._decoder.decode_whole(reference, range(10))
        if not self._decoder.cuda_graphs:
            return
        cfg = self.config
        prompt = round(cfg.resolved_reference_seconds() * 25)
        started = time.perf_counter()
        graphs = self._decoder.precapture(cfg.s3gen_max_batch, prompt)
        if self._fast_decoder is not None:
            first = cfg.first_chunk_size
            graphs += self._fast_decoder.precapture(
                FAST_MAX_BATCH,
                prompt,
                hops=(first, cfg.chunk_size),
                final_tokens=FAST_MAX_TOKENS,
            )
        logger.info(
            f"{self}: recorded {graphs} S3Gen CUDA graphs in {time.perf_counter() - started:.1f} s"
        )

    def _warm_up_voice_path(self) -> None:
        """Compute (and discard) the conditionals of a synthetic clip before serving.

        The first computation of a process compiles librosa's numba functions (the voice
        encoder's STFT): about 30 s on the H200 machine (benchmarks/NOTES.md, issue 13), paid
        here rather than by the first voice registration. Numba caches the compiled code under
        ``NUMBA_CACHE_DIR`` (set at start), so later starts on the machine skip most of it.
        """
        started = time.perf_counter()
        t = np.arange(3 * 16_000) / 16_000
        clip = 0.2 * np.sin(2 * np.pi * 140 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
        with self._voice_stream():
            compute_conditionals(
                clip.astype(np.float32), 16_000, self._s3gen, self._ve, self._conditioning
            )
        logger.info(f"{self}: voice path warmed up in {time.perf_counter() - started:.1f} s")

    def _calibrate(self) -> int:
        """Streams this GPU keeps gap-free, from timings taken here at start.

        Times a bulk S3Gen batch of full-hop chunks at 16, 32 and 64 rows and the T3 step at
        the same counts, turns them into GPU seconds per second of audio for N streams
        speaking short replies (the hop schedule of a 150-token reply, prompt and context
        included), and returns the largest N whose total stays within ``gpu_share``.

        The model counts GPU work only; what it leaves out (two lanes and T3 sharing the GPU,
        T3 decoding ahead of need, prefill bursts) is folded into ``gpu_share``, which was set
        from the H200 measurements of issue 12 (one stream gap-free at a modelled 0.12 of the
        GPU, 16 streams not at 0.23). It gives 4 streams on an H200, the level measured to meet
        the issue's 16-stream row there (TTFA p95 232 ms, 100 % gap-free; 8 streams: p95 333
        ms, BENCHMARKS.md).
        """
        import torch

        assert self._decoder is not None and self._default is not None
        cfg, scfg = self.config, self._stream_config
        decoder, ref = self._decoder, self._default.reference
        prompt = ref.prompt_token.shape[1]
        hop = scfg.max_chunk_size
        # frame-rows of S3Gen work per 150-token reply under the hop schedule
        played, k, frames = 0, 0, 0
        while played < 150:
            h = min(scfg.hop_cap(k), 150 - played)
            frames += 2 * (prompt + min(scfg.context_window, played) + h + LOOKAHEAD_TOKENS)
            played, k = played + h, k + 1
        frames_per_audio_s = frames / (150 / 25)
        result: dict = {"frames_per_audio_s": round(frames_per_audio_s, 1)}
        costs = {}
        for rows in (16, 32, 64):
            rows = min(rows, cfg.s3gen_max_batch)
            streams = []
            for _ in range(rows):
                st = decoder.new_stream(ref)
                st.push(range(200, 200 + scfg.context_window + hop + LOOKAHEAD_TOKENS + 1))
                st.played_tokens, st.chunks_decoded = scfg.context_window, 3
                st.mel_cache = torch.zeros(1, 80, 8, device=decoder.device)
                st.source_cache = torch.zeros(1, 1, 3840, device=decoder.device)
                st.speech_tail = torch.zeros(1, 3840, device=decoder.device)
                st.phase = torch.zeros(1, 9, device=decoder.device)
                streams.append(st)
            times = []
            for _ in range(3):
                for st in streams:
                    st.played_tokens, st.finished = scfg.context_window, False
                started = time.perf_counter()
                decoder.decode_chunks(streams, [False] * rows, [hop] * rows)
                times.append(time.perf_counter() - started)
            row_frames = rows * 2 * (prompt + scfg.context_window + hop + LOOKAHEAD_TOKENS)
            costs[rows] = sorted(times)[1] / row_frames
        step = getattr(self._t3, "time_step", None)
        t3 = {rows: (step(rows) if step else None) or 0.0 for rows in costs}
        capacity = 1
        for n in range(1, 257):
            rows = min(costs, key=lambda r: abs(r - n))
            gpu = n * frames_per_audio_s * costs[rows] + 25 * t3[rows]
            if gpu <= cfg.gpu_share:
                capacity = n
        result.update(
            s3gen_us_per_row_frame={r: round(1e6 * c, 3) for r, c in costs.items()},
            t3_step_ms={r: round(1000 * t, 2) for r, t in t3.items()},
            capacity=capacity,
        )
        self.calibration = result
        logger.info(f"{self}: calibration {result}")
        return capacity

    def _make_t3_backend(self, model_dir: Path) -> T3Backend:
        cfg = self.config
        kind = cfg.t3_backend
        if kind == "vllm" and self._spec.name != ORIGINAL.name:
            raise EngineError("TTS_T3_BACKEND=vllm serves the Original model only")
        if kind == "auto":
            # The torch backend is the measured one (CUDA graphs, sampling in the graph; see
            # BENCHMARKS.md) and follows upstream where chatterbox-vllm does not (per-request
            # guidance, speech positions); vLLM is used when asked for by name.
            kind = "torch"
        if kind == "vllm":
            from chatterbox_sidecar.engines.chatterbox.model_files import max_model_len
            from chatterbox_sidecar.engines.chatterbox.t3.vllm_backend import VllmT3Backend

            t3_model_dir = cfg.t3_model_dir or (
                Path.home() / ".cache" / "pipecat-chatterbox" / "t3-model"
            )
            return VllmT3Backend(
                model_dir,
                t3_model_dir,
                max_model_len=cfg.max_model_len
                or max_model_len(cfg.max_text_chars_per_piece, cfg.max_speech_tokens),
                max_num_seqs=cfg.max_concurrency,
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                enforce_eager=cfg.enforce_eager,
                cfg_scale=cfg.cfg_scale,
            )
        if kind != "torch":
            raise EngineError(f"unknown T3 backend {cfg.t3_backend!r} (auto, vllm or torch)")
        torch_options: dict[str, Any] = {
            "device": cfg.device,
            "dtype": cfg.dtype,
            "max_batch_size": cfg.max_concurrency,
        }
        if self._spec.name == TURBO.name:
            from chatterbox_sidecar.engines.chatterbox.turbo.t3_backend import TurboT3Backend

            return TurboT3Backend(model_dir, top_k=self._spec.top_k, **torch_options)
        if self._spec.name == MULTILINGUAL.name:
            from chatterbox_sidecar.engines.chatterbox.multilingual.backend import (
                MultilingualT3Backend,
            )

            return MultilingualT3Backend(model_dir, t3_file=self._spec.t3_file, **torch_options)
        from chatterbox_sidecar.engines.chatterbox.t3.torch_backend import TorchT3Backend

        return TorchT3Backend(model_dir, **torch_options)

    async def close(self) -> None:
        """Stop T3 and the worker threads."""
        if self._t3 is not None:
            with suppress(Exception):
                await self._t3.close()
        if self._scheduler is not None:
            await self._scheduler.close()
        self._s3_executor.shutdown(wait=False, cancel_futures=True)
        self._fast_executor.shutdown(wait=False, cancel_futures=True)
        self._voice_executor.shutdown(wait=False, cancel_futures=True)

    # ---- load --------------------------------------------------------------------------

    @property
    def falling_behind(self) -> bool:
        """Returns: whether a chunk reached a playing listener late within the hold time."""
        return time.monotonic() < self._behind_until

    def counters(self) -> dict[str, int]:
        """Returns: chunks that reached a playing listener late (``tts_engine_late_chunks``)."""
        return {"late_chunks": self._late_chunks}

    def _fell_behind(self, late: float) -> None:
        """Count a late chunk and hold :attr:`falling_behind` (see the module docstring)."""
        self._late_chunks += 1
        hold = self.config.resolved_overload_hold()
        if hold <= 0:
            return
        if not self.falling_behind:
            logger.warning(
                f"{self}: falling behind: a chunk reached its listener {late:.2f} s after the "
                f"audio ran out; new streams get busy for {hold:g} s"
            )
        self._behind_until = time.monotonic() + hold

    # ---- voices ----------------------------------------------------------------------

    def _reference(self, conds: VoiceConditionals) -> Reference:
        import torch

        gen = cap_reference(conds.gen, self.config.resolved_reference_seconds())
        return Reference.from_gen(
            gen, torch.device(self.config.device), getattr(torch, self.config.s3gen_dtype)
        )

    async def prepare_voice(self, voice: Voice) -> None:
        """Compute the voice's conditionals, write ``conds.pt`` and cache them in memory."""
        try:
            conds = await self._in_voice_thread(self._compute_and_save, voice)
        except Exception as e:
            raise EngineError(
                f"could not compute conditionals for voice '{voice.voice_id}': {e}"
            ) from e
        self._voices[voice.voice_id] = _CachedVoice(voice.revision, conds, self._reference(conds))

    def _voice_stream(self) -> AbstractContextManager:
        """The voice thread's CUDA stream, high priority, as a context (no-op on the CPU).

        Measured under a 16-stream load on the H200 (benchmarks/NOTES.md, issue 13): on the
        default stream a registration's ~2,000 small kernels each queued behind the S3Gen
        lanes' batches and took 3-6 s in all (0.1 s on an idle GPU); a shorter GIL switch
        interval did not change it. At T3's priority its kernels are scheduled ahead of the
        bulk lane's. Results leave the stream as CPU tensors (``compute_conditionals``), so no
        other stream reads its memory.
        """
        if not self.config.on_cuda:
            return nullcontext()
        import torch

        if self._voice_cuda_stream is None:
            self._voice_cuda_stream = torch.cuda.Stream(
                torch.device(self.config.device), priority=-1
            )
        return torch.cuda.stream(self._voice_cuda_stream)

    def _compute_and_save(self, voice: Voice) -> VoiceConditionals:
        with self._voice_stream():
            conds = compute_conditionals_from_file(
                voice.reference_path, self._s3gen, self._ve, self._conditioning
            )
        conds.save(voice.artifact_path(self._conds_file))
        logger.info(f"{self}: conditionals for voice '{voice.voice_id}' written")
        return conds

    def _load_or_compute(self, voice: Voice) -> VoiceConditionals:
        path = voice.artifact_path(self._conds_file)
        try:
            return VoiceConditionals.load(path)
        except FileNotFoundError:
            logger.warning(f"{self}: {path} is missing; computing it again")
        except Exception as e:  # corrupt or foreign file: rebuild it from the reference
            logger.warning(f"{self}: {path} is unreadable ({e}); computing it again")
        return self._compute_and_save(voice)

    async def _voice(self, voice: Voice | None) -> _CachedVoice:
        if voice is None:
            assert self._default is not None, "engine not started"
            return self._default
        cached = self._voices.get(voice.voice_id)
        if cached is not None and cached.revision == voice.revision:
            return cached
        lock = self._voice_locks.setdefault(voice.voice_id, asyncio.Lock())
        async with lock:
            cached = self._voices.get(voice.voice_id)
            if cached is None or cached.revision != voice.revision:
                try:
                    conds = await self._in_voice_thread(self._load_or_compute, voice)
                except Exception as e:
                    raise EngineError(f"voice '{voice.voice_id}' cannot be loaded: {e}") from e
                cached = _CachedVoice(voice.revision, conds, self._reference(conds))
                self._voices[voice.voice_id] = cached
        return cached

    async def forget_voice(self, voice_id: str) -> None:
        """Drop the cached conditionals of a deleted voice."""
        self._voices.pop(voice_id, None)
        self._voice_locks.pop(voice_id, None)

    # ---- synthesis -------------------------------------------------------------------

    async def synthesize(
        self,
        segments: AsyncIterator[str],
        params: SynthesisParams,
        voice: Voice | None,
    ) -> AsyncIterator[np.ndarray | AlignedAudio]:
        """Stream audio for one context (see :meth:`Engine.synthesize`).

        With ``params.word_timestamps`` (and ``info.word_timestamps``) every chunk is an
        :class:`AlignedAudio` holding the timings of the words that start in it.
        """
        if self._t3 is None or self._decoder is None:
            raise EngineError("chatterbox engine is not started")
        if params.language not in self.info.languages:
            raise UnsupportedError(
                f"{self._spec.name} does not speak '{params.language}' here "
                f"(languages: {', '.join(self.info.languages)})"
            )
        cached = await self._voice(voice)
        self._requests += 1
        context = f"ctx{self._requests}-{uuid.uuid4().hex[:8]}"
        timed = params.word_timestamps and self.info.times_words(params.language)
        if params.streaming:
            index = 0
            playback = _Playback()
            number = -1
            async for segment in segments:
                number += 1
                for piece, timer in self._timed_pieces(number, segment, timed, params.language):
                    request = self._request(f"{context}-{index}", piece, cached, params, timer)
                    index += 1
                    # aclosing: T3 is aborted when our consumer stops, not at garbage collection
                    pieces = self._stream_piece(request, cached.reference, playback, timer)
                    async with aclosing(pieces) as audios:
                        async for audio in audios:
                            yield audio
        else:
            pieces = []
            number = -1
            async for segment in segments:
                number += 1
                pieces += self._timed_pieces(number, segment, timed, params.language)
            async with aclosing(self._batch(context, pieces, cached, params)) as audios:
                async for audio in audios:
                    yield audio

    def _pieces(self, segment: str, language: str = "en") -> list[str]:
        # The server's segmenter already keeps segments within info.max_segment_chars; a direct
        # caller's longer segment is split by the same shared splitter.
        if len(segment) <= self.config.max_text_chars_per_piece:
            return [segment] if segment.strip() else []
        return split_text(
            segment,
            self.config.max_text_chars_per_piece,
            keep_tags=self._spec.tags,
            language=language,
        )

    def _timed_pieces(
        self, number: int, segment: str, timed: bool, language: str
    ) -> list[tuple[str, PieceTimer | None]]:
        """The pieces of segment ``number``, each with its word timer when timestamps are on."""
        pieces = self._pieces(segment, language)
        if not timed:
            return [(piece, None) for piece in pieces]
        return [
            (piece, PieceTimer(number, offset, piece) if offset is not None else None)
            for piece, offset in zip(pieces, piece_offsets(segment, pieces), strict=True)
        ]

    def _request(
        self,
        request_id: str,
        text: str,
        cached: _CachedVoice,
        params: SynthesisParams,
        timer: PieceTimer | None = None,
    ) -> T3Request:
        from chatterbox_sidecar.engines.chatterbox.model_files import speech_token_budget

        cfg = self.config
        return T3Request(
            request_id=request_id,
            text=text,
            conditionals=cached.conds.t3,
            exaggeration=params.exaggeration,
            cfg_weight=params.cfg_weight,
            temperature=params.temperature,
            top_p=self._spec.top_p if cfg.top_p is None else cfg.top_p,
            min_p=self._spec.min_p if cfg.min_p is None else cfg.min_p,
            repetition_penalty=(
                self._spec.repetition_penalty
                if cfg.repetition_penalty is None
                else cfg.repetition_penalty
            ),
            max_new_tokens=speech_token_budget(text, max_tokens=cfg.max_speech_tokens),
            seed=params.seed,
            language=params.language,
            alignment=timer is not None,
        )

    async def _stream_piece(
        self,
        request: T3Request,
        reference: Reference,
        playback: _Playback,
        timer: PieceTimer | None = None,
    ) -> AsyncIterator[np.ndarray | AlignedAudio]:
        assert self._t3 is not None and self._decoder is not None and self._scheduler is not None
        decoder, cfg, scheduler = self._decoder, self._stream_config, self._scheduler
        stream = decoder.new_stream(reference)
        pump = _TokenPump(timer=timer)
        samples = 0  # of the piece, yielded so far
        task = asyncio.create_task(self._pump(request, pump), name=f"t3-{request.request_id}")
        loop = asyncio.get_running_loop()
        asked_at = loop.time()
        margin = self.config.urgency_margin
        try:
            while not stream.finished:
                stream.push(pump.buffer)
                pump.buffer.clear()
                if pump.error is not None:
                    raise EngineError(f"T3 failed: {pump.error}") from pump.error
                deadline = playback.dry_at(asked_at)
                if pump.done:
                    stream.push(self._spec.silence_tokens)  # Turbo ends on 3 silence tokens
                    audio = await scheduler.decode(stream, True, deadline)
                    audio = self._trim_final(audio)
                else:
                    wake: float | None = None
                    if stream.chunks_decoded == 0:
                        # The first chunk of a piece: its first hop as soon as it is there.
                        first = cfg.first_chunk_size
                        hop = first if stream.pending >= first + LOOKAHEAD_TOKENS else None
                    else:
                        lead = scheduler.lead_time() + margin
                        left = deadline - loop.time()
                        hop = stream.hop(cfg, urgent=left <= lead)
                        wake = max(0.005, left - lead)
                    if hop is None:
                        pump.changed.clear()
                        with suppress(TimeoutError):
                            await asyncio.wait_for(pump.changed.wait(), wake)
                        continue
                    audio = await scheduler.decode(stream, False, deadline, hop)
                spans: tuple = ()
                if timer is not None:  # the words that start in this chunk come with it
                    end = None if stream.finished else (samples + len(audio)) / SAMPLE_RATE
                    spans = timer.take(samples / SAMPLE_RATE, end)
                    samples += len(audio)
                if len(audio):
                    late = playback.emit(len(audio) / SAMPLE_RATE, loop.time(), asked_at)
                    if late > LATE_TOLERANCE_S:
                        self._fell_behind(late)
                yielded = loop.time()
                if timer is not None and (len(audio) or spans):
                    yield AlignedAudio(audio, spans)
                elif len(audio):
                    yield audio
                playback.held(loop.time() - yielded)
        finally:
            if not task.done():
                task.cancel()
                with suppress(asyncio.CancelledError, Exception):
                    await task

    def _trim_final(self, audio: np.ndarray) -> np.ndarray:
        """An utterance's last audio without its final token's, for models that drop it."""
        if self._spec.trim_final_token and len(audio) > SAMPLES_PER_TOKEN:
            return audio[:-SAMPLES_PER_TOKEN]
        return audio

    async def _pump(self, request: T3Request, pump: _TokenPump) -> None:
        assert self._t3 is not None
        tokens = self._t3.generate(request)
        take_rows = _alignment_reader(tokens, pump.timer, request)
        try:
            async for delta in tokens:
                pump.buffer.extend(delta)
                if take_rows is not None:  # before the tokens can reach S3Gen
                    take_rows()
                pump.changed.set()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            pump.error = e
        finally:
            pump.done = True
            pump.changed.set()
            close = getattr(tokens, "aclose", None)
            if close is not None:
                with suppress(Exception):
                    await close()

    async def _batch(
        self,
        context: str,
        pieces: list[tuple[str, PieceTimer | None]],
        cached: _CachedVoice,
        params: SynthesisParams,
    ) -> AsyncIterator[np.ndarray | AlignedAudio]:
        assert self._scheduler is not None
        scheduler = self._scheduler

        async def piece_audio(i: int, piece: str, timer: PieceTimer | None) -> np.ndarray:
            request = self._request(f"{context}-{i}", piece, cached, params, timer)
            tokens = await self._collect(request, timer)
            tokens.extend(self._spec.silence_tokens)
            return self._trim_final(await scheduler.decode_whole(cached.reference, tokens))

        # Every piece generates and decodes at once (S3Gen batches them with other contexts'
        # pieces); the audio goes out in order.
        tasks = [asyncio.create_task(piece_audio(i, *p)) for i, p in enumerate(pieces)]
        try:
            for task, (_, timer) in zip(tasks, pieces, strict=True):
                audio = await task
                if timer is not None:  # the whole piece's path is known: all its words
                    spans = timer.take(0.0, None)
                    if len(audio) or spans:
                        yield AlignedAudio(audio, spans)
                elif len(audio):
                    yield audio
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _collect(self, request: T3Request, timer: PieceTimer | None = None) -> list[int]:
        assert self._t3 is not None
        tokens: list[int] = []
        stream = self._t3.generate(request)
        take_rows = _alignment_reader(stream, timer, request)
        try:
            async for delta in stream:
                tokens.extend(delta)
                if take_rows is not None:
                    take_rows()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise EngineError(f"T3 failed: {e}") from e
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                with suppress(Exception):
                    await close()
        return tokens

    # ---- threads ---------------------------------------------------------------------

    async def _in_s3(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._s3_executor, fn, *args)

    async def _in_fast(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._fast_executor, fn, *args)

    async def _in_voice_thread(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._voice_executor, fn, *args)

    def __str__(self) -> str:
        return "ChatterboxEngine"


__all__ = ["ChatterboxEngine", "ChatterboxEngineConfig", "StreamState"]
