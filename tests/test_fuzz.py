"""Hostile input: property-based fuzzing of the protocol parser and of a real server socket."""

from __future__ import annotations

import asyncio
import json

from chatterbox_sidecar import protocol
from chatterbox_sidecar.protocol import ERROR_CODES, ProtocolError, parse_client_message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

SERVER_TYPES = {
    "ready",
    "started",
    "done",
    "cancelled",
    "error",
    "voices",
    "voice_registered",
    "voice_deleted",
}
CLIENT_TYPES = ["synthesize", "flush", "cancel", "register_voice", "delete_voice", "list_voices"]
FIELDS = [
    "type",
    "text",
    "context_id",
    "continue",
    "voice_id",
    "streaming",
    "exaggeration",
    "cfg_weight",
    "temperature",
    "seed",
    "sample_rate",
    "encoding",
    "reference_audio",
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.sampled_from(
        ["", " ", "\u0000", "\ud800", "..", "../x", "a" * 300, "pcm_mulaw", "default"]
    )
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
messages = st.fixed_dictionaries(
    {"type": st.sampled_from(CLIENT_TYPES) | st.text(max_size=10)},
    optional={name: json_values for name in FIELDS[1:]},
)


def _check_parse(raw: str) -> None:
    try:
        parsed = parse_client_message(raw)
    except ProtocolError as e:
        assert e.code in ERROR_CODES
        assert isinstance(e.message, str) and e.message
        protocol.encode(protocol.error(e.code, e.message, e.context_id))  # always serialisable
    else:
        assert type(parsed).__name__ in {
            "Synthesize",
            "Flush",
            "Cancel",
            "RegisterVoice",
            "DeleteVoice",
            "ListVoices",
        }


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200))
def test_parser_never_crashes_on_text(raw):
    _check_parse(raw)


@settings(max_examples=600, deadline=None)
@given(json_values | messages)
def test_parser_never_crashes_on_json(value):
    _check_parse(json.dumps(value))


def _valid_server_message(item) -> None:
    if isinstance(item, bytes):
        return
    msg = json.loads(item)
    assert isinstance(msg, dict) and msg.get("type") in SERVER_TYPES, msg
    if msg["type"] == "error":
        assert msg["code"] in ERROR_CODES, msg


async def _exchange(url: str, frames: list) -> None:
    async with connect(url, max_size=None) as ws:
        _valid_server_message(await ws.recv())
        for frame in frames:
            await ws.send(frame)
        # a sentinel request: the connection must still answer after all of that
        await ws.send(json.dumps({"type": "list_voices"}))
        while True:
            item = await asyncio.wait_for(ws.recv(), 60)
            _valid_server_message(item)
            if isinstance(item, str) and json.loads(item)["type"] == "voices":
                break


frames = st.lists(
    messages.map(json.dumps)
    | json_values.map(json.dumps)
    | st.binary(max_size=64)
    | st.text(max_size=64)
    | st.just(json.dumps({"type": "synthesize", "text": "x" * 50_000}))
    | st.just(
        json.dumps({"type": "register_voice", "voice_id": "v", "reference_audio": "A" * 9999})
    ),
    max_size=12,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(frames)
def test_server_answers_hostile_frames_with_protocol_messages(sidecar, frames):
    asyncio.run(_exchange(sidecar.url, frames))
    # and the server is alive and healthy afterwards
    assert sidecar.proc.poll() is None
    assert sidecar.get_json("/health")[0] == 200
    assert "Traceback" not in sidecar.log_text(), "an exception escaped while handling input"
