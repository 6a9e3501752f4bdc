"""Chunked, streaming S3Gen decoding: speech tokens in as T3 samples them, 24 kHz audio out.

The recipe follows CosyVoice 2's ``token2wav`` (as vllm-omni's Chatterbox port describes it):

- A chunk is decoded from up to ``context_window`` already played tokens of left context plus
  the new ones; the mel frames of the context are dropped.
- The encoder looks 3 tokens ahead, so the last 3 tokens of a non-final chunk are held back
  and decoded with the next chunk; the final chunk keeps them (``finalize``).
- The flow's starting noise is taken by absolute position from one seeded buffer, so a mel
  frame starts from the same noise whichever chunk decodes it, and a one-chunk decode of a whole
  utterance uses exactly the noise layout of upstream's ``flow_inference``.
- The vocoder (HiFT) re-vocodes the previous chunk's last 8 mel frames with their saved
  excitation source, and the 3840 samples it held back are cross-faded (equal-gain raised
  cosine) with the new rendering of those frames.
- The excitation source (HiFT's sine-plus-noise input) is generated here rather than by HiFT's
  own source module: its harmonic phases continue across chunks and its noise is taken by
  absolute sample position, so streaming and whole-utterance decoding drive the vocoder alike.
- Upstream's 20 ms silence + 20 ms fade-in (``trim_fade``) is applied to an utterance's first
  chunk only.

Design: per-utterance state lives in :class:`StreamState`; :class:`S3GenStreamDecoder` holds
the model and decodes chunks. ``decode_chunks`` decodes several streams' chunks together: one
flow call per Euler step for all of them (rows = streams), the encoder per group of equal token
count, the vocoder per group of equal mel length. On CUDA those calls replay CUDA graphs and the
flow estimator runs in bfloat16 (see ``graphs``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from chatterbox_sidecar.engines.chatterbox.s3gen.graphs import (
    GraphCache,
    bf16_estimator,
    bucket,
    fold_weight_norm,
    graphable_hift,
    patch_sync_free_masks,
    pow2_bucket,
)

SAMPLE_RATE = 24_000
SPEECH_VOCAB_SIZE = 6561
TOKEN_MEL_RATIO = 2
SAMPLES_PER_FRAME = 480
SAMPLES_PER_TOKEN = TOKEN_MEL_RATIO * SAMPLES_PER_FRAME
LOOKAHEAD_TOKENS = 3
MEL_CACHE_FRAMES = 8
SOURCE_CACHE_SAMPLES = MEL_CACHE_FRAMES * SAMPLES_PER_FRAME
# A non-final chunk must bring at least MEL_CACHE_FRAMES new frames after its lookahead.
MIN_NEW_TOKENS = math.ceil(MEL_CACHE_FRAMES / TOKEN_MEL_RATIO)
MIN_CHUNK_TOKENS = LOOKAHEAD_TOKENS + MIN_NEW_TOKENS
# CUDA graphs: token windows (prompt + window) are padded to a multiple of this, and a final
# chunk's mel to a multiple of FINAL_MEL_STEP frames (see S3GenStreamDecoder).
TOKEN_STEP = 32
FINAL_MEL_STEP = 32
# CUDA graphs: flow frames are padded (masked) to a multiple of this.
FRAME_STEP = 64
# Final chunks rarely share a batch in large numbers: their vocoder graphs are recorded before
# serving for batches up to this many rows only (larger ones when met twice).
FINAL_PRECAPTURE_ROWS = 8
NOISE_SEED = 0
# Flow noise covers 300 s of mel frames (prompt included), as upstream's buffer does.
NOISE_FRAMES = 50 * 300
# The vocoder's additive source noise repeats every 2**18 samples (~10.9 s).
SOURCE_NOISE_SAMPLES = 1 << 18


@dataclass(frozen=True)
class StreamConfig:
    """How a stream is cut into chunks and decoded.

    Hops grow: the first chunk takes ``first_chunk_size`` new tokens, the second
    ``chunk_size``, and each later one twice the one before, up to ``max_chunk_size``. Bigger
    hops re-decode fewer context and prompt frames per second of audio; a stream about to run
    dry may take a smaller hop of the same set (:meth:`StreamState.hop`), so that the
    decoder meets few shapes.

    Parameters:
        chunk_size: New speech tokens of the second chunk (``TTS_CHUNK_SIZE``).
        first_chunk_size: New tokens the first chunk waits for; smaller gives earlier audio.
        context_window: Already played tokens decoded again as left context
            (``TTS_CONTEXT_WINDOW``).
        flow_steps: Euler steps of the flow matching (upstream: 10).
        max_chunk_size: Largest hop (``chunk_size`` for fixed hops).
    """

    chunk_size: int = 25
    first_chunk_size: int = 10
    context_window: int = 50
    flow_steps: int = 10
    max_chunk_size: int = 100

    def __post_init__(self) -> None:
        """Check the sizes against the floor the lookahead and the mel cache impose."""
        for name in ("chunk_size", "first_chunk_size"):
            if getattr(self, name) < MIN_CHUNK_TOKENS:
                raise ValueError(f"{name} must be >= {MIN_CHUNK_TOKENS}")
        if self.context_window < 0:
            raise ValueError("context_window must be >= 0")
        if self.flow_steps < 1:
            raise ValueError("flow_steps must be >= 1")
        if self.max_chunk_size < self.chunk_size:
            object.__setattr__(self, "max_chunk_size", self.chunk_size)

    def hop_cap(self, chunks_decoded: int) -> int:
        """New tokens a stream's chunk takes once it has ``chunks_decoded`` chunks behind it."""
        if chunks_decoded == 0:
            return self.first_chunk_size
        return min(self.max_chunk_size, self.chunk_size << min(chunks_decoded - 1, 16))

    def hops(self) -> tuple[int, ...]:
        """Every hop a non-final chunk may take, ascending."""
        sizes = {self.first_chunk_size, self.max_chunk_size}
        size = self.chunk_size
        while size < self.max_chunk_size:
            sizes.add(size)
            size *= 2
        return tuple(sorted(sizes))


