"""Issue 18: a GPU fault poisons the process; the sidecar says so and asks to be restarted.

A real CUDA fault cannot be raised on these CPU machines, so the fault enters at the engine
boundary: ``DeviceFaultingPiperEngine`` is the real piper engine that raises torch's own
``AcceleratorError`` (what torch raises on a device-side assert) for texts holding a marker,
directly or wrapped in an ``EngineError`` as the chatterbox engine wraps T3's failures.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from chatterbox_sidecar.engines.base import EngineError, is_device_fault
from websockets.exceptions import InvalidStatus

from tests.client import TTSClient
from tests.engine_faults import FaultInjectingPiperEngine, inprocess_sidecar

torch = pytest.importorskip("torch")


def test_device_faults_are_told_from_other_failures():
    assert is_device_fault(torch.AcceleratorError("CUDA error: device-side assert triggered"))
    wrapped = EngineError("T3 failed: boom")
    wrapped.__cause__ = torch.AcceleratorError("CUDA error: an illegal memory access")
    assert is_device_fault(wrapped)
    assert is_device_fault(RuntimeError("CUDA error: unspecified launch failure"))
    assert not is_device_fault(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert not is_device_fault(RuntimeError("shape mismatch"))
    assert not is_device_fault(EngineError("piper failed on a segment"))


def _device_fault(segment: str) -> BaseException | None:
    """torch's own CUDA fault for FAULT; wrapped as the chatterbox engine wraps T3's failures
    for WRAPPED FAULT."""
    if "WRAPPED FAULT" in segment.upper():
        try:
            raise torch.AcceleratorError("CUDA error: device-side assert triggered")
        except RuntimeError as e:
            wrapped = EngineError(f"T3 failed: {e}")
            wrapped.__cause__ = e
            return wrapped
    if "FAULT" in segment.upper():
        return torch.AcceleratorError("CUDA error: device-side assert triggered")
    return None


@pytest.fixture
async def faulting_server(tmp_path: Path):
    engine = FaultInjectingPiperEngine(_device_fault, max_concurrency=2)
    async with inprocess_sidecar(engine, tmp_path) as (app, port):
        yield app, port


def _get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("marker", ["fault", "wrapped fault"])
async def test_a_device_fault_fails_liveness_and_every_open_context(faulting_server, marker):
    app, port = faulting_server
    url = f"ws://127.0.0.1:{port}/v1/stream/tts"
    assert (await asyncio.to_thread(_get, port, "/health/live"))[0] == 200
    long_text = " ".join(f"Sentence {i} of a long reply that keeps going." for i in range(30))
    async with await TTSClient.connect(url) as bystander, await TTSClient.connect(url) as client:
        await bystander.send({"type": "synthesize", "text": long_text, "context_id": "long"})
        while not isinstance(await bystander.recv(), bytes):
            pass  # the bystander's context is in flight
        result = await client.synthesize(f"This text hits a {marker} on the GPU.")
        assert result.end["type"] == "error" and result.end["code"] == "engine_error"
        assert "device failed" in result.end["message"] and "restart" in result.end["message"]
        ended = await bystander.collect(1)  # in-flight contexts end too: the GPU is poisoned
        assert ended["long"].end["code"] == "engine_error"
        status, live = await asyncio.to_thread(_get, port, "/health/live")
        assert status == 503 and live["status"] == "device_fault"
        status, health = await asyncio.to_thread(_get, port, "/health")
        assert status == 503 and health["status"] == "device_fault"
        assert "error" not in health
        reply = await client.request({"type": "synthesize", "text": "Hello."}, "error")
        assert reply["code"] == "engine_error" and "device failed" in reply["message"]
    with pytest.raises(InvalidStatus) as info:
        await TTSClient.connect(url)
    assert info.value.response.status_code == 503
    assert app.metrics.device_fault._value.get() == 1
