"""Model files: finding or fetching the weights, the vLLM model folder, token budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chatterbox_sidecar.engines.chatterbox import model_files
from chatterbox_sidecar.engines.chatterbox.model_files import (
    MODEL_FILES,
    REVISION,
    ModelFilesError,
    ensure_vllm_model_dir,
    max_model_len,
    resolve_model_dir,
    speech_token_budget,
)

from .t3_checkpoint import real_tokenizer_path

pytestmark = pytest.mark.torch


def fill(folder: Path, names=MODEL_FILES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name == "tokenizer.json":
            (folder / name).write_bytes(real_tokenizer_path().read_bytes())
        else:
            (folder / name).write_bytes(b"weights of " + name.encode())
    return folder


def test_model_dir_with_all_files(tmp_path):
    folder = fill(tmp_path / "m")
    assert resolve_model_dir(folder) == folder


def test_incomplete_model_dir_names_the_missing_files_and_both_options(tmp_path):
    folder = fill(tmp_path / "m", [n for n in MODEL_FILES if n != "conds.pt"])
    with pytest.raises(ModelFilesError) as err:
        resolve_model_dir(folder)
    text = str(err.value)
    assert "conds.pt" in text and "s3gen.safetensors" not in text.split("lacks")[1].split(".")[0]
    assert "TTS_MODEL_DIR" in text and "download" in text and "ResembleAI/chatterbox" in text
    with pytest.raises(ModelFilesError, match="TTS_MODEL_DIR"):
        resolve_model_dir(tmp_path / "nowhere")


def test_failed_download_names_both_options(tmp_path):
    # Offline with an empty cache (as on a machine without network).
    with pytest.raises(ModelFilesError) as err:
        resolve_model_dir(None, cache_dir=tmp_path / "hf", local_files_only=True)
    text = str(err.value)
    assert "TTS_MODEL_DIR" in text and "Hugging Face" in text and REVISION[:12] in text


def test_cached_download_is_used_offline(tmp_path):
    cache = tmp_path / "hf"
    snap = fill(cache / "models--ResembleAI--chatterbox" / "snapshots" / REVISION)
    (cache / "models--ResembleAI--chatterbox" / "refs").mkdir()
    folder = resolve_model_dir(None, cache_dir=cache, local_files_only=True)
    assert folder.resolve() == snap.resolve()


def test_vllm_model_dir_is_created_and_repaired(tmp_path, monkeypatch):
    weights = fill(tmp_path / "weights")
    other = fill(tmp_path / "other")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    t3 = tmp_path / "deploy" / "t3-model"

    folder = ensure_vllm_model_dir(t3, weights)
    assert folder == t3.resolve()
    assert list(cwd.iterdir()) == []  # nothing lands in the working directory
    config = json.loads((t3 / "config.json").read_text())
    assert config["architectures"] == ["ChatterboxT3"]
    assert config["hidden_size"] == 2048 and config["num_hidden_layers"] == 30
    assert config["rope_scaling"]["rope_type"] == "llama3"
    assert (t3 / "tokenizer.json").read_bytes() == real_tokenizer_path().read_bytes()
    link = t3 / "model.safetensors"
    assert link.resolve() == (weights / "t3_cfg.safetensors").resolve()
    stamp = (t3 / "config.json").stat().st_mtime_ns

    # A second call leaves a good folder alone.
    ensure_vllm_model_dir(t3, weights)
    assert (t3 / "config.json").stat().st_mtime_ns == stamp

    # Stale link (other weights), broken config, altered tokenizer: all repaired.
    link.unlink()
    link.symlink_to(other / "t3_cfg.safetensors")
    (t3 / "config.json").write_text("{not json")
    (t3 / "tokenizer.json").write_text("{}")
    ensure_vllm_model_dir(t3, weights)
    assert link.resolve() == (weights / "t3_cfg.safetensors").resolve()
    assert json.loads((t3 / "config.json").read_text()) == model_files.VLLM_CONFIG
    assert (t3 / "tokenizer.json").read_bytes() == real_tokenizer_path().read_bytes()

    # Broken link (weights moved) and a plain file in its place.
    link.unlink()
    link.symlink_to(tmp_path / "gone.safetensors")
    ensure_vllm_model_dir(t3, weights)
    assert link.resolve() == (weights / "t3_cfg.safetensors").resolve()
    link.unlink()
    link.write_bytes(b"old copy")
    ensure_vllm_model_dir(t3, weights)
    assert link.read_bytes() == (weights / "t3_cfg.safetensors").read_bytes()
    assert not [p for p in t3.iterdir() if p.name.endswith(".tmp")]


def test_vllm_model_dir_needs_the_weights(tmp_path):
    weights = fill(tmp_path / "w", ["tokenizer.json"])
    with pytest.raises(ModelFilesError, match="t3_cfg.safetensors"):
        ensure_vllm_model_dir(tmp_path / "t3", weights)


def test_speech_token_budget_follows_text_length():
    short, medium = speech_token_budget("Hi."), speech_token_budget("x" * 140)
    assert 25 <= short <= 150  # a second or two of speech plus slack
    assert 10 * 25 < medium < 2 * 10 * 25 + 100  # ~10 s expected at ~25 tokens/s, with margin
    assert speech_token_budget("x" * 2000) == 1000  # capped
    assert speech_token_budget("x" * 2000, max_tokens=600) == 600
    lengths = [speech_token_budget("x" * n) for n in range(0, 400, 7)]
    assert lengths == sorted(lengths)


def test_max_model_len_covers_the_longest_segment():
    n = max_model_len(300)
    assert n >= 34 + 302 + 1 + speech_token_budget("x" * 300)
    assert n <= 34 + 300 + 20 + 1000
    assert max_model_len(300, max_speech_tokens=200) == n - speech_token_budget("x" * 300) + 200
    assert max_model_len(100) < n
