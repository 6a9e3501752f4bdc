"""Random S3Gen, voice-encoder and conds.pt files in upstream Chatterbox's layout.

The weights are random (seeded) but every key and shape is the real model's, so the engine's
own loader (``s3gen_loader``) loads them exactly as it loads the published checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

TOKENIZER_BUFFERS = ("tokenizer._mel_filters", "tokenizer.window")


def write_random_s3gen_checkpoint(model_dir: Path, seed: int = 0) -> Path:
    """Write ``s3gen.safetensors`` (full size, ~1 GB) with seeded random weights."""
    from chatterbox_vllm.models.s3gen import S3Gen

    torch.manual_seed(seed)
    model = S3Gen()
    state = {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if k not in TOKENIZER_BUFFERS  # upstream's file does not carry them
    }
    path = Path(model_dir) / "s3gen.safetensors"
    save_file(state, str(path))
    return path


def write_random_ve_checkpoint(model_dir: Path, seed: int = 0) -> Path:
    """Write ``ve.safetensors`` with seeded random weights."""
    from chatterbox_vllm.models.voice_encoder import VoiceEncoder

    torch.manual_seed(seed)
    state = {k: v.detach().contiguous() for k, v in VoiceEncoder().state_dict().items()}
    path = Path(model_dir) / "ve.safetensors"
    save_file(state, str(path))
    return path


def write_random_conds(model_dir: Path, seed: int = 0, prompt_seconds: float = 2.0) -> Path:
    """Write the model's default ``conds.pt`` in upstream's layout, with random content.

    The real file prompts S3Gen with 10 s of reference; tests use ``prompt_seconds`` to keep
    CPU decoding fast.
    """
    g = torch.Generator().manual_seed(seed)
    n = int(prompt_seconds * 25)
    data = {
        "t3": {
            "speaker_emb": torch.randn(1, 256, generator=g).abs() / 16,
            "clap_emb": None,
            "cond_prompt_speech_tokens": torch.randint(0, 6561, (1, 150), generator=g),
            "cond_prompt_speech_emb": None,
            "emotion_adv": 0.5 * torch.ones(1, 1, 1),
        },
        "gen": {
            "prompt_token": torch.randint(0, 6561, (1, n), generator=g),
            "prompt_token_len": torch.tensor([n]),
            "prompt_feat": torch.randn(1, 2 * n, 80, generator=g) - 5.0,
            "prompt_feat_len": None,
            "embedding": torch.randn(1, 192, generator=g),
        },
    }
    path = Path(model_dir) / "conds.pt"
    torch.save(data, path)
    return path


def write_random_s3gen_model_dir(model_dir: Path, seed: int = 0) -> Path:
    """Write S3Gen, the voice encoder and ``conds.pt`` into ``model_dir``."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    write_random_s3gen_checkpoint(model_dir, seed)
    write_random_ve_checkpoint(model_dir, seed)
    write_random_conds(model_dir, seed)
    return model_dir
