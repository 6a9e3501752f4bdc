"""ChatterboxEngine end to end on CPU: real T3 (torch backend) and S3Gen code, random weights.

T3 is a scripted checkpoint (real layout, weights arranged so that it speaks a fixed token
sequence and then the stop token), so the number of speech tokens, and with it the audio length,
is known: 960 samples per token at 24 kHz, the budget of each text piece permitting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import torch
from chatterbox_sidecar.engines.base import EngineError, SynthesisParams
from chatterbox_sidecar.engines.chatterbox import ChatterboxEngine, ChatterboxEngineConfig
from chatterbox_sidecar.engines.chatterbox import engine as engine_module
from chatterbox_sidecar.engines.chatterbox.model_files import speech_token_budget
from chatterbox_sidecar.engines.chatterbox.s3gen.stream import SAMPLES_PER_TOKEN
from chatterbox_sidecar.engines.chatterbox.t3.backend import T3Backend, T3Request
from chatterbox_sidecar.engines.chatterbox.t3.torch_backend import TorchT3Backend
from chatterbox_sidecar.voices import VoiceStore, validate_reference_wav

from .t3_checkpoint import write_scripted_model_dir
from .test_conditionals import voice_like

pytestmark = [pytest.mark.torch, pytest.mark.asyncio(loop_scope="module")]

SCRIPT = torch.randperm(6561, generator=torch.Generator().manual_seed(5))[:100].tolist()
TEXTS = ["Hi.", "Hi there you.", "Hello there, my friend."]
# ~850 tokens of budget: long enough that T3 is still speaking when the first chunk plays.
LONG_TEXT = " ".join(["This sentence is long enough to get a large budget of speech tokens."] * 4)
LONG_SCRIPT = torch.randperm(6561, generator=torch.Generator().manual_seed(6))[:1000].tolist()


def expected_tokens(text: str) -> int:
    return min(speech_token_budget(text), len(SCRIPT))


def engine_config(model_dir: Path, **overrides) -> ChatterboxEngineConfig:
    options = dict(
        model_dir=model_dir,
        t3_backend="torch",
        device="cpu",
        chunk_size=25,
        first_chunk_size=10,
        context_window=25,
        flow_steps=2,
        max_concurrency=4,
        warmup=False,
    )
    options.update(overrides)
    return ChatterboxEngineConfig(**options)


class RecordingT3(T3Backend):
    """The real torch backend, with a record of what each request delivered and how it ended."""

    def __init__(self, inner: T3Backend):
        self.inner = inner
        self.delivered: dict[str, int] = {}
        self.ended: dict[str, str] = {}

    async def start(self) -> None:
        await self.inner.start()

    async def generate(self, request: T3Request) -> AsyncIterator[list[int]]:
        stream = self.inner.generate(request)
        self.delivered[request.request_id] = 0
        self.ended[request.request_id] = "running"
        try:
            async for delta in stream:
                self.delivered[request.request_id] += len(delta)
                yield delta
            self.ended[request.request_id] = "finished"
        finally:
            if self.ended[request.request_id] == "running":
                self.ended[request.request_id] = "aborted"
            await stream.aclose()

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture(scope="module")
def scripted_model_dir(s3gen_model_dir: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scripted-chatterbox")
    return write_scripted_model_dir(folder, s3gen_model_dir, [*SCRIPT, 6562], n_layers=1)


@pytest.fixture(scope="module")
def slow_model_dir(s3gen_model_dir: Path, tmp_path_factory) -> Path:
    """A scripted T3 at the real width that speaks 1000 tokens (tens of seconds on CPU)."""
    folder = tmp_path_factory.mktemp("slow-chatterbox")
    return write_scripted_model_dir(
        folder, s3gen_model_dir, LONG_SCRIPT, n_layers=2, hidden=1024, intermediate=4096
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def slow_engine(slow_model_dir: Path) -> AsyncIterator[ChatterboxEngine]:
    t3 = RecordingT3(TorchT3Backend(slow_model_dir, device="cpu", max_batch_size=2))
    eng = ChatterboxEngine(engine_config(slow_model_dir), t3_backend=t3)
    await eng.start()
    yield eng
    await eng.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(scripted_model_dir: Path) -> AsyncIterator[ChatterboxEngine]:
    t3 = RecordingT3(TorchT3Backend(scripted_model_dir, device="cpu", max_batch_size=4))
    eng = ChatterboxEngine(engine_config(scripted_model_dir), t3_backend=t3)
    await eng.start()
    yield eng
    await eng.close()


async def segments(*texts: str) -> AsyncIterator[str]:
    for text in texts:
        await asyncio.sleep(0)
        yield text


async def collect(stream: AsyncIterator[np.ndarray]) -> list[np.ndarray]:
    return [chunk async for chunk in stream]


def split_by_pieces(audio: np.ndarray, texts: list[str]) -> list[np.ndarray]:
    bounds = np.cumsum([expected_tokens(t) * SAMPLES_PER_TOKEN for t in texts])[:-1]
    return np.split(audio, bounds)


async def test_engine_info(engine):
    assert engine.info.name == "chatterbox"
    assert engine.info.native_sample_rate == 24_000
    assert engine.info.can_clone
    assert engine.info.max_segment_chars == 300
    assert engine.info.capacity is None  # CPU: no calibration, no TTS_MAX_STREAMS


async def test_capacity_given_is_reported_after_start(scripted_model_dir):
    eng = ChatterboxEngine(engine_config(scripted_model_dir, max_streams=3))
    assert eng.info.capacity is None  # known only once started
    await eng.start()
    try:
        assert eng.info.capacity == 3
    finally:
        await eng.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def streamed_chunks(engine) -> list[np.ndarray]:
    return await collect(engine.synthesize(segments(*TEXTS), SynthesisParams(), None))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def batch_chunks(engine) -> list[np.ndarray]:
    params = SynthesisParams(streaming=False)
    return await collect(engine.synthesize(segments(*TEXTS), params, None))


async def test_streaming_audio_length_follows_token_count(streamed_chunks):
    chunks = streamed_chunks
    lengths = [expected_tokens(t) for t in TEXTS]
    assert lengths == [59, 85, 100]  # the budgets of the three texts cut the script apart
    assert all(c.dtype == np.float32 and c.ndim == 1 for c in chunks)
    assert sum(len(c) for c in chunks) == sum(lengths) * SAMPLES_PER_TOKEN
    assert len(chunks) >= 2 * len(TEXTS)  # streamed: several chunks per piece
    audio = np.concatenate(chunks)
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0
    assert np.abs(audio).max() > 0.01


async def test_batch_mode_yields_pieces_in_order(engine, batch_chunks):
    chunks = batch_chunks
    assert [len(c) for c in chunks] == [expected_tokens(t) * SAMPLES_PER_TOKEN for t in TEXTS]
    # Each piece is the whole-utterance decode of its tokens (checked exactly for the first).
    whole = engine._decoder.decode_whole(
        engine._default.reference, SCRIPT[: expected_tokens(TEXTS[0])]
    )
    np.testing.assert_array_equal(chunks[0], whole)


async def test_streaming_matches_batch_audio(streamed_chunks, batch_chunks):
    streamed = np.concatenate(streamed_chunks)
    for s, b in zip(split_by_pieces(streamed, TEXTS), batch_chunks, strict=True):
        assert len(s) == len(b)
        rel = np.sqrt(np.mean((s - b) ** 2) / np.mean(b**2))
        assert rel < 0.05


async def test_cancel_stops_generation_within_one_chunk(slow_engine, monkeypatch):
    engine = slow_engine
    assert speech_token_budget(LONG_TEXT) > 700
    t3: RecordingT3 = engine._t3
    decoded: list[bool] = []
    original = engine._decoder.decode_chunks

    def counting(streams, finalize, hops=None):
        decoded.extend(finalize)
        return original(streams, finalize, hops)

    monkeypatch.setattr(engine._decoder, "decode_chunks", counting)
    before = set(t3.ended)
    stream = engine.synthesize(segments(LONG_TEXT, LONG_TEXT), SynthesisParams(), None)
    first = await anext(stream)
    assert len(first) > 0
    started = time.monotonic()
    await stream.aclose()
    closing = time.monotonic() - started
    (request_id,) = set(t3.ended) - before  # the second text was never sent
    assert t3.ended[request_id] == "aborted"
    assert t3.delivered[request_id] < 400
    await asyncio.sleep(0.2)
    assert request_id not in t3.inner.decoder.active_ids
    assert decoded == [False]  # no chunk was decoded after the one delivered
    assert closing < 1.0


async def test_cancel_while_a_chunk_decodes(slow_engine):
    engine = slow_engine
    t3: RecordingT3 = engine._t3
    before = set(t3.ended)
    received: list[np.ndarray] = []

    async def consume() -> None:
        async for chunk in engine.synthesize(segments(LONG_TEXT), SynthesisParams(), None):
            received.append(chunk)

    task = asyncio.create_task(consume())
    for _ in range(1000):  # until the request is running
        if set(t3.ended) - before and t3.delivered[next(iter(set(t3.ended) - before))] > 13:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)  # the first chunk is being decoded
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (request_id,) = set(t3.ended) - before
    assert t3.ended[request_id] == "aborted"
    assert len(received) <= 1


async def test_registered_voice_conds_written_cached_and_rebuilt(engine, tmp_path):
    store = VoiceStore(tmp_path / "voices")
    wav = tmp_path / "ref.wav"
    import soundfile as sf

    sf.write(wav, voice_like(4.0, 22_050, seed=3), 22_050)
    audio = validate_reference_wav(wav.read_bytes())
    voice = await store.register("alice", audio, prepare=engine.prepare_voice)
    conds_path = voice.artifact_path("conds.pt")
    assert conds_path.is_file()
    assert engine._voices["alice"].reference.prompt_token.shape == (1, 100)  # 4 s reference

    chunks = await collect(engine.synthesize(segments("Hi."), SynthesisParams(), voice))
    assert sum(len(c) for c in chunks) == expected_tokens("Hi.") * SAMPLES_PER_TOKEN

    # A lost conds.pt is computed again from the reference and written back.
    await engine.forget_voice("alice")
    conds_path.unlink()
    await collect(engine.synthesize(segments("Hi."), SynthesisParams(streaming=False), voice))
    assert conds_path.is_file()


async def test_restart_reuses_conds_pt(engine, scripted_model_dir, tmp_path, monkeypatch):
    store = VoiceStore(tmp_path / "voices")
    wav = tmp_path / "ref.wav"
    import soundfile as sf

    sf.write(wav, voice_like(3.5, 16_000, seed=4), 16_000)
    voice = await store.register(
        "bob", validate_reference_wav(wav.read_bytes()), prepare=engine.prepare_voice
    )
    stat = voice.artifact_path("conds.pt").stat()

    def no_recompute(*args, **kwargs):
        raise AssertionError("conditionals recomputed although conds.pt exists")

    monkeypatch.setattr(engine_module, "compute_conditionals_from_file", no_recompute)
    restarted = ChatterboxEngine(engine_config(scripted_model_dir))
    await restarted.start()
    try:
        again = VoiceStore(tmp_path / "voices").get("bob")
        chunks = await collect(
            restarted.synthesize(segments("Hi."), SynthesisParams(streaming=False), again)
        )
        assert sum(len(c) for c in chunks) == expected_tokens("Hi.") * SAMPLES_PER_TOKEN
        assert voice.artifact_path("conds.pt").stat().st_mtime_ns == stat.st_mtime_ns
        torch.testing.assert_close(
            restarted._voices["bob"].reference.prompt_feat,
            engine._voices["bob"].reference.prompt_feat,
        )
    finally:
        await restarted.close()


async def test_reference_cap_applies_to_the_default_voice(scripted_model_dir):
    eng = ChatterboxEngine(engine_config(scripted_model_dir, reference_seconds=1.0))
    eng._model_dir = scripted_model_dir
    eng._load_s3gen()
    assert eng._default.reference.prompt_token.shape == (1, 25)
    assert eng._default.reference.prompt_feat.shape == (1, 50, 80)
    await eng.close()


async def test_bad_configuration():
    with pytest.raises(ValueError):
        ChatterboxEngine(ChatterboxEngineConfig(first_chunk_size=5))
    eng = ChatterboxEngine(ChatterboxEngineConfig(model_dir=Path("/nonexistent"), device="cpu"))
    with pytest.raises(EngineError):
        await eng.start()
    await eng.close()


def test_sidecar_settings_reach_the_engine_config(tmp_path):
    from chatterbox_sidecar.config import SidecarConfig
    from chatterbox_sidecar.engines import create_engine

    env = {
        "TTS_ENGINE": "chatterbox",
        "TTS_DEVICE": "cpu",
        "TTS_MODEL_DIR": str(tmp_path),
        "TTS_FIRST_CHUNK_SIZE": "8",
        "TTS_REFERENCE_SECONDS": "3",
        "TTS_COMPILE_FLOW": "true",
        "TTS_FLOW_STEPS": "4",
    }
    engine = create_engine(SidecarConfig.from_env(env))
    assert isinstance(engine, ChatterboxEngine)
    cfg = engine.config
    assert (cfg.first_chunk_size, cfg.reference_seconds, cfg.flow_steps) == (8, 3.0, 4)
    assert cfg.compile_flow is True and cfg.device == "cpu"
    # Unset, compiling stays off (experimental: its speed-up is not measured yet).
    del env["TTS_COMPILE_FLOW"]
    assert create_engine(SidecarConfig.from_env(env)).config.compile_flow is False


def test_default_backend_is_torch_on_every_device(tmp_path):
    # "auto" picks the measured torch backend (CUDA graphs, sampling in the graph) also on
    # CUDA, whether or not vLLM is importable; the vllm backend only when named.
    for device in ("cpu", "cuda"):
        eng = ChatterboxEngine(ChatterboxEngineConfig(model_dir=tmp_path, device=device))
        assert eng.config.t3_backend == "auto"
        assert isinstance(eng._make_t3_backend(tmp_path), TorchT3Backend)
    named = ChatterboxEngine(ChatterboxEngineConfig(t3_backend="vllm", device="cuda"))
    assert type(named._make_t3_backend(tmp_path)).__name__ == "VllmT3Backend"


async def test_a_voice_registered_on_one_sidecar_speaks_on_another(
    engine, scripted_model_dir, tmp_path, monkeypatch
):
    """Fleet sidecars share the voices folder: a voice is loaded there on first use.

    ``engine`` registers, replaces and deletes the voice; ``other`` (another sidecar's engine,
    started before the voice existed) speaks it from the shared conds.pt without computing
    conditionals, follows a replacement made within the same second, and loses a deleted one.
    """
    import soundfile as sf

    root = tmp_path / "shared-voices"
    here, there = VoiceStore(root), VoiceStore(root)
    other = ChatterboxEngine(engine_config(scripted_model_dir))
    await other.start()
    computed = []
    real_compute = engine_module.compute_conditionals_from_file

    def counting_compute(*args, **kwargs):
        computed.append(args[0])
        return real_compute(*args, **kwargs)

    monkeypatch.setattr(engine_module, "compute_conditionals_from_file", counting_compute)
    try:
        first, second = tmp_path / "first.wav", tmp_path / "second.wav"
        sf.write(first, voice_like(3.5, 16_000, seed=7), 16_000)
        sf.write(second, voice_like(4.5, 24_000, seed=8), 24_000)
        registered = await here.register(
            "carol", validate_reference_wav(first.read_bytes()), prepare=engine.prepare_voice
        )
        assert len(computed) == 1  # by the registering sidecar only

        async def speak_there() -> int:
            voice = there.get("carol")
            assert voice is not None
            chunks = await collect(
                other.synthesize(segments("Hi."), SynthesisParams(streaming=False), voice)
            )
            return sum(len(c) for c in chunks)

        assert await speak_there() == expected_tokens("Hi.") * SAMPLES_PER_TOKEN
        assert len(computed) == 1  # the other sidecar loaded conds.pt
        torch.testing.assert_close(
            other._voices["carol"].reference.prompt_feat,
            engine._voices["carol"].reference.prompt_feat,
        )

        replaced = await here.register(
            "carol", validate_reference_wav(second.read_bytes()), prepare=engine.prepare_voice
        )
        assert replaced.revision != registered.revision
        await speak_there()
        assert len(computed) == 2
        new_feat = engine._voices["carol"].reference.prompt_feat
        assert other._voices["carol"].reference.prompt_feat.shape == new_feat.shape
        torch.testing.assert_close(other._voices["carol"].reference.prompt_feat, new_feat)

        await here.delete("carol")
        assert there.get("carol") is None
    finally:
        await other.close()
