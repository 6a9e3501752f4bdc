"""vLLM plugin: registers chatterbox-vllm's T3 model and tokenizer in every vLLM process.

vLLM runs its engine core and workers in spawned processes, which import nothing of ours unless
told to. The ``vllm.general_plugins`` entry point in ``pyproject.toml`` names :func:`register`,
which vLLM calls in each process before it resolves the ``ChatterboxT3`` architecture and the
``EnTokenizer`` tokenizer. The backend also calls it in the main process.
"""

from __future__ import annotations

from loguru import logger


def register() -> None:
    """Register ``ChatterboxT3`` and ``EnTokenizer``/``MtlTokenizer`` with vLLM (idempotent)."""
    try:
        # Importing the package runs its ModelRegistry / TokenizerRegistry registrations.
        import chatterbox_vllm.models.t3  # noqa: F401
    except ImportError as exc:
        logger.warning(f"chatterbox-vllm not importable, Chatterbox T3 not registered: {exc}")
