"""One phone call: the Pipecat pipeline behind a Twilio Media Stream.

Twilio (8 kHz mu-law) -> Silero VAD -> Whisper STT -> LLM (OpenAI-compatible, or the echo
stand-in) -> ``ChatterboxTTSService`` -> back to Twilio. The pipeline runs at 16 kHz in, because
``WhisperSTTService`` hands PCM straight to faster-whisper, which assumes 16 kHz, and 8 kHz out,
so the sidecar speaks at the phone's own rate; the Twilio serializer converts both ways. A
barge-in interrupts the bot, and the serializer turns the interruption into Twilio's ``clear``
event so audio Twilio has buffered stops too.
"""

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loguru import logger
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import TTSSpeakFrame
from pipecat.observers.user_bot_latency_observer import UserBotLatencyObserver
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)
from pipecat.workers.runner import WorkerRunner
from pipecat_chatterbox import ChatterboxTTSService
from starlette.websockets import WebSocket
from whisper_model import DEFAULT as DEFAULT_WHISPER_MODEL

if TYPE_CHECKING:
    from pipecat.services.whisper.stt import WhisperSTTService

DEFAULT_TTS_URL = "ws://localhost:8002/v1/stream/tts"
DEFAULT_LLM_MODEL = "gpt-4.1-mini"
DEFAULT_GREETING = "Hello! Thanks for calling. How can I help you today?"
DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly assistant on a phone call. Your replies are spoken aloud, so answer "
    "in one or two short sentences of plain text, with no lists, markdown or emoji."
)

# Twilio sends and expects 8 kHz mu-law. Whisper wants 16 kHz in; the TTS speaks 8 kHz out.
AUDIO_IN_SAMPLE_RATE = 16000
AUDIO_OUT_SAMPLE_RATE = 8000

LLM_MODES = ("openai", "echo")


@dataclass
class BotConfig:
    """Everything a call's pipeline is built from.

    Parameters:
        tts_url: The sidecar's websocket URL.
        tts_api_key: The sidecar's ``TTS_API_KEY``, or None for an open sidecar.
        voice: The sidecar voice to speak with (``default`` or a registered voice id).
        whisper_model: A faster-whisper model name (``base.en``, ``small.en``, ...) or the path
            of a local CTranslate2 model folder.
        whisper_device: ``cpu``, ``cuda`` or ``auto``.
        llm: ``openai`` (any OpenAI-compatible endpoint) or ``echo`` (no model at all).
        llm_base_url: The endpoint's base URL (``http://localhost:8000/v1`` for vLLM,
            ``http://localhost:11434/v1`` for Ollama); None for OpenAI itself.
        llm_model: The model name the endpoint serves.
        llm_api_key: The endpoint's API key (any non-empty string for a local server).
        system_prompt: The LLM's system instruction.
        greeting: What the bot says when the call connects; empty for silence.
        twilio_account_sid: Twilio account SID; with the auth token, the bot hangs up the call
            through Twilio's REST API when its pipeline ends.
        twilio_auth_token: Twilio auth token.
    """

    tts_url: str = DEFAULT_TTS_URL
    tts_api_key: str | None = None
    voice: str = "default"
    whisper_model: str = DEFAULT_WHISPER_MODEL
    whisper_device: str = "auto"
    llm: str = "openai"
    llm_base_url: str | None = None
    llm_model: str = DEFAULT_LLM_MODEL
    llm_api_key: str | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    greeting: str = DEFAULT_GREETING
    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = None

    @property
    def can_hang_up(self) -> bool:
        """Returns: whether Twilio credentials are set, so the serializer can end calls."""
        return bool(self.twilio_account_sid and self.twilio_auth_token)


def create_stt(config: BotConfig) -> "WhisperSTTService":
    """Load the Whisper speech-to-text service (blocking: the model is read from disk).

    Args:
        config: The bot's configuration.

    Returns:
        A ``WhisperSTTService`` for ``config.whisper_model``.
    """
    # Imported here: faster-whisper is only needed once a call comes in.
    from pipecat.services.whisper.stt import WhisperSTTService

    return WhisperSTTService(
        device=config.whisper_device,
        # CTranslate2 picks the fastest type the device supports (int8 on a CPU).
        compute_type="auto",
        settings=WhisperSTTService.Settings(model=config.whisper_model),
    )


