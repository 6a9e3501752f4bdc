"""The ``vllm`` T3 backend: a thin adapter over vLLM's async engine running chatterbox-vllm's T3.

One vLLM request per :class:`T3Request`, streamed as per-token deltas; closing the stream
aborts it. Sampling parameters go through as the request gives them (chatterbox-vllm's own API
drops ``min_p`` and defaults the repetition penalty to 2.0; we do neither). The voice
conditioning rows are computed here with our T3 conditioning encoder, as chatterbox-vllm
expects them (a [34, 1024] CPU tensor per request).

Known limits of chatterbox-vllm that this adapter cannot fix: the guidance scale is one global
value (``CHATTERBOX_CFG_SCALE``, read by the vLLM worker at start, set here from ``cfg_scale``),
its unconditional branch has no context, and learned speech positions are not applied while
decoding. The ``torch`` backend has none of these. No word timestamps either: vLLM's attention
kernels never expose attention probabilities, so ``word_alignment`` stays False and the
engine's ``started`` says ``word_timestamps: false`` with this backend.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from chatterbox_sidecar.engines.chatterbox.model_files import ensure_vllm_model_dir
from chatterbox_sidecar.engines.chatterbox.t3.backend import T3Backend, T3Request
from chatterbox_sidecar.engines.chatterbox.t3.model import (
    SPEECH_VOCAB_VALID,
    STOP_SPEECH_TOKEN,
    T3Model,
)
from chatterbox_sidecar.engines.chatterbox.t3.stream import TokenStream
from chatterbox_sidecar.engines.chatterbox.t3.text import t3_prompt

#: chatterbox-vllm shifts speech ids by this much inside vLLM (ids below it are prompt ids).
SPEECH_TOKEN_OFFSET = 2500


@dataclass(frozen=True)
class VllmApi:
    """The few vLLM entry points the adapter uses (tests pass fakes).

    Parameters:
        make_engine: Builds the async engine from engine keyword arguments.
        sampling_params: ``SamplingParams`` (or a stand-in taking the same keywords).
        delta_kind: ``RequestOutputKind.DELTA``.
    """

    make_engine: Callable[[dict[str, Any]], Any]
    sampling_params: Callable[..., Any]
    delta_kind: Any


def load_vllm_api() -> VllmApi:
    """Import vLLM (0.10, V1 engine) and register chatterbox-vllm's model and tokenizer."""
    from chatterbox_sidecar.engines.chatterbox.vllm_plugin import register

    register()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    def make_engine(kwargs: dict[str, Any]) -> Any:
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

    return VllmApi(make_engine, SamplingParams, RequestOutputKind.DELTA)


