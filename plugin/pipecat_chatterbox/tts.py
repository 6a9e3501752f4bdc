"""Pipecat text-to-speech service that speaks through a chatterbox sidecar.

The sidecar (``python -m chatterbox_sidecar``) serves protocol v1 on
``ws://HOST:8002/v1/stream/tts`` (see ``docs/protocol.md``). Each Pipecat context becomes one
sidecar context: every sentence (or LLM token) goes out as a ``synthesize`` message with
``continue: true``, the end of the turn as ``flush``, and an interruption as ``cancel``. The
sidecar answers ``started``, raw ``pcm_s16le`` audio at the pipeline's output rate, then
``done``, which closes the context at once. While connected, the service sends ``keepalive``
at a third of the sidecar's idle timeout (at most every 20 s), so an idle call is never
closed under it.

Across a fleet (several sidecars behind one load balancer URL): when the connection goes away
mid-call, Pipecat's reconnect opens a new one through the same URL, each context the old one
carried is reported lost once (a non-fatal ``ErrorFrame``) and the next turn is spoken. A
``busy`` refusal (HTTP 503 on the upgrade, or ``busy`` for a new context) is retried with
exponential backoff and jitter within the service's ``busy_retry_*`` bounds.

Word timestamps (on by default): each context asks for ``word_timestamps`` and the sidecar's
``timestamps`` messages go to Pipecat's word-timestamp machinery, which releases each word as a
``TTSTextFrame`` when playback reaches it; an interrupted turn's assistant message then holds
only the words the listener heard. A sidecar or engine that cannot time words says so in
``started``; the service then times the context's words where its text was sent (the audio
received so far), which counts a sentence as heard once its audio starts, as services without
word timings do.
"""

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger
from pipecat.frames.frames import ErrorFrame, Frame, TTSAudioRawFrame, TTSStoppedFrame
from pipecat.processors.frame_processor import FrameProcessorSetup
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TextAggregationMode, WebsocketTTSService
from pipecat.transcriptions.language import Language, resolve_language
from pipecat.utils.errors import ErrorCategory, classify_http_status_code
from pipecat.utils.tracing.service_decorators import traced_tts
from pipecat.utils.types import NOT_GIVEN, NotGiven
from websockets.exceptions import InvalidStatus
from websockets.protocol import State

from pipecat_chatterbox import voices
from pipecat_chatterbox.client import ConnectionLostError, answer_voice_request
from pipecat_chatterbox.errors import UNAUTHORIZED, SidecarError, auth_headers, category_for_code
from pipecat_chatterbox.retry import BusyBackoff, retryable_refusal

DEFAULT_URL = voices.DEFAULT_URL

# Pipecat's audio frames are 16-bit PCM, so that is what the plugin asks for.
ENCODING = "pcm_s16le"

# Settings that the sidecar applies per context: changing one mid-turn starts a new context.
_CONTEXT_SETTINGS = frozenset({"voice", "exaggeration", "cfg_weight", "temperature", "language"})

# The languages of Chatterbox Multilingual (the sidecar's ``ready`` lists what it speaks).
CHATTERBOX_LANGUAGES = (
    "ar", "da", "de", "el", "en", "es", "fi", "fr", "he", "hi", "it", "ja",
    "ko", "ms", "nl", "no", "pl", "pt", "ru", "sv", "sw", "tr", "zh",
)  # fmt: skip
# Every Pipecat language (regional ones too) that one of those codes speaks; Norwegian Bokmål
# and Nynorsk are the model's Norwegian, Mandarin its Chinese.
_LANGUAGE_MAP: dict[Language, str] = {
    language: base
    for language in Language
    if (base := language.value.split("-")[0].lower()) in CHATTERBOX_LANGUAGES
} | {
    Language.NB: "no",
    Language.NB_NO: "no",
    Language.NN: "no",
    Language.NN_NO: "no",
    Language.CMN: "zh",
    Language.CMN_CN: "zh",
}


def language_to_chatterbox_language(language: Language) -> str:
    """Convert a Pipecat ``Language`` to the sidecar's ISO 639-1 code.

    Args:
        language: The language (a regional one, such as ``Language.ES_MX``, too).

    Returns:
        The code sent as ``synthesize``'s ``language`` (``es``). A language Chatterbox does
        not speak falls back to its base code with a warning (``resolve_language``); the
        sidecar then ends the context with ``unsupported``.
    """
    return resolve_language(language, _LANGUAGE_MAP, use_base_code=True)


# Contexts ended recently, remembered so a late flush or cancel for them sends nothing.
_ENDED_MEMORY = 64

# The sidecar closes a connection with no context and no message for its
# ``limits.idle_timeout_seconds``; a keepalive goes out at this fraction of it ...
KEEPALIVE_FRACTION = 1 / 3
# ... and at least this often (seconds), which is also the interval before ``ready`` says.
KEEPALIVE_MAX_INTERVAL = 20.0

# While a turn waits for capacity, its audio context is kept alive at least this often (seconds),
# under the 3 s after which Pipecat ends a context that receives nothing.
_CONTEXT_REFRESH_INTERVAL = 1.0


@dataclass
class _BusyContext:
    """A context the sidecar refused with ``busy``, to be sent again.

    Parameters:
        backoff: Its retry budget, kept across refusals.
        text: All its text so far.
        flushed: Whether its text is complete (a flush is due after it).
        waiting: True until the text has been sent again.
        task: The task that sends it again.
    """

    backoff: BusyBackoff
    text: str = ""
    flushed: bool = False
    waiting: bool = True
    task: asyncio.Task | None = None


