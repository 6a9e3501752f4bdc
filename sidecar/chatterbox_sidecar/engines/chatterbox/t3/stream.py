"""The async iterator a T3 backend returns: token deltas pushed by a producer, pulled by asyncio.

The producer (the torch backend's decode thread, or the vLLM adapter's pump task) calls
:meth:`TokenStream.push` and :meth:`TokenStream.finish` from any thread. The consumer iterates;
deltas that piled up while it was busy come out merged. Closing the stream (``aclose``), or
cancelling the task waiting in ``__anext__``, calls ``on_close`` once, which aborts the request.

Word timestamps: a request that asked for its alignment has one attention row per token pushed
with it (``push(tokens, alignment)``); the consumer collects the rows of the tokens it was
handed with :meth:`TokenStream.take_alignment`, in step with the tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

_END = object()


class TokenStream:
    """Async iterator of speech-token lists.

    Must be created inside a running event loop (the loop that will consume it).

    Args:
        on_close: Called once when the consumer stops early (close, cancel, garbage collection);
            not called when the producer finished the stream.
        text_tokens: The request's text tokens as strings (``[START]`` ... ``[STOP]``), when
            alignment rows come with its tokens; None otherwise.
    """

    def __init__(
        self, on_close: Callable[[], None] | None = None, text_tokens: list[str] | None = None
    ):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._on_close = on_close
        self._done = False  # producer finished (or consumer closed): no more items
        self._terminal: Any = None  # _END or an exception, seen while merging deltas
        self.text_tokens = text_tokens
        self._rows: list[Any] = []  # alignment rows of the tokens handed out, not yet taken

    # ---- producer side (any thread)

    def push(self, tokens: list[int], alignment: list[Any] | None = None) -> None:
        """Deliver new tokens (ignored if empty).

        Args:
            tokens: The new tokens.
            alignment: One attention row per token (``[heads, n_text]`` arrays), or None.
        """
        if tokens:
            if alignment is not None and len(alignment) != len(tokens):
                raise ValueError("one alignment row per token")
            self._put((list(tokens), alignment))

    def finish(self, error: BaseException | None = None) -> None:
        """End the stream, normally or with ``error`` raised to the consumer."""
        self._put(error if error is not None else _END)

    def _put(self, item: Any) -> None:
        try:
            if _running_loop() is self._loop:
                self._queue.put_nowait(item)
            else:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:
            pass  # the consumer's loop is gone

    # ---- consumer side

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> list[int]:
        if self._terminal is None and not self._done:
            try:
                item = await self._queue.get()
            except asyncio.CancelledError:
                self._close()
                raise
            tokens: list[int] = []
            while True:
                if isinstance(item, tuple):
                    tokens.extend(item[0])
                    if item[1] is not None:
                        self._rows.extend(item[1])
                else:
                    self._terminal = item
                    break
                if self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if tokens:
                return tokens
        terminal, self._terminal = self._terminal, None
        self._done = True
        if isinstance(terminal, BaseException):
            raise terminal
        raise StopAsyncIteration

    def take_alignment(self) -> list[Any]:
        """Returns: the alignment rows of the tokens handed out so far and not taken yet."""
        rows, self._rows = self._rows, []
        return rows

    async def aclose(self) -> None:
        """Stop consuming; aborts the request if it is still running."""
        self._close()

    def _close(self) -> None:
        if not self._done:
            self._done = True
            callback, self._on_close = self._on_close, None
            if callback is not None:
                callback()

    def __del__(self) -> None:
        if not self._done and self._on_close is not None:
            try:
                self._on_close()
            except Exception:  # noqa: BLE001 - never raise from a finaliser
                pass


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
