"""The shortest Pipecat pipeline that speaks through a chatterbox sidecar: text in, a WAV out.

No audio device needed. Start a sidecar (``python -m chatterbox_sidecar``), then::

    python examples/minimal_pipeline.py --out hello.wav
    python examples/minimal_pipeline.py --voice alice "Hi, I'm Alice." "Nice to meet you."
"""

import argparse
import asyncio
import os
import wave

from pipecat.frames.frames import EndFrame, Frame, TTSAudioRawFrame, TTSSpeakFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner
from pipecat_chatterbox import ChatterboxTTSService

SENTENCES = [
    "Hello from the chatterbox sidecar.",
    "This audio went through a Pipecat pipeline.",
    "Every sentence streams back as soon as it is ready.",
]


class WavWriter(FrameProcessor):
    """Collects the TTS audio that passes by and writes it to a WAV file at the end."""

    def __init__(self, path: str):
        """Initialize the writer.

        Args:
            path: Where the WAV file goes.
        """
        super().__init__()
        self._path = path
        self._audio = bytearray()
        self._sample_rate = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        """Keep audio frames, write the file on ``EndFrame``, pass everything on.

        Args:
            frame: The frame to process.
            direction: The direction the frame travels.
        """
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self._audio += frame.audio
            self._sample_rate = frame.sample_rate
        elif isinstance(frame, EndFrame):
            with wave.open(self._path, "wb") as wav:
                wav.setnchannels(1)
                wav.setsampwidth(2)
                wav.setframerate(self._sample_rate or 24000)
                wav.writeframes(bytes(self._audio))
        await self.push_frame(frame, direction)


async def main():
    """Speak the sentences given on the command line into a WAV file."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sentences", nargs="*", default=SENTENCES, help="what to say")
    p.add_argument("--url", default=os.environ.get("TTS_URL", "ws://localhost:8002/v1/stream/tts"))
    p.add_argument("--api-key", default=os.environ.get("TTS_API_KEY"))
    p.add_argument("--voice", default="default")
    p.add_argument("--sample-rate", type=int, default=24000)
    p.add_argument("--out", default="minimal_pipeline.wav")
    args = p.parse_args()

    tts = ChatterboxTTSService(
        url=args.url,
        api_key=args.api_key,
        settings=ChatterboxTTSService.Settings(voice=args.voice),
    )
    worker = PipelineWorker(
        Pipeline([tts, WavWriter(args.out)]),
        params=PipelineParams(audio_out_sample_rate=args.sample_rate),
    )
    # The EndFrame comes out of the TTS after the last sentence's audio, then ends the run.
    await worker.queue_frames([TTSSpeakFrame(s) for s in args.sentences] + [EndFrame()])

    runner = WorkerRunner(handle_sigint=True)
    await runner.add_workers(worker)
    await runner.run()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
