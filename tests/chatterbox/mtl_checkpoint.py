"""Write Chatterbox Multilingual model files for tests, in the real layout.

A multilingual folder (``ResembleAI/chatterbox`` at the multilingual pin) holds
``t3_mtl23ls_v2.safetensors`` (the Original's T3 keys, text embedding and head 2454 rows wide),
``grapheme_mtl_merged_expanded_v1.json`` (the real one, shipped in chatterbox-vllm),
``Cangjie5_TC.json`` (a JSON list of ``"<character>\\t<code>"`` entries; a few real-format
entries here), and the Original's ``s3gen.safetensors``, ``ve.safetensors`` and ``conds.pt``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import save_file

from .t3_checkpoint import random_t3_state, scripted_t3_state

TEXT_VOCAB = 2454
T3_FILE = "t3_mtl23ls_v2.safetensors"
TOKENIZER_FILE = "grapheme_mtl_merged_expanded_v1.json"
# Real Cangjie 5 codes; 妳 shares 好's code "vnd", so it is spelled with index 1.
CANGJIE_ENTRIES = ["你\tonf", "好\tvnd", "妳\tvnd", "世\tpt", "界\twol", "我\thqi"]


def real_mtl_tokenizer_path() -> Path:
    """The multilingual tokenizer shipped in chatterbox-vllm (found without importing vLLM)."""
    spec = importlib.util.find_spec("chatterbox_vllm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("chatterbox-vllm is not installed: it ships the multilingual tokenizer")
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / "models" / "t3" / TOKENIZER_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing")
    return path


def write_mtl_tokenizer_files(folder: Path) -> Path:
    """Write the tokenizer and a small ``Cangjie5_TC.json`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(real_mtl_tokenizer_path(), folder / TOKENIZER_FILE)
    text = json.dumps(CANGJIE_ENTRIES, ensure_ascii=False)
    (folder / "Cangjie5_TC.json").write_text(text, encoding="utf-8")
    return folder


def write_mtl_t3(
    folder: Path, script: Sequence[int] | None, t3_file: str = T3_FILE, **t3_options
) -> Path:
    """Write a multilingual T3 (2454-entry text vocabulary) as ``folder / t3_file``: scripted
    (see ``t3_checkpoint.scripted_t3_state``), or without ``script`` random, full size unless
    ``t3_options`` narrow it. Returns the file."""
    if script is None:
        state = random_t3_state(text_vocab=TEXT_VOCAB, **t3_options)
    else:
        state = scripted_t3_state(script, text_vocab=TEXT_VOCAB, **t3_options)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / t3_file))
    return folder / t3_file


def write_mtl_model_dir(
    model_dir: str | Path, s3gen_model_dir: Path, script: Sequence[int] | None, **t3_options
) -> Path:
    """A whole multilingual folder: the T3 of :func:`write_mtl_t3`, the tokenizer files, and
    the S3Gen, voice-encoder and conds files of ``s3gen_model_dir`` (linked)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in ("s3gen.safetensors", "ve.safetensors", "conds.pt"):
        (model_dir / name).symlink_to(s3gen_model_dir / name)
    write_mtl_t3(model_dir, script, **t3_options)
    return write_mtl_tokenizer_files(model_dir)
