"""Chatterbox T3 in plain PyTorch: text and voice conditioning in, speech-token logits out.

T3 is a 0.5B Llama (30 layers, hidden 1024, 16 heads of 64, SiLU MLP 4096, RMSNorm, RoPE with
llama3 scaling) with its own input and output layers: a conditioning encoder (speaker embedding,
a perceiver over 150 prompt speech tokens, an emotion scalar), text and speech embeddings with
learned position tables, and a speech head. Module attribute names follow the checkpoint
(``t3_cfg.safetensors``), so its keys load as they are; the shape of the network (layer count,
widths, vocabularies) is read from the checkpoint.

The backbone runs in three modes that share one attention implementation:

- :meth:`T3Model.forward_full`: a plain causal pass over whole sequences, no cache (the reference).
- :meth:`T3Model.prefill`: the same over a new prompt, writing its keys and values into
  :class:`T3KVCache` slots.
- :meth:`T3Model.decode`: one token for each of the first ``rows`` cache slots, reading and
  writing the cache at per-row positions. Shapes depend only on ``rows`` and ``kv_len``, so a
  static cache and CUDA-graph capture can be layered on later.

Prefill and decode can also record, for word timestamps, the attention probabilities of a few
heads from each row's newest query over the text keys (:class:`AlignmentCapture`): the heads
upstream Chatterbox found to follow the text (``t3.alignment.ALIGNMENT_HEADS``). They are
written into a static buffer, so a CUDA graph can record the capture too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from loguru import logger
from torch import Tensor, nn

# Token ids of the English model (upstream T3Config).
START_TEXT_TOKEN = 255
STOP_TEXT_TOKEN = 0
START_SPEECH_TOKEN = 6561
STOP_SPEECH_TOKEN = 6562
#: Speech ids below this are S3 codec tokens; everything from it up is never sent to S3Gen.
SPEECH_VOCAB_VALID = 6561

# Checkpoint keys our model does not use: the backbone's placeholder token table (T3 feeds
# embeddings, never ids) and the text head (training only).
IGNORED_KEYS = frozenset({"tfmr.embed_tokens.weight", "text_head.weight"})

_LLAMA_HEAD_DIM = 64
_PERCEIVER_HEADS = 4


@dataclass(frozen=True)
class T3ModelConfig:
    """Shape and constants of a T3 network.

    Parameters:
        hidden_size: Model width.
        n_layers: Llama decoder layers.
        n_heads: Attention heads.
        n_kv_heads: Key/value heads (equal to ``n_heads`` for Llama_520M).
        head_dim: Width of one head.
        intermediate_size: MLP width.
        text_vocab_size: Rows of the text embedding.
        speech_vocab_size: Rows of the speech embedding and the speech head.
        text_positions: Rows of the learned text position table.
        speech_positions: Rows of the learned speech position table.
        speaker_embed_size: Width of the voice-encoder embedding.
        perceiver_queries: Perceiver output rows (0 when the checkpoint has no perceiver).
        emotion_adv: Whether the checkpoint has the emotion (exaggeration) input.
        rms_norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        rope_factor: llama3 RoPE scaling factor.
        rope_low_freq_factor: llama3 low-frequency factor.
        rope_high_freq_factor: llama3 high-frequency factor.
        rope_original_max_positions: llama3 original context length.
    """

    hidden_size: int = 1024
    n_layers: int = 30
    n_heads: int = 16
    n_kv_heads: int = 16
    head_dim: int = _LLAMA_HEAD_DIM
    intermediate_size: int = 4096
    text_vocab_size: int = 704
    speech_vocab_size: int = 8194
    text_positions: int = 2050
    speech_positions: int = 4100
    speaker_embed_size: int = 256
    perceiver_queries: int = 32
    emotion_adv: bool = True
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192

    @property
    def conditioning_len(self) -> int:
        """Rows the conditioning encoder produces (speaker + perceiver + emotion)."""
        return 1 + self.perceiver_queries + (1 if self.emotion_adv else 0)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> T3ModelConfig:
        """Infer the configuration from checkpoint tensor shapes.

        Args:
            shapes: Checkpoint key to tensor shape.

        Returns:
            The configuration.

        Raises:
            ValueError: If the keys are not those of a Chatterbox T3 checkpoint.
        """
        required = ("text_emb.weight", "speech_emb.weight", "cond_enc.spkr_enc.weight")
        missing = [k for k in required if k not in shapes]
        if missing:
            raise ValueError(f"not a Chatterbox T3 checkpoint: missing {', '.join(missing)}")
        layers = {
            int(key.split(".")[2])
            for key in shapes
            if key.startswith("tfmr.layers.") and key.split(".")[2].isdigit()
        }
        if not layers or layers != set(range(len(layers))):
            raise ValueError(f"not a Chatterbox T3 checkpoint: layer indices {sorted(layers)}")
        attn = "tfmr.layers.0.self_attn."
        head_dim = _LLAMA_HEAD_DIM
        query = shapes.get("cond_enc.perceiver.pre_attention_query")
        return cls(
            hidden_size=shapes["text_emb.weight"][1],
            n_layers=len(layers),
            n_heads=shapes[attn + "q_proj.weight"][0] // head_dim,
            n_kv_heads=shapes[attn + "k_proj.weight"][0] // head_dim,
            head_dim=head_dim,
            intermediate_size=shapes["tfmr.layers.0.mlp.gate_proj.weight"][0],
            text_vocab_size=shapes["text_emb.weight"][0],
            speech_vocab_size=shapes["speech_emb.weight"][0],
            text_positions=shapes["text_pos_emb.emb.weight"][0],
            speech_positions=shapes["speech_pos_emb.emb.weight"][0],
            speaker_embed_size=shapes["cond_enc.spkr_enc.weight"][1],
            perceiver_queries=query[1] if query is not None else 0,
            emotion_adv="cond_enc.emotion_adv_fc.weight" in shapes,
        )


# --------------------------------------------------------------------------- conditioning


class LearnedPositions(nn.Module):
    """A learned position table (checkpoint key ``<name>.emb.weight``)."""

    def __init__(self, n_positions: int, dim: int):
        super().__init__()
        self.emb = nn.Embedding(n_positions, dim)

    def forward(self, positions: Tensor) -> Tensor:
        """Look up position rows.

        Args:
            positions: Integer positions, any shape.

        Returns:
            Embeddings of shape ``positions.shape + (dim,)``.
        """
        return self.emb(positions)


class PerceiverAttention(nn.Module):
    """Pre-norm multi-head attention with a residual (the perceiver's only block)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.proj_out = nn.Linear(dim, dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)

    def forward(self, queries: Tensor, context: Tensor) -> Tensor:
        """Attend from ``queries`` [B, Nq, D] to ``context`` [B, Nc, D]."""
        q_in, kv_in = self.norm(queries), self.norm(context)
        q = self._heads(self.to_q(q_in))
        k = self._heads(self.to_k(kv_in))
        v = self._heads(self.to_v(kv_in))
        out = F.scaled_dot_product_attention(q, k, v)
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, -1)
        return queries + self.proj_out(out)


