"""Sidecar configuration, read from the environment once at start-up.

Every variable is validated here; a bad value stops the server with a message naming it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ENGINES = ("auto", "piper", "chatterbox")
#: The Chatterbox models one sidecar can serve (``TTS_MODEL``); the first is the default.
MODELS = ("chatterbox", "chatterbox-turbo", "chatterbox-multilingual")
T3_BACKENDS = ("auto", "vllm", "torch")
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """A configuration variable with a bad value."""


@dataclass(frozen=True)
class SidecarConfig:
    """Everything the sidecar reads from its environment.

    Parameters:
        host: Interface to listen on (``TTS_HOST``).
        port: TCP port (``TTS_PORT``).
        max_connections: Open websocket connections before upgrades get 503
            (``TTS_MAX_CONNECTIONS``).
        engine: ``auto``, ``piper`` or ``chatterbox`` (``TTS_ENGINE``).
        model: The Chatterbox model the ``chatterbox`` engine serves (``TTS_MODEL``):
            ``chatterbox`` (Original, English), ``chatterbox-turbo`` or
            ``chatterbox-multilingual``. One sidecar serves one model.
        multilingual_weights: Multilingual's T3 weights, ``v2`` (default) or ``v3``
            (``TTS_MULTILINGUAL_WEIGHTS``; only with ``TTS_MODEL=chatterbox-multilingual``).
        voices_dir: Registered voices (``TTS_VOICES_DIR``).
        log_dir: Log folder for ``tts.log`` (``TTS_LOG_DIR``).
        log_level: Loguru level (``TTS_LOG_LEVEL``).
        api_key: Bearer key required on every route but ``/health``, ``/health/live`` and
            ``/health/ready`` (``TTS_API_KEY``).
        chunk_size: Speech tokens per streamed S3Gen chunk (``TTS_CHUNK_SIZE``).
        context_window: Left-context tokens per S3Gen chunk (``TTS_CONTEXT_WINDOW``).
        streaming: Default for requests that do not say ``streaming`` (``TTS_STREAMING``).
        max_text_chars: Characters per context (``TTS_MAX_TEXT_CHARS``).
        max_frame_bytes: Largest client frame (``TTS_MAX_FRAME_BYTES``).
        max_contexts_per_connection: Open contexts per connection (``TTS_MAX_CONTEXTS``).
        engine_concurrency: Contexts generated at once, 0 for the engine's default
            (``TTS_ENGINE_CONCURRENCY``).
        model_dir: Chatterbox weights folder, or None to download (``TTS_MODEL_DIR``).
        t3_model_dir: vLLM model folder (``TTS_T3_MODEL_DIR``); by default ``t3-model/`` in a
            source checkout, else the engine's cache folder. Never relative to the CWD.
        t3_backend: ``auto`` (torch), ``vllm`` or ``torch`` (``TTS_T3_BACKEND``).
        device: Torch device for the chatterbox engine (``TTS_DEVICE``).
        flow_steps: S3Gen flow-matching steps, 0 for the model's own (10 for Chatterbox and
            Multilingual, 2 for Turbo's meanflow decoder) (``TTS_FLOW_STEPS``).
        first_chunk_size: New speech tokens in a context's first streamed chunk
            (``TTS_FIRST_CHUNK_SIZE``).
        reference_seconds: Cap on the S3Gen reference prompt, 0 for the engine's default (4 s on
            CUDA, 10 s on CPU) (``TTS_REFERENCE_SECONDS``).
        compile_flow: ``torch.compile`` S3Gen's flow estimator on CUDA (``TTS_COMPILE_FLOW``;
            experimental: on an H100 machine the compile had not finished after 320 s, so its
            speed-up is unmeasured; see ``benchmarks/NOTES.md``).
        piper_model: Piper ``.onnx`` voice, or None for the bundled one (``TTS_PIPER_MODEL``).
        max_streams: Contexts open across all connections (and HTTP syntheses) before new ones
            get ``busy`` and ``/health/ready`` answers 503; 0 for the engine's capacity
            (``TTS_MAX_STREAMS``; ``TTS_MAX_ACTIVE_CONTEXTS`` is its old name).
        overload_hold_seconds: After the engine gave a playing stream its audio late (it fell
            behind), how long new streams get ``busy`` and ``/health/ready`` answers 503; 0
            never; None for the engine's default (the chatterbox engine: 5 s on CUDA, never
            on the CPU) (``TTS_OVERLOAD_HOLD_SECONDS``).
        context_idle_seconds: An open context with no text and no flush for this long is ended
            with ``timeout`` (``TTS_CONTEXT_IDLE_SECONDS``).
        max_voices: Registered voices the store holds (``TTS_MAX_VOICES``).
        max_audio_seconds: Audio one context may produce; text estimated to need more gets
            ``text_too_long`` (``TTS_MAX_AUDIO_SECONDS``).
        drain_seconds: On SIGTERM, how long in-flight contexts may finish (``TTS_DRAIN_SECONDS``).
        stall_seconds: A client that takes longer to accept audio is cut off
            (``TTS_STALL_SECONDS``).
        idle_seconds: A connection with no open context and no message for this long is closed
            (``TTS_IDLE_SECONDS``).
    """

    host: str = "0.0.0.0"
    port: int = 8002
    max_connections: int = 50
    engine: str = "auto"
    model: str = "chatterbox"
    multilingual_weights: str = "v2"
    voices_dir: Path = field(default_factory=lambda: Path("voices"))
    log_dir: Path = field(default_factory=lambda: Path("logs"))
    log_level: str = "INFO"
    api_key: str | None = None
    chunk_size: int = 25
    context_window: int = 50
    streaming: bool = True
    max_text_chars: int = 20_000
    max_frame_bytes: int = 16 * 1024 * 1024
    max_contexts_per_connection: int = 16
    engine_concurrency: int = 0
    model_dir: Path | None = None
    t3_model_dir: Path | None = None
    t3_backend: str = "auto"
    device: str = "auto"
    flow_steps: int = 0
    piper_model: Path | None = None
    first_chunk_size: int = 12
    reference_seconds: float = 0.0
    compile_flow: bool = False
    max_streams: int = 0
    overload_hold_seconds: float | None = None
    context_idle_seconds: float = 60.0
    max_voices: int = 1000
    max_audio_seconds: float = 3600.0
    drain_seconds: float = 30.0
    stall_seconds: float = 10.0
    idle_seconds: float = 300.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SidecarConfig:
        """Read and validate the configuration.

        Args:
            env: The environment; ``os.environ`` by default.

        Returns:
            The configuration.

        Raises:
            ConfigError: Naming the first variable with a bad value.
        """
        env = os.environ if env is None else env
        r = _Reader(env)
        checkout = Path(__file__).resolve().parents[2]
        default_t3_dir = checkout / "t3-model" if (checkout / "pyproject.toml").is_file() else None
        config = cls(
            host=r.str("TTS_HOST", "0.0.0.0"),
            port=r.int("TTS_PORT", 8002, 0, 65535),
            max_connections=r.int("TTS_MAX_CONNECTIONS", 50, 1, 100_000),
            engine=r.choice("TTS_ENGINE", "auto", ENGINES),
            model=r.choice("TTS_MODEL", MODELS[0], MODELS),
            multilingual_weights=r.choice("TTS_MULTILINGUAL_WEIGHTS", "v2", ("v2", "v3")),
            voices_dir=r.path("TTS_VOICES_DIR", Path("voices")),
            log_dir=r.path("TTS_LOG_DIR", Path("logs")),
            log_level=r.choice("TTS_LOG_LEVEL", "INFO", LOG_LEVELS, upper=True),
            api_key=r.str("TTS_API_KEY", "") or None,
            chunk_size=r.int("TTS_CHUNK_SIZE", 25, 10, 500),
            context_window=r.int("TTS_CONTEXT_WINDOW", 50, 0, 1000),
            streaming=r.bool("TTS_STREAMING", True),
            max_text_chars=r.int("TTS_MAX_TEXT_CHARS", 20_000, 1, 10_000_000),
            max_frame_bytes=r.int("TTS_MAX_FRAME_BYTES", 16 * 1024 * 1024, 1024, 1 << 30),
            max_contexts_per_connection=r.int("TTS_MAX_CONTEXTS", 16, 1, 10_000),
            engine_concurrency=r.int("TTS_ENGINE_CONCURRENCY", 0, 0, 10_000),
            model_dir=r.path("TTS_MODEL_DIR", None),
            t3_model_dir=r.path("TTS_T3_MODEL_DIR", default_t3_dir),
            t3_backend=r.choice("TTS_T3_BACKEND", "auto", T3_BACKENDS),
            device=r.str("TTS_DEVICE", "auto"),
            flow_steps=r.int("TTS_FLOW_STEPS", 0, 0, 100),
            piper_model=r.path("TTS_PIPER_MODEL", None),
            first_chunk_size=r.int("TTS_FIRST_CHUNK_SIZE", 12, 7, 500),
            reference_seconds=r.float("TTS_REFERENCE_SECONDS", 0.0, 0.0, 10.0),
            compile_flow=r.bool("TTS_COMPILE_FLOW", False),
            max_streams=r.int(
                "TTS_MAX_STREAMS", r.int("TTS_MAX_ACTIVE_CONTEXTS", 0, 0, 1_000_000), 0, 1_000_000
            ),
            overload_hold_seconds=r.optional_float("TTS_OVERLOAD_HOLD_SECONDS", 0.0, 3600.0),
            context_idle_seconds=r.float("TTS_CONTEXT_IDLE_SECONDS", 60.0, 0.5, 86400.0),
            max_voices=r.int("TTS_MAX_VOICES", 1000, 1, 1_000_000),
            max_audio_seconds=r.float("TTS_MAX_AUDIO_SECONDS", 3600.0, 1.0, 86400.0),
            drain_seconds=r.float("TTS_DRAIN_SECONDS", 30.0, 0.0, 3600.0),
            stall_seconds=r.float("TTS_STALL_SECONDS", 10.0, 0.1, 3600.0),
            idle_seconds=r.float("TTS_IDLE_SECONDS", 300.0, 1.0, 86400.0),
        )
        _check_cuda_visible_devices(env.get("CUDA_VISIBLE_DEVICES"))
        if config.host.strip() == "":
            raise ConfigError("TTS_HOST must not be empty")
        if config.piper_model is not None and not config.piper_model.is_file():
            raise ConfigError(f"TTS_PIPER_MODEL: no such file: {config.piper_model}")
        if config.first_chunk_size > config.chunk_size:
            raise ConfigError("TTS_FIRST_CHUNK_SIZE must not exceed TTS_CHUNK_SIZE")
        if config.engine == "piper" and config.model != MODELS[0]:
            raise ConfigError(
                f"TTS_MODEL={config.model} needs TTS_ENGINE=chatterbox (or auto), not piper"
            )
        if r.str("TTS_MULTILINGUAL_WEIGHTS", "") and config.model != "chatterbox-multilingual":
            raise ConfigError(
                "TTS_MULTILINGUAL_WEIGHTS chooses the weights of TTS_MODEL=chatterbox-multilingual;"
                f" this sidecar serves {config.model}"
            )
        if config.model_dir is not None and not config.model_dir.is_dir():
            raise ConfigError(f"TTS_MODEL_DIR: no such folder: {config.model_dir}")
        return config

    def limits(self) -> dict[str, float]:
        """Returns: the limits the server enforces, as announced in ``ready.limits``."""
        return {
            "max_text_chars": self.max_text_chars,
            "max_frame_bytes": self.max_frame_bytes,
            "max_contexts_per_connection": self.max_contexts_per_connection,
            "min_reference_seconds": 3,
            "max_reference_seconds": 30,
            "idle_timeout_seconds": self.idle_seconds,
            "stall_timeout_seconds": self.stall_seconds,
            "context_idle_timeout_seconds": self.context_idle_seconds,
            "max_audio_seconds": self.max_audio_seconds,
            "max_voices": self.max_voices,
        }


class _Reader:
    def __init__(self, env: Mapping[str, str]):
        self._env = env

    def _raw(self, name: str) -> str | None:
        value = self._env.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def str(self, name: str, default: str) -> str:
        value = self._raw(name)
        return default if value is None else value

    def int(self, name: str, default: int, low: int, high: int) -> int:
        value = self._raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
        if not low <= number <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {number}")
        return number

    def optional_float(self, name: str, low: float, high: float) -> float | None:
        return None if self._raw(name) is None else self.float(name, 0.0, low, high)

    def float(self, name: str, default: float, low: float, high: float) -> float:
        value = self._raw(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if not low <= number <= high:
            raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {number:g}")
        return number

    def bool(self, name: str, default: bool) -> bool:
        value = self._raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")

    def choice(self, name: str, default: str, choices: tuple[str, ...], upper=False) -> str:
        value = self._raw(name)
        if value is None:
            return default
        value = value.upper() if upper else value.lower()
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value

    def path(self, name: str, default: Path | None) -> Path | None:
        value = self._raw(name)
        return default if value is None else Path(value).expanduser()


_CUDA_DEVICES = re.compile(r"^(-1|[0-9]+|GPU-[0-9a-fA-F-]+|MIG-[0-9a-zA-Z/-]+)$")


def _check_cuda_visible_devices(value: str | None) -> None:
    if value is None or value.strip() == "":
        return
    for item in value.split(","):
        if not _CUDA_DEVICES.match(item.strip()):
            raise ConfigError(
                f"CUDA_VISIBLE_DEVICES must be a comma-separated list of GPU indices or UUIDs, "
                f"got {value!r}"
            )
