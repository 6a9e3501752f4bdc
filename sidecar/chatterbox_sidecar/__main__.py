"""Start the sidecar: ``python -m chatterbox_sidecar`` or ``chatterbox-sidecar``."""

from __future__ import annotations

import argparse
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


async def _serve(config: SidecarConfig) -> int:
    stop = asyncio.Event()  # first signal: drain, then exit
    force = asyncio.Event()  # second signal: exit now

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            logger.warning(f"{sig.name} again: stopping without waiting")
            force.set()
        else:
            logger.info(f"{sig.name}: draining (send it again to stop at once)")
            stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    app = App(config, create_engine(config), VoiceStore(config.voices_dir, config.max_voices))
    return await run_until_stopped(app, stop, force)


def main() -> None:
    """Read the environment, then serve until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="chatterbox-sidecar",
        description="Streaming TTS websocket server (protocol v1 at /v1/stream/tts), configured "
        "by environment variables: TTS_HOST, TTS_PORT, TTS_ENGINE, TTS_VOICES_DIR, TTS_API_KEY "
        "and more (see README.md). SIGTERM drains, a second SIGTERM stops at once.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.parse_args()
    try:
        config = SidecarConfig.from_env()
    except ConfigError as e:
        print(f"chatterbox-sidecar: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    setup_logging(config)
    logger.info(f"chatterbox-sidecar {__version__} starting (engine={config.engine})")
    try:
        status = asyncio.run(_serve(config))
    except ImportError as e:
        logger.error(f"{e}")
        sys.exit(3)
    logger.info(f"chatterbox-sidecar stopped (exit {status})")
    sys.exit(status)


if __name__ == "__main__":
    main()