class Perceiver(nn.Module):
    """Resamples the prompt speech embeddings to a fixed number of query rows."""

    def __init__(self, n_queries: int, dim: int, n_heads: int = _PERCEIVER_HEADS):
        super().__init__()
        self.pre_attention_query = nn.Parameter(torch.zeros(1, n_queries, dim))
        self.attn = PerceiverAttention(dim, n_heads)

    def forward(self, x: Tensor) -> Tensor:
        """Cross-attention from the learned queries to ``x`` [B, N, D], then self-attention."""
        queries = self.pre_attention_query.expand(x.shape[0], -1, -1)
        mixed = self.attn(queries, x)
        return self.attn(mixed, mixed)


class T3CondEnc(nn.Module):
    """Projects the voice conditioning (speaker, prompt speech, emotion) to model rows."""

    def __init__(self, config: T3ModelConfig):
        super().__init__()
        dim = config.hidden_size
        self.spkr_enc = nn.Linear(config.speaker_embed_size, dim)
        self.perceiver = (
            Perceiver(config.perceiver_queries, dim) if config.perceiver_queries else None
        )
        self.emotion_adv_fc = nn.Linear(1, dim, bias=False) if config.emotion_adv else None

    def forward(
        self, speaker_emb: Tensor, prompt_speech_emb: Tensor | None, emotion: Tensor | None
    ) -> Tensor:
        """Build the conditioning rows.

        Args:
            speaker_emb: Voice-encoder embeddings [B, speaker_embed_size].
            prompt_speech_emb: Embedded prompt speech tokens [B, N, D], or None.
            emotion: Exaggeration values [B], or None for a model without emotion input.

        Returns:
            Conditioning rows [B, conditioning_len, D].
        """
        rows = [self.spkr_enc(speaker_emb)[:, None]]
        if prompt_speech_emb is not None and self.perceiver is not None:
            rows.append(self.perceiver(prompt_speech_emb))
        if self.emotion_adv_fc is not None:
            if emotion is None:
                raise ValueError("this T3 needs an exaggeration value")
            rows.append(self.emotion_adv_fc(emotion.view(-1, 1, 1)))
        return torch.cat(rows, dim=1)


