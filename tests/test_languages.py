"""``language`` on synthesize: parsed as ISO 639-1, checked against the model's languages
(``unsupported`` otherwise, the connection stays usable), echoed in ``started``, and the same in
the HTTP routes. Runs on the piper engine, which speaks English only."""

from __future__ import annotations

import json

import aiohttp
import pytest
from chatterbox_sidecar import protocol
from chatterbox_sidecar.engines.base import EngineInfo
from chatterbox_sidecar.protocol import ProtocolError, parse_client_message

from tests.client import TTSClient


def synthesize(**fields) -> protocol.Synthesize:
    return parse_client_message(json.dumps({"type": "synthesize", "text": "Hi.", **fields}))


@pytest.mark.parametrize(
    "value, code", [("es", "es"), ("EN", "en"), ("pt-BR", "pt"), ("zh_Hant", "zh"), (None, None)]
)
def test_language_is_an_iso_639_1_code(value, code):
    assert synthesize(language=value).language == code


@pytest.mark.parametrize("value", ["english", "e", "123", "en-", "es-MX-", 5, ["en"]])
def test_anything_else_is_an_invalid_request(value):
    with pytest.raises(ProtocolError) as e:
        synthesize(context_id="c1", language=value)
    assert e.value.code == "invalid_request" and e.value.context_id == "c1"
    assert "'language'" in e.value.message


def test_started_echoes_the_language_in_effect():
    msg = synthesize()
    assert protocol.started("c", msg, True, language="en")["language"] == "en"
    assert protocol.started("c", synthesize(language="fr"), True)["language"] == "fr"


def test_default_language_is_english_where_the_model_has_it():
    info = EngineInfo("x", 24000, True, 1)
    assert info.languages == ("en",) and info.default_language == "en"
    assert EngineInfo("x", 24000, True, 1, languages=("de", "en")).default_language == "en"
    assert EngineInfo("x", 24000, True, 1, languages=("sv", "de")).default_language == "sv"


async def test_websocket_language_on_an_english_only_engine(sidecar):
    async with await TTSClient.connect(sidecar.url) as client:
        assert client.ready["languages"] == ["en"] and client.ready["default_language"] == "en"
        refused = await client.synthesize("Hola.", context_id="es", language="es")
        assert refused.end["type"] == "error" and refused.end["code"] == "unsupported"
        assert "'es'" in refused.end["message"]
        assert "chatterbox-multilingual" in refused.end["message"]
        # the connection stays usable
        spoken = await client.synthesize("Hello there.", context_id="en", language="en-US")
        assert spoken.end["type"] == "done" and spoken.started["language"] == "en"
        default = await client.synthesize("Hello again.", context_id="d")
        assert default.end["type"] == "done" and default.started["language"] == "en"


async def test_http_routes_take_and_check_the_language(sidecar):
    async with aiohttp.ClientSession() as session:
        url = sidecar.http_url
        body = {"text": "Hello there.", "language": "en"}
        async with session.post(f"{url}/v1/synthesize", json=body) as r:
            assert r.status == 200 and r.content_type == "audio/wav"
        body = {"text": "Bonjour.", "language": "fr"}
        async with session.post(f"{url}/v1/synthesize", json=body) as r:
            assert r.status == 400 and (await r.json())["code"] == "unsupported"
        speech = {"model": "tts-1", "input": "Hallo.", "voice": "alloy", "language": "de"}
        async with session.post(f"{url}/v1/audio/speech", json=speech) as r:
            assert r.status == 400
            assert "'de'" in (await r.json())["error"]["message"]
        speech["language"] = "german"
        async with session.post(f"{url}/v1/audio/speech", json=speech) as r:
            error = (await r.json())["error"]
            assert r.status == 400 and error["param"] == "language"
        one_shot = f"{url}/v1/synthesize"
        for language, status, code in (("x1", 400, "invalid_request"), ("sv", 400, "unsupported")):
            async with session.get(one_shot, params={"text": "Hi", "language": language}) as r:
                assert r.status == status and (await r.json())["code"] == code
        async with session.get(one_shot, params={"text": "Hi", "language": "en"}) as r:
            assert r.status == 200
