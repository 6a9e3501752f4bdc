"""Configuration from the environment, and start-up failures that name the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from chatterbox_sidecar.config import ConfigError, SidecarConfig


def test_defaults_match_the_deployment_guide():
    config = SidecarConfig.from_env({})
    assert (config.host, config.port, config.max_connections) == ("0.0.0.0", 8002, 50)
    assert (config.engine, config.chunk_size, config.context_window) == ("auto", 25, 50)
    assert config.voices_dir == Path("voices") and config.log_dir == Path("logs")
    assert config.api_key is None
    # in a checkout, t3-model/ beside pyproject.toml; never relative to the current directory
    assert config.t3_model_dir == Path(__file__).resolve().parents[1] / "t3-model"


def test_model_is_validated_and_one_sidecar_serves_one():
    from chatterbox_sidecar.engines import resolve_engine_name

    assert SidecarConfig.from_env({}).model == "chatterbox"
    assert SidecarConfig.from_env({}).flow_steps == 0  # the model's own: 10, Turbo 2
    turbo = SidecarConfig.from_env({"TTS_MODEL": "Chatterbox-Turbo"})
    assert turbo.model == "chatterbox-turbo"
    assert resolve_engine_name(turbo) == "chatterbox"  # never replaced by piper
    with pytest.raises(ConfigError, match="TTS_MODEL must be one of"):
        SidecarConfig.from_env({"TTS_MODEL": "chatterbox-nano"})
    with pytest.raises(ConfigError, match="TTS_MODEL=chatterbox-multilingual needs"):
        SidecarConfig.from_env({"TTS_MODEL": "chatterbox-multilingual", "TTS_ENGINE": "piper"})


def test_values_are_read():
    config = SidecarConfig.from_env(
        {
            "TTS_PORT": "9000",
            "TTS_ENGINE": "PIPER",
            "TTS_API_KEY": "k",
            "TTS_STREAMING": "false",
            "TTS_CHUNK_SIZE": "12",
            "CUDA_VISIBLE_DEVICES": "0,1",
        }
    )
    assert (config.port, config.engine, config.api_key) == (9000, "piper", "k")
    assert config.streaming is False and config.chunk_size == 12


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TTS_PORT", "eighty"),
        ("TTS_PORT", "70000"),
        ("TTS_MAX_CONNECTIONS", "0"),
        ("TTS_ENGINE", "espeak"),
        ("TTS_CHUNK_SIZE", "-3"),
        ("TTS_CONTEXT_WINDOW", "1.5"),
        ("TTS_STREAMING", "maybe"),
        ("TTS_T3_BACKEND", "onnx"),
        ("TTS_LOG_LEVEL", "LOUD"),
        ("CUDA_VISIBLE_DEVICES", "zero"),
        ("TTS_MODEL_DIR", "/no/such/folder"),
        ("TTS_FIRST_CHUNK_SIZE", "3"),
        ("TTS_REFERENCE_SECONDS", "12"),
    ],
)
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        SidecarConfig.from_env({name: value})


def test_first_chunk_cannot_exceed_the_chunk():
    with pytest.raises(ConfigError, match="TTS_FIRST_CHUNK_SIZE"):
        SidecarConfig.from_env({"TTS_CHUNK_SIZE": "12", "TTS_FIRST_CHUNK_SIZE": "20"})


def test_bad_value_stops_the_server_at_start(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "chatterbox_sidecar"],
        env={"PATH": "/usr/bin:/bin", "TTS_PORT": "not-a-port", "TTS_LOG_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "TTS_PORT" in proc.stderr
