"""Chatterbox model files: find or download the weights, keep the vLLM model folder in shape.

- :func:`resolve_model_dir`: ``TTS_MODEL_DIR`` (a folder with the five files), else a one-time
  ``huggingface_hub`` download of ``ResembleAI/chatterbox`` at a pinned revision.
- :func:`ensure_vllm_model_dir`: creates and repairs the folder vLLM loads T3 from
  (``config.json``, ``tokenizer.json``, ``model.safetensors`` link); never relative to the CWD.
- :func:`speech_token_budget` and :func:`max_model_len`: how many speech tokens a text segment
  may take, and the vLLM context length that follows from the longest segment.
"""

from __future__ import annotations

import filecmp
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from loguru import logger

REPO_ID = "ResembleAI/chatterbox"
#: The revision chatterbox-vllm 0.2.1 pins for the English model.
REVISION = "1b475dffa71fb191cb6d5901215eb6f55635a9b6"
MODEL_FILES = (
    "t3_cfg.safetensors",
    "s3gen.safetensors",
    "ve.safetensors",
    "tokenizer.json",
    "conds.pt",
)

#: Conditioning rows in front of the text (speaker + 32 perceiver rows + emotion).
CONDITIONING_LEN = 34
#: Speech tokens per second of audio.
TOKENS_PER_SECOND = 25
#: Default cap on one segment's speech tokens (40 s, upstream's ``max_new_tokens``).
DEFAULT_MAX_SPEECH_TOKENS = 1000

#: Llama_520M as chatterbox-vllm's model expects it. ``hidden_size`` is 2048 on purpose: its
#: guidance trick carries the conditional and unconditional rows side by side, and the model
#: sets the backbone back to 1024 when it is built.
VLLM_CONFIG: dict[str, Any] = {
    "architectures": ["ChatterboxT3"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_implementation": "sdpa",
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 16,
    "num_hidden_layers": 30,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 8,
}


class ModelFilesError(RuntimeError):
    """The Chatterbox weights cannot be found or fetched."""


def _missing(folder: Path, files: tuple[str, ...] = MODEL_FILES) -> list[str]:
    return [name for name in files if not (folder / name).is_file()]


def resolve_model_dir(
    model_dir: str | Path | None = None,
    *,
    repo_id: str = REPO_ID,
    revision: str = REVISION,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    local_files_only: bool = False,
    files: tuple[str, ...] = MODEL_FILES,
) -> Path:
    """Find the folder holding the five Chatterbox files, downloading them if needed.

    Args:
        model_dir: ``TTS_MODEL_DIR``: a local folder with all of :data:`MODEL_FILES`; None to
            use the Hugging Face cache (downloading once, with progress bars).
        repo_id: Hugging Face repository.
        revision: Pinned commit.
        cache_dir: Hugging Face cache folder (default: ``HF_HOME``'s).
        endpoint: Hub endpoint (default: ``HF_ENDPOINT`` or huggingface.co).
        local_files_only: Only look in the cache.
        files: The files the model needs (another model's, see ``models.ModelSpec.files``).

    Returns:
        The folder with the files.

    Raises:
        ModelFilesError: Neither the folder nor the download gives all files; the message
            names both ways to provide them.
    """
    how = (
        f"Either set TTS_MODEL_DIR to a folder holding {', '.join(files)}, or leave it "
        f"unset and allow the one-time download of {repo_id}@{revision[:12]} from the Hugging "
        f"Face Hub (network access; cached under HF_HOME)."
    )
    if model_dir is not None:
        folder = Path(model_dir).expanduser()
        missing = _missing(folder, files) if folder.is_dir() else list(files)
        if missing:
            raise ModelFilesError(f"TTS_MODEL_DIR={folder} lacks {', '.join(missing)}. {how}")
        logger.info(f"Chatterbox weights from TTS_MODEL_DIR={folder}")
        return folder
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelFilesError(f"huggingface_hub is not installed (gpu extra). {how}") from exc
    logger.info(
        f"Fetching Chatterbox weights {repo_id}@{revision[:12]} (cached after the first time)"
    )
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=list(files),
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            endpoint=endpoint,
            local_files_only=local_files_only,
        )
    except Exception as exc:  # noqa: BLE001 - network, auth and cache errors all end here
        raise ModelFilesError(
            f"Could not download the Chatterbox weights ({type(exc).__name__}: {exc}). {how}"
        ) from exc
    folder = Path(path)
    missing = _missing(folder, files)
    if missing:
        raise ModelFilesError(f"The download in {folder} lacks {', '.join(missing)}. {how}")
    return folder


