"""Chatterbox-Turbo's T3 in plain PyTorch: a GPT-2 backbone with T3's own input and output layers.

Turbo's T3 (upstream ``T3`` with ``GPT2_medium``: 24 layers, width 1024, 16 heads of 64, GELU
(tanh) MLP 4096, LayerNorm 1e-5, learned absolute positions ``wpe``) differs from the
Original's Llama T3:

- the prompt is ``[speaker row, prompt speech embeddings (<= 375, no perceiver), text
  embeddings, start-of-speech]``; no emotion row, no learned text or speech position tables:
  GPT-2 adds ``wpe`` of the sequence position to every input;
- the text is GPT-2 BPE ids with no start/stop text tokens;
- the speech vocabulary is 6563 (start 6561, stop 6562) and the speech head has a bias;
- there is no guidance: one sequence per request.

Module attribute names follow the checkpoint (``t3_turbo_v1.safetensors``), so its keys load
as they are; the shape of the network is read from the checkpoint. The backbone runs in the
same three modes as the Original's (:meth:`TurboT3Model.forward_full`, ``prefill``,
``decode``) over a static per-slot key/value cache, so its decode step can be recorded as a
CUDA graph.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from loguru import logger
from torch import Tensor, nn

from chatterbox_sidecar.engines.chatterbox.t3.model import (
    AttnContext,
    T3KVCache,
    cached_attention,
    load_checkpoint,
)

START_SPEECH_TOKEN = 6561
STOP_SPEECH_TOKEN = 6562
SPEECH_VOCAB_VALID = 6561
HEAD_DIM = 64

# Checkpoint keys the model does not use: GPT-2's own token table (T3 feeds embeddings; upstream
# deletes it after loading), the text head (training only), and the causal-mask buffers older
# transformers versions saved with each attention layer.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
IGNORED_KEYS = frozenset({"tfmr.wte.weight", "text_head.weight"})


@dataclass(frozen=True)
class TurboT3Config:
    """Shape of a Turbo T3 network.

    Parameters:
        hidden_size: Model width.
        n_layers: GPT-2 blocks.
        n_heads: Attention heads (of 64).
        intermediate_size: MLP width.
        n_positions: Rows of GPT-2's position table (the longest sequence).
        text_vocab_size: Rows of the text embedding.
        speech_vocab_size: Rows of the speech embedding and head.
        speaker_embed_size: Width of the voice-encoder embedding.
        layer_norm_eps: LayerNorm epsilon.
    """

    hidden_size: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    intermediate_size: int = 4096
    n_positions: int = 8196
    text_vocab_size: int = 50276
    speech_vocab_size: int = 6563
    speaker_embed_size: int = 256
    layer_norm_eps: float = 1e-5

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads (as many as query heads: GPT-2 has no grouped attention)."""
        return self.n_heads

    @property
    def head_dim(self) -> int:
        """Width of an attention head."""
        return HEAD_DIM

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> TurboT3Config:
        """Infer the configuration from checkpoint tensor shapes.

        Raises:
            ValueError: If the keys are not those of a Turbo T3 checkpoint.
        """
        required = (
            "text_emb.weight",
            "speech_emb.weight",
            "speech_head.bias",
            "cond_enc.spkr_enc.weight",
            "tfmr.wpe.weight",
        )
        missing = [k for k in required if k not in shapes]
        if missing:
            raise ValueError(f"not a Chatterbox-Turbo T3 checkpoint: missing {', '.join(missing)}")
        layers = {
            int(key.split(".")[2])
            for key in shapes
            if key.startswith("tfmr.h.") and key.split(".")[2].isdigit()
        }
        if not layers or layers != set(range(len(layers))):
            raise ValueError(f"not a Chatterbox-Turbo T3 checkpoint: layers {sorted(layers)}")
        hidden = shapes["tfmr.wpe.weight"][1]
        return cls(
            hidden_size=hidden,
            n_layers=len(layers),
            n_heads=hidden // HEAD_DIM,
            intermediate_size=shapes["tfmr.h.0.mlp.c_fc.weight"][1],
            n_positions=shapes["tfmr.wpe.weight"][0],
            text_vocab_size=shapes["text_emb.weight"][0],
            speech_vocab_size=shapes["speech_emb.weight"][0],
            speaker_embed_size=shapes["cond_enc.spkr_enc.weight"][1],
        )