@dataclass
class Reference:
    """A voice as S3Gen needs it (the ``gen`` part of ``conds.pt``), on the decoder's device.

    Parameters:
        prompt_token: Shape (1, P), S3 tokens of the reference clip.
        prompt_feat: Shape (1, 2P, 80), its 24 kHz mel.
        embedding: Shape (1, 192), its CAMPPlus x-vector.
    """

    prompt_token: torch.Tensor
    prompt_feat: torch.Tensor
    embedding: torch.Tensor

    @classmethod
    def from_gen(cls, gen: dict, device: torch.device, dtype: torch.dtype) -> Reference:
        """Build a reference from a ``conds.pt`` ``gen`` dict.

        Args:
            gen: The dict (``prompt_token``, ``prompt_feat``, ``embedding``, ...).
            device: Device to put the tensors on.
            dtype: Floating dtype of the decoder.

        Returns:
            The reference, with the mel trimmed to two frames per prompt token.
        """
        token = torch.as_tensor(gen["prompt_token"]).to(device=device, dtype=torch.long)
        if token.dim() == 1:
            token = token[None]
        feat = torch.as_tensor(gen["prompt_feat"]).to(device=device, dtype=dtype)
        if feat.dim() == 2:
            feat = feat[None]
        n = min(token.shape[1], feat.shape[1] // TOKEN_MEL_RATIO)
        embedding = torch.as_tensor(gen["embedding"]).to(device=device, dtype=dtype).reshape(1, -1)
        return cls(token[:, :n], feat[:, : n * TOKEN_MEL_RATIO], embedding)


@dataclass
class StreamState:
    """One utterance's progress through the decoder.

    Parameters:
        reference: The voice.
        tokens: Every valid speech token received so far.
        played_tokens: Tokens whose mel frames have been decoded and passed on.
        chunks_decoded: Chunks decoded so far (0 before the first).
        finished: Whether the final chunk has been decoded.
        mel_cache: Shape (1, 80, 8): the last mel frames passed on, vocoded again next time.
        source_cache: Shape (1, 1, 3840): HiFT's source for those frames.
        speech_tail: Shape (1, 3840): samples held back for the cross-fade.
        phase: Shape (1, 9): harmonic phases (in cycles) at the last source sample generated.
    """

    reference: Reference
    tokens: list[int] = field(default_factory=list)
    played_tokens: int = 0
    chunks_decoded: int = 0
    finished: bool = False
    mel_cache: torch.Tensor | None = None
    source_cache: torch.Tensor | None = None
    speech_tail: torch.Tensor | None = None
    phase: torch.Tensor | None = None

    def push(self, tokens: Iterable[int]) -> int:
        """Add tokens from T3, dropping any that are not S3 speech codes (>= 6561 or < 0).

        Args:
            tokens: Token ids as sampled.

        Returns:
            How many were kept.
        """
        kept = [int(t) for t in tokens if 0 <= int(t) < SPEECH_VOCAB_SIZE]
        self.tokens.extend(kept)
        return len(kept)

    @property
    def pending(self) -> int:
        """Returns: tokens received but not yet played (lookahead included)."""
        return len(self.tokens) - self.played_tokens

    def hop(self, config: StreamConfig, urgent: bool = False) -> int | None:
        """New tokens the next non-final chunk would take now.

        Args:
            config: The chunking configuration.
            urgent: Whether the listener is about to run dry: then the largest hop of
                ``config.hops()`` (at most this chunk's cap) that the waiting tokens fill.

        Returns:
            This chunk's cap (:meth:`StreamConfig.hop_cap`) once that many tokens wait beyond
            the lookahead; when urgent, the largest allowed hop that fits; else None.
        """
        if self.finished:
            return None
        cap = config.hop_cap(self.chunks_decoded)
        available = self.pending - LOOKAHEAD_TOKENS
        if available >= cap:
            return cap
        if urgent:
            fits = [h for h in config.hops() if h <= available]
            return max(fits) if fits else None
        return None

    def ready(self, config: StreamConfig) -> bool:
        """Whether a full hop waits for a non-final chunk (see :meth:`hop`).

        Args:
            config: The chunking configuration.

        Returns:
            True if the next chunk can be decoded without the end of the utterance.
        """
        return self.hop(config) is not None


@dataclass
class _Job:
    """One stream's chunk inside a batched decode."""

    stream: StreamState
    finalize: bool
    first: bool
    start: int  # absolute index of the window's first token
    window: list[int]
    offset: int  # context tokens at the start of the window (their frames are dropped)
    hop: int | None  # new tokens played by a non-final chunk (None: final, all of them)
    new_mel: torch.Tensor | None = None  # (1, 80, n): frames new in this chunk


class S3GenStreamDecoder:
    """S3Gen's flow and vocoder with a chunked, position-stable, batched decode.

    Several streams' chunks decode together: their flow rows share one estimator call per step
    (right-padded with masked frames: the estimator's convolutions are causal and its attention
    masks padded keys, so padding changes nothing before it), the encoder runs once per group
    of equal token count and the vocoder once per group of equal mel length (HiFT is not
    causal, so it is never padded in time).

    On CUDA (``cuda_graphs``) every one of those calls replays a CUDA graph recorded for its
    bucketed shape (rows rounded up to a power of two, flow frames to a multiple of 32), and
    the flow estimator may run in bfloat16 (``flow_dtype``). Weight norm is folded away.

    Thread use: one thread at a time (the engine runs it in its S3Gen worker thread).

    Args:
        s3gen: A loaded ``chatterbox_vllm.models.s3gen.S3Gen`` (eval mode, on its device).
        config: Chunking configuration.
        noise_seed: Seed of the flow-noise and source buffers.
        cuda_graphs: Replay CUDA graphs (None: on CUDA devices).
        flow_dtype: Dtype of the flow estimator (None: the model's; bfloat16 is the fast
            option on CUDA, its error against fp32 is measured by the GPU benchmark).
        compile_flow: Run the flow estimator through ``torch.compile`` (dynamic shapes, one
            compilation for every bucket), meant to fuse the estimator's ~1,000 small kernels
            a step inside the CUDA graphs (experimental: compiling takes over 5 minutes on an
            H100 machine, and the speed-up is unmeasured).
        stream_priority: Priority of the decoder's CUDA stream (lower is higher; -1 lets a
            lane of first chunks go ahead of long batches on the GPU).
    """

    def __init__(
        self,
        s3gen: torch.nn.Module,
        config: StreamConfig,
        noise_seed: int = NOISE_SEED,
        *,
        cuda_graphs: bool | None = None,
        flow_dtype: torch.dtype | None = None,
        compile_flow: bool = False,
        stream_priority: int = 0,
    ):
        self.s3gen = s3gen
        self.config = config
        self.flow = s3gen.flow
        self.hift = s3gen.mel2wav
        params = next(self.flow.parameters())
        self.device, self.dtype = params.device, params.dtype
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs and on_cuda)
        self.graphs = GraphCache(self.cuda_graphs)
        if self.cuda_graphs:
            # The encoder and vocoder stay float32; TF32 matrix products (as cuDNN's
            # convolutions already use by default) cost them ~1e-3 relative error.
            torch.backends.cuda.matmul.allow_tf32 = True
        # Shape buckets only matter when shapes key graphs.
        self._frame_step = FRAME_STEP if self.cuda_graphs else 1
        fold_weight_norm(self.hift)
        patch_sync_free_masks()
        if self.cuda_graphs:
            graphable_hift(self.hift)
        decoder = self.flow.decoder
        self.flow_dtype = flow_dtype or self.dtype
        if self.flow_dtype == torch.bfloat16 and self.dtype != torch.bfloat16:
            self._estimator = bf16_estimator(decoder.estimator)
        else:
            self._estimator = decoder.estimator
        self.compile_flow = compile_flow
        if compile_flow:
            self._estimator = torch.compile(self._estimator, dynamic=True)
        self._cfg_rate = float(decoder.inference_cfg_rate)
        # Turbo's distilled estimator (turbo.s3gen): plain Euler on a linear schedule, no
        # guidance rows, the step's end time passed beside its start.
        self.meanflow = bool(getattr(decoder.estimator, "meanflow", False))
        encoder = self.flow.encoder
        if encoder.static_chunk_size != 0 or encoder.use_dynamic_chunk:
            raise ValueError("S3Gen's encoder uses chunk masks, which _encode does not build")
        self._cuda_stream = (
            torch.cuda.Stream(self.device, priority=stream_priority) if on_cuda else None
        )

        generator = torch.Generator().manual_seed(noise_seed)
        self.flow_noise = torch.randn(1, 80, NOISE_FRAMES, generator=generator).to(
            self.device, self.dtype
        )
        source = self.hift.m_source
        self._harmonics = source.l_sin_gen.harmonic_num + 1
        self._sine_amp = float(source.l_sin_gen.sine_amp)
        self._noise_std = float(source.l_sin_gen.noise_std)
        self._voiced_threshold = float(source.l_sin_gen.voiced_threshold)
        # Initial phase of each harmonic (the fundamental starts at 0), fixed like the noise.
        phases = torch.rand(1, self._harmonics, generator=generator) - 0.5
        phases[:, 0] = 0.0
        self._initial_phase = phases.to(self.device, torch.float32)
        self._source_noise = torch.randn(
            self._harmonics, SOURCE_NOISE_SAMPLES, generator=generator
        ).to(self.device, torch.float32)
        # Equal-gain raised-cosine cross-fade: rising + falling == 1 at every sample. (CosyVoice's
        # Hamming halves sum to ~1.08, a 0.7 dB bump at every seam.)
        n = torch.arange(SOURCE_CACHE_SAMPLES, device=self.device, dtype=torch.float32)
        self._fade_in = 0.5 - 0.5 * torch.cos(math.pi * (n + 0.5) / SOURCE_CACHE_SAMPLES)
        n_trim = SAMPLE_RATE // 50
        trim = torch.zeros(2 * n_trim, device=self.device)
        trim[n_trim:] = (torch.cos(torch.linspace(math.pi, 0, n_trim, device=self.device)) + 1) / 2
        self._trim_fade = trim
        # As upstream: float32 on the device.
        t_span = torch.linspace(0, 1, config.flow_steps + 1, device=self.device)
        if decoder.t_scheduler == "cosine" and not self.meanflow:
            t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
        self._t_span = t_span

    def new_stream(self, reference: Reference) -> StreamState:
        """Start an utterance.

        Args:
            reference: The voice, from :meth:`Reference.from_gen`.

        Returns:
            A fresh stream state.
        """
        return StreamState(reference=reference)

    # ---- public decoding -------------------------------------------------------------

    @torch.inference_mode()
    def decode_chunks(
        self,
        streams: Sequence[StreamState],
        finalize: Sequence[bool],
        hops: Sequence[int | None] | None = None,
    ) -> list:
        """Decode the next chunk of several streams in one batch.

        Args:
            streams: The streams (each at most once); each must be ready (or finalizing).
            finalize: Per stream, whether its utterance is complete (all tokens pushed).
            hops: Per stream, new tokens of a non-final chunk (None: ``stream.hop(config,
                urgent=True)``, the largest allowed hop that its tokens fill).

        Returns:
            Per stream, float32 numpy audio at 24 kHz: the samples new in this chunk.

        Raises:
            RuntimeError: If a stream is finished already or a non-final chunk has too few
                tokens (no stream is changed then).
        """
        streams, finalize = list(streams), list(finalize)
        hops = list(hops) if hops is not None else [None] * len(streams)
        if not len(streams) == len(finalize) == len(hops):
            raise ValueError("one finalize flag and one hop per stream")
        if len({id(s) for s in streams}) != len(streams):
            raise ValueError("a stream appears twice in one batch")
        for k, (stream, final) in enumerate(zip(streams, finalize, strict=True)):
            if stream.finished:
                raise RuntimeError("stream already finalized")
            if final:
                hops[k] = None
                continue
            hop = hops[k] if hops[k] is not None else stream.hop(self.config, urgent=True)
            if hop is None or hop + MIN_CHUNK_TOKENS - MIN_NEW_TOKENS > stream.pending:
                raise RuntimeError(f"a non-final chunk needs >= {MIN_CHUNK_TOKENS} pending tokens")
            if hop < MIN_NEW_TOKENS:
                raise RuntimeError(f"a non-final chunk takes >= {MIN_NEW_TOKENS} new tokens")
            hops[k] = hop
        on_stream = (
            torch.cuda.stream(self._cuda_stream)
            if self._cuda_stream is not None
            else contextlib.nullcontext()
        )
        with on_stream:
            return self._decode_batch(streams, finalize, hops)

    def decode_chunk(
        self, stream: StreamState, finalize: bool, hop: int | None = None
    ) -> np.ndarray:
        """Decode one stream's next chunk (see :meth:`decode_chunks`).

        Args:
            stream: The stream.
            finalize: Whether all of its tokens have been pushed.
            hop: New tokens of a non-final chunk (None: the largest allowed that fits).

        Returns:
            The new audio, float32 at 24 kHz (may be empty).
        """
        return self.decode_chunks([stream], [finalize], [hop])[0]

    @torch.inference_mode()
    def decode_whole(self, reference: Reference, tokens: Iterable[int]) -> np.ndarray:
        """Decode a whole utterance in one chunk (batch mode, and the streaming reference).

        Args:
            reference: The voice.
            tokens: All speech tokens of the utterance (invalid ids are dropped).

        Returns:
            Float32 audio at 24 kHz, 960 samples per valid token.
        """
        stream = self.new_stream(reference)
        stream.push(tokens)
        return self.decode_chunk(stream, True)

    @torch.inference_mode()
    def precapture(
        self,
        max_rows: int,
        prompt_tokens: int,
        hops: Sequence[int] | None = None,
        final_tokens: int | None = None,
        min_prompt_tokens: int | None = None,
    ) -> int:
        """Record, before serving, the CUDA graphs of every shape streamed chunks meet.

        Rows are bucketed to powers of two up to ``max_rows``; token windows (prompt, context,
        hop and lookahead) to multiples of ``TOKEN_STEP``; flow frames to multiples of 32;
        vocoder lengths are those of the allowed hops (a first chunk, a later chunk with its
        mel cache) and the bucketed lengths of final chunks up to ``final_tokens``. Larger
        shapes (a long final chunk, batch mode) are recorded when met twice.

        Args:
            max_rows: Most chunks in one batch.
            prompt_tokens: Longest voice prompt, in tokens (the reference cap x 25).
            hops: The hops chunks take (default: ``config.hops()``).
            final_tokens: Longest final chunk covered (default: twice the largest hop).
            min_prompt_tokens: Shortest voice prompt covered (default: half of
                ``prompt_tokens``; shorter voices record their shapes when met).

        Returns:
            Graphs recorded.
        """
        if not self.cuda_graphs:
            return 0
        cfg = self.config
        hops = tuple(hops or cfg.hops())
        final_tokens = final_tokens or 2 * max(hops)
        longest = prompt_tokens + cfg.context_window
        longest += max(max(hops) + LOOKAHEAD_TOKENS, final_tokens)
        if min_prompt_tokens is None:
            min_prompt_tokens = prompt_tokens // 2
        shortest = min_prompt_tokens + min(hops)
        rows_list, rows = [], 1
        while rows < max_rows:
            rows_list.append(rows)
            rows *= 2
        rows_list.append(self._row_bucket(max_rows))
        before, min_uses = self.graphs.captures, self.graphs.min_uses
        self.graphs.min_uses = 1
        fd, dev = self.flow_dtype, self.device
        mel_lengths = {TOKEN_MEL_RATIO * h for h in hops}
        mel_lengths |= {MEL_CACHE_FRAMES + TOKEN_MEL_RATIO * h for h in hops}
        final_lengths = set(
            range(
                FINAL_MEL_STEP,
                bucket(MEL_CACHE_FRAMES + 2 * final_tokens, FINAL_MEL_STEP) + 1,
                FINAL_MEL_STEP,
            )
        )
        t = self._t_span[0:1]
        dt = (self._t_span[1] - self._t_span[0]).reshape(1)
        spk_dim = self.flow.spk_embed_affine_layer.out_features
        try:
            with torch.cuda.stream(self._cuda_stream):
                for rows in reversed(rows_list):  # largest first: smaller ones reuse its pool
                    top = bucket(longest, TOKEN_STEP) + 1
                    for width in range(bucket(shortest, TOKEN_STEP), top, TOKEN_STEP):
                        tokens = torch.randint(0, SPEECH_VOCAB_SIZE, (rows, width), device=dev)
                        lengths = torch.full((rows,), width, device=dev, dtype=torch.long)
                        self.graphs("encoder", self._encode, tokens, lengths)
                    step = self._frame_step
                    top = bucket(2 * longest, step) + 1
                    flow_rows = rows if self.meanflow else 2 * rows  # guidance rows
                    step_fn = self._meanflow_step if self.meanflow else self._euler_step
                    for frames in range(bucket(2 * shortest, step), top, step):
                        x = torch.randn(rows, 80, frames, device=dev)
                        mask = torch.ones(flow_rows, 1, frames, device=dev, dtype=fd)
                        mu = torch.randn(flow_rows, 80, frames, device=dev, dtype=fd)
                        spks = torch.randn(flow_rows, spk_dim, device=dev, dtype=fd)
                        cond = torch.randn(flow_rows, 80, frames, device=dev, dtype=fd)
                        self.graphs("flow_step", step_fn, x, mask, mu, t, spks, cond, dt)
                    finals = final_lengths if rows <= FINAL_PRECAPTURE_ROWS else set()
                    lengths = mel_lengths | finals
                    for length in sorted(lengths):
                        mel = torch.randn(rows, 80, length, device=dev, dtype=self.dtype)
                        self.graphs("hift_f0", self._f0, mel)
                        source = torch.randn(rows, 1, length * SAMPLES_PER_FRAME, device=dev)
                        self.graphs("hift_decode", self._hift_decode, mel, source)
            torch.cuda.current_stream(dev).wait_stream(self._cuda_stream)
        finally:
            self.graphs.min_uses = min_uses
        return self.graphs.captures - before

    # ---- internals -------------------------------------------------------------------

    def _decode_batch(
        self, streams: list[StreamState], finalize: list[bool], hops: list[int | None]
    ) -> list:
        cfg = self.config
        outputs: list[np.ndarray | None] = [None] * len(streams)
        jobs: list[tuple[int, _Job]] = []
        for i, (stream, final, hop) in enumerate(zip(streams, finalize, hops, strict=True)):
            first = stream.chunks_decoded == 0
            if stream.pending == 0 and first:
                stream.finished = True
                outputs[i] = np.zeros(0, dtype=np.float32)
                continue
            start = max(0, stream.played_tokens - cfg.context_window)
            end = None if hop is None else stream.played_tokens + hop + LOOKAHEAD_TOKENS
            window = stream.tokens[start:end]
            offset = stream.played_tokens - start
            jobs.append((i, _Job(stream, final, first, start, window, offset, hop)))
        if not jobs:
            return outputs
        mels = self._flow_mels(
            [(j.stream.reference, j.window, j.start, j.finalize) for _, j in jobs]
        )
        for (_, job), mel in zip(jobs, mels, strict=True):
            job.new_mel = mel[:, :, job.offset * TOKEN_MEL_RATIO :]
        speeches = self._vocode_jobs([job for _, job in jobs])
        for (i, job), (speech, source, vocode_mel) in zip(jobs, speeches, strict=True):
            outputs[i] = self._finish(job, speech, source, vocode_mel)
        return outputs

    def _finish(
        self, job: _Job, speech: torch.Tensor, source: torch.Tensor, vocode_mel: torch.Tensor
    ) -> np.ndarray:
        """Fade, cross-fade and hold back; advance the stream's state."""
        stream = job.stream
        if job.first:
            n = min(self._trim_fade.shape[0], speech.shape[1])
            speech[:, :n] *= self._trim_fade[:n]
        else:
            overlap, rising = SOURCE_CACHE_SAMPLES, self._fade_in
            speech[:, :overlap] = speech[:, :overlap] * rising + stream.speech_tail * (1 - rising)
        stream.chunks_decoded += 1
        if job.finalize:
            stream.finished = True
            stream.played_tokens = len(stream.tokens)
            stream.mel_cache = stream.source_cache = stream.speech_tail = None
            out = speech
        else:
            assert job.hop is not None
            stream.played_tokens += job.hop
            stream.mel_cache = vocode_mel[:, :, -MEL_CACHE_FRAMES:].clone()
            stream.source_cache = source[:, :, -SOURCE_CACHE_SAMPLES:].clone()
            stream.speech_tail = speech[:, -SOURCE_CACHE_SAMPLES:].clone()
            out = speech[:, :-SOURCE_CACHE_SAMPLES]
        return out[0].float().cpu().numpy()

    def _noise(self, prompt_frames: int, start_frame: int, frames: int) -> torch.Tensor:
        """Flow noise: the prompt's frames, then the utterance's by absolute position."""
        idx = torch.cat(
            [
                torch.arange(prompt_frames),
                prompt_frames + start_frame + torch.arange(frames),
            ]
        ).remainder(NOISE_FRAMES)
        return self.flow_noise[:, :, idx.to(self.device)]

    @torch.inference_mode()
    def _flow_mel(
        self, ref: Reference, window: list[int], start_token: int, finalize: bool
    ) -> torch.Tensor:
        """Mel frames of ``window`` (generated frames only, lookahead dropped unless final).

        This is upstream's ``CausalMaskedDiffWithXvec.inference`` plus its Euler solver with
        classifier-free guidance, with the starting noise supplied by position.
        """
        return self._flow_mels([(ref, window, start_token, finalize)])[0]

    def _encode(self, token: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L), right-padded, to the flow's conditioning ``mu``, shape (B, 2L, 80).

        Upstream's ``UpsampleConformerEncoder.forward`` with one change: the embedded input is
        zeroed past each row's length before the look-ahead convolution, which otherwise reads
        the embedding layer's bias from the padding into a row's last 3 tokens (and through
        attention, ~4e-4 into every frame). With that, each row's first ``2 * lengths`` frames
        equal an unpadded call's to float rounding (~4e-7 relative on the CPU), so one call
        serves a whole batch at a bucketed width. The encoder has no chunk masks
        (``static_chunk_size`` 0, no dynamic chunks; checked at construction).
        """
        from chatterbox_vllm.models.s3gen.utils.mask import make_pad_mask

        flow, enc = self.flow, self.flow.encoder
        xs = flow.input_embedding(token.clamp(0, flow.input_embedding.num_embeddings - 1))
        masks = ~make_pad_mask(lengths, xs.shape[1]).unsqueeze(1)  # (B, 1, L)
        if enc.global_cmvn is not None:
            xs = enc.global_cmvn(xs)
        xs, pos_emb, masks = enc.embed(xs, masks)
        xs = xs * masks.transpose(1, 2).to(xs.dtype)
        xs = enc.pre_lookahead_layer(xs)
        xs = enc.forward_layers(xs, masks, pos_emb, masks)
        xs, up_lengths = enc.up_layer(xs.transpose(1, 2).contiguous(), lengths)
        xs = xs.transpose(1, 2).contiguous()
        masks = ~make_pad_mask(up_lengths, xs.shape[1]).unsqueeze(1)
        xs, pos_emb, masks = enc.up_embed(xs, masks)
        xs = enc.forward_up_layers(xs, masks, pos_emb, masks)
        if enc.normalize_before:
            xs = enc.after_norm(xs)
        return flow.encoder_proj(xs)

    def _flow_mels(self, rows: list[tuple[Reference, list[int], int, bool]]) -> list[torch.Tensor]:
        """Generated mel frames of several windows, rows batched through the flow.

        The encoder runs once for all rows (right-padded token windows, see :meth:`_encode`),
        the flow once per Euler step (right-padded, masked frames). Inputs are assembled on
        the host and copied in one transfer each, not row by row.

        Args:
            rows: Per row (reference, window tokens, absolute start token, finalize).

        Returns:
            Per row, shape (1, 80, frames): the window's frames (lookahead dropped unless final).
        """
        flow = self.flow
        drop = flow.pre_lookahead_len * flow.token_mel_ratio
        n = len(rows)
        n_rows = self._row_bucket(n)
        token_lists = [ref.prompt_token[0].tolist() + list(window) for ref, window, _, _ in rows]
        lengths = [len(t) for t in token_lists]
        width = bucket(max(lengths), TOKEN_STEP) if self.cuda_graphs else max(lengths)
        host_tokens = torch.zeros(n_rows, width, dtype=torch.long)
        for i in range(n_rows):
            t = token_lists[min(i, n - 1)]  # padded rows repeat the last one
            host_tokens[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        host_lengths = torch.tensor([lengths[min(i, n - 1)] for i in range(n_rows)])
        tokens = host_tokens.to(self.device, non_blocking=True)
        token_lengths = host_lengths.to(self.device, non_blocking=True)
        mu_all = self.graphs("encoder", self._encode, tokens, token_lengths)
        frames = [
            TOKEN_MEL_RATIO * length - (0 if final else drop)
            for length, (_, _, _, final) in zip(lengths, rows, strict=True)
        ]
        frames_max = bucket(max(frames), self._frame_step)
        fd = self.flow_dtype
        prompt_frames = [ref.prompt_feat.shape[1] for ref, _, _, _ in rows]
        # Flow noise by position: the prompt's frames, then the window's by absolute frame.
        idx = torch.zeros(n_rows, frames_max, dtype=torch.long)
        for i, ((_, _, start, _), pf, nf) in enumerate(
            zip(rows, prompt_frames, frames, strict=True)
        ):
            idx[i, :pf] = torch.arange(pf)
            idx[i, pf:nf] = pf + start * TOKEN_MEL_RATIO + torch.arange(nf - pf)
        idx = idx.remainder(NOISE_FRAMES).to(self.device, non_blocking=True)
        x = self.flow_noise[0][:, idx].permute(1, 0, 2).float()  # (R, 80, F)
        valid = torch.tensor([frames[min(i, n - 1)] if i < n else 0 for i in range(n_rows)])
        valid = valid.to(self.device, non_blocking=True)
        mask = torch.arange(frames_max, device=self.device)[None, :] < valid[:, None]
        mask = mask[:, None, :].to(fd)  # (R, 1, F)
        mu = mu_all[:, :frames_max].transpose(1, 2).to(fd) * mask
        x = x * mask.float()
        cond = torch.zeros(n_rows, 80, frames_max, device=self.device, dtype=fd)
        for i, (ref, _, _, _) in enumerate(rows):
            cond[i, :, : prompt_frames[i]] = ref.prompt_feat[0].transpose(0, 1)
        embeddings = torch.zeros(n_rows, rows[0][0].embedding.shape[1], device=self.device)
        embeddings[:n] = torch.cat([ref.embedding for ref, _, _, _ in rows]).float()
        spks = flow.spk_embed_affine_layer(F.normalize(embeddings.to(self.dtype), dim=1)).to(fd)
        mel = self._solve(x, mu, mask, spks, cond)
        return [
            mel[i : i + 1, :, pf:nf].clone()
            for i, (pf, nf) in enumerate(zip(prompt_frames, frames, strict=True))
        ]

    def _solve(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        mask: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
    ) -> torch.Tensor:
        """Euler steps: cosine schedule with guidance rows, or meanflow's linear one without."""
        if self.meanflow:
            step_fn, mask_in, mu_in, spks_in, cond_in = self._meanflow_step, mask, mu, spks, cond
        else:
            step_fn = self._euler_step
            mask_in = torch.cat([mask, mask])
            mu_in = torch.cat([mu, torch.zeros_like(mu)])
            spks_in = torch.cat([spks, torch.zeros_like(spks)])
            cond_in = torch.cat([cond, torch.zeros_like(cond)])
        t_span = self._t_span
        t = t_span[0:1]
        dt = (t_span[1] - t_span[0]).reshape(1)
        x = x.float()
        for step in range(1, len(t_span)):
            x = self.graphs("flow_step", step_fn, x, mask_in, mu_in, t, spks_in, cond_in, dt)
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1 : step + 2] - t
        return x

    def _euler_step(
        self,
        x: torch.Tensor,
        mask_in: torch.Tensor,
        mu_in: torch.Tensor,
        t: torch.Tensor,
        spks_in: torch.Tensor,
        cond_in: torch.Tensor,
        dt: torch.Tensor,
    ) -> torch.Tensor:
        """One guided Euler step; ``x`` and ``t`` float32, the rest in the estimator's dtype."""
        b = x.shape[0]
        xd = x.to(self.flow_dtype)
        t_in = t.expand(2 * b)
        if self.flow_dtype == self.dtype:
            t_in = t_in.to(self.dtype)
        v = self._estimator(torch.cat([xd, xd]), mask_in, mu_in, t_in, spks_in, cond_in).float()
        rate = self._cfg_rate
        return x + dt * ((1.0 + rate) * v[:b] - rate * v[b:])

    def _meanflow_step(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        dt: torch.Tensor,
    ) -> torch.Tensor:
        """One meanflow Euler step from ``t`` to ``t + dt`` (upstream's ``basic_euler``).

        The estimator gets the start and end times stacked (``turbo.s3gen.MeanflowTime``).
        """
        b = x.shape[0]
        times = torch.cat([t.expand(b), (t + dt).expand(b)])
        if self.flow_dtype == self.dtype:
            times = times.to(self.dtype)
        v = self._estimator(x.to(self.flow_dtype), mask, mu, times, spks, cond).float()
        return x + dt * v

    def _row_bucket(self, n: int) -> int:
        return pow2_bucket(n) if self.cuda_graphs else n

    def _pad_rows(self, batch: torch.Tensor) -> torch.Tensor:
        """Repeat the last row up to the row bucket (rows never interact)."""
        n = self._row_bucket(batch.shape[0])
        if n == batch.shape[0]:
            return batch
        return torch.cat([batch, batch[-1:].expand(n - batch.shape[0], *batch.shape[1:])])

    def _vocode_jobs(
        self, jobs: list[_Job]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Vocode every job's new frames; returns per job (speech, source, vocoded mel)."""
        results: list = [None] * len(jobs)
        groups: dict[tuple[int, bool], list[int]] = {}
        mels = []
        for i, job in enumerate(jobs):
            mel = job.new_mel if job.first else torch.cat([job.stream.mel_cache, job.new_mel], 2)
            mels.append(mel.to(self.dtype))
            length = mel.shape[2]
            if job.finalize and self.cuda_graphs:
                # A final chunk's length is whatever the utterance left: vocoded at a bucketed
                # length so that it replays a recorded graph (see _pad_final).
                length = bucket(length, FINAL_MEL_STEP)
            groups.setdefault((length, job.first), []).append(i)
        for (length, first), members in groups.items():
            mel = torch.cat([self._pad_final(mels[i], length) for i in members])
            start_frames = [
                jobs[i].stream.played_tokens * TOKEN_MEL_RATIO - (0 if first else MEL_CACHE_FRAMES)
                for i in members
            ]
            streams = [jobs[i].stream for i in members]
            speech, source = self._vocode(streams, mel, start_frames, first)
            for k, i in enumerate(members):
                n = mels[i].shape[2] * SAMPLES_PER_FRAME
                results[i] = (speech[k : k + 1, :n], source[k : k + 1, :, :n], mels[i])
        return results

    @staticmethod
    def _pad_final(mel: torch.Tensor, length: int) -> torch.Tensor:
        """``mel`` (1, 80, n) extended to ``length`` frames by repeating its last frame.

        HiFT is not causal, so only a final chunk is padded (its audio is cut back to ``n``
        frames): the last few frames of an utterance then hear the repeated frame instead of
        the zero padding of an exact-length call, a difference in its closing ~0.1 s only.
        """
        extra = length - mel.shape[2]
        if extra <= 0:
            return mel
        return torch.cat([mel, mel[:, :, -1:].expand(-1, -1, extra)], 2)

    def _f0(self, mel: torch.Tensor) -> torch.Tensor:
        """Mel (B, 80, T) to F0 per sample, shape (B, 480 T), float32."""
        hift = self.hift
        f0 = hift.f0_predictor(mel)
        return hift.f0_upsamp(f0[:, None]).transpose(1, 2).float()[:, :, 0]

    def _hift_decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return self.hift.decode(x=mel, s=source.to(self.dtype)).float()

    def _vocode(
        self, streams: list[StreamState], mel: torch.Tensor, start_frames: list[int], first: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """HiFT with our own excitation source, rows of one mel length.

        Returns:
            speech (B, n) and source (B, 1, n); each stream's ``phase`` is advanced.
        """
        b = mel.shape[0]
        padded = self._pad_rows(mel)
        f0 = self.graphs("hift_f0", self._f0, padded)[:b]
        start = torch.tensor(start_frames, device=self.device) * SAMPLES_PER_FRAME
        cached = 0 if first else SOURCE_CACHE_SAMPLES
        phase = None if first else torch.cat([s.phase for s in streams])
        source, new_phase = self._source(f0, start, cached, phase)
        if not first:
            source[:, :, :cached] = torch.cat([s.source_cache for s in streams])
        for k, s in enumerate(streams):
            s.phase = new_phase[k : k + 1]
        speech = self.graphs("hift_decode", self._hift_decode, padded, self._pad_rows(source))
        return speech[:b].clone(), source

    def _source(
        self, f0: torch.Tensor, start_sample: torch.Tensor, cached: int, phase: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """HiFT's NSF source (sines on F0 and its harmonics, plus noise), position-stable.

        Args:
            f0: Shape (B, n), F0 in Hz per sample.
            start_sample: Shape (B,), absolute index of each row's first sample.
            cached: Samples at the start that the caller replaces with the cached source;
                phase continues from ``phase`` at the first sample after them.
            phase: Shape (B, H) phases in cycles at the sample before ``start_sample + cached``,
                or None at the start of an utterance.

        Returns:
            The source, shape (B, 1, n), and the phases at its last sample, shape (B, H).
        """
        h = self._harmonics
        harmonics = torch.arange(1, h + 1, device=f0.device, dtype=f0.dtype)
        inc = f0[:, None, :] * harmonics[None, :, None] / SAMPLE_RATE  # (B, H, n)
        cum = torch.cumsum(inc.double(), dim=-1)
        if phase is None:
            base = self._initial_phase.double()[:, :, None]
        else:
            before = cum[:, :, cached - 1 : cached] if cached > 0 else 0.0
            base = phase.double()[:, :, None] - before
        cycles = torch.remainder(cum + base, 1.0)
        new_phase = cycles[:, :, -1].float()
        sines = self._sine_amp * torch.sin(2 * math.pi * cycles.float())
        uv = (f0 > self._voiced_threshold).float()[:, None, :]
        positions = start_sample[:, None] + torch.arange(f0.shape[1], device=f0.device)[None]
        idx = positions % SOURCE_NOISE_SAMPLES  # (B, n)
        noise_amp = uv * self._noise_std + (1 - uv) * self._sine_amp / 3
        noise = noise_amp * self._source_noise[:, idx].transpose(0, 1)  # (B, H, n)
        sines = sines * uv + noise
        m = self.hift.m_source
        merged = m.l_tanh(m.l_linear(sines.transpose(1, 2).to(self.dtype)))  # (B, n, 1)
        return merged.transpose(1, 2).float(), new_phase
