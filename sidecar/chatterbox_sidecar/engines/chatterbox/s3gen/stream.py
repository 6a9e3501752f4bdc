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
MIN_CHUNK_TOKENS = LOOKAHEAD_TOKENS + math.ceil(MEL_CACHE_FRAMES / TOKEN_MEL_RATIO)
NOISE_SEED = 0
# Flow noise covers 300 s of mel frames (prompt included), as upstream's buffer does.
NOISE_FRAMES = 50 * 300
# The vocoder's additive source noise repeats every 2**18 samples (~10.9 s).
SOURCE_NOISE_SAMPLES = 1 << 18


@dataclass(frozen=True)
class StreamConfig:
    """How a stream is cut into chunks and decoded.

    Parameters:
        chunk_size: New speech tokens per chunk after the first (``TTS_CHUNK_SIZE``).
        first_chunk_size: New tokens the first chunk waits for; smaller gives earlier audio.
        context_window: Already played tokens decoded again as left context
            (``TTS_CONTEXT_WINDOW``).
        flow_steps: Euler steps of the flow matching (upstream: 10).
    """

    chunk_size: int = 25
    first_chunk_size: int = 10
    context_window: int = 50
    flow_steps: int = 10

    def __post_init__(self) -> None:
        """Check the sizes against the floor the lookahead and the mel cache impose."""
        for name in ("chunk_size", "first_chunk_size"):
            if getattr(self, name) < MIN_CHUNK_TOKENS:
                raise ValueError(f"{name} must be >= {MIN_CHUNK_TOKENS}")
        if self.context_window < 0:
            raise ValueError("context_window must be >= 0")
        if self.flow_steps < 1:
            raise ValueError("flow_steps must be >= 1")


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

    def ready(self, config: StreamConfig) -> bool:
        """Whether enough tokens wait for a non-final chunk.

        Args:
            config: The chunking configuration.

        Returns:
            True if the next chunk can be decoded without the end of the utterance.
        """
        if self.finished:
            return False
        wanted = config.first_chunk_size if self.chunks_decoded == 0 else config.chunk_size
        return self.pending >= wanted + LOOKAHEAD_TOKENS