def create_llm(config: BotConfig) -> FrameProcessor:
    """Create the LLM step of the pipeline.

    Args:
        config: The bot's configuration.

    Returns:
        An ``OpenAILLMService`` for ``config.llm == "openai"``, else an ``EchoLLM``.

    Raises:
        ValueError: For an unknown ``config.llm``.
    """
    if config.llm == "echo":
        from echo_llm import EchoLLM

        return EchoLLM()
    if config.llm == "openai":
        from pipecat.services.openai.llm import OpenAILLMService

        return OpenAILLMService(
            # The OpenAI client insists on a key; local servers accept any.
            api_key=config.llm_api_key or ("unused" if config.llm_base_url else None),
            base_url=config.llm_base_url,
            settings=OpenAILLMService.Settings(
                model=config.llm_model, system_instruction=config.system_prompt
            ),
        )
    raise ValueError(f"unknown LLM mode {config.llm!r}: expected one of {', '.join(LLM_MODES)}")


async def run_bot(websocket: WebSocket, config: BotConfig):
    """Run one call's pipeline on an accepted Twilio Media Streams websocket until it ends.

    Args:
        websocket: The accepted websocket; Twilio's ``connected`` and ``start`` messages
            have not been read yet.
        config: The bot's configuration.
    """
    transport_type, call_data = await parse_telephony_websocket(websocket)
    if transport_type != "twilio":
        logger.error(f"expected a Twilio media stream, got {transport_type!r}; closing")
        await websocket.close(code=1008)
        return
    stream_sid = call_data["stream_id"]
    call_sid = call_data["call_id"]
    logger.info(f"call {call_sid}: stream {stream_sid} started")

    serializer = TwilioFrameSerializer(
        stream_sid=stream_sid,
        call_sid=call_sid,
        account_sid=config.twilio_account_sid,
        auth_token=config.twilio_auth_token,
        # Hanging up needs Twilio's REST API; without credentials the caller hangs up.
        params=TwilioFrameSerializer.InputParams(auto_hang_up=config.can_hang_up),
    )
    transport = FastAPIWebsocketTransport(
        websocket=websocket,
        params=FastAPIWebsocketParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            add_wav_header=False,
            serializer=serializer,
        ),
    )

    # Loading the Whisper model reads it from disk: keep that off the event loop, which
    # carries the audio of every other call.
    stt = await asyncio.to_thread(create_stt, config)
    llm = create_llm(config)
    tts = ChatterboxTTSService(
        url=config.tts_url,
        api_key=config.tts_api_key,
        settings=ChatterboxTTSService.Settings(voice=config.voice),
    )

    context = LLMContext()
    user_aggregator, assistant_aggregator = LLMContextAggregatorPair(
        context,
        user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer()),
    )

    pipeline = Pipeline(
        [
            transport.input(),
            stt,
            user_aggregator,
            llm,
            tts,
            transport.output(),
            assistant_aggregator,
        ]
    )

    latency_observer = UserBotLatencyObserver()
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(
            audio_in_sample_rate=AUDIO_IN_SAMPLE_RATE,
            audio_out_sample_rate=AUDIO_OUT_SAMPLE_RATE,
            enable_metrics=True,
            enable_usage_metrics=True,
        ),
        observers=[latency_observer],
    )

    @latency_observer.event_handler("on_latency_measured")
    async def on_latency_measured(observer, latency_seconds: float):
        logger.info(
            f"call {call_sid}: turn latency {latency_seconds * 1000:.0f} ms "
            "(user stopped speaking -> first bot audio)"
        )

    @latency_observer.event_handler("on_latency_breakdown")
    async def on_latency_breakdown(observer, breakdown):
        for line in breakdown.turn_contribution_lines():
            logger.debug(f"call {call_sid}:   {line}")

    @user_aggregator.event_handler("on_user_turn_stopped")
    async def on_user_turn_stopped(aggregator, strategy, message):
        logger.info(f"call {call_sid}: caller said {message.content!r}")

    @assistant_aggregator.event_handler("on_assistant_turn_stopped")
    async def on_assistant_turn_stopped(aggregator, message):
        # The TTS sends word timestamps, so an interrupted reply holds only what was heard.
        cut = " (interrupted: only the words the caller heard)" if message.interrupted else ""
        logger.info(f"call {call_sid}: bot said {message.content!r}{cut}")

    @worker.event_handler("on_pipeline_started")
    async def on_pipeline_started(worker, frame):
        # Audio from before this moment (while the call's Whisper model loads) is not heard.
        logger.info(f"call {call_sid}: listening")

    @transport.event_handler("on_client_connected")
    async def on_client_connected(transport, client):
        if config.greeting:
            await worker.queue_frames([TTSSpeakFrame(config.greeting)])

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client):
        logger.info(f"call {call_sid}: caller hung up")
        await worker.cancel()

    # uvicorn owns the process's signals.
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()
    logger.info(f"call {call_sid}: ended")
