"""The ``chatterbox`` engine: T3 speech tokens streamed into chunked S3Gen decoding.

For each text piece of a context the engine sends one request to the T3 backend (``vllm`` or
``torch``) with a speech-token budget that follows the piece's length, feeds the tokens as they
arrive into a :class:`~.s3gen.stream.StreamState` and yields 24 kHz audio chunk by chunk
(``streaming=True``). In batch mode (``streaming=False``) every piece of the text is generated
at once and each is decoded whole, in order.

S3Gen (and the voice conditioning) run in worker threads, never on the event loop. Closing the
audio iterator aborts the T3 request; at most the chunk being decoded is finished first.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from loguru import logger

from chatterbox_sidecar.engines.base import (
    Engine,
    EngineError,
    EngineInfo,
    SynthesisParams,
)
from chatterbox_sidecar.engines.chatterbox.conditionals import (
    ConditioningConfig,
    VoiceConditionals,
    cap_reference,
    compute_conditionals_from_file,
)
from chatterbox_sidecar.engines.chatterbox.s3gen.stream import (
    SAMPLE_RATE,
    Reference,
    S3GenStreamDecoder,
    StreamConfig,
    StreamState,
)
from chatterbox_sidecar.engines.chatterbox.t3.backend import T3Backend, T3Request
from chatterbox_sidecar.text import split_text
from chatterbox_sidecar.voices import Voice

T = TypeVar("T")
CONDS_FILE = "conds.pt"
# S3Gen reference cap on CUDA, in seconds. Every chunk's flow re-processes the prompt: on the
# H100, 4 s instead of 10 s halves a 64-stream S3Gen batch (1.32 s -> 0.64 s) and cuts a single
# chunk by ~6 ms (benchmarks/NOTES.md). The speaker embedding still comes from the whole clip;
# the effect on voice similarity is unmeasured (random weights): set 10 for upstream behaviour.
CUDA_REFERENCE_SECONDS = 4.0


@dataclass(frozen=True)
class ChatterboxEngineConfig:
    """Configuration of the chatterbox engine.

    Parameters:
        model_dir: Folder with the Chatterbox files (``TTS_MODEL_DIR``); None downloads them once
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
        s3gen_max_batch: Most streams whose chunks share one S3Gen call.
        s3gen_hold_seconds: Longest a chunk whose stream has audio in hand waits for other
            chunks to share its S3Gen call (0: never; see ``_ChunkBatcher``). On an H100 a
            0.2 s hold raised throughput at 64 streams but made time to first audio worse at
            16 and 64 (BENCHMARKS.md), hence off.
        chunk_size: New speech tokens per streamed chunk (``TTS_CHUNK_SIZE``).
        first_chunk_size: New tokens of the first chunk (smaller: earlier first audio; >= 7).
        context_window: Tokens of left context per chunk (``TTS_CONTEXT_WINDOW``).
        flow_steps: S3Gen flow-matching steps (upstream ``n_cfm_timesteps``: 10).
        streaming_default: Mode for requests that do not say (the server resolves it).
        max_concurrency: Contexts generated at once (T3 batch size).
        max_text_chars_per_piece: Longest text piece sent to T3; longer segments are split.
        reference_seconds: Cap on the S3Gen reference prompt, in seconds (upstream: 10); every
            chunk re-processes the prompt, so a shorter one makes S3Gen cheaper. None: 10 on
            CPU, ``CUDA_REFERENCE_SECONDS`` on CUDA.
        t3_reference_seconds: Seconds of reference tokenized for T3's prompt (upstream: 6).
        top_p: T3 nucleus sampling threshold.
        min_p: T3 minimum relative probability.
        repetition_penalty: T3 repetition penalty (upstream English: 1.2).
        max_speech_tokens: Cap on one piece's speech tokens.
        max_model_len: vLLM context length; None derives it from the piece length and budget.
        gpu_memory_utilization: vLLM's share of GPU memory (leave room for S3Gen).
        enforce_eager: Disable vLLM CUDA graphs.
        cfg_scale: vLLM backend's global guidance scale (chatterbox-vllm reads it once).
        warmup: Decode a few tokens at start so the first request does not pay for it.
    """

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
    s3gen_hold_seconds: float = 0.0
    chunk_size: int = 25
    first_chunk_size: int = 7
    context_window: int = 50
    flow_steps: int = 10
    streaming_default: bool = True
    max_concurrency: int = 8
    max_text_chars_per_piece: int = 300
    reference_seconds: float | None = None
    t3_reference_seconds: float = 6.0
    top_p: float = 1.0
    min_p: float = 0.05
    repetition_penalty: float = 1.2
    max_speech_tokens: int = 1000
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.4
    enforce_eager: bool = True
    cfg_scale: float = 0.5
    warmup: bool = True

    @property
    def on_cuda(self) -> bool:
        """Returns: whether the engine runs on a CUDA device."""
        return self.device.startswith("cuda")

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
            flow_steps=self.flow_steps,
        )


@dataclass
class _CachedVoice:
    created_at: str
    conds: VoiceConditionals
    reference: Reference


@dataclass
class _TokenPump:
    """Tokens of one T3 request, gathered on the event loop while S3Gen works."""

    buffer: list[int] = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Waiting:
    """A chunk waiting for the next S3Gen batch."""

    stream: StreamState
    finalize: bool
    future: asyncio.Future
    release: float  # loop time by which its batch must start


class _ChunkBatcher:
    """Gathers the chunks that streams want decoded; S3Gen decodes whatever is ready together.

    Every stream awaits :meth:`decode`. One drain task hands the waiting requests to the S3Gen
    worker as one batch (rows = streams), so while the worker is busy the next batch fills up by
    itself. A single request goes through ``decoder.decode_chunk``.

    With ``hold_seconds`` > 0, a chunk whose stream has audio in hand (``slack``) may wait up to
    that long, never closer than ``slack_margin`` to running dry, for other chunks to share its
    batch; a batch starts as soon as one member must, or when it is full. Bigger batches cost
    less GPU per chunk; streams with no audio yet (first chunks) never wait.

    Args:
        decoder: The S3Gen decoder.
        run: Runs a function in the S3Gen worker thread (``ChatterboxEngine._in_s3``).
        max_batch: Most chunks per batch.
        hold_seconds: Longest a chunk with slack waits for company (0: never).
        slack_margin: Audio a stream keeps in hand while its chunk waits, in seconds.
    """

    def __init__(
        self,
        decoder: S3GenStreamDecoder,
        run: Callable[..., Any],
        max_batch: int,
        hold_seconds: float = 0.0,
        slack_margin: float = 0.3,
    ):
        self._decoder = decoder
        self._run = run
        self._max_batch = max(1, max_batch)
        self._hold = max(0.0, hold_seconds)
        self._margin = slack_margin
        self._waiting: list[_Waiting] = []
        self._arrived = asyncio.Event()
        self._drain_task: asyncio.Task | None = None
        self.batches = 0
        self.chunks = 0
        self.held = 0  # batches that waited for company

    async def decode(self, stream: StreamState, finalize: bool, slack: float = 0.0) -> np.ndarray:
        """Decode ``stream``'s next chunk in the next batch.

        Args:
            stream: The stream (ready, or finalizing).
            finalize: Whether its utterance is complete.
            slack: Seconds of audio its listener has in hand (0: none yet, decode at once).

        Returns:
            The new audio (float32, 24 kHz).
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        wait = max(0.0, min(self._hold, slack - self._margin))
        self._waiting.append(_Waiting(stream, finalize, future, loop.time() + wait))
        self._arrived.set()
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.create_task(self._drain(), name="s3gen-batcher")
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            if self._hold > 0 and await self._wait_for_company():
                self.held += 1
            batch = [w for w in self._waiting[: self._max_batch] if not w.future.done()]
            del self._waiting[: self._max_batch]
            if not batch:
                continue
            streams = [w.stream for w in batch]
            finals = [w.finalize for w in batch]
            try:
                if len(batch) == 1:
                    audios = [await self._run(self._decoder.decode_chunk, streams[0], finals[0])]
                else:
                    audios = await self._run(self._decoder.decode_chunks, streams, finals)
            except asyncio.CancelledError:
                for w in batch:
                    w.future.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - every stream of the batch hears of it
                for w in batch:
                    if not w.future.done():
                        w.future.set_exception(e)
                continue
            self.batches += 1
            self.chunks += len(batch)
            for w, audio in zip(batch, audios, strict=True):
                if not w.future.done():
                    w.future.set_result(audio)

    async def _wait_for_company(self) -> bool:
        """Wait while the batch is not full and no waiting chunk must start; True if waited."""
        loop = asyncio.get_running_loop()
        waited = False
        while True:
            live = [w for w in self._waiting if not w.future.done()]
            if not live or len(live) >= self._max_batch:
                return waited
            delay = min(w.release for w in live) - loop.time()
            if delay <= 0:
                return waited
            self._arrived.clear()
            waited = True
            try:
                await asyncio.wait_for(self._arrived.wait(), delay)
            except TimeoutError:
                return waited

    async def close(self) -> None:
        """Stop the drain task; waiting streams are cancelled."""
        task, self._drain_task = self._drain_task, None
        if task is not None and not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await task
        for w in self._waiting:
            w.future.cancel()
        self._waiting.clear()


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
        self._conditioning = ConditioningConfig(t3_reference_seconds=config.t3_reference_seconds)
        self.info = EngineInfo(
            name="chatterbox",
            native_sample_rate=SAMPLE_RATE,
            can_clone=True,
            max_concurrency=config.max_concurrency,
            max_segment_chars=config.max_text_chars_per_piece,
        )
        self._t3: T3Backend | None = t3_backend
        self._s3_executor = ThreadPoolExecutor(1, thread_name_prefix="s3gen")
        self._voice_executor = ThreadPoolExecutor(1, thread_name_prefix="voice-conds")
        self._model_dir: Path | None = None
        self._s3gen: Any = None
        self._ve: Any = None
        self._decoder: S3GenStreamDecoder | None = None
        self._batcher: _ChunkBatcher | None = None
        self._default: _CachedVoice | None = None
        self._voices: dict[str, _CachedVoice] = {}
        self._voice_locks: dict[str, asyncio.Lock] = {}
        self._requests = 0

    # ---- life cycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve the weights, load S3Gen, the voice encoder and T3, and warm up."""
        from chatterbox_sidecar.engines.chatterbox.model_files import resolve_model_dir

        cfg = self.config
        try:
            self._model_dir = await asyncio.to_thread(resolve_model_dir, cfg.model_dir)
            await self._in_s3(self._load_s3gen)
            if self._t3 is None:
                self._t3 = self._make_t3_backend(self._model_dir)
            await self._t3.start()
            if cfg.warmup:
                assert self._default is not None
                await self._in_s3(self._warm_up, self._default.reference)
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"chatterbox engine failed to start: {e}") from e
        logger.info(
            f"{self}: ready on {cfg.device} (T3 {type(self._t3).__name__}, chunks "
            f"{cfg.first_chunk_size}/{cfg.chunk_size} tokens, context {cfg.context_window}, "
            f"{cfg.flow_steps} flow steps, reference <= {cfg.resolved_reference_seconds():g} s, "
            f"S3Gen graphs {self._decoder.cuda_graphs}, flow {self._decoder.flow_dtype})"
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
        self._s3gen = load_s3gen(self._model_dir / S3GEN_FILE, self.config.device, dtype)
        self._ve = load_voice_encoder(self._model_dir / VE_FILE, self.config.device)
        flow_dtype = self.config.flow_dtype or (
            "bfloat16" if self.config.on_cuda else self.config.s3gen_dtype
        )
        self._decoder = S3GenStreamDecoder(
            self._s3gen,
            self._stream_config,
            cuda_graphs=self.config.cuda_graphs,
            flow_dtype=getattr(torch, flow_dtype),
            compile_flow=self.config.compile_flow and self.config.on_cuda,
        )
        self._batcher = _ChunkBatcher(
            self._decoder,
            self._in_s3,
            self.config.s3gen_max_batch,
            hold_seconds=self.config.s3gen_hold_seconds,
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
        cfg = self._stream_config
        tokens = cfg.first_chunk_size + 4 * cfg.chunk_size + cfg.context_window + 3
        for _ in range(2):  # a shape is recorded at its second use (GraphCache.min_uses)
            stream = self._decoder.new_stream(reference)
            stream.push(range(100, 100 + tokens))
            while stream.ready(cfg):
                self._decoder.decode_chunk(stream, False)
            self._decoder.decode_chunk(stream, True)

    def _make_t3_backend(self, model_dir: Path) -> T3Backend:
        cfg = self.config
        kind = cfg.t3_backend
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
        if kind == "torch":
            from chatterbox_sidecar.engines.chatterbox.t3.torch_backend import TorchT3Backend

            return TorchT3Backend(
                model_dir,
                device=cfg.device,
                dtype=cfg.dtype,
                max_batch_size=cfg.max_concurrency,
            )
        raise EngineError(f"unknown T3 backend {cfg.t3_backend!r} (auto, vllm or torch)")

    async def close(self) -> None:
        """Stop T3 and the worker threads."""
        if self._t3 is not None:
            with suppress(Exception):
                await self._t3.close()
        if self._batcher is not None:
            await self._batcher.close()
        self._s3_executor.shutdown(wait=False, cancel_futures=True)
        self._voice_executor.shutdown(wait=False, cancel_futures=True)

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
        self._voices[voice.voice_id] = _CachedVoice(voice.created_at, conds, self._reference(conds))

    def _compute_and_save(self, voice: Voice) -> VoiceConditionals:
        conds = compute_conditionals_from_file(
            voice.reference_path, self._s3gen, self._ve, self._conditioning
        )
        conds.save(voice.artifact_path(CONDS_FILE))
        logger.info(f"{self}: conditionals for voice '{voice.voice_id}' written")
        return conds

    def _load_or_compute(self, voice: Voice) -> VoiceConditionals:
        path = voice.artifact_path(CONDS_FILE)
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
        if cached is not None and cached.created_at == voice.created_at:
            return cached
        lock = self._voice_locks.setdefault(voice.voice_id, asyncio.Lock())
        async with lock:
            cached = self._voices.get(voice.voice_id)
            if cached is None or cached.created_at != voice.created_at:
                try:
                    conds = await self._in_voice_thread(self._load_or_compute, voice)
                except Exception as e:
                    raise EngineError(f"voice '{voice.voice_id}' cannot be loaded: {e}") from e
                cached = _CachedVoice(voice.created_at, conds, self._reference(conds))
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
    ) -> AsyncIterator[np.ndarray]:
        """Stream audio for one context (see :meth:`Engine.synthesize`)."""
        if self._t3 is None or self._decoder is None:
            raise EngineError("chatterbox engine is not started")
        cached = await self._voice(voice)
        self._requests += 1
        context = f"ctx{self._requests}-{uuid.uuid4().hex[:8]}"
        if params.streaming:
            index = 0
            async for segment in segments:
                for piece in self._pieces(segment):
                    request = self._request(f"{context}-{index}", piece, cached, params)
                    index += 1
                    # aclosing: T3 is aborted when our consumer stops, not at garbage collection
                    async with aclosing(self._stream_piece(request, cached.reference)) as audios:
                        async for audio in audios:
                            yield audio
        else:
            pieces = [piece async for segment in segments for piece in self._pieces(segment)]
            async with aclosing(self._batch(context, pieces, cached, params)) as audios:
                async for audio in audios:
                    yield audio

    def _pieces(self, segment: str) -> list[str]:
        # The server's segmenter already keeps segments within info.max_segment_chars; a direct
        # caller's longer segment is split by the same shared splitter.
        if len(segment) <= self.config.max_text_chars_per_piece:
            return [segment] if segment.strip() else []
        return split_text(segment, self.config.max_text_chars_per_piece)

    def _request(
        self, request_id: str, text: str, cached: _CachedVoice, params: SynthesisParams
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
            top_p=cfg.top_p,
            min_p=cfg.min_p,
            repetition_penalty=cfg.repetition_penalty,
            max_new_tokens=speech_token_budget(text, max_tokens=cfg.max_speech_tokens),
            seed=params.seed,
        )

    async def _stream_piece(
        self, request: T3Request, reference: Reference
    ) -> AsyncIterator[np.ndarray]:
        assert self._t3 is not None and self._decoder is not None and self._batcher is not None
        decoder, cfg, batcher = self._decoder, self._stream_config, self._batcher
        stream = decoder.new_stream(reference)
        pump = _TokenPump()
        task = asyncio.create_task(self._pump(request, pump), name=f"t3-{request.request_id}")
        loop = asyncio.get_running_loop()
        played_from: float | None = None  # when the listener's playback is taken to start
        emitted = 0.0  # seconds of audio yielded
        try:
            while not stream.finished:
                stream.push(pump.buffer)
                pump.buffer.clear()
                if pump.error is not None:
                    raise EngineError(f"T3 failed: {pump.error}") from pump.error
                slack = 0.0 if played_from is None else played_from + emitted - loop.time()
                if stream.ready(cfg):
                    audio = await batcher.decode(stream, False, slack)
                elif pump.done:
                    audio = await batcher.decode(stream, True, slack)
                else:
                    pump.changed.clear()
                    await pump.changed.wait()
                    continue
                if len(audio):
                    if played_from is None:
                        played_from = loop.time()
                    emitted += len(audio) / SAMPLE_RATE
                    yield audio
        finally:
            if not task.done():
                task.cancel()
                with suppress(asyncio.CancelledError, Exception):
                    await task

    async def _pump(self, request: T3Request, pump: _TokenPump) -> None:
        assert self._t3 is not None
        tokens = self._t3.generate(request)
        try:
            async for delta in tokens:
                pump.buffer.extend(delta)
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
        self, context: str, pieces: list[str], cached: _CachedVoice, params: SynthesisParams
    ) -> AsyncIterator[np.ndarray]:
        assert self._decoder is not None
        tasks = [
            asyncio.create_task(
                self._collect(self._request(f"{context}-{i}", piece, cached, params))
            )
            for i, piece in enumerate(pieces)
        ]
        try:
            for task in tasks:
                tokens = await task
                audio = await self._in_s3(self._decoder.decode_whole, cached.reference, tokens)
                if len(audio):
                    yield audio
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _collect(self, request: T3Request) -> list[int]:
        assert self._t3 is not None
        tokens: list[int] = []
        stream = self._t3.generate(request)
        try:
            async for delta in stream:
                tokens.extend(delta)
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

    async def _in_voice_thread(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._voice_executor, fn, *args)

    def __str__(self) -> str:
        return "ChatterboxEngine"


__all__ = ["ChatterboxEngine", "ChatterboxEngineConfig", "StreamState"]
