"""A FAKE of the slice of vLLM's async API the vLLM T3 backend uses (vLLM cannot run here).

``FakeAsyncLLM`` has ``AsyncLLM``'s ``generate(prompt, sampling_params, request_id)`` (an async
generator of request outputs), ``abort(request_id)`` and ``shutdown()``. Instead of a model it
plays a scripted list of speech ids (shifted by chatterbox-vllm's 2500 offset, as the real model
emits them), honouring ``max_tokens``, ``stop_token_ids`` and the output kind (cumulative unless
DELTA is asked for). It records what it was given, so tests can check what the adapter sends.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from chatterbox_sidecar.engines.chatterbox.t3.vllm_backend import SPEECH_TOKEN_OFFSET, VllmApi

FAKE_DELTA = "FAKE_DELTA"  # stands in for vllm.sampling_params.RequestOutputKind.DELTA


@dataclass
class FakeSamplingParams:
    """The ``SamplingParams`` keywords the adapter uses."""

    temperature: float = 1.0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    output_kind: Any = None
    detokenize: bool = True


@dataclass
class FakeCompletionOutput:
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class FakeRequestOutput:
    request_id: str
    outputs: list[FakeCompletionOutput]
    finished: bool


class FakeAsyncLLM:
    """Plays ``script`` (speech ids, no offset) for every request.

    Args:
        engine_kwargs: What the adapter would pass to ``AsyncEngineArgs``.
        script: Speech ids to emit (6562 is the stop token).
        delay: Seconds between tokens.
        fail_after: Raise an error after this many tokens (None: never).
    """

    def __init__(
        self,
        engine_kwargs: dict[str, Any],
        script: list[int],
        delay: float = 0.0,
        fail_after: int | None = None,
    ):
        self.engine_kwargs = engine_kwargs
        self.script = script
        self.delay = delay
        self.fail_after = fail_after
        self.requests: dict[str, tuple[dict[str, Any], FakeSamplingParams]] = {}
        self.aborted: list[str] = []
        self.running: set[str] = set()
        self.shut_down = False

    async def generate(
        self, prompt: dict[str, Any], sampling_params: FakeSamplingParams, request_id: str
    ):
        self.requests[request_id] = (prompt, sampling_params)
        self.running.add(request_id)
        emitted: list[int] = []
        try:
            for i, speech_id in enumerate(self.script):
                if self.fail_after is not None and i >= self.fail_after:
                    raise RuntimeError("fake engine failure")
                if request_id in self.aborted:
                    return
                await asyncio.sleep(self.delay)
                token = speech_id + SPEECH_TOKEN_OFFSET
                emitted.append(token)
                stop = token in sampling_params.stop_token_ids
                finished = stop or len(emitted) >= sampling_params.max_tokens
                ids = [token] if sampling_params.output_kind == FAKE_DELTA else list(emitted)
                reason = "stop" if stop else ("length" if finished else None)
                yield FakeRequestOutput(request_id, [FakeCompletionOutput(ids, reason)], finished)
                if finished:
                    return
        finally:
            self.running.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        self.shut_down = True


def fake_vllm_api(script: list[int], **fake_kwargs: Any) -> tuple[VllmApi, list[FakeAsyncLLM]]:
    """A ``VllmApi`` building FakeAsyncLLM engines; the list collects the engines built."""
    engines: list[FakeAsyncLLM] = []

    def make_engine(kwargs: dict[str, Any]) -> FakeAsyncLLM:
        engine = FakeAsyncLLM(kwargs, script, **fake_kwargs)
        engines.append(engine)
        return engine

    return VllmApi(make_engine, FakeSamplingParams, FAKE_DELTA), engines
