"""Log set-up: loguru to stderr and to a rotating ``tts.log``."""

from __future__ import annotations

import sys

from loguru import logger

from chatterbox_sidecar.config import SidecarConfig


def setup_logging(config: SidecarConfig) -> None:
    """Send logs to stderr and to ``<TTS_LOG_DIR>/tts.log`` (10 MB files, 5 kept).

    Args:
        config: The configuration (log folder and level).
    """
    logger.remove()
    logger.add(sys.stderr, level=config.log_level, enqueue=False)
    config.log_dir.mkdir(parents=True, exist_ok=True)
    logger.add(
        config.log_dir / "tts.log",
        level=config.log_level,
        rotation="10 MB",
        retention=5,
        enqueue=True,
        encoding="utf-8",
    )
