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
the model and decodes chunks. ``decode_chunks`` takes a list of streams so that several
streams' chunks can later share one flow call (rows = streams); today it decodes them one by one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

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


class S3GenStreamDecoder:
    """S3Gen's flow and vocoder with a chunked, position-stable decode.

    Thread use: one thread at a time (the engine runs it in its S3Gen worker thread).

    Args:
        s3gen: A loaded ``chatterbox_vllm.models.s3gen.S3Gen`` (eval mode, on its device).
        config: Chunking configuration.
        noise_seed: Seed of the flow-noise and source buffers.
    """

    def __init__(self, s3gen: torch.nn.Module, config: StreamConfig, noise_seed: int = NOISE_SEED):
        self.s3gen = s3gen
        self.config = config
        self.flow = s3gen.flow
        self.hift = s3gen.mel2wav
        params = next(self.flow.parameters())
        self.device, self.dtype = params.device, params.dtype
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
        """Decode the next chunk of several streams.

        Args:
            streams: The streams; each must be ready (or finalizing).
            finalize: Per stream, whether its utterance is complete (all tokens pushed).

        Returns:
            Per stream, float32 numpy audio at 24 kHz: the samples new in this chunk.
        """
        return [self._decode(s, f) for s, f in zip(streams, finalize, strict=True)]

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
        return self._decode(stream, True)

    # ---- internals -------------------------------------------------------------------

    def _decode(self, stream: StreamState, finalize: bool) -> np.ndarray:
        if stream.finished:
            raise RuntimeError("stream already finalized")
        cfg = self.config
        if not finalize and stream.pending < MIN_CHUNK_TOKENS:
            raise RuntimeError(f"a non-final chunk needs >= {MIN_CHUNK_TOKENS} pending tokens")
        first = stream.chunks_decoded == 0
        if stream.pending == 0 and first:
            stream.finished = True
            return np.zeros(0, dtype=np.float32)

        start = max(0, stream.played_tokens - cfg.context_window)
        window = stream.tokens[start:]
        offset = stream.played_tokens - start
        mel = self._flow_mel(stream.reference, window, start, finalize)
        new_mel = mel[:, :, offset * TOKEN_MEL_RATIO :]
        new_start_frame = stream.played_tokens * TOKEN_MEL_RATIO

        if first:
            vocode_mel = new_mel
            vocode_start_frame = new_start_frame
        else:
            vocode_mel = torch.cat([stream.mel_cache, new_mel], dim=2)
            vocode_start_frame = new_start_frame - MEL_CACHE_FRAMES
        speech, source = self._vocode(stream, vocode_mel, vocode_start_frame, first)

        if first:
            n = min(self._trim_fade.shape[0], speech.shape[1])
            speech[:, :n] *= self._trim_fade[:n]
        else:
            overlap, rising = SOURCE_CACHE_SAMPLES, self._fade_in
            speech[:, :overlap] = speech[:, :overlap] * rising + stream.speech_tail * (1 - rising)

        stream.chunks_decoded += 1
        if finalize:
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
        flow = self.flow
        tokens = torch.tensor(window, dtype=torch.long, device=self.device)[None]
        token = torch.cat([ref.prompt_token, tokens], dim=1)
        token_len = torch.tensor([token.shape[1]], device=self.device)
        spks = flow.spk_embed_affine_layer(F.normalize(ref.embedding, dim=1))
        emb = flow.input_embedding(token.clamp(0, flow.input_embedding.num_embeddings - 1))
        h, _ = flow.encoder(emb, token_len)
        if not finalize:
            h = h[:, : -flow.pre_lookahead_len * flow.token_mel_ratio]
        prompt_frames = ref.prompt_feat.shape[1]
        frames = h.shape[1] - prompt_frames
        mu = flow.encoder_proj(h).transpose(1, 2).contiguous()
        cond = torch.zeros_like(mu)
        cond[:, :, :prompt_frames] = ref.prompt_feat.transpose(1, 2)
        mask = torch.ones(1, 1, mu.shape[2], device=self.device, dtype=mu.dtype)
        x = self._noise(prompt_frames, start_token * TOKEN_MEL_RATIO, frames)
        mel = self._solve(x, mu, mask, spks, cond)
        return mel[:, :, prompt_frames:]

    def _solve(
        self,
        x: torch.Tensor,
        mu: torch.Tensor,
        mask: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
    ) -> torch.Tensor:
        """Euler steps on a cosine schedule, CFG rows stacked after the conditional rows."""
        decoder = self.flow.decoder
        rate = decoder.inference_cfg_rate
        b = x.shape[0]
        t_span = torch.linspace(0, 1, self.config.flow_steps + 1, device=x.device, dtype=x.dtype)
        if decoder.t_scheduler == "cosine":
            t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
        mask_in = torch.cat([mask, mask])
        mu_in = torch.cat([mu, torch.zeros_like(mu)])
        spks_in = torch.cat([spks, torch.zeros_like(spks)])
        cond_in = torch.cat([cond, torch.zeros_like(cond)])
        t = t_span[0:1]
        dt = t_span[1] - t_span[0]
        for step in range(1, len(t_span)):
            v = decoder.estimator(
                torch.cat([x, x]), mask_in, mu_in, t.expand(2 * b), spks_in, cond_in
            )
            v_cond, v_uncond = v[:b], v[b:]
            x = x + dt * ((1.0 + rate) * v_cond - rate * v_uncond)
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x.float()

    def _vocode(
        self, stream: StreamState, mel: torch.Tensor, start_frame: int, first: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """HiFT with our own excitation source; returns (speech (1, n), source (1, 1, n))."""
        hift = self.hift
        mel = mel.to(self.dtype)
        f0 = hift.f0_predictor(mel)
        f0_up = hift.f0_upsamp(f0[:, None]).transpose(1, 2).float()  # (1, n, 1)
        start_sample = start_frame * SAMPLES_PER_FRAME
        cached = 0 if first else SOURCE_CACHE_SAMPLES
        source, stream.phase = self._source(f0_up[:, :, 0], start_sample, cached, stream.phase)
        if not first:
            source[:, :, :cached] = stream.source_cache
        speech = hift.decode(x=mel, s=source.to(self.dtype)).float()
        return speech, source

    def _source(
        self, f0: torch.Tensor, start_sample: int, cached: int, phase: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """HiFT's NSF source (sines on F0 and its harmonics, plus noise), position-stable.

        Args:
            f0: Shape (1, n), F0 in Hz per sample.
            start_sample: Absolute index of the first sample.
            cached: Samples at the start that the caller replaces with the cached source;
                phase continues from ``phase`` at the first sample after them.
            phase: Shape (1, H) phases in cycles at the sample before ``start_sample + cached``,
                or None at the start of an utterance.

        Returns:
            The source, shape (1, 1, n), and the phases at its last sample.
        """
        h = self._harmonics
        harmonics = torch.arange(1, h + 1, device=f0.device, dtype=f0.dtype)
        inc = f0[:, None, :] * harmonics[None, :, None] / SAMPLE_RATE  # (1, H, n)
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
        idx = (start_sample + torch.arange(f0.shape[1], device=f0.device)) % SOURCE_NOISE_SAMPLES
        noise_amp = uv * self._noise_std + (1 - uv) * self._sine_amp / 3
        noise = noise_amp * self._source_noise[:, idx][None]
        sines = sines * uv + noise  # (1, H, n)
        m = self.hift.m_source
        merged = m.l_tanh(m.l_linear(sines.transpose(1, 2).to(self.dtype)))  # (1, n, 1)
        return merged.transpose(1, 2).float(), new_phase