def ensure_vllm_model_dir(
    t3_model_dir: str | Path, model_dir: str | Path, *, t3_weights: str = "t3_cfg.safetensors"
) -> Path:
    """Create or repair the folder vLLM loads chatterbox-vllm's T3 from.

    Writes ``config.json`` (when absent or different), copies ``tokenizer.json`` (when absent
    or different) and points ``model.safetensors`` at the T3 weights (replacing a broken,
    stale or non-link entry; falls back to a copy where links are not possible).

    Args:
        t3_model_dir: The vLLM model folder (``TTS_T3_MODEL_DIR``; absolute, not CWD-relative).
        model_dir: The folder with the Chatterbox files (see :func:`resolve_model_dir`).
        t3_weights: T3 weights file name in ``model_dir``.

    Returns:
        The vLLM model folder.
    """
    folder = Path(t3_model_dir).expanduser().resolve()
    source = Path(model_dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)

    config_path = folder / "config.json"
    current = None
    if config_path.is_file():
        try:
            current = json.loads(config_path.read_text())
        except (OSError, ValueError):
            current = None
    if current != VLLM_CONFIG:
        _atomic_write_text(config_path, json.dumps(VLLM_CONFIG, indent=2) + "\n")
        logger.info(f"Wrote {config_path}")

    tokenizer = folder / "tokenizer.json"
    if not tokenizer.is_file() or not filecmp.cmp(tokenizer, source / "tokenizer.json", False):
        tmp = tokenizer.with_suffix(".json.tmp")
        shutil.copyfile(source / "tokenizer.json", tmp)
        os.replace(tmp, tokenizer)
        logger.info(f"Copied tokenizer.json into {folder}")

    target = source / t3_weights
    if not target.is_file():
        raise ModelFilesError(f"{target} does not exist")
    link = folder / "model.safetensors"
    if not _links_to(link, target):
        _replace_with_link(link, target)
        logger.info(f"Linked {link} -> {target}")
    return folder


def _links_to(link: Path, target: Path) -> bool:
    if link.is_symlink():
        try:
            return link.resolve(strict=True) == target.resolve()
        except OSError:
            return False
    if link.is_file():  # a copy or hard link made where symlinks fail
        try:
            same = link.samefile(target)
        except OSError:
            same = False
        return same or (
            link.stat().st_size == target.stat().st_size
            and link.stat().st_mtime >= target.stat().st_mtime
        )
    return False


def _replace_with_link(link: Path, target: Path) -> None:
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(target)
    except OSError:
        try:
            os.link(target, tmp)
        except OSError:
            shutil.copyfile(target, tmp)
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    os.replace(tmp, link)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def speech_token_budget(
    text: str,
    *,
    chars_per_second: float = 14.0,
    margin: float = 1.5,
    extra_seconds: float = 2.0,
    max_tokens: int = DEFAULT_MAX_SPEECH_TOKENS,
) -> int:
    """Speech tokens a text segment may take before it is cut off.

    Expected speech is ``spoken_length(text) / chars_per_second`` seconds (English at an
    ordinary pace is 13-16 characters a second; a CJK ideograph counts as 3 characters, kana
    and Hangul as 2, see ``text.spoken_length``); the budget allows ``margin`` times that plus
    ``extra_seconds``, at 25 tokens a second, capped at ``max_tokens``. So a missed stop token
    costs a few seconds of babble, not 40.

    Args:
        text: The segment.
        chars_per_second: Assumed speaking rate.
        margin: Factor on the expected duration.
        extra_seconds: Added slack for pauses and short texts.
        max_tokens: Hard cap.

    Returns:
        The budget in tokens.
    """
    from chatterbox_sidecar.text import spoken_length

    seconds = spoken_length(text.strip()) / chars_per_second * margin + extra_seconds
    return max(1, min(max_tokens, math.ceil(seconds * TOKENS_PER_SECOND)))


def max_model_len(
    max_segment_chars: int = 300, max_speech_tokens: int = DEFAULT_MAX_SPEECH_TOKENS
) -> int:
    """Context length (vLLM ``max_model_len``) for segments up to ``max_segment_chars`` long.

    The prompt is the conditioning, the text tokens (at most one per character, plus start,
    stop and a little room for punctuation clean-up) and start-of-speech; the speech part is the
    budget of the longest segment (:func:`speech_token_budget`, capped at ``max_speech_tokens``).

    Args:
        max_segment_chars: Longest text segment the engine sends.
        max_speech_tokens: Cap on one segment's speech tokens.

    Returns:
        The context length.
    """
    prompt = CONDITIONING_LEN + max_segment_chars + 8 + 1
    longest = speech_token_budget("x" * max_segment_chars, max_tokens=max_speech_tokens)
    return prompt + longest