# --------------------------------------------------------------------------- backbone


class RMSNorm(nn.Module):
    """Llama RMSNorm, computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """Normalise the last dimension of ``x``."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def llama3_inv_freq(config: T3ModelConfig) -> Tensor:
    """RoPE inverse frequencies with llama3 scaling (float32, [head_dim // 2])."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    old_len = config.rope_original_max_positions
    low_wavelen = old_len / config.rope_low_freq_factor
    high_wavelen = old_len / config.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / config.rope_factor, inv_freq)
    smooth = (old_len / wavelen - config.rope_low_freq_factor) / (
        config.rope_high_freq_factor - config.rope_low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / config.rope_factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryTable:
    """Precomputed RoPE cos/sin rows for positions ``0..max_positions-1``."""

    def __init__(self, config: T3ModelConfig, max_positions: int, device: torch.device | str):
        inv_freq = llama3_inv_freq(config).to(device)
        positions = torch.arange(max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(positions, inv_freq)
        angles = torch.cat([freqs, freqs], dim=-1)
        self.cos = angles.cos()
        self.sin = angles.sin()
        self.max_positions = max_positions

    def lookup(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Return cos and sin rows for ``positions`` (any shape), cast to ``dtype``."""
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + _rotate_half(x) * sin


