"""A stand-in LLM that repeats what the caller said, so the call loop runs with no model.

``--llm echo`` puts :class:`EchoLLM` where the OpenAI-compatible service would go: it answers
each user turn with "You said: <transcript>", streamed as LLM text frames the way a real LLM
answers, so sentence aggregation, the TTS, interruptions and the context aggregators all see
the frames they see in production.
"""

from loguru import logger
from pipecat.frames.frames import (
    Frame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext, standard_message_text
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

# What the bot says when the last user turn carried no words (a barge-in with no transcript).
DEFAULT_NOTHING_HEARD = "Sorry, I didn't catch that."


class EchoLLM(FrameProcessor):
    """Answers every user turn with what the user said.

    It takes the place of an LLM service between the user and assistant context aggregators:
    on each ``LLMContextFrame`` it pushes ``LLMFullResponseStartFrame``, the reply as
    ``LLMTextFrame`` tokens (one per word) and ``LLMFullResponseEndFrame``. Every other frame
    passes through.
    """

    def __init__(
        self, *, prefix: str = "You said:", nothing_heard: str = DEFAULT_NOTHING_HEARD, **kwargs
    ):
        """Initialize the echo LLM.

        Args:
            prefix: Words put before the echoed transcript.
            nothing_heard: The reply when the last message is not a user message with text.
            **kwargs: Passed on to ``FrameProcessor``.
        """
        super().__init__(**kwargs)
        self._prefix = prefix
        self._nothing_heard = nothing_heard

    def reply_for(self, context: LLMContext) -> str:
        """Build the reply to a context.

        Args:
            context: The conversation so far.

        Returns:
            ``"<prefix> <last user message>"``, or the nothing-heard reply when the last message
            is not a user message with text.
        """
        messages = context.get_messages()
        if messages:
            last = messages[-1]
            if isinstance(last, dict) and last.get("role") == "user":
                heard = " ".join(standard_message_text(last).split())
                if heard:
                    return f"{self._prefix} {heard}"
        return self._nothing_heard

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        """Answer context frames; pass every other frame on.

        Args:
            frame: The frame to process.
            direction: The direction the frame travels.
        """
        await super().process_frame(frame, direction)

        if isinstance(frame, LLMContextFrame):
            if frame.speculation:
                # A provisional inference for an unconfirmed turn: the real one follows.
                return
            await self._answer(frame.context)
        else:
            await self.push_frame(frame, direction)

    async def _answer(self, context: LLMContext):
        reply = self.reply_for(context)
        logger.debug(f"{self}: replying {reply!r}")
        await self.push_frame(LLMFullResponseStartFrame())
        words = reply.split(" ")
        for i, word in enumerate(words):
            await self.push_frame(LLMTextFrame(word if i == 0 else f" {word}"))
        await self.push_frame(LLMFullResponseEndFrame())
