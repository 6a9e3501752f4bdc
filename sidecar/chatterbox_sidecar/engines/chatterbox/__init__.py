"""The Chatterbox GPU engine: T3 (vLLM or our own PyTorch) and streamed S3Gen decoding.

``ChatterboxEngine`` and ``ChatterboxEngineConfig`` are imported lazily, so that light
submodules (``model_files``, ``vllm_plugin``) can be imported without torch or the S3Gen stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chatterbox_sidecar.engines.chatterbox.engine import (
        ChatterboxEngine,
        ChatterboxEngineConfig,
    )

__all__ = ["ChatterboxEngine", "ChatterboxEngineConfig"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from chatterbox_sidecar.engines.chatterbox import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