class VllmT3Backend(T3Backend):
    """T3 on vLLM through chatterbox-vllm.

    Args:
        model_dir: Folder with the Chatterbox files (``t3_cfg.safetensors``, ``tokenizer.json``).
        t3_model_dir: The vLLM model folder to create or repair (``TTS_T3_MODEL_DIR``).
        max_model_len: vLLM context length (see :func:`.model_files.max_model_len`).
        max_num_seqs: Requests vLLM decodes at once.
        gpu_memory_utilization: Share of GPU memory vLLM may take (weights plus KV cache);
            leave room for S3Gen.
        enforce_eager: True disables CUDA graphs (chatterbox-vllm reports wrong output with
            them).
        cfg_scale: The global guidance scale (``CHATTERBOX_CFG_SCALE``).
        conditioning_device: Where the conditioning encoder runs.
        engine_kwargs: Extra vLLM engine arguments (override the above).
        vllm_api: vLLM entry points; None imports vLLM in :meth:`start`.
    """

    def __init__(
        self,
        model_dir: str | Path,
        t3_model_dir: str | Path,
        *,
        max_model_len: int,
        max_num_seqs: int = 16,
        gpu_memory_utilization: float = 0.4,
        enforce_eager: bool = True,
        cfg_scale: float = 0.5,
        conditioning_device: str = "cpu",
        engine_kwargs: dict[str, Any] | None = None,
        vllm_api: VllmApi | None = None,
    ):
        self.model_dir = Path(model_dir)
        self.t3_model_dir = Path(t3_model_dir)
        self.max_model_len = max_model_len
        self.cfg_scale = cfg_scale
        self.conditioning_device = conditioning_device
        self._engine_kwargs = {
            "tokenizer": "EnTokenizer",
            "tokenizer_mode": "custom",
            "task": "generate",
            "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enforce_eager": enforce_eager,
            **(engine_kwargs or {}),
        }
        self._api = vllm_api
        self._engine: Any = None
        self._conditioner: T3Model | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned_cfg = False

    async def start(self) -> None:
        """Prepare the vLLM model folder, load the conditioning encoder, start vLLM."""
        api = self._api or load_vllm_api()
        self._api = api
        folder = await asyncio.to_thread(ensure_vllm_model_dir, self.t3_model_dir, self.model_dir)
        self._conditioner = await asyncio.to_thread(
            T3Model.from_safetensors,
            self.model_dir / "t3_cfg.safetensors",
            device=self.conditioning_device,
            with_backbone=False,
        )
        os.environ["CHATTERBOX_CFG_SCALE"] = str(self.cfg_scale)
        kwargs = {"model": str(folder), **self._engine_kwargs}
        logger.info(f"Starting vLLM for T3: {kwargs}")
        self._engine = api.make_engine(kwargs)

    def generate(self, request: T3Request) -> TokenStream:
        """Submit ``request`` to vLLM; its speech tokens stream out (see T3Backend)."""
        if self._engine is None or self._api is None:
            raise RuntimeError("VllmT3Backend is not started")
        if request.cfg_weight != self.cfg_scale and not self._warned_cfg:
            self._warned_cfg = True
            logger.warning(
                f"vLLM backend: cfg_weight {request.cfg_weight} ignored, chatterbox-vllm "
                f"applies the global CHATTERBOX_CFG_SCALE={self.cfg_scale}"
            )
        params = self._api.sampling_params(
            temperature=request.temperature,
            top_p=request.top_p,
            min_p=request.min_p,
            repetition_penalty=request.repetition_penalty,
            max_tokens=max(1, min(request.max_new_tokens, self.max_model_len)),
            stop_token_ids=[STOP_SPEECH_TOKEN + SPEECH_TOKEN_OFFSET],
            seed=request.seed,
            output_kind=self._api.delta_kind,
            detokenize=False,
        )
        loop = asyncio.get_running_loop()
        task: asyncio.Task[None] | None = None

        def on_close() -> None:
            if task is not None:
                loop.call_soon_threadsafe(task.cancel)

        stream = TokenStream(on_close=on_close)
        task = loop.create_task(self._pump(request, params, stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return stream

    async def _pump(self, request: T3Request, params: Any, stream: TokenStream) -> None:
        request_id = request.request_id
        try:
            cond = await asyncio.to_thread(self._conditioning, request)
            prompt = {
                "prompt": t3_prompt(request.text),
                "multi_modal_data": {"conditionals": [cond]},
            }
            async for output in self._engine.generate(prompt, params, request_id):
                speech = [t - SPEECH_TOKEN_OFFSET for t in output.outputs[0].token_ids]
                stream.push([t for t in speech if 0 <= t < SPEECH_VOCAB_VALID])
                if output.finished:
                    break
        except asyncio.CancelledError:
            stream.finish(RuntimeError(f"T3 request {request_id} aborted"))
            await self._engine.abort(request_id)
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the request's consumer
            logger.warning(f"vLLM T3 request {request_id} failed: {exc}")
            stream.finish(exc)
            return
        stream.finish()

    def _conditioning(self, request: T3Request) -> torch.Tensor:
        assert self._conditioner is not None
        conds = request.conditionals

        def field(name: str) -> Any:
            return conds.get(name) if isinstance(conds, dict) else getattr(conds, name, None)

        with torch.inference_mode():
            rows = self._conditioner.conditioning(
                field("speaker_emb"), field("cond_prompt_speech_tokens"), request.exaggeration
            )
        return rows.float().cpu()

    async def close(self) -> None:
        """Abort running requests and shut vLLM down."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        engine, self._engine = self._engine, None
        if engine is not None and hasattr(engine, "shutdown"):
            engine.shutdown()
        self._conditioner = None
