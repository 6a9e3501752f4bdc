"""Start the sidecar: ``python -m chatterbox_sidecar`` or ``chatterbox-sidecar``."""

from __future__ import annotations

import asyncio
import signal
import sys

from loguru import logger

from chatterbox_sidecar import __version__
from chatterbox_sidecar.app import App
from chatterbox_sidecar.config import ConfigError, SidecarConfig
from chatterbox_sidecar.engines import create_engine
from chatterbox_sidecar.logs import setup_logging
from chatterbox_sidecar.server import run_until_stopped
from chatterbox_sidecar.voices import VoiceStore


async def _serve(config: SidecarConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    app = App(config, create_engine(config), VoiceStore(config.voices_dir))
    await run_until_stopped(app, stop)


def main() -> None:
    """Read the environment, then serve until SIGINT or SIGTERM."""
    try:
        config = SidecarConfig.from_env()
    except ConfigError as e:
        print(f"chatterbox-sidecar: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    setup_logging(config)
    logger.info(f"chatterbox-sidecar {__version__} starting (engine={config.engine})")
    try:
        asyncio.run(_serve(config))
    except ImportError as e:
        logger.error(f"{e}")
        sys.exit(3)
    logger.info("chatterbox-sidecar stopped")


if __name__ == "__main__":
    main()
