"""Loading S3Gen (``s3gen.safetensors``) and the voice encoder (``ve.safetensors``).

Both model classes come from chatterbox-vllm (``chatterbox_vllm.models``), which import without
vLLM. The checkpoints are upstream Chatterbox's; S3Gen's also holds the S3 tokenizer and the
CAMPPlus speaker encoder used to compute voice conditionals.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from loguru import logger

S3GEN_FILE = "s3gen.safetensors"
VE_FILE = "ve.safetensors"
# Buffers the S3 tokenizer builds itself; upstream checkpoints do not carry them.
TOKENIZER_BUFFERS = frozenset({"tokenizer._mel_filters", "tokenizer.window"})


def load_s3gen(path: Path, device: str | torch.device = "cpu", dtype=torch.float32):
    """Build S3Gen and load its checkpoint.

    Args:
        path: ``s3gen.safetensors``.
        device: Device to run on.
        dtype: Floating dtype (upstream runs S3Gen in float32).

    Returns:
        The model (``chatterbox_vllm.models.s3gen.S3Gen``), in eval mode.

    Raises:
        ValueError: If the checkpoint lacks parameters the model needs or holds unknown ones.
    """
    from chatterbox_vllm.models.s3gen import S3Gen
    from safetensors.torch import load_file

    started = time.monotonic()
    model = S3Gen()
    load_s3gen_state(model, load_file(str(path)), path, "an S3Gen")
    model = model.to(device=device, dtype=dtype).eval()
    logger.info(f"S3Gen loaded from {path} in {time.monotonic() - started:.1f} s")
    return model


def load_s3gen_state(model: torch.nn.Module, state: dict, path: Path, kind: str) -> None:
    """Load a checkpoint's tensors into an S3Gen, all of them and nothing else.

    The S3 tokenizer's buffers (mel filters, window) are built by the model, not stored.

    Raises:
        ValueError: ``"{path}: not {kind} checkpoint (...)"`` when parameters are missing or
            unknown.
    """
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in TOKENIZER_BUFFERS]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: not {kind} checkpoint (missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )


def load_voice_encoder(path: Path, device: str | torch.device = "cpu"):
    """Build the voice encoder and load ``ve.safetensors``.

    Args:
        path: The checkpoint.
        device: Device to run on.

    Returns:
        The model (``chatterbox_vllm.models.voice_encoder.VoiceEncoder``), in eval mode.
    """
    from chatterbox_vllm.models.voice_encoder import VoiceEncoder
    from safetensors.torch import load_file

    model = VoiceEncoder()
    model.load_state_dict(load_file(str(path)))
    return model.to(device=device).eval()