@dataclass
class ChatterboxTTSSettings(TTSSettings):
    """Runtime-updatable settings for :class:`ChatterboxTTSService`.

    Parameters:
        voice: A voice id known to the sidecar: ``default`` or one registered with
            ``register_voice``.
        exaggeration: Emotion exaggeration (Chatterbox ``exaggeration``, 0.25 to 2.0 is
            useful; 0.5 is neutral).
        cfg_weight: Classifier-free guidance weight (lower is slower, more deliberate).
        temperature: Sampling temperature.
        language: The language spoken (inherited from ``TTSSettings``): a Pipecat
            ``Language``, converted with :func:`language_to_chatterbox_language`; None leaves
            it to the sidecar (its model's default, ``en``). Only
            ``TTS_MODEL=chatterbox-multilingual`` speaks other languages than English.
    """

    exaggeration: float | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    cfg_weight: float | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    temperature: float | None | NotGiven = field(default_factory=lambda: NOT_GIVEN)


class ChatterboxTTSService(WebsocketTTSService):
    """Streaming TTS through a self-hosted chatterbox sidecar over a websocket.

    A drop-in replacement for hosted websocket services such as ``CartesiaTTSService``::

        tts = ChatterboxTTSService(
            url="ws://localhost:8002/v1/stream/tts",
            settings=ChatterboxTTSService.Settings(voice="default", exaggeration=0.6),
        )

    Audio comes back as ``pcm_s16le`` at the pipeline's output rate (``audio_out_sample_rate``),
    so an 8 kHz phone pipeline gets 8 kHz audio with no resampling in the plugin.
    ``TTSUpdateSettingsFrame(delta=ChatterboxTTSService.Settings(...))`` changes the voice,
    the style or the language at run time; the next sentence goes to a new sidecar context that
    uses it. A sidecar serving ``chatterbox-multilingual`` speaks 23 languages:
    ``Settings(language=Language.ES)`` sends ``language: "es"`` with each context, as Cartesia's
    service does.

    Behind a load balancer (``deploy/haproxy``), ``url`` is the balancer's. A lost connection
    (a sidecar died or drained) is reconnected through it by Pipecat's reconnect
    (``reconnect_backoff_*``); each turn it cut short is reported once, as a non-fatal
    ``ErrorFrame`` (``ErrorCategory.CONNECTIVITY``), and the next turn is spoken. A ``busy``
    refusal is retried: on the upgrade (503, the fleet is full) the turn's text waits; for a new
    context (its sidecar filled up) the context's text is sent again, on a new connection when
    nothing else uses the old one, so that the balancer can place it on a sidecar with room.
    Past the ``busy_retry_*`` bounds the turn is reported once (``ErrorCategory.RATE_LIMIT``)
    and the service stays usable.
    """

    Settings = ChatterboxTTSSettings
    _settings: Settings

    def __init__(
        self,
        *,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        sample_rate: int | None = None,
        seed: int | None = None,
        voice_request_timeout: float = 30.0,
        busy_retry_attempts: int = 10,
        busy_retry_timeout: float = 15.0,
        busy_retry_min_wait: float = 0.25,
        busy_retry_max_wait: float = 2.0,
        word_timestamps: bool = True,
        settings: Settings | None = None,
        text_aggregation_mode: TextAggregationMode | None = None,
        **kwargs,
    ):
        """Initialize the service.

        Args:
            url: The sidecar's websocket URL.
            api_key: The sidecar's ``TTS_API_KEY``, sent as ``Authorization: Bearer``. None
                for a sidecar without a key.
            sample_rate: Output sample rate. None (the default) uses the pipeline's
                ``audio_out_sample_rate``.
            seed: Optional sampling seed sent with every request (used by the GPU engine).
            voice_request_timeout: Seconds that ``register_voice`` and friends wait for
                the sidecar's reply.
            busy_retry_attempts: Retries of a turn refused with ``busy`` (or ``not_ready``)
                before it is reported; 0 reports the first refusal.
            busy_retry_timeout: Longest a turn waits for capacity, in seconds.
            busy_retry_min_wait: First wait before a retry, in seconds; each next one doubles,
                drawn between half and all of it (jitter).
            busy_retry_max_wait: Longest wait between two retries, in seconds.
            word_timestamps: Ask the sidecar when each word is spoken, so that the
                conversation keeps only the words heard before an interruption. False: one
                ``TTSTextFrame`` per sentence, pushed as its audio starts.
            settings: Runtime-updatable settings; fields given here override the defaults
                (voice ``default``, exaggeration 0.5, cfg_weight 0.5, temperature 0.8,
                language None: the sidecar's default).
            text_aggregation_mode: ``TextAggregationMode.SENTENCE`` (default) sends whole
                sentences; ``TextAggregationMode.TOKEN`` streams LLM tokens into the same
                context and lets the sidecar split them.
            **kwargs: Passed on to ``WebsocketTTSService`` (for example
                ``reconnect_backoff_min_wait``, ``text_transforms``).
        """
        default_settings = self.Settings(
            model=None,
            voice="default",
            language=None,
            exaggeration=0.5,
            cfg_weight=0.5,
            temperature=0.8,
        )
        if settings is not None:
            default_settings.apply_update(settings)

        super().__init__(
            text_aggregation_mode=text_aggregation_mode,
            # With word timings the base builds one TTSTextFrame per word, timed to the
            # audio; without, it pushes one per sentence, behind that sentence's
            # TTSStartedFrame.
            push_text_frames=not word_timestamps,
            # The base opens the audio context, starts TTFB and pushes TTSStartedFrame;
            # the sidecar's ``done`` gives the TTSStoppedFrame.
            push_start_frame=True,
            push_stop_frames=False,
            # Audio frames are attributed to the context the sidecar last ``started``,
            # so later requests need not wait for earlier contexts to finish.
            pause_frame_processing=False,
            sample_rate=sample_rate,
            settings=default_settings,
            **kwargs,
        )

        self._url = url
        self._api_key = api_key
        self._seed = seed
        self._voice_request_timeout = voice_request_timeout
        self._word_timestamps = word_timestamps

        self._receive_task: asyncio.Task | None = None
        # What the sidecar announced in ``ready``.
        self._server_info: dict[str, Any] = {}
        # Context whose audio the sidecar is delivering (its ``started`` came last).
        self._delivering_context_id: str | None = None
        # A trailing odd byte of a binary frame, completed by the next frame.
        self._pending_byte = b""
        # Contexts with text sent on this connection and not ended: all the text sent.
        self._open_contexts: dict[str, str] = {}
        self._ended_contexts: deque[str] = deque(maxlen=_ENDED_MEMORY)
        # Voice requests awaiting their replies.
        self._voice_requests: list[tuple[dict[str, Any], asyncio.Future]] = []
        # Contexts the sidecar ended with an error: reported as that error, not also as a
        # context that completed without audio.
        self._failed_contexts: deque[str] = deque(maxlen=_ENDED_MEMORY)
        # False once the sidecar has answered ``keepalive`` with ``unknown_type``.
        self._keepalive_supported = True
        self._busy_retry = (
            busy_retry_attempts,
            busy_retry_timeout,
            busy_retry_min_wait,
            busy_retry_max_wait,
        )
        # Contexts refused with ``busy`` that will be sent again.
        self._busy_contexts: dict[str, _BusyContext] = {}
        # Open contexts whose flush has been sent.
        self._flushed_contexts: set[str] = set()
        # One connect (or replacement of the connection) at a time.
        self._connect_lock = asyncio.Lock()
        # Contexts whose ``started`` said the sidecar sends no word timings: the audio seconds
        # received for each.
        self._untimed_audio_s: dict[str, float] = {}

    def language_to_service_language(self, language: Language) -> str | None:
        """Convert a Pipecat ``Language`` to the sidecar's code.

        Args:
            language: The language to convert.

        Returns:
            Its ISO 639-1 code (see :func:`language_to_chatterbox_language`).
        """
        return language_to_chatterbox_language(language)

    def can_generate_metrics(self) -> bool:
        """Check if this service can generate processing metrics.

        Returns:
            True: TTFB and usage metrics are reported.
        """
        return True

    @property
    def server_info(self) -> dict[str, Any]:
        """The sidecar's ``ready`` message (engine, version, voices, limits).

        Returns:
            The last ``ready`` message received, or an empty dict before the first.
        """
        return self._server_info

    #
    # Lifecycle
    #

    async def setup(self, setup: FrameProcessorSetup):
        """Learn the output sample rate and connect to the sidecar.

        Args:
            setup: Configuration object containing setup parameters.
        """
        await super().setup(setup)
        # A full fleet must not hold up the pipeline's start: the first text connects again.
        await self._connect(wait_for_capacity=False)

    async def _connect(
        self,
        *,
        replace_if_idle: bool = False,
        wait_for_capacity: bool = True,
        busy_backoff: BusyBackoff | None = None,
    ):
        """Connect the websocket and start the receive task.

        Args:
            replace_if_idle: Close the open connection and open another, if no context and
                no voice request is open on it.
            wait_for_capacity: Retry a ``busy`` refusal (see ``_connect_websocket``).
            busy_backoff: The retry budget to use; a new one if None.
        """
        await super()._connect()

        async with self._connect_lock:
            replace = replace_if_idle and not (self._open_contexts or self._voice_requests)
            if replace or not self._is_connected():
                # A receive task of a connection that closed is replaced with the new one's.
                if self._receive_task:
                    await self.cancel_task(self._receive_task)
                    self._receive_task = None
                if self._websocket is not None:
                    if not replace:
                        # Lost before the receive task noticed: end what that connection
                        # carried, as a reconnect from the receive task would.
                        await self._report_lost_contexts()
                        await self._close_connection_contexts()
                    await self._disconnect_websocket()

            await self._connect_websocket(
                busy_backoff=busy_backoff, wait_for_capacity=wait_for_capacity
            )

            if self._websocket and not self._receive_task:
                self._receive_task = self.create_task(
                    self._receive_task_handler(self._report_error), name="receive"
                )
            if self._websocket and self._keepalive_supported:
                # Replaced by one at the sidecar's own pace when its ``ready`` arrives.
                self._create_keepalive_task(self._keepalive_interval())

    async def _disconnect(self):
        """Stop the retry, receive and keepalive tasks and close the websocket."""
        # First, so that no retry connects again meanwhile.
        await self._cancel_busy_retries()
        await super()._disconnect()

        await self._cancel_keepalive_task()
        if self._receive_task:
            await self.cancel_task(self._receive_task)
            self._receive_task = None

        await self._disconnect_websocket()

    async def _reconnect_websocket(self, attempt_number: int) -> bool:
        """Report the turns the lost connection cut short, then reconnect (Pipecat's reconnect).

        Args:
            attempt_number: The reconnect attempt, from 1.

        Returns:
            True once reconnected.
        """
        await self._report_lost_contexts()
        return await super()._reconnect_websocket(attempt_number)

    async def _report_lost_contexts(self):
        """Report, once each, the contexts that a connection going away cut short.

        The sidecar does not resume a context on another connection, so the rest of each is
        lost; Pipecat then ends them (audio already received still plays) and moves a turn in
        progress to a new context, so the rest of that turn is spoken. Each is reported as a
        non-fatal error and is not also counted as a context that completed without audio.
        """
        lost = [c for c in self._open_contexts if self.audio_context_available(c)]
        lost += [
            c for c in self._busy_contexts if c not in lost and self.audio_context_available(c)
        ]
        for context_id in lost:
            self._mark_ended(context_id)
            self._failed_contexts.append(context_id)
            error = ConnectionLostError(
                "connection_closed",
                f"the connection to the sidecar at {self._url} closed before context "
                f"{context_id} was spoken to its end",
                context_id,
            )
            await self.push_error(
                error_msg=f"{self}: {error.message}",
                exception=error,
                category=ErrorCategory.CONNECTIVITY,
            )

    async def _cancel_busy_retries(self):
        """Stop retrying every context refused with ``busy``."""
        while self._busy_contexts:
            _, busy = self._busy_contexts.popitem()
            if busy.task:
                await self.cancel_task(busy.task)

    def _keepalive_interval(self) -> float:
        """Returns: seconds between keepalives, from the sidecar's idle timeout if known."""
        limits = self._server_info.get("limits")
        idle = limits.get("idle_timeout_seconds") if isinstance(limits, dict) else None
        if isinstance(idle, int | float) and not isinstance(idle, bool) and idle > 0:
            return min(KEEPALIVE_MAX_INTERVAL, idle * KEEPALIVE_FRACTION)
        return KEEPALIVE_MAX_INTERVAL

    async def _restart_keepalive(self):
        """Run the keepalive at the pace of the sidecar that just said ``ready``."""
        await self._cancel_keepalive_task()
        if self._keepalive_supported:
            self._create_keepalive_task(self._keepalive_interval())

    async def _send_keepalive(self):
        """Send ``keepalive``: the sidecar counts it as activity and does not answer it."""
        await self._send_json({"type": "keepalive"})

    async def _connect_websocket(
        self, *, busy_backoff: BusyBackoff | None = None, wait_for_capacity: bool = True
    ):
        """Open the websocket, reporting a refused key as a permanent error.

        An upgrade refused with 503 (``busy``: every sidecar behind the balancer is full, or
        this one is draining or at its connection limit; ``not_ready``: still loading) is
        tried again after a backoff, within ``busy_backoff``'s budget.

        Args:
            busy_backoff: The retry budget; a new one from the ``busy_retry_*`` settings if None.
            wait_for_capacity: False to try once and, if refused as busy, only log it: the
                next text connects again.
        """
        if self._websocket and self._websocket.state is State.OPEN:
            return
        backoff = busy_backoff or self._new_busy_backoff()
        while True:
            try:
                logger.debug(f"{self}: connecting to {self._url}")
                self._websocket = await self._websocket_connect(
                    self._url,
                    additional_headers=auth_headers(self._api_key),
                    compression=None,
                )
            except InvalidStatus as e:
                self._websocket = None
                refusal = retryable_refusal(e)
                if refusal is not None and not wait_for_capacity:
                    logger.warning(f"{self}: {self._url} has no capacity now: {refusal.message}")
                    return
                wait = backoff.next_wait() if refusal is not None else None
                if wait is not None:
                    logger.info(
                        f"{self}: {self._url} refused the connection [{refusal.code}]: "
                        f"{refusal.message}; retry {backoff.retries} in {wait:.2f} s"
                    )
                    await self._wait_keeping_contexts(wait)
                    continue
                await self._report_refusal(e, refusal, backoff.retries)
                return
            except Exception as e:
                message = f"{self}: cannot connect to the sidecar at {self._url}: {e}"
                self._websocket = None
                await self.push_error(
                    error_msg=message, exception=e, category=ErrorCategory.CONNECTIVITY
                )
                await self._call_event_handler("on_connection_error", message)
                return
            await self._call_event_handler("on_connected")
            return

    def _new_busy_backoff(self) -> BusyBackoff:
        return BusyBackoff(*self._busy_retry)

    async def _wait_keeping_contexts(self, seconds: float):
        """Sleep, keeping the open audio contexts from ending for want of audio meanwhile."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            for context_id in self.get_audio_contexts():
                self._refresh_audio_context(context_id)
            await asyncio.sleep(min(remaining, _CONTEXT_REFRESH_INTERVAL))

    async def _report_refusal(self, e: InvalidStatus, refusal: SidecarError | None, retries: int):
        """Report an upgrade the sidecar (or the balancer) refused, past any retries."""
        status = e.response.status_code
        if refusal is not None:
            message = (
                f"{self}: the sidecar at {self._url} has no capacity "
                f"({retries} retries): [{refusal.code}] {refusal.message}"
            )
            error: Exception = refusal
            category = category_for_code(refusal.code)
        elif status in (401, 403):
            message = (
                f"{self}: the sidecar at {self._url} refused the API key (HTTP {status}); "
                "pass the sidecar's TTS_API_KEY as api_key"
            )
            error = SidecarError(UNAUTHORIZED, message)
            category = ErrorCategory.AUTHENTICATION
        else:
            message = f"{self}: the sidecar at {self._url} refused the connection (HTTP {status})"
            error = e
            category = classify_http_status_code(status)
        await self.push_error(error_msg=message, exception=error, category=category)
        await self._call_event_handler("on_connection_error", message)

    async def _disconnect_websocket(self):
        """Close the websocket and forget this connection's contexts."""
        try:
            await self.stop_all_metrics()
            if self._websocket:
                logger.debug(f"{self}: disconnecting from {self._url}")
                await self._websocket.close()
        except Exception as e:
            logger.debug(f"{self}: error closing the websocket: {e}")
        finally:
            self._websocket = None
            self._reset_connection_state()
            await self._call_event_handler("on_disconnected")

    def _reset_connection_state(self):
        """Forget what belonged to the connection that ended."""
        self._delivering_context_id = None
        self._pending_byte = b""
        self._ended_contexts.extend(self._open_contexts)
        self._open_contexts.clear()
        self._flushed_contexts.clear()
        while self._voice_requests:
            _, future = self._voice_requests.pop(0)
            if not future.done():
                future.set_exception(ConnectionError("the sidecar connection closed"))

    async def _close_connection_contexts(self):
        """End the audio contexts of a connection that is going away.

        The sidecar does not resume contexts on a new connection, so each open context is
        ended with a ``TTSStoppedFrame`` after the audio already received.
        """
        for context_id in self.get_audio_contexts():
            await self.append_to_audio_context(context_id, TTSStoppedFrame(context_id=context_id))
        await super()._close_connection_contexts()

    def _get_websocket(self):
        """Return the open websocket.

        Raises:
            ConnectionError: There is none.
        """
        if self._websocket:
            return self._websocket
        raise ConnectionError(f"{self}: not connected to the sidecar")

    def _is_connected(self) -> bool:
        return self._websocket is not None and self._websocket.state is State.OPEN

    #
    # Settings
    #

    async def _update_settings(self, delta: TTSSettings) -> dict[str, Any]:
        """Apply a settings delta; voice and style changes start a new sidecar context.

        The sidecar fixes a context's voice and parameters when it opens, so an update in
        the middle of a turn flushes the turn's context and moves the rest of the turn to
        a new one.

        Args:
            delta: A ``ChatterboxTTSService.Settings`` (or ``TTSSettings``) delta.

        Returns:
            Dict mapping changed field names to their previous values.
        """
        changed = await super()._update_settings(delta)
        if changed.keys() & _CONTEXT_SETTINGS and self._turn_context_id:
            turn_context_id = self._turn_context_id
            # In token mode, the sentence still pending belongs to the old context.
            await self._push_sequencer_frames(
                await self._aggregated_frame_sequencer.finalize(turn_context_id),
                turn_context_id,
            )
            if self.audio_context_available(turn_context_id):
                await self.flush_audio(context_id=turn_context_id)
            self._turn_context_id = None
            self._turn_context_id = self.create_context_id()
        self._warn_unhandled_updated_settings(changed.keys() - _CONTEXT_SETTINGS)
        return changed

    #
    # Sending
    #

    def _build_synthesize_msg(self, text: str, context_id: str) -> dict[str, Any]:
        """Build one ``synthesize`` piece of a context.

        Args:
            text: The piece of text, sent verbatim.
            context_id: The context it belongs to.

        Returns:
            The protocol message.
        """
        msg: dict[str, Any] = {
            "type": "synthesize",
            "text": text,
            "context_id": context_id,
            "continue": True,
            "voice_id": self._settings.voice,
            "sample_rate": self.sample_rate,
            "encoding": ENCODING,
        }
        if self._word_timestamps:
            msg["word_timestamps"] = True
        for name in ("exaggeration", "cfg_weight", "temperature"):
            value = getattr(self._settings, name)
            if value is not None:
                msg[name] = value
        if self._seed is not None:
            msg["seed"] = self._seed
        if self._settings.language:
            msg["language"] = str(self._settings.language)
        return msg

    def _piece_for_context(self, text: str, context_id: str) -> str:
        """Return the text to send so the context's pieces join into readable text.

        The sidecar concatenates a context's pieces verbatim. Tokens carry their own
        spacing; whole sentences do not, so a space is put between two of them.
        """
        busy = self._busy_contexts.get(context_id)
        previous = busy.text if busy and busy.waiting else self._open_contexts.get(context_id)
        if (
            previous
            and not self._is_streaming_tokens
            and not previous[-1:].isspace()
            and not text[:1].isspace()
        ):
            return " " + text
        return text

    async def _send_json(self, message: dict[str, Any]):
        await self._get_websocket().send(json.dumps(message))

    @traced_tts
    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Send a piece of text for a context; its audio arrives on the receive task.

        Args:
            text: The sentence (or token) to speak.
            context_id: The Pipecat context, used as the sidecar's context id.

        Yields:
            Frame: None once the text is sent, or an error and a stop frame on failure.
        """
        busy = self._busy_contexts.get(context_id)
        if busy and busy.waiting:
            # Refused with ``busy``: the text waits for the retry, which sends all of it.
            busy.text += self._piece_for_context(text, context_id)
            yield None
            return

        if not self._is_connected():
            await self._connect()
        if not self._is_connected():
            # _connect_websocket has reported why; not also counted as a context without audio.
            self._mark_ended(context_id)
            self._failed_contexts.append(context_id)
            yield TTSStoppedFrame(context_id=context_id)
            await self.remove_audio_context(context_id)
            return

        if context_id in self._ended_contexts:
            # The sidecar ended this context (an error, or the connection it lived on
            # closed); the text that was on its way to it is dropped.
            logger.debug(f"{self}: context {context_id} has ended; not sending [{text}]")
            await self._end_audio_context_now(context_id)
            return

        piece = self._piece_for_context(text, context_id)
        # Marked open before sending: an interruption that cancels this send must still
        # cancel whatever part of the text reached the sidecar.
        self._open_contexts[context_id] = self._open_contexts.get(context_id, "") + piece
        try:
            await self._send_json(self._build_synthesize_msg(piece, context_id))
        except Exception as e:
            # The receive task sees the closed connection and reconnects.
            self._mark_ended(context_id)
            yield ErrorFrame(error=f"{self}: sending text to the sidecar failed: {e}", exception=e)
            yield TTSStoppedFrame(context_id=context_id)
            await self.remove_audio_context(context_id)
            return
        await self.start_tts_usage_metrics(text)
        await self._note_text_sent(piece, context_id)
        yield None

    async def flush_audio(self, context_id: str | None = None):
        """End a context's text: the sidecar speaks the rest and answers ``done``.

        Args:
            context_id: The context to end; defaults to the active one.
        """
        flush_id = context_id or self.get_active_audio_context_id()
        if not flush_id or flush_id in self._ended_contexts:
            return
        busy = self._busy_contexts.get(flush_id)
        if busy and busy.waiting:
            busy.flushed = True  # sent after the retried text
            return
        if flush_id in self._open_contexts and self._is_connected():
            try:
                await self._send_json({"type": "flush", "context_id": flush_id})
                self._flushed_contexts.add(flush_id)
                return
            except Exception as e:
                logger.warning(f"{self}: flushing context {flush_id} failed: {e}")
        # No text reached the sidecar on a live connection (the service is unusable or
        # disconnected), so no ``done`` will come: end the context here.
        self._mark_ended(flush_id)
        await self._end_audio_context_now(flush_id)

    async def on_audio_context_interrupted(self, context_id: str):
        """Cancel the interrupted context on the sidecar, which stops generating it.

        Args:
            context_id: The interrupted context.
        """
        await self.stop_all_metrics()
        if context_id in self._open_contexts and self._is_connected():
            try:
                await self._send_json({"type": "cancel", "context_id": context_id})
            except Exception as e:
                logger.warning(f"{self}: cancelling context {context_id} failed: {e}")
        self._mark_ended(context_id)
        await super().on_audio_context_interrupted(context_id)

    def _mark_ended(self, context_id: str):
        self._open_contexts.pop(context_id, None)
        self._flushed_contexts.discard(context_id)
        # A retry waiting for it finds it gone and stops.
        self._busy_contexts.pop(context_id, None)
        self._untimed_audio_s.pop(context_id, None)
        if context_id not in self._ended_contexts:
            self._ended_contexts.append(context_id)

    #
    # Word timestamps
    #

    async def _note_text_sent(self, piece: str, context_id: str):
        """Time a piece sent for a context the sidecar does not time (after its ``started``).

        Text sent before ``started`` is timed when it comes.
        """
        if self._word_timestamps and context_id in self._untimed_audio_s:
            await self._time_untimed_words(piece, context_id)

    async def _time_untimed_words(self, text: str, context_id: str):
        """Time the words of text the sidecar will not time: at the audio received so far.

        A word cut by the end of a token piece is timed twice in part; Pipecat matches words
        against the text it sent, and whatever is left untimed it releases at the end of the
        context.
        """
        at = self._untimed_audio_s.get(context_id, 0.0)
        words = [(word, at) for word in text.split()]
        if words:
            await self.add_word_timestamps(words, context_id)

    async def _handle_started_timestamps(self, msg: dict[str, Any], context_id: str):
        """Note whether the sidecar times this context's words; if not, time the text sent."""
        if not self._word_timestamps or msg.get("word_timestamps") is True:
            return
        if context_id not in self._untimed_audio_s:
            logger.debug(
                f"{self}: the sidecar ({self._server_info.get('engine')}) sends no word "
                f"timestamps for context {context_id}; each sentence counts as heard when its "
                "audio starts"
            )
        if len(self._untimed_audio_s) > _ENDED_MEMORY:
            for stale in [c for c in self._untimed_audio_s if c in self._ended_contexts]:
                del self._untimed_audio_s[stale]
        self._untimed_audio_s[context_id] = 0.0
        await self._time_untimed_words(self._open_contexts.get(context_id, ""), context_id)

    async def _handle_timestamps(self, msg: dict[str, Any], context_id: str | None):
        """Hand the sidecar's word timings to Pipecat, which releases each word in time."""
        words, starts = msg.get("words"), msg.get("start")
        if not context_id or not isinstance(words, list) or not isinstance(starts, list):
            logger.warning(f"{self}: ignoring a malformed timestamps message: {msg!r:.200}")
            return
        if not self.audio_context_available(context_id):
            return  # a cancelled or interrupted context's timings still on the wire
        word_times = [
            (word, float(start))
            for word, start in zip(words, starts, strict=False)
            if isinstance(word, str) and isinstance(start, int | float)
        ]
        logger.trace(f"{self}: context {context_id} word times {word_times}")
        await self.add_word_timestamps(word_times, context_id)

    async def _end_audio_context_now(self, context_id: str):
        """Queue a context's ``TTSStoppedFrame`` and close it, if it is still open."""
        if self.audio_context_available(context_id):
            await self.append_to_audio_context(context_id, TTSStoppedFrame(context_id=context_id))
            await self.remove_audio_context(context_id)

    #
    # Receiving
    #

    async def _receive_messages(self):
        """Dispatch the sidecar's messages: JSON events and binary audio."""
        async for message in self._get_websocket():
            if isinstance(message, bytes):
                await self._handle_audio(message)
                continue
            try:
                msg = json.loads(message)
            except json.JSONDecodeError:
                logger.warning(f"{self}: ignoring a message that is not JSON: {message[:80]!r}")
                continue
            if isinstance(msg, dict):
                await self._handle_message(msg)

    async def _handle_audio(self, data: bytes):
        """Queue a binary frame as audio of the context being delivered."""
        context_id = self._delivering_context_id
        if not context_id or not self.audio_context_available(context_id):
            # Audio of a cancelled or interrupted context still on the wire.
            return
        data = self._pending_byte + data
        usable = len(data) - len(data) % 2
        self._pending_byte = data[usable:]
        if not usable:
            return
        frame = TTSAudioRawFrame(
            audio=data[:usable],
            sample_rate=self.sample_rate,
            num_channels=1,
            context_id=context_id,
        )
        if context_id in self._untimed_audio_s:
            self._untimed_audio_s[context_id] += usable / 2 / self.sample_rate
        await self.append_to_audio_context(context_id, frame)

    async def _handle_message(self, msg: dict[str, Any]):
        """Handle one JSON message from the sidecar.

        Args:
            msg: The decoded message.
        """
        msg_type = msg.get("type")
        context_id = msg.get("context_id")

        if msg_type == "timestamps":
            await self._handle_timestamps(msg, context_id)
        elif msg_type == "started":
            self._delivering_context_id = context_id
            self._pending_byte = b""
            if context_id:
                await self._handle_started_timestamps(msg, context_id)
            if msg.get("sample_rate", self.sample_rate) != self.sample_rate or (
                msg.get("encoding", ENCODING) != ENCODING
            ):
                logger.warning(
                    f"{self}: context {context_id} started as {msg.get('encoding')} at "
                    f"{msg.get('sample_rate')} Hz, not {ENCODING} at {self.sample_rate} Hz"
                )
        elif msg_type in ("done", "cancelled"):
            if context_id == self._delivering_context_id:
                self._delivering_context_id = None
            if context_id:
                self._mark_ended(context_id)
                await self._end_audio_context_now(context_id)
            if msg_type == "done":
                logger.debug(
                    f"{self}: context {context_id} done: {msg.get('audio_seconds')} s of audio, "
                    f"sidecar TTFB {msg.get('ttfb_ms')} ms"
                )
        elif msg_type == "error":
            await self._handle_error(msg)
        elif msg_type in ("voice_registered", "voice_deleted", "voices"):
            self._answer_voice_request(msg, None)
        elif msg_type == "ready":
            self._server_info = msg
            logger.debug(
                f"{self}: sidecar ready: engine {msg.get('engine')}, version {msg.get('version')}"
            )
            await self._restart_keepalive()
        else:
            logger.debug(f"{self}: ignoring sidecar message of type {msg_type!r}")

    async def _handle_error(self, msg: dict[str, Any]):
        """Report an ``error`` message; one that names a context ends that context."""
        error = voices.reply_error(msg)
        context_id = error.context_id
        if context_id is None and self._is_keepalive_refusal(error):
            self._keepalive_supported = False
            logger.warning(
                f"{self}: the sidecar does not know 'keepalive' (an older sidecar); without it, "
                "it closes a connection idle for its TTS_IDLE_SECONDS and the service reconnects"
            )
            await self._cancel_keepalive_task()
            return
        if context_id is None and self._voice_requests:
            # An error with no context answers a voice request (it echoes the voice id).
            self._answer_voice_request(msg, error)
            return
        if context_id is not None and error.code == "busy" and self._defer_busy_context(error):
            return
        if context_id is not None:
            if context_id == self._delivering_context_id:
                self._delivering_context_id = None
            self._mark_ended(context_id)
            if not self.audio_context_available(context_id):
                logger.debug(f"{self}: error for a context already ended: {error}")
                return
            self._failed_contexts.append(context_id)
        await self.push_error(
            error_msg=f"{self}: sidecar error [{error.code}]: {error.message}",
            exception=error,
            category=category_for_code(error.code),
        )
        if context_id is not None:
            await self._end_audio_context_now(context_id)
            if context_id == self._turn_context_id:
                # The rest of the turn opens a new sidecar context.
                self._turn_context_id = None
                self._turn_context_id = self.create_context_id()

    def _defer_busy_context(self, error: SidecarError) -> bool:
        """Arrange to send a context that the sidecar refused with ``busy`` again.

        The sidecar refuses a new context when it is at capacity (or the connection holds
        its share), before any of it is spoken, so sending all of its text again later loses
        nothing.

        Returns:
            True if it will be sent again (or already waits to be); False to report it.
        """
        context_id = error.context_id
        busy = self._busy_contexts.get(context_id)
        if busy and busy.waiting:
            return True  # a later piece of its text, refused like the first
        text = self._open_contexts.get(context_id)
        if text is None or not self.audio_context_available(context_id):
            return False
        if busy is None:
            busy = self._busy_contexts[context_id] = _BusyContext(self._new_busy_backoff())
        wait = busy.backoff.next_wait()
        if wait is None:
            logger.warning(
                f"{self}: context {context_id} still busy after {busy.backoff.retries} retries"
            )
            del self._busy_contexts[context_id]
            return False
        # No longer open on the sidecar: its further text and its flush wait for the retry.
        busy.text = text
        busy.flushed = context_id in self._flushed_contexts
        busy.waiting = True
        del self._open_contexts[context_id]
        self._flushed_contexts.discard(context_id)
        logger.info(
            f"{self}: context {context_id} refused [busy]: {error.message}; "
            f"retry {busy.backoff.retries} in {wait:.2f} s"
        )
        busy.task = self.create_task(
            self._resend_busy_context(context_id, busy, wait), name=f"busy-{context_id}"
        )
        return True

    async def _resend_busy_context(self, context_id: str, busy: _BusyContext, wait: float):
        """Send a context refused with ``busy`` again after ``wait`` seconds.

        If nothing else uses the connection, the text goes on a new one, so that a load
        balancer can place it on a sidecar with room (the one that refused it is full).
        """
        await self._wait_keeping_contexts(wait)
        if not self._still_busy(context_id, busy):
            return
        await self._connect(replace_if_idle=True, busy_backoff=busy.backoff)
        if not self._still_busy(context_id, busy):
            return
        if not self._is_connected():
            # _connect_websocket has reported why (no capacity within the budget, or no
            # sidecar at all): the context ends.
            self._mark_ended(context_id)
            self._failed_contexts.append(context_id)
            await self._end_audio_context_now(context_id)
            return
        busy.waiting = False
        self._open_contexts[context_id] = busy.text
        try:
            await self._send_json(self._build_synthesize_msg(busy.text, context_id))
            if busy.flushed:
                await self._send_json({"type": "flush", "context_id": context_id})
                self._flushed_contexts.add(context_id)
        except Exception as e:
            # The receive task sees the connection close and reports the context lost.
            logger.warning(f"{self}: sending context {context_id} again failed: {e}")

    def _still_busy(self, context_id: str, busy: _BusyContext) -> bool:
        """Returns: whether a retry is still due (not interrupted, not lost meanwhile)."""
        if self._busy_contexts.get(context_id) is not busy:
            return False
        if not self.audio_context_available(context_id):
            del self._busy_contexts[context_id]
            return False
        return True

    @staticmethod
    def _is_keepalive_refusal(error: SidecarError) -> bool:
        return error.code == "unknown_type" and "'keepalive'" in error.message

    async def _record_context_audio_outcome(self, context_id: str, received_audio: bool):
        """Count a silent context, unless the sidecar ended it with an error.

        The base class reports every context that completes without audio and writes the
        service off after a few in a row. A context the sidecar refused (a mistyped voice,
        say) has been reported as the sidecar's own error already; counting it as well would
        report it twice and make a few bad turns in a row fatal. (Pipecat 1.14's own hook,
        called once per completed context; the ``pipecat`` extra pins 1.14.)
        """
        if context_id in self._failed_contexts:
            self._failed_contexts.remove(context_id)
            if not received_audio:
                return
        await super()._record_context_audio_outcome(context_id, received_audio)

    def _answer_voice_request(self, msg: dict[str, Any], error: SidecarError | None):
        """Resolve the pending voice request a reply answers (see ``answer_voice_request``)."""
        if not answer_voice_request(self._voice_requests, msg, error):
            logger.debug(f"{self}: no voice request waits for this {msg.get('type')} message")

    #
    # Voices
    #

    async def register_voice(self, voice_id: str, wav_path: str | Path) -> dict[str, Any]:
        """Register a voice from a reference WAV file (3 to 30 s).

        Uses the service's connection when it is open, otherwise a short-lived one.
        Afterwards ``TTSUpdateSettingsFrame(delta=ChatterboxTTSService.Settings(
        voice=voice_id))`` speaks with it.

        Args:
            voice_id: The id to register the voice under (``^[A-Za-z0-9_-]{1,64}$``).
            wav_path: Path to the reference recording.

        Returns:
            The sidecar's ``voice_registered`` reply.

        Raises:
            SidecarError: The sidecar rejected the voice or the API key.
        """
        message = await voices.build_register_voice_message(voice_id, wav_path)
        return await self._voice_request(message)

    async def delete_voice(self, voice_id: str) -> dict[str, Any]:
        """Delete a registered voice.

        Args:
            voice_id: The voice to delete.

        Returns:
            The sidecar's ``voice_deleted`` reply.
        """
        return await self._voice_request({"type": "delete_voice", "voice_id": voice_id})

    async def list_voices(self) -> list[dict[str, Any]]:
        """List the sidecar's voices.

        Returns:
            The ``voices`` field of the sidecar's reply.
        """
        reply = await self._voice_request({"type": "list_voices"})
        return list(reply.get("voices", []))

    async def _voice_request(self, message: dict[str, Any]) -> dict[str, Any]:
        if not (self._is_connected() and self._receive_task):
            return await voices.send_voice_request(
                self._url, message, self._api_key, self._voice_request_timeout
            )
        future = asyncio.get_running_loop().create_future()
        entry = (message, future)
        self._voice_requests.append(entry)
        try:
            await self._send_json(message)
            async with asyncio.timeout(self._voice_request_timeout):
                return await future
        finally:
            if entry in self._voice_requests:
                self._voice_requests.remove(entry)