class T3KVCache:
    """Static key/value storage: ``[layers, slots, kv_heads, max_len, head_dim]`` each.

    A slot holds one sequence (a request's conditional or unconditional row). Slots are
    handed out by the caller; the cache only stores.
    """

    def __init__(
        self,
        config: T3ModelConfig,
        n_slots: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ):
        shape = (config.n_layers, n_slots, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_slots = n_slots
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        """Memory held by the cache."""
        return self.k.numel() * self.k.element_size() * 2


@dataclass(frozen=True)
class AlignmentCapture:
    """Where a pass writes the attention probabilities of chosen heads over the text keys.

    For each row, its newest query (decode: the row's one token; prefill: the row's last real
    position) is scored against the keys and softmaxed over all it may attend to, in float32,
    as attention does; the probabilities of the ``width`` keys from the row's first text key
    on are written to ``out[row, i]`` for the ``i``-th head of ``heads``. Columns past the
    pass's keys hold repeats of its last key: the reader uses only the text's own columns.

    Parameters:
        heads: ``(layer, head)`` pairs, in the order of ``out``'s second axis.
        text_start: Index of the first text key of each cache slot ``[slots]`` (its
            conditioning length).
        out: Float32 ``[rows, len(heads), width]``, at least as many rows as the pass.
        slots: Prefill only: the slot of each row ``[B]`` (decode: row ``i`` is slot ``i``).
        query_rows: Prefill only: index of each row's last real position ``[B]`` (None: the
            last position of every row).
    """

    heads: tuple[tuple[int, int], ...]
    text_start: Tensor
    out: Tensor
    slots: Tensor | None = None
    query_rows: Tensor | None = None

    def layer_heads(self, layer: int) -> list[tuple[int, int]]:
        """Returns: ``(index in out, head)`` of the captured heads in ``layer``."""
        return [(i, head) for i, (at, head) in enumerate(self.heads) if at == layer]


@dataclass
class AttnContext:
    """How attention reads and writes keys/values in one backbone pass."""

    mode: str  # "full", "prefill" or "decode"
    cache: T3KVCache | None = None
    slots: Tensor | None = None  # prefill: [B] slot of each row
    positions: Tensor | None = None  # decode: [S] write position of each row
    mask: Tensor | None = None  # decode: [S, 1, 1, kv_len] attendable keys
    kv_len: int = 0
    align: AlignmentCapture | None = None  # prefill and decode: heads to record


def _capture_alignment(
    q: Tensor, keys: Tensor, allowed: Tensor, align: AlignmentCapture, layer: int
) -> None:
    """Write the attention probabilities of ``align``'s heads in ``layer`` (see its doc).

    Args:
        q: Each row's newest query [B, heads, head_dim].
        keys: The keys it attends over [B, kv_heads, K, head_dim].
        allowed: Keys each row may attend to [B, K] (bool).
        align: The capture.
        layer: The layer's index.
    """
    pairs = align.layer_heads(layer)
    if not pairs:
        return
    b, n_heads, dim = q.shape
    group = n_heads // keys.shape[1]
    width = align.out.shape[2]
    starts = align.text_start[align.slots] if align.slots is not None else align.text_start[:b]
    columns = starts[:, None] + torch.arange(width, device=q.device)[None, :]
    columns = columns.clamp(max=keys.shape[2] - 1)
    for index, head in pairs:
        scores = torch.einsum("bd,bkd->bk", q[:, head].float(), keys[:, head // group].float())
        scores = scores.mul(1.0 / math.sqrt(dim)).masked_fill(~allowed, float("-inf"))
        align.out[:b, index] = scores.softmax(dim=-1).gather(1, columns)


def cached_attention(
    q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext, layer: int, enable_gqa: bool = False
) -> Tensor:
    """Causal attention of one layer, reading and writing the KV cache as ``ctx`` says.

    Args:
        q: Queries [B, heads, L, head_dim] (RoPE applied where the model uses it).
        k: This pass's keys [B, kv_heads, L, head_dim].
        v: This pass's values, as ``k``.
        ctx: The pass: ``full`` (no cache), ``prefill`` (keys of rows written to their slots)
            or ``decode`` (one token a row, written at its position; row ``i`` is slot ``i``).
        layer: The layer's index in the cache.
        enable_gqa: Fewer key/value heads than query heads.

    Returns:
        The attention output [B, heads, L, head_dim].
    """
    b, _, n, _ = q.shape
    align = ctx.align
    if ctx.mode == "decode":
        assert ctx.cache is not None and ctx.positions is not None
        rows = torch.arange(b, device=q.device)
        k_cache, v_cache = ctx.cache.k[layer], ctx.cache.v[layer]
        k_cache[rows, :, ctx.positions] = k[:, :, 0]
        v_cache[rows, :, ctx.positions] = v[:, :, 0]
        keys = k_cache[:b, :, : ctx.kv_len]
        values = v_cache[:b, :, : ctx.kv_len]
        if align is not None and ctx.mask is not None:
            _capture_alignment(q[:, :, 0], keys, ctx.mask[:, 0, 0], align, layer)
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=ctx.mask, enable_gqa=enable_gqa
        )
    if ctx.mode == "prefill":
        assert ctx.cache is not None and ctx.slots is not None
        ctx.cache.k[layer][ctx.slots, :, :n] = k
        ctx.cache.v[layer][ctx.slots, :, :n] = v
        if align is not None:
            last = align.query_rows
            if last is None:
                last = torch.full((b,), n - 1, dtype=torch.long, device=q.device)
            query = q[torch.arange(b, device=q.device), :, last]  # [B, heads, head_dim]
            allowed = torch.arange(n, device=q.device)[None, :] <= last[:, None]
            _capture_alignment(query, k, allowed, align, layer)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)


class Attention(nn.Module):
    """Llama self-attention (no biases) over a RoPE'd, optionally cached, sequence."""

    def __init__(self, config: T3ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        dim = config.hidden_size
        self.q_proj = nn.Linear(dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: AttnContext) -> Tensor:
        """Attend over ``x`` [B, L, D]; ``cos``/``sin`` are [B, L, head_dim]."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        out = cached_attention(q, k, v, ctx, self.layer_idx, self.n_kv_heads != self.n_heads)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.o_proj(out)


class MLP(nn.Module):
    """Llama SiLU-gated MLP."""

    def __init__(self, config: T3ModelConfig):
        super().__init__()
        dim, hidden = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the MLP."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm Llama decoder layer."""

    def __init__(self, config: T3ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: AttnContext) -> Tensor:
        """Run the layer on ``x`` [B, L, D]."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    """The decoder stack and final norm (checkpoint prefix ``tfmr.``)."""

    def __init__(self, config: T3ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: AttnContext) -> Tensor:
        """Run all layers and the final norm."""
        for layer in self.layers:
            x = layer(x, cos, sin, ctx)
        return self.norm(x)


# --------------------------------------------------------------------------- T3


ModelT = TypeVar("ModelT", bound=nn.Module)


def load_checkpoint(
    path: Path,
    build: Callable[[dict[str, tuple[int, ...]]], ModelT],
    *,
    kind: str,
    ignored: Callable[[str], bool],
    device: torch.device | str,
    dtype: torch.dtype,
) -> ModelT:
    """Build a model from a safetensors checkpoint's shapes and load all its tensors into it.

    The model is built on the meta device (no memory until the tensors are assigned), so a
    checkpoint is read once, straight to ``device`` and ``dtype``.

    Args:
        path: The checkpoint.
        build: Makes the model from the checkpoint's ``{key: shape}``.
        kind: What the file should be, for the error (``"Chatterbox T3"``).
        ignored: Keys the file may hold that the model does not take.
        device: Where to put the parameters.
        dtype: Their dtype.

    Returns:
        The model, in eval mode, without gradients.

    Raises:
        ValueError: If the model's parameters are missing from the file, the file holds keys
            the model does not take, or shapes differ.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        with torch.device("meta"):
            model = build(shapes)
        wanted = model.state_dict()
        missing = [key for key in wanted if key not in shapes]
        unexpected = [key for key in shapes if key not in wanted and not ignored(key)]
        wrong = [k for k in wanted if k in shapes and tuple(wanted[k].shape) != shapes[k]]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{path.name} is not a {kind} checkpoint: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
            )
        state = {key: f.get_tensor(key).to(device=device, dtype=dtype) for key in wanted}
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    return model


class T3Model(nn.Module):
    """The whole T3 network.

    Args:
        config: Network shape.
        with_backbone: False builds only what conditioning needs (``cond_enc``, ``speech_emb``,
            ``speech_pos_emb``), as the vLLM backend does, whose backbone lives in vLLM.
    """

    def __init__(self, config: T3ModelConfig, with_backbone: bool = True):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.cond_enc = T3CondEnc(config)
        self.speech_emb = nn.Embedding(config.speech_vocab_size, dim)
        self.speech_pos_emb = LearnedPositions(config.speech_positions, dim)
        self.with_backbone = with_backbone
        if with_backbone:
            self.text_emb = nn.Embedding(config.text_vocab_size, dim)
            self.text_pos_emb = LearnedPositions(config.text_positions, dim)
            self.tfmr = LlamaBackbone(config)
            self.speech_head = nn.Linear(dim, config.speech_vocab_size, bias=False)
        self.rope: RotaryTable | None = None

    # ---- loading

    @classmethod
    def from_safetensors(
        cls,
        path: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        with_backbone: bool = True,
        max_positions: int = 4096,
    ) -> T3Model:
        """Load a ``t3_cfg.safetensors`` checkpoint.

        Args:
            path: The checkpoint file.
            device: Where to put the model.
            dtype: Parameter dtype.
            with_backbone: See :class:`T3Model`.
            max_positions: Longest sequence (prompt plus speech) the RoPE table covers.

        Returns:
            The model in eval mode.

        Raises:
            ValueError: If the file's keys or shapes do not fit a T3 network.
        """
        path = Path(path)
        model = load_checkpoint(
            path,
            lambda shapes: cls(T3ModelConfig.from_shapes(shapes), with_backbone=with_backbone),
            kind="Chatterbox T3",
            # without the backbone, the backbone's tensors are the file's and not wanted here
            ignored=lambda key: key in IGNORED_KEYS or not with_backbone,
            device=device,
            dtype=dtype,
        )
        config = model.config
        if with_backbone:
            model.rope = RotaryTable(config, max_positions, device)
        logger.info(
            f"Loaded T3 from {path} ({config.n_layers} layers, hidden {config.hidden_size}, "
            f"{dtype}, {device})"
        )
        return model

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.speech_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the parameters."""
        return self.speech_emb.weight.dtype

    # ---- embeddings

    def conditioning(
        self, speaker_emb: Tensor, prompt_speech_tokens: Tensor | None, exaggeration: float
    ) -> Tensor:
        """Embed one voice's conditioning.

        Args:
            speaker_emb: Voice-encoder embedding, 256 values (any leading shape).
            prompt_speech_tokens: S3 prompt tokens (any leading shape), or None.
            exaggeration: Emotion intensity.

        Returns:
            Conditioning rows [conditioning_len, D].
        """
        device, dtype = self.device, self.dtype
        speaker = speaker_emb.to(device=device, dtype=dtype).reshape(1, -1)
        prompt = None
        if prompt_speech_tokens is not None and prompt_speech_tokens.numel() > 0:
            tokens = prompt_speech_tokens.to(device=device, dtype=torch.long).reshape(1, -1)
            positions = torch.arange(tokens.shape[1], device=device)
            prompt = self.speech_emb(tokens) + self.speech_pos_emb(positions)[None]
        emotion = torch.tensor([exaggeration], device=device, dtype=dtype)
        return self.cond_enc(speaker, prompt, emotion)[0]

    def prompt_embeds(self, cond: Tensor, text_ids: Tensor, *, unconditional: bool) -> Tensor:
        """Lay out a prompt: conditioning, text, then start-of-speech twice.

        The layout is upstream Chatterbox's inference layout: its input embeddings end with a
        start-of-speech row (speech position 0), and its generation loop appends another one.
        The unconditional (CFG) row zeroes the text embeddings but keeps their positions.

        Args:
            cond: Conditioning rows [C, D].
            text_ids: Text ids including start and stop tokens [T].
            unconditional: True for the guidance row.

        Returns:
            Embeddings [C + T + 2, D].
        """
        text_ids = text_ids.to(self.device)
        positions = torch.arange(text_ids.shape[0], device=self.device)
        text = self.text_emb(text_ids)
        if unconditional:
            text = torch.zeros_like(text)
        text = text + self.text_pos_emb(positions)
        bos_ids = torch.full((2,), START_SPEECH_TOKEN, device=self.device)
        bos = self.speech_emb(bos_ids) + self.speech_pos_emb(torch.zeros_like(bos_ids))
        return torch.cat([cond.to(self.dtype), text, bos], dim=0)

    def speech_embeds(self, tokens: Tensor, speech_positions: Tensor) -> Tensor:
        """Embed generated speech tokens with their learned positions ([R] -> [R, D])."""
        return self.speech_emb(tokens) + self.speech_pos_emb(speech_positions)

    # ---- backbone passes

    def _rope(self, positions: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """Cos/sin for ``positions``, all of which are below ``length`` (checked on the host)."""
        if self.rope is None:
            raise RuntimeError("T3Model was built without a backbone")
        if length > self.rope.max_positions:
            raise ValueError(f"sequence longer than the RoPE table ({self.rope.max_positions})")
        return self.rope.lookup(positions, self.dtype)

    def logits(self, hidden: Tensor) -> Tensor:
        """Speech-head logits in float32."""
        return self.speech_head(hidden).float()

    def forward_full(self, embeds: Tensor) -> Tensor:
        """Causal pass over whole sequences without a cache.

        Args:
            embeds: Input embeddings [B, L, D].

        Returns:
            Final hidden states [B, L, D].
        """
        b, n, _ = embeds.shape
        positions = torch.arange(n, device=embeds.device).expand(b, n)
        cos, sin = self._rope(positions, n)
        return self.tfmr(embeds.to(self.dtype), cos, sin, AttnContext("full"))

    def prefill(
        self,
        embeds: Tensor,
        cache: T3KVCache,
        slots: Tensor,
        lengths: Tensor | None = None,
        align: AlignmentCapture | None = None,
    ) -> Tensor:
        """Run new prompts and store their keys/values.

        Rows of different lengths are right-padded: attention is causal, so a real position
        never sees the padding after it, and each padded key in the cache lies beyond its
        row's length, where decoding overwrites it before any query may attend to it.

        Args:
            embeds: Prompt embeddings [B, L, D].
            cache: The cache to write.
            slots: Cache slot of each row [B].
            lengths: Real length of each row [B] (None: all ``L``).
            align: Record the alignment heads' attention from each row's last real position
                (row ``k`` of ``align.out`` is row ``k`` of the batch).

        Returns:
            Final hidden state of each row's last real position [B, D].
        """
        b, n, _ = embeds.shape
        positions = torch.arange(n, device=embeds.device).expand(b, n)
        cos, sin = self._rope(positions, n)
        if align is not None:
            last = lengths - 1 if lengths is not None else None
            align = dataclasses.replace(align, slots=slots, query_rows=last)
        ctx = AttnContext("prefill", cache=cache, slots=slots, align=align)
        hidden = self.tfmr(embeds.to(self.dtype), cos, sin, ctx)
        if lengths is None:
            return hidden[:, -1]
        return hidden[torch.arange(b, device=hidden.device), lengths - 1]

    def decode(
        self,
        embeds: Tensor,
        positions: Tensor,
        cache: T3KVCache,
        kv_len: int,
        align: AlignmentCapture | None = None,
    ) -> Tensor:
        """One token for each of the first ``R`` cache slots.

        Row ``i`` is slot ``i``: its token is written at ``positions[i]`` and attends to that
        slot's keys ``0..positions[i]``. Rows of unused slots may carry any token and position
        (their output is meaningless and they only write their own slot).

        Args:
            embeds: Token embeddings [R, D].
            positions: Sequence position of each row's token [R] (its RoPE position too).
            cache: The cache.
            kv_len: Keys to attend over, greater than every position.
            align: Record the alignment heads' attention from each row's token (row ``i`` of
                ``align.out`` is slot ``i``).

        Returns:
            Final hidden states [R, D].
        """
        cos, sin = self._rope(positions[:, None], kv_len)
        keys = torch.arange(kv_len, device=positions.device)
        mask = (keys[None, :] <= positions[:, None])[:, None, None, :]
        ctx = AttnContext(
            "decode", cache=cache, positions=positions, mask=mask, kv_len=kv_len, align=align
        )
        return self.tfmr(embeds[:, None].to(self.dtype), cos, sin, ctx)[:, 0]
