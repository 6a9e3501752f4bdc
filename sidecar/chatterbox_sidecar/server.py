"""The websocket server: the protocol endpoint, HTTP routes, auth and admission.

Everything is served on one port by the ``websockets`` library; plain HTTP GETs are answered
from ``process_request`` before any handshake.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import replace
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from loguru import logger
from websockets import ConnectionClosed
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from chatterbox_sidecar import protocol
from chatterbox_sidecar.app import App
from chatterbox_sidecar.engines.base import EngineError
from chatterbox_sidecar.protocol import ProtocolError
from chatterbox_sidecar.session import Session
from chatterbox_sidecar.voices import VOICE_ID_PATTERN

OPEN_PATHS = ("/health", "/health/live", "/health/ready")


def _response(
    connection: ServerConnection,
    status: HTTPStatus,
    body: bytes,
    content_type: str,
    headers: dict[str, str] | None = None,
) -> Response:
    response = connection.respond(status, "")
    new_headers = Headers(response.headers)
    extra = {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}
    for key, value in extra.items():
        if key in new_headers:
            del new_headers[key]  # Headers is a multi-dict: assignment would add a second value
        new_headers[key] = value
    return replace(response, headers=new_headers, body=body)


def _json(connection: ServerConnection, status: HTTPStatus, document: object) -> Response:
    return _response(connection, status, json.dumps(document).encode(), "application/json")


def _error(connection: ServerConnection, status: HTTPStatus, code: str, message: str) -> Response:
    return _json(connection, status, protocol.error(code, message))


class SidecarServer:
    """Serves one :class:`App` over websockets and HTTP."""

    def __init__(self, app: App):
        """Initialize the server.

        Args:
            app: The sidecar app.
        """
        self._app = app
        self._connections = 0
        self._sessions: set[Session] = set()
        self._server: Server | None = None

    @property
    def port(self) -> int:
        """Returns: the port actually bound (useful with port 0)."""
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        """Bind and start serving (the engine may still be loading)."""
        config = self._app.config
        self._server = await serve(
            self._handle,
            config.host,
            config.port,
            process_request=self._process_request,
            max_size=config.max_frame_bytes,
            max_queue=16,
            ping_interval=20,
            ping_timeout=20,
            close_timeout=2,
            server_header=None,
        )
        logger.info(f"Listening on ws://{config.host}:{self.port}{protocol.PATH}")

    async def close(self) -> None:
        """Close every connection (1001, going away) and stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _authorized(self, request: Request) -> bool:
        key = self._app.config.api_key
        if key is None:
            return True
        header = request.headers.get("Authorization", "")
        supplied = header[7:] if header.startswith("Bearer ") else None
        if supplied is None:
            supplied = parse_qs(urlsplit(request.path).query).get("api_key", [None])[0]
        if supplied is None:
            return False
        return hmac.compare_digest(supplied.encode(), key.encode())

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        url = urlsplit(request.path)
        path = url.path.rstrip("/") or "/"
        if path in OPEN_PATHS:
            return self._health(connection, path)
        if not self._authorized(request):
            self._app.metrics.connections_rejected.labels("unauthorized").inc()
            return _response(
                connection,
                HTTPStatus.UNAUTHORIZED,
                b"missing or invalid API key\n",
                "text/plain",
                {"WWW-Authenticate": 'Bearer realm="tts"'},
            )
        if path == protocol.PATH:
            return self._admit(connection)
        if path == "/metrics":
            return _response(
                connection,
                HTTPStatus.OK,
                self._app.metrics.render(),
                self._app.metrics.content_type,
            )
        if path == "/v1/voices":
            return _json(connection, HTTPStatus.OK, {"voices": self._app.list_voices()})
        if path == "/v1/synthesize":
            return await self._synthesize_wav(connection, parse_qs(url.query))
        return _error(connection, HTTPStatus.NOT_FOUND, "not_found", f"no route {path}")

    def _health(self, connection: ServerConnection, path: str) -> Response:
        if path == "/health/live":
            return _json(connection, HTTPStatus.OK, {"status": "live"})
        status = HTTPStatus.OK if self._app.healthy else HTTPStatus.SERVICE_UNAVAILABLE
        return _json(connection, status, self._app.health())

    def _admit(self, connection: ServerConnection) -> Response | None:
        if self._app.draining:
            self._app.metrics.connections_rejected.labels("draining").inc()
            return _error(
                connection, HTTPStatus.SERVICE_UNAVAILABLE, "busy", "the server is shutting down"
            )
        if not self._app.ready.is_set():
            self._app.metrics.connections_rejected.labels("not_ready").inc()
            return _error(
                connection, HTTPStatus.SERVICE_UNAVAILABLE, "not_ready", "engine is loading"
            )
        if self._connections >= self._app.config.max_connections:
            self._app.metrics.connections_rejected.labels("max_connections").inc()
            return _error(
                connection,
                HTTPStatus.SERVICE_UNAVAILABLE,
                "busy",
                f"connection limit reached ({self._app.config.max_connections})",
            )
        self._connections += 1  # counted from admission so a burst cannot overshoot the limit
        connection.tts_admitted = True  # type: ignore[attr-defined]
        return None

    async def _synthesize_wav(
        self, connection: ServerConnection, query: dict[str, list[str]]
    ) -> Response:
        app = self._app
        if not app.ready.is_set():
            return _error(
                connection, HTTPStatus.SERVICE_UNAVAILABLE, "not_ready", "engine is loading"
            )
        text = query.get("text", [""])[0]
        voice_id = query.get("voice_id", ["default"])[0]
        try:
            sample_rate = int(query.get("sample_rate", [str(protocol.DEFAULT_SAMPLE_RATE)])[0])
        except ValueError:
            sample_rate = -1
        if not text.strip():
            return _error(
                connection, HTTPStatus.BAD_REQUEST, "invalid_request", "'text' is required"
            )
        if len(text) > app.config.max_text_chars:
            return _error(
                connection,
                HTTPStatus.BAD_REQUEST,
                "text_too_long",
                f"text exceeds {app.config.max_text_chars} characters",
            )
        if not protocol.MIN_SAMPLE_RATE <= sample_rate <= protocol.MAX_SAMPLE_RATE:
            return _error(
                connection,
                HTTPStatus.BAD_REQUEST,
                "invalid_request",
                "'sample_rate' must be an integer from 8000 to 48000",
            )
        if not VOICE_ID_PATTERN.match(voice_id):
            return _error(connection, HTTPStatus.BAD_REQUEST, "invalid_request", "bad 'voice_id'")
        try:
            wav = await app.synthesize_wav(text, voice_id, sample_rate)
        except ProtocolError as e:
            status = HTTPStatus.NOT_FOUND if e.code == "voice_not_found" else HTTPStatus.BAD_REQUEST
            return _error(connection, status, e.code, e.message)
        except EngineError as e:
            return _error(connection, HTTPStatus.INTERNAL_SERVER_ERROR, e.code, str(e))
        return _response(connection, HTTPStatus.OK, wav, "audio/wav")

    async def _handle(self, connection: ServerConnection) -> None:
        host, port = connection.remote_address[:2]
        peer = f"{host}:{port}"
        app = self._app
        app.metrics.connections_open.inc()

        async def close(code: int, reason: str) -> None:
            await connection.close(code, reason)

        session = Session(app, connection.send, close, peer)
        self._sessions.add(session)
        logger.info(f"{session}: connected")
        t0 = time.perf_counter()
        try:
            await session.send_json(app.ready_message())
            await self._receive(connection, session)
        except ConnectionClosed:
            pass
        finally:
            self._sessions.discard(session)
            await session.close()
            self._connections -= 1
            app.metrics.connections_open.dec()
            logger.info(
                f"{session}: disconnected after {time.perf_counter() - t0:.1f} s "
                f"(code {connection.close_code})"
            )

    async def _receive(self, connection: ServerConnection, session: Session) -> None:
        idle = self._app.config.idle_seconds
        last_activity = time.monotonic()
        while True:
            try:
                # cancelling recv() is safe in websockets: no frame is lost
                frame = await asyncio.wait_for(connection.recv(), timeout=idle)
            except TimeoutError:
                if session.has_open_contexts or time.monotonic() - last_activity < idle:
                    continue
                logger.info(f"{session}: idle for {idle:g} s, closing")
                await connection.close(1000, "idle timeout")
                return
            last_activity = time.monotonic()
            if isinstance(frame, str):
                await session.handle_text(frame)
            else:
                await session.handle_binary()

    async def drain(self, deadline_s: float, force: asyncio.Event) -> None:
        """Stop taking new work and wait for in-flight contexts to finish.

        Args:
            deadline_s: Longest wait.
            force: Set to stop waiting at once (a second SIGTERM).
        """
        self._app.draining = True
        logger.info(
            f"Draining: {len(self._app.contexts)} open contexts on {len(self._sessions)} "
            f"connections, up to {deadline_s:g} s"
        )
        deadline = time.monotonic() + deadline_s
        while self._app.contexts and time.monotonic() < deadline and not force.is_set():
            try:
                await asyncio.wait_for(force.wait(), timeout=0.1)
            except TimeoutError:
                pass
        if self._app.contexts:
            logger.warning(f"Drain ended with {len(self._app.contexts)} contexts still open")


async def run_until_stopped(
    app: App, stop: asyncio.Event, force: asyncio.Event | None = None
) -> int:
    """Serve until ``stop`` is set, loading the engine in the background, then drain and close.

    Args:
        app: The sidecar app.
        stop: Set to shut down gracefully (SIGTERM).
        force: Set to cut the drain short (a second SIGTERM).

    Returns:
        The process exit status: 0, or 1 if the engine failed to load.
    """
    force = force or asyncio.Event()
    server = SidecarServer(app)
    await server.start()
    loader = asyncio.create_task(app.start_engine(), name="engine-load")
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if loader.done() and loader.exception() is not None:
            return 1
        await stopper
        await server.drain(app.config.drain_seconds, force)
        return 0
    finally:
        stopper.cancel()
        loader.cancel()
        await server.close()
        await app.engine.close()
        await asyncio.gather(loader, stopper, return_exceptions=True)
