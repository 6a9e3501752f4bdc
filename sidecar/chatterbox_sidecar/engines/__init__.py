"""Engines behind the sidecar, and the factory that picks one from the configuration."""

from __future__ import annotations

import importlib.util

from loguru import logger

from chatterbox_sidecar.config import SidecarConfig
from chatterbox_sidecar.engines.base import Engine, EngineError, EngineInfo, UnsupportedError

__all__ = ["Engine", "EngineError", "EngineInfo", "UnsupportedError", "create_engine"]


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def resolve_engine_name(config: SidecarConfig) -> str:
    """Decide which engine ``auto`` means on this machine.

    Args:
        config: The configuration.

    Returns:
        ``chatterbox`` when CUDA and the gpu extra are present or a Chatterbox model other than
        the default is named in ``TTS_MODEL``, else ``piper``.
    """
    if config.engine != "auto":
        return config.engine
    if config.model != "chatterbox":
        return "chatterbox"  # a model asked for by name is never replaced by piper
    has_gpu_extra = importlib.util.find_spec("chatterbox_vllm") is not None
    if has_gpu_extra and _cuda_available():
        return "chatterbox"
    logger.info("TTS_ENGINE=auto: no CUDA GPU with the gpu extra here, using piper")
    return "piper"


def create_engine(config: SidecarConfig) -> Engine:
    """Build the configured engine (not started).

    Args:
        config: The configuration.

    Returns:
        The engine.
    """
    name = resolve_engine_name(config)
    if name == "piper":
        from chatterbox_sidecar.engines.piper import PiperEngine

        return PiperEngine(config.piper_model, config.engine_concurrency)
    from chatterbox_sidecar.engines.chatterbox.engine import (
        ChatterboxEngine,
        ChatterboxEngineConfig,
    )

    device = config.device
    if device == "auto":
        device = "cuda" if _cuda_available() else "cpu"
    engine_config = ChatterboxEngineConfig(
        model=config.model,
        multilingual_weights=config.multilingual_weights,
        model_dir=config.model_dir,
        t3_model_dir=config.t3_model_dir,
        t3_backend=config.t3_backend,
        device=device,
        chunk_size=config.chunk_size,
        first_chunk_size=config.first_chunk_size,
        reference_seconds=config.reference_seconds or None,
        context_window=config.context_window,
        flow_steps=config.flow_steps or None,
        compile_flow=config.compile_flow,
        overload_hold_seconds=config.overload_hold_seconds,
        streaming_default=config.streaming,
        **({"max_concurrency": config.engine_concurrency} if config.engine_concurrency else {}),
    )
    return ChatterboxEngine(engine_config)
