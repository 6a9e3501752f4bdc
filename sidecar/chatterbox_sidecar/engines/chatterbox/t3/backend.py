"""The T3 backend interface: text and voice conditioning in, speech tokens out, streamed.

Two backends implement it: ``torch`` (our own inference, :mod:`.torch_backend`) and ``vllm``
(chatterbox-vllm on vLLM, :mod:`.vllm_backend`). The engine talks to this interface only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class T3Request:
    """One context's generation request.

    Parameters:
        request_id: Unique id (the engine uses the context id plus a segment index).
        text: Normalised text of one segment (at most ~300 characters).
        conditionals: The voice's T3 conditionals (speaker embedding, prompt speech tokens);
            backend-specific tensors, as loaded from ``conds.pt``.
        exaggeration: Emotion intensity, applied per request.
        cfg_weight: Classifier-free guidance weight (0 disables guidance).
        temperature: Sampling temperature.
        top_p: Nucleus sampling threshold.
        min_p: Minimum probability relative to the most likely token.
        repetition_penalty: Penalty on already generated tokens (upstream English: 1.2).
        max_new_tokens: Speech-token budget for this segment.
        seed: Random seed, or None.
        language: ISO 639-1 code of the text (the multilingual model's language token).
        alignment: Stream the text alignment of each speech token with it (word timestamps;
            only on a backend whose ``word_alignment`` is True, see :meth:`T3Backend.generate`).
    """

    request_id: str
    text: str
    conditionals: Any
    exaggeration: float = 0.5
    cfg_weight: float = 0.5
    temperature: float = 0.8
    top_p: float = 1.0
    min_p: float = 0.05
    repetition_penalty: float = 1.2
    max_new_tokens: int = 1000
    seed: int | None = None
    language: str = "en"
    alignment: bool = False


class T3Backend(ABC):
    """Generates S3 speech tokens (ids < 6561) for requests, many at once."""

    #: Whether requests with ``alignment`` get their attention alignment streamed (the torch
    #: backend's Original model; never vLLM, whose attention kernels expose no probabilities).
    word_alignment: bool = False

    @abstractmethod
    async def start(self) -> None:
        """Load weights and warm up."""

    @abstractmethod
    def generate(self, request: T3Request) -> AsyncIterator[list[int]]:
        """Stream the speech tokens of one request as they are sampled.

        Args:
            request: The request.

        Returns:
            An async iterator of token-id lists (deltas, in order; only valid speech tokens,
            never the start/stop tokens). It ends at the stop token or the budget. Closing it
            or cancelling its consumer aborts the request. With ``request.alignment`` on a
            backend with ``word_alignment``, it is a :class:`~.stream.TokenStream` whose
            ``text_tokens`` and ``take_alignment()`` give each token's attention over the text.
        """

    @abstractmethod
    async def close(self) -> None:
        """Release the model."""
