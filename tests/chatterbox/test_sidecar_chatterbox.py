"""The sidecar with TTS_ENGINE=chatterbox on CPU, over protocol v1 (real T3 torch backend and
S3Gen code on random checkpoints in the real layout, loaded through the users' loader)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from chatterbox_sidecar.engines.chatterbox.model_files import speech_token_budget
from chatterbox_sidecar.engines.chatterbox.s3gen.stream import SAMPLES_PER_TOKEN
from chatterbox_sidecar.text import split_text

from tests.client import TTSClient

from .t3_checkpoint import write_scripted_model_dir
from .test_conditionals import voice_like

# slow: every sidecar start loads full-size S3Gen and warms it up
pytestmark = [pytest.mark.torch, pytest.mark.slow]

SCRIPT = torch.randperm(6561, generator=torch.Generator().manual_seed(11))[:150].tolist()


@pytest.fixture(scope="module")
def model_dir(s3gen_model_dir: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sidecar-chatterbox")
    return write_scripted_model_dir(folder, s3gen_model_dir, [*SCRIPT, 6562], n_layers=1)


def chatterbox_env(model_dir: Path) -> dict[str, str]:
    return {
        "TTS_ENGINE": "chatterbox",
        "TTS_MODEL_DIR": str(model_dir),
        "TTS_T3_BACKEND": "torch",
        "TTS_DEVICE": "cpu",
        "TTS_FLOW_STEPS": "2",
        "TTS_CHUNK_SIZE": "25",
        "TTS_CONTEXT_WINDOW": "25",
    }


PIECES = ["It costs $5 million,", " my friend. Call me", " back today!"]


def timestamps_of(client: TTSClient, context_id: str) -> list[dict]:
    return [
        m
        for m in client.messages
        if isinstance(m, dict) and m["type"] == "timestamps" and m["context_id"] == context_id
    ]


def check_timestamps(client: TTSClient, context_id: str, text: str, audio_seconds: float) -> None:
    """Every word of ``text`` once, in order, starts non-decreasing within the audio, and each
    ``timestamps`` message before the audio that holds its words (never after it)."""
    messages = [
        m for m in client.messages if isinstance(m, bytes) or m.get("context_id") == context_id
    ]
    kinds = [m["type"] if isinstance(m, dict) else "audio" for m in messages]
    start = kinds.index("started")  # contexts here run one after another: the audio between
    # this context's started and done is its own
    received_s, words = 0.0, []
    for m in messages[start + 1 :]:
        if isinstance(m, bytes):
            received_s += len(m) / 4 / 24000  # pcm_f32le at 24 kHz
        elif m["type"] == "timestamps":
            assert len(m["words"]) == len(m["start"]) == len(m["end"]) > 0
            assert min(m["start"]) >= received_s - 1 / 24000, (m, received_s)
            words += list(zip(m["words"], m["start"], m["end"], strict=True))
        elif m["type"] == "done":
            break
    assert [w for w, _, _ in words] == text.split()
    starts = [s for _, s, _ in words]
    assert starts == sorted(starts) and all(e >= s for _, s, e in words)
    assert 0 <= starts[0] and words[-1][2] <= audio_seconds + 0.01


def expected_seconds(text: str) -> float:
    tokens = sum(min(speech_token_budget(s), len(SCRIPT)) for s in split_text(text))
    return tokens * SAMPLES_PER_TOKEN / 24000


async def test_protocol_end_to_end_on_the_chatterbox_engine(sidecar_factory, model_dir):
    sidecar = sidecar_factory(**chatterbox_env(model_dir))
    status, health = sidecar.get_json("/health")
    assert status == 200 and health["engine"] == "chatterbox"
    async with await TTSClient.connect(sidecar.url) as client:
        ready = client.ready
        assert ready["engine"] == "chatterbox" and ready["native_sample_rate"] == 24000
        assert ready["can_clone"] is True
        text = "Hi there you."
        result = await client.synthesize(text, context_id="a", exaggeration=0.7, seed=3)
        assert result.started["exaggeration"] == 0.7
        assert result.end["type"] == "done"
        n = len(result.audio_bytes) // 4
        assert n == pytest.approx(expected_seconds(text) * 24000, abs=1)
        assert result.end["audio_seconds"] == pytest.approx(n / 24000, abs=1e-5)
        audio = result.audio()
        assert 0.001 < float(abs(audio).max()) <= 1.0
        # at 8 kHz mu-law the same token count gives a third of the samples
        phone = await client.synthesize(
            text, context_id="b", sample_rate=8000, encoding="pcm_mulaw", streaming=False
        )
        assert phone.started["streaming"] is False
        assert len(phone.audio_bytes) == pytest.approx(expected_seconds(text) * 8000, abs=2)
        # Word timestamps from T3's alignment heads (on this 1-layer checkpoint, the heads taken
        # modulo its shape: the path is arbitrary, the messages' shape and order are not).
        assert ready["word_timestamps"] is True
        assert not timestamps_of(client, "a") and not timestamps_of(client, "b")
        timed = await client.synthesize(
            text, context_id="w", word_timestamps=True, exaggeration=0.7, seed=3
        )
        assert timed.started["word_timestamps"] is True and timed.end["type"] == "done"
        assert timed.audio_bytes == result.audio_bytes  # recording the heads changes no token
        check_timestamps(client, "w", text, timed.end["audio_seconds"])

        # Several messages into one context ("$5" is spoken "five dollars", one word).
        for piece in PIECES:
            await client.send(
                {
                    "type": "synthesize",
                    "context_id": "m",
                    "text": piece,
                    "continue": True,
                    "word_timestamps": True,
                }
            )
        await client.send({"type": "flush", "context_id": "m"})
        many = (await client.collect(1))["m"]
        assert many.end["type"] == "done"
        check_timestamps(client, "m", "".join(PIECES), many.end["audio_seconds"])


async def test_cancel_and_cloned_voice_survive_restart(sidecar_factory, model_dir, tmp_path):
    sidecar = sidecar_factory(**chatterbox_env(model_dir))
    async with await TTSClient.connect(sidecar.url) as client:
        reply = await client.register_voice("carol", (voice_like(5.0, 22050, seed=4), 22050))
        assert reply["type"] == "voice_registered", reply
        conds = sidecar.voices_dir / "carol" / "conds.pt"
        assert conds.exists()
        stamp = conds.stat().st_mtime_ns
        result = await client.synthesize("Hi.", context_id="v1", voice_id="carol")
        assert result.end["type"] == "done" and result.started["voice_id"] == "carol"

        long_text = "This sentence is long enough to take a big budget of speech tokens."
        await client.send({"type": "synthesize", "text": long_text, "context_id": "long"})
        assert (await client.recv_json())["type"] == "started"
        assert isinstance(await client.recv(), bytes)
        await client.send({"type": "cancel", "context_id": "long"})
        ended = await client.collect(1)
        assert ended["long"].end["type"] == "cancelled"
        full = expected_seconds(long_text) * 24000 * 4
        assert len(ended["long"].audio_bytes) < full  # stopped before the whole utterance

    sidecar.stop()
    sidecar.start(timeout=300)
    async with await TTSClient.connect(sidecar.url) as client:
        assert "carol" in client.ready["voices"]
        result = await client.synthesize("Hi.", context_id="v2", voice_id="carol")
        assert result.end["type"] == "done"
    assert conds.stat().st_mtime_ns == stamp  # reused, not recomputed
