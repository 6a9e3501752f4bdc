"""The server: the protocol's websocket endpoint and the HTTP routes, on one port.

Served by ``aiohttp``: websockets at ``/v1/stream/tts`` and plain HTTP routes side by side, each
request in its own handler with no handshake deadline over it (a long HTTP synthesis is not cut
off), auth and error shapes in middlewares, admission counted only for upgrades that succeed.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from aiohttp import WSMsgType, web
from loguru import logger

from chatterbox_sidecar import http_api, protocol
from chatterbox_sidecar.app import App
from chatterbox_sidecar.engines.base import EngineError
from chatterbox_sidecar.http_api import STATUS_OF_CODE, HttpApi
from chatterbox_sidecar.protocol import ProtocolError
from chatterbox_sidecar.session import Session
from chatterbox_sidecar.voices import VOICE_ID_PATTERN

OPEN_PATHS = frozenset({"/health", "/health/live", "/health/ready"})
HEARTBEAT_S = 20.0  # websocket pings; a client that does not answer within half of it is gone
HEADER_TIMEOUT_S = 15.0  # a connection that has not sent a whole request by then is closed
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(
    status: HTTPStatus, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """Build an HTTP error in the protocol's shape (``{"type": "error", "code", "message"}``).

    Args:
        status: HTTP status.
        code: Protocol error code.
        message: Explanation.
        headers: Extra headers.

    Returns:
        The response.
    """
    return web.json_response(protocol.error(code, message), status=int(status), headers=headers)


def protocol_error_response(error: ProtocolError) -> web.Response:
    """Returns: ``error`` as an HTTP response with the status its code implies."""
    status = STATUS_OF_CODE.get(error.code, HTTPStatus.BAD_REQUEST)
    return error_response(status, error.code, error.message)


class SidecarServer:
    """Serves one :class:`App` over websockets and HTTP on one port."""

    def __init__(self, app: App):
        """Initialize the server.

        Args:
            app: The sidecar app.
        """
        self._app = app
        self._connections = 0  # websocket connections admitted and not yet closed
        self._sockets: set[web.WebSocketResponse] = set()
        self._sessions: set[Session] = set()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.web_app = web.Application(
            middlewares=[self._errors, self._auth],
            client_max_size=app.config.max_frame_bytes,
        )
        self.web_app.router.add_get(protocol.PATH, self._websocket)
        self.web_app.router.add_get("/health", self._health)
        self.web_app.router.add_get("/health/live", self._health)
        self.web_app.router.add_get("/health/ready", self._health)
        self.web_app.router.add_get("/metrics", self._metrics)
        self.web_app.router.add_get("/v1/voices", self._voices)
        self.web_app.router.add_get("/v1/synthesize", self._synthesize_wav)
        HttpApi(app).register(self.web_app.router)

    @property
    def port(self) -> int:
        """Returns: the port actually bound (useful with port 0)."""
        assert self._runner is not None
        return self._runner.addresses[0][1]

    async def start(self) -> None:
        """Bind and start serving (the engine may still be loading)."""
        config = self._app.config
        self._runner = web.AppRunner(
            self.web_app,
            access_log=None,
            handle_signals=False,
            # cancel a handler whose client went away (an HTTP synthesis stops at once)
            handler_cancellation=True,
            # also closes a connection that has not sent a whole request by then (slowloris)
            keepalive_timeout=HEADER_TIMEOUT_S,
            shutdown_timeout=2.0,
        )
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, config.host, config.port)
        await self._site.start()
        logger.info(f"Listening on ws://{config.host}:{self.port}{protocol.PATH}")

    async def close(self) -> None:
        """Close every connection (1001, going away) and stop listening."""
        await asyncio.gather(
            *(ws.close(code=1001, message=b"server shutting down") for ws in list(self._sockets)),
            return_exceptions=True,
        )
        if self._runner is not None:
            await self._runner.cleanup()

    # --- middlewares ----------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Answer unknown routes, methods and oversized bodies in the route's error shape."""
        path = request.path
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return http_api.error_response(
                path, HTTPStatus.NOT_FOUND, "not_found", f"no route {request.path}"
            )
        except web.HTTPMethodNotAllowed as e:
            return http_api.error_response(
                path,
                HTTPStatus.METHOD_NOT_ALLOWED,
                "invalid_request",
                f"{request.method} is not allowed on {request.path}",
                headers={"Allow": ", ".join(sorted(e.allowed_methods))},
            )
        except web.HTTPRequestEntityTooLarge:
            return http_api.error_response(
                path,
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "invalid_request",
                f"body exceeds {self._app.config.max_frame_bytes} bytes",
            )

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Require the API key on every route but the health probes."""
        if request.path in OPEN_PATHS:
            return await handler(request)
        if len(request.headers.getall("Authorization", [])) > 1:
            return http_api.error_response(
                request.path,
                HTTPStatus.BAD_REQUEST,
                "invalid_request",
                "more than one Authorization header",
            )
        if not self._authorized(request):
            self._app.metrics.connections_rejected.labels("unauthorized").inc()
            return http_api.error_response(
                request.path,
                HTTPStatus.UNAUTHORIZED,
                "unauthorized",
                "missing or invalid API key",
                headers={"WWW-Authenticate": 'Bearer realm="tts"'},
            )
        return await handler(request)

    def _authorized(self, request: web.Request) -> bool:
        key = self._app.config.api_key
        if key is None:
            return True
        header = request.headers.get("Authorization", "")
        supplied = header[7:] if header.startswith("Bearer ") else None
        if supplied is None:
            supplied = request.query.get("api_key")
        if supplied is None:
            return False
        return hmac.compare_digest(supplied.encode(), key.encode())

    # --- HTTP routes ----------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        app = self._app
        if request.path == "/health/live":
            if app.live:
                return web.json_response({"status": "live"})
            return web.json_response({"status": "device_fault"}, status=503)
        status = HTTPStatus.OK if app.healthy else HTTPStatus.SERVICE_UNAVAILABLE
        return web.json_response(app.health(), status=int(status))

    async def _metrics(self, request: web.Request) -> web.Response:
        metrics = self._app.metrics
        return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})

    async def _voices(self, request: web.Request) -> web.Response:
        return web.json_response({"voices": self._app.list_voices()})

    async def _synthesize_wav(self, request: web.Request) -> web.Response:
        app = self._app
        if not app.ready.is_set():
            return error_response(HTTPStatus.SERVICE_UNAVAILABLE, "not_ready", "engine is loading")
        query = request.query
        text = query.get("text", "")
        voice_id = query.get("voice_id", "default")
        try:
            sample_rate = int(query.get("sample_rate", str(protocol.DEFAULT_SAMPLE_RATE)))
        except ValueError:
            sample_rate = -1
        try:
            text = protocol.clean_text(text)
            if not text.strip():
                raise ProtocolError("invalid_request", "'text' is required")
            if len(text) > app.config.max_text_chars:
                raise ProtocolError(
                    "text_too_long", f"text exceeds {app.config.max_text_chars} characters"
                )
            if not protocol.MIN_SAMPLE_RATE <= sample_rate <= protocol.MAX_SAMPLE_RATE:
                raise ProtocolError(
                    "invalid_request", "'sample_rate' must be an integer from 8000 to 48000"
                )
            if not VOICE_ID_PATTERN.fullmatch(voice_id):
                raise ProtocolError("invalid_request", "bad 'voice_id'")
            language = protocol.parse_language(query.get("language"))
            wav = await app.synthesize_wav(text, voice_id, sample_rate, language)
        except ProtocolError as e:
            app.metrics.errors.labels(e.code).inc()
            return protocol_error_response(e)
        except EngineError as e:
            app.metrics.errors.labels(e.code).inc()
            status = STATUS_OF_CODE.get(e.code, HTTPStatus.BAD_REQUEST)
            return error_response(status, e.code, str(e))
        return web.Response(body=wav, content_type="audio/wav")

    # --- the websocket endpoint -----------------------------------------------------------

    def _admission_error(self) -> web.Response | None:
        app = self._app
        if app.draining:
            app.metrics.connections_rejected.labels("draining").inc()
            return error_response(
                HTTPStatus.SERVICE_UNAVAILABLE, "busy", "the server is shutting down"
            )
        if not app.ready.is_set():
            app.metrics.connections_rejected.labels("not_ready").inc()
            return error_response(HTTPStatus.SERVICE_UNAVAILABLE, "not_ready", "engine is loading")
        if not app.live:
            app.metrics.connections_rejected.labels("device_fault").inc()
            return error_response(
                HTTPStatus.SERVICE_UNAVAILABLE, "engine_error", "the engine's device failed"
            )
        if self._connections >= app.config.max_connections:
            app.metrics.connections_rejected.labels("max_connections").inc()
            return error_response(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "busy",
                f"server connection limit reached ({app.config.max_connections} connections, "
                "TTS_MAX_CONNECTIONS)",
            )
        return None

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        rejection = self._admission_error()
        if rejection is not None:
            return rejection
        config = self._app.config
        ws = web.WebSocketResponse(
            max_msg_size=config.max_frame_bytes, heartbeat=HEARTBEAT_S, compress=False
        )
        if not ws.can_prepare(request).ok:
            return error_response(
                HTTPStatus.UPGRADE_REQUIRED,
                "invalid_request",
                f"{protocol.PATH} is a websocket endpoint: send an upgrade request",
                {"Upgrade": "websocket", "Connection": "Upgrade"},
            )
        # Counted before the first await, so a burst cannot overshoot the limit, and released
        # exactly once on every path, a failed handshake included: by the session's clean-up as
        # soon as the connection ends, or by the finally below.
        self._connections += 1
        slot = _Slot(self)
        try:
            await ws.prepare(request)
            await self._serve(ws, request, slot)
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client went away during the handshake or the connection
        finally:
            slot.release()
        return ws

    async def _serve(self, ws: web.WebSocketResponse, request: web.Request, slot: _Slot) -> None:
        app = self._app
        peer = _peer(request)
        transport = request.transport

        async def send(data: str | bytes) -> None:
            if isinstance(data, str):
                await ws.send_str(data)
            else:
                await ws.send_bytes(data)

        async def close(code: int, reason: str) -> None:
            try:
                await asyncio.wait_for(ws.close(code=code, message=reason.encode()), 2.0)
            except (TimeoutError, ConnectionError):
                if transport is not None:
                    transport.abort()  # a client that reads nothing cannot take a close frame

        session = Session(app, send, close, peer)
        self._sessions.add(session)
        self._sockets.add(ws)
        app.metrics.connections_open.inc()
        logger.info(f"{session}: connected")
        t0 = time.perf_counter()
        activity = _Activity()
        idle_watch = asyncio.create_task(self._close_when_idle(ws, session, activity))
        try:
            await session.send_json(app.ready_message())
            async for message in ws:
                activity.touch()
                if message.type == WSMsgType.TEXT:
                    await session.handle_text(message.data)
                elif message.type == WSMsgType.BINARY:
                    await session.handle_binary()
                elif message.type == WSMsgType.ERROR:
                    break
        except ConnectionAbortedError:
            pass  # the session cut off a client that stopped reading
        finally:
            # Bookkeeping first, with no await: aiohttp cancels this handler when the client's
            # socket closes, which can land on any await below.
            idle_watch.cancel()
            self._sockets.discard(ws)
            self._sessions.discard(session)
            slot.release()
            app.metrics.connections_open.dec()
            await asyncio.shield(self._clean_up(session, ws, close, time.perf_counter() - t0))

    @staticmethod
    async def _clean_up(
        session: Session,
        ws: web.WebSocketResponse,
        close: Callable[[int, str], Awaitable[None]],
        seconds: float,
    ) -> None:
        await session.close()
        if not ws.closed:
            await close(1000, "")
        logger.info(f"{session}: disconnected after {seconds:.1f} s (code {ws.close_code})")

    async def _close_when_idle(
        self, ws: web.WebSocketResponse, session: Session, activity: _Activity
    ) -> None:
        idle = self._app.config.idle_seconds
        while not ws.closed:
            await asyncio.sleep(min(1.0, idle / 4))
            if session.has_open_contexts:
                activity.touch()  # a connection with work in progress is not idle
            elif time.monotonic() - activity.last >= idle:
                logger.info(f"{session}: idle for {idle:g} s, closing")
                await ws.close(code=1000, message=b"idle timeout")
                return

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
        while self._app.active_streams and time.monotonic() < deadline and not force.is_set():
            try:
                await asyncio.wait_for(force.wait(), timeout=0.1)
            except TimeoutError:
                pass
        if self._app.active_streams:
            logger.warning(f"Drain ended with {self._app.active_streams} streams still open")


class _Slot:
    """One admitted connection's place under ``TTS_MAX_CONNECTIONS``, given back once."""

    def __init__(self, server: SidecarServer):
        self._server: SidecarServer | None = server

    def release(self) -> None:
        if self._server is not None:
            self._server._connections -= 1
            self._server = None


class _Activity:
    """When a connection last received a message."""

    def __init__(self):
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()


def _peer(request: web.Request) -> str:
    peername = request.transport.get_extra_info("peername") if request.transport else None
    if not peername:
        return "?"
    return f"{peername[0]}:{peername[1]}"


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