@dataclass
class _Job:
    """One stream's chunk inside a batched decode."""

    stream: StreamState
    finalize: bool
    first: bool
    start: int  # absolute index of the window's first token
    window: list[int]
    offset: int  # context tokens at the start of the window (their frames are dropped)
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
        self._frame_step = 32 if self.cuda_graphs else 1
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
        self._cuda_stream = torch.cuda.Stream(self.device) if on_cuda else None

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
        if decoder.t_scheduler == "cosine":
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
    def decode_chunks(self, streams: Sequence[StreamState], finalize: Sequence[bool]) -> list:
        """Decode the next chunk of several streams in one batch.

        Args:
            streams: The streams (each at most once); each must be ready (or finalizing).
            finalize: Per stream, whether its utterance is complete (all tokens pushed).

        Returns:
            Per stream, float32 numpy audio at 24 kHz: the samples new in this chunk.

        Raises:
            RuntimeError: If a stream is finished already or a non-final chunk has too few
                tokens (no stream is changed then).
        """
        streams, finalize = list(streams), list(finalize)
        if len(streams) != len(finalize):
            raise ValueError("one finalize flag per stream")
        if len({id(s) for s in streams}) != len(streams):
            raise ValueError("a stream appears twice in one batch")
        for stream, final in zip(streams, finalize, strict=True):
            if stream.finished:
                raise RuntimeError("stream already finalized")
            if not final and stream.pending < MIN_CHUNK_TOKENS:
                raise RuntimeError(f"a non-final chunk needs >= {MIN_CHUNK_TOKENS} pending tokens")
        on_stream = (
            torch.cuda.stream(self._cuda_stream)
            if self._cuda_stream is not None
            else contextlib.nullcontext()
        )
        with on_stream:
            return self._decode_batch(streams, finalize)

    def decode_chunk(self, stream: StreamState, finalize: bool) -> np.ndarray:
        """Decode one stream's next chunk (see :meth:`decode_chunks`).

        Args:
            stream: The stream.
            finalize: Whether all of its tokens have been pushed.

        Returns:
            The new audio, float32 at 24 kHz (may be empty).
        """
        return self.decode_chunks([stream], [finalize])[0]

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

    # ---- internals -------------------------------------------------------------------

    def _decode_batch(self, streams: list[StreamState], finalize: list[bool]) -> list:
        cfg = self.config
        outputs: list[np.ndarray | None] = [None] * len(streams)
        jobs: list[tuple[int, _Job]] = []
        for i, (stream, final) in enumerate(zip(streams, finalize, strict=True)):
            first = stream.chunks_decoded == 0
            if stream.pending == 0 and first:
                stream.finished = True
                outputs[i] = np.zeros(0, dtype=np.float32)
                continue
            start = max(0, stream.played_tokens - cfg.context_window)
            window = stream.tokens[start:]
            jobs.append(
                (i, _Job(stream, final, first, start, window, stream.played_tokens - start))
            )
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
            stream.played_tokens = len(stream.tokens) - LOOKAHEAD_TOKENS
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

    def _encode(self, token: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) to the flow's conditioning ``mu``, shape (B, 2L, 80)."""
        flow = self.flow
        lengths = torch.full((token.shape[0],), token.shape[1], device=token.device)
        emb = flow.input_embedding(token.clamp(0, flow.input_embedding.num_embeddings - 1))
        h, _ = flow.encoder(emb, lengths)
        return flow.encoder_proj(h)

    def _flow_mels(self, rows: list[tuple[Reference, list[int], int, bool]]) -> list[torch.Tensor]:
        """Generated mel frames of several windows, rows batched through the flow.

        Args:
            rows: Per row (reference, window tokens, absolute start token, finalize).

        Returns:
            Per row, shape (1, 80, frames): the window's frames (lookahead dropped unless final).
        """
        flow = self.flow
        drop = flow.pre_lookahead_len * flow.token_mel_ratio
        # Encoder: one call per group of equal token count (exact: no padding in time).
        tokens = [
            torch.cat(
                [ref.prompt_token[0], torch.tensor(window, dtype=torch.long, device=self.device)]
            )
            for ref, window, _, _ in rows
        ]
        mus: list[torch.Tensor | None] = [None] * len(rows)
        groups: dict[int, list[int]] = {}
        for i, t in enumerate(tokens):
            groups.setdefault(t.shape[0], []).append(i)
        for members in groups.values():
            batch = torch.stack([tokens[i] for i in members])
            batch = self._pad_rows(batch)
            mu = self.graphs("encoder", self._encode, batch)
            for k, i in enumerate(members):
                mu_i = mu[k]
                mus[i] = mu_i if rows[i][3] else mu_i[:-drop]
        # Flow: all rows in one batch, right-padded with masked frames.
        lengths = [m.shape[0] for m in mus]
        n_rows = self._row_bucket(len(rows))
        frames_max = bucket(max(lengths), self._frame_step)
        fd = self.flow_dtype
        x = torch.zeros(n_rows, 80, frames_max, device=self.device, dtype=torch.float32)
        mu = torch.zeros(n_rows, 80, frames_max, device=self.device, dtype=fd)
        cond = torch.zeros_like(mu)
        mask = torch.zeros(n_rows, 1, frames_max, device=self.device, dtype=fd)
        embeddings = torch.zeros(n_rows, rows[0][0].embedding.shape[1], device=self.device)
        prompt_frames = []
        for i, ((ref, _, start, _), mu_i, n) in enumerate(zip(rows, mus, lengths, strict=True)):
            pf = ref.prompt_feat.shape[1]
            prompt_frames.append(pf)
            mu[i, :, :n] = mu_i.transpose(0, 1)
            cond[i, :, :pf] = ref.prompt_feat[0].transpose(0, 1)
            mask[i, :, :n] = 1
            x[i][:, :n] = self._noise(pf, start * TOKEN_MEL_RATIO, n - pf)[0]
            embeddings[i] = ref.embedding[0]
        spks = flow.spk_embed_affine_layer(F.normalize(embeddings.to(self.dtype), dim=1)).to(fd)
        mel = self._solve(x, mu, mask, spks, cond)
        return [
            mel[i : i + 1, :, pf:n].clone()
            for i, (pf, n) in enumerate(zip(prompt_frames, lengths, strict=False))
        ]

    def _solve(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        mask: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
    ) -> torch.Tensor:
        """Euler steps on a cosine schedule, CFG rows stacked after the conditional rows."""
        mask_in = torch.cat([mask, mask])
        mu_in = torch.cat([mu, torch.zeros_like(mu)])
        spks_in = torch.cat([spks, torch.zeros_like(spks)])
        cond_in = torch.cat([cond, torch.zeros_like(cond)])
        t_span = self._t_span
        t = t_span[0:1]
        dt = (t_span[1] - t_span[0]).reshape(1)
        x = x.float()
        for step in range(1, len(t_span)):
            x = self.graphs(
                "flow_step", self._euler_step, x, mask_in, mu_in, t, spks_in, cond_in, dt
            )
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
            groups.setdefault((mel.shape[2], job.first), []).append(i)
        for (_, first), members in groups.items():
            mel = torch.cat([mels[i] for i in members])
            start_frames = [
                jobs[i].stream.played_tokens * TOKEN_MEL_RATIO - (0 if first else MEL_CACHE_FRAMES)
                for i in members
            ]
            streams = [jobs[i].stream for i in members]
            speech, source = self._vocode(streams, mel, start_frames, first)
            for k, i in enumerate(members):
                results[i] = (speech[k : k + 1], source[k : k + 1], mels[i])
        return results

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