class Conv1D(nn.Module):
    """GPT-2's linear layer: ``x @ weight + bias`` with ``weight`` stored ``[in, out]``."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layer to ``x`` [..., in]."""
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(
            *x.shape[:-1], -1
        )


class GPT2Attention(nn.Module):
    """Causal multi-head self-attention (fused qkv projection ``c_attn``, output ``c_proj``)."""

    def __init__(self, config: TurboT3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.n_heads
        dim = config.hidden_size
        self.c_attn = Conv1D(dim, 3 * dim)
        self.c_proj = Conv1D(dim, dim)

    def forward(self, x: Tensor, ctx: AttnContext) -> Tensor:
        """Attend over ``x`` [B, L, D]."""
        b, n, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=-1)
        q = q.view(b, n, self.n_heads, HEAD_DIM).transpose(1, 2)
        k = k.view(b, n, self.n_heads, HEAD_DIM).transpose(1, 2)
        v = v.view(b, n, self.n_heads, HEAD_DIM).transpose(1, 2)
        out = cached_attention(q, k, v, ctx, self.layer_idx)
        return self.c_proj(out.transpose(1, 2).reshape(b, n, d))


class GPT2MLP(nn.Module):
    """GPT-2's MLP: ``c_fc``, tanh-approximated GELU (``gelu_new``), ``c_proj``."""

    def __init__(self, config: TurboT3Config):
        super().__init__()
        self.c_fc = Conv1D(config.hidden_size, config.intermediate_size)
        self.c_proj = Conv1D(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the MLP."""
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    """Pre-norm GPT-2 block."""

    def __init__(self, config: TurboT3Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(self, x: Tensor, ctx: AttnContext) -> Tensor:
        """Run the block on ``x`` [B, L, D]."""
        x = x + self.attn(self.ln_1(x), ctx)
        return x + self.mlp(self.ln_2(x))


class GPT2Backbone(nn.Module):
    """Position table, blocks and final norm (checkpoint prefix ``tfmr.``)."""

    def __init__(self, config: TurboT3Config):
        super().__init__()
        self.wpe = nn.Embedding(config.n_positions, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, embeds: Tensor, positions: Tensor, ctx: AttnContext) -> Tensor:
        """Add positions to ``embeds`` [B, L, D] (``positions`` [B, L]) and run the stack."""
        x = embeds + self.wpe(positions)
        for block in self.h:
            x = block(x, ctx)
        return self.ln_f(x)


class TurboCondEnc(nn.Module):
    """Turbo's conditioning encoder: only the speaker projection (no perceiver, no emotion)."""

    def __init__(self, config: TurboT3Config):
        super().__init__()
        self.spkr_enc = nn.Linear(config.speaker_embed_size, config.hidden_size)


class TurboT3Model(nn.Module):
    """The whole Turbo T3 network."""

    def __init__(self, config: TurboT3Config):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.cond_enc = TurboCondEnc(config)
        self.text_emb = nn.Embedding(config.text_vocab_size, dim)
        self.speech_emb = nn.Embedding(config.speech_vocab_size, dim)
        self.tfmr = GPT2Backbone(config)
        self.speech_head = nn.Linear(dim, config.speech_vocab_size, bias=True)

    @classmethod
    def from_safetensors(
        cls,
        path: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> TurboT3Model:
        """Load a ``t3_turbo_v1.safetensors`` checkpoint.

        Raises:
            ValueError: If the file's keys or shapes do not fit a Turbo T3 network.
        """
        path = Path(path)
        model = load_checkpoint(
            path,
            lambda shapes: cls(TurboT3Config.from_shapes(shapes)),
            kind="Chatterbox-Turbo T3",
            ignored=lambda key: key in IGNORED_KEYS or key.endswith(_IGNORED_SUFFIXES),
            device=device,
            dtype=dtype,
        )
        config = model.config
        logger.info(
            f"Loaded Turbo T3 from {path} ({config.n_layers} layers, hidden "
            f"{config.hidden_size}, {dtype}, {device})"
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

    def conditioning(self, speaker_emb: Tensor, prompt_speech_tokens: Tensor | None) -> Tensor:
        """Embed one voice: the speaker row, then the prompt speech tokens as they are.

        Args:
            speaker_emb: Voice-encoder embedding (any leading shape).
            prompt_speech_tokens: S3 prompt tokens (any leading shape), or None.

        Returns:
            Conditioning rows [1 + prompt tokens, D].
        """
        device, dtype = self.device, self.dtype
        speaker = speaker_emb.to(device=device, dtype=dtype).reshape(1, -1)
        rows = [self.cond_enc.spkr_enc(speaker)]
        if prompt_speech_tokens is not None and prompt_speech_tokens.numel() > 0:
            tokens = prompt_speech_tokens.to(device=device, dtype=torch.long).reshape(-1)
            rows.append(self.speech_emb(tokens))
        return torch.cat(rows, dim=0)

    def prompt_embeds(self, cond: Tensor, text_ids: Tensor) -> Tensor:
        """Lay out a prompt: conditioning, text, then one start-of-speech row (upstream's).

        Args:
            cond: Conditioning rows [C, D].
            text_ids: GPT-2 text ids [T] (no start or stop text tokens).

        Returns:
            Embeddings [C + T + 1, D] (positions are added by the backbone).
        """
        text = self.text_emb(text_ids.to(self.device))
        bos = self.speech_emb(torch.full((1,), START_SPEECH_TOKEN, device=self.device))
        return torch.cat([cond.to(self.dtype), text, bos], dim=0)

    def speech_embeds(self, tokens: Tensor) -> Tensor:
        """Embed generated speech tokens ([R] -> [R, D])."""
        return self.speech_emb(tokens)

    def logits(self, hidden: Tensor) -> Tensor:
        """Speech-head logits in float32."""
        return self.speech_head(hidden).float()

    # ---- backbone passes

    def _check_length(self, length: int) -> None:
        if length > self.config.n_positions:
            raise ValueError(f"sequence longer than GPT-2's {self.config.n_positions} positions")

    def forward_full(self, embeds: Tensor) -> Tensor:
        """Causal pass over whole sequences without a cache ([B, L, D] -> [B, L, D])."""
        b, n, _ = embeds.shape
        self._check_length(n)
        positions = torch.arange(n, device=embeds.device).expand(b, n)
        return self.tfmr(embeds.to(self.dtype), positions, AttnContext("full"))

    def prefill(
        self, embeds: Tensor, cache: T3KVCache, slots: Tensor, lengths: Tensor | None = None
    ) -> Tensor:
        """Run right-padded prompts [B, L, D], store their keys/values in ``slots``.

        Returns:
            The final hidden state of each row's last real position [B, D].
        """
        b, n, _ = embeds.shape
        self._check_length(n)
        positions = torch.arange(n, device=embeds.device).expand(b, n)
        ctx = AttnContext("prefill", cache=cache, slots=slots)
        hidden = self.tfmr(embeds.to(self.dtype), positions, ctx)
        if lengths is None:
            return hidden[:, -1]
        return hidden[torch.arange(b, device=hidden.device), lengths - 1]

    def decode(self, embeds: Tensor, positions: Tensor, cache: T3KVCache, kv_len: int) -> Tensor:
        """One token for each of the first ``R`` cache slots (row ``i`` is slot ``i``).

        Args:
            embeds: Token embeddings [R, D] (without positions).
            positions: Sequence position of each row's token [R].
            cache: The cache.
            kv_len: Keys to attend over, greater than every position.

        Returns:
            Final hidden states [R, D].
        """
        keys = torch.arange(kv_len, device=positions.device)
        mask = (keys[None, :] <= positions[:, None])[:, None, None, :]
        ctx = AttnContext("decode", cache=cache, positions=positions, mask=mask, kv_len=kv_len)
        return self.tfmr(embeds[:, None].to(self.dtype), positions[:, None], ctx)[:, 0]


def gelu_new(x: Tensor) -> Tensor:
    """GPT-2's ``gelu_new`` written out (the reference the tests compare ``F.gelu`` with)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
