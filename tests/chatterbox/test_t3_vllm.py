"""The vLLM T3 adapter against FakeAsyncLLM (a fake of vLLM's async engine interface)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import torch
from chatterbox_sidecar.engines.chatterbox.t3.backend import T3Request
from chatterbox_sidecar.engines.chatterbox.t3.model import T3Model
from chatterbox_sidecar.engines.chatterbox.t3.vllm_backend import VllmT3Backend

from .fake_vllm import FAKE_DELTA, fake_vllm_api
from .t3_checkpoint import write_random_t3_checkpoint

pytestmark = pytest.mark.torch

# 6563 and 8000 are not speech ids; 6562 stops; 99 comes after the stop and must not appear.
SCRIPT = [5, 17, 6563, 42, 8000, 6560, 6562, 99]


@pytest.fixture(scope="module")
def t3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_t3_checkpoint(
        tmp_path_factory.mktemp("t3v"), n_layers=1, hidden=256, intermediate=512
    )


def conds(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "speaker_emb": torch.randn(1, 256, generator=gen),
        "cond_prompt_speech_tokens": torch.randint(0, 6561, (1, 150), generator=gen),
        "emotion_adv": 0.5 * torch.ones(1, 1, 1),
        "clap_emb": None,
        "cond_prompt_speech_emb": None,
    }


async def started(t3_dir: Path, tmp_path: Path, monkeypatch, script=SCRIPT, **fake):
    # The adapter sets this for vLLM's workers; monkeypatch restores it afterwards.
    monkeypatch.setenv("CHATTERBOX_CFG_SCALE", "unset")
    api, engines = fake_vllm_api(script, **fake)
    backend = VllmT3Backend(
        t3_dir, tmp_path / "t3-model", max_model_len=600, cfg_scale=0.4, vllm_api=api
    )
    await backend.start()
    return backend, engines[0]


async def test_start_prepares_model_folder_and_engine(t3_dir, tmp_path, monkeypatch):
    backend, engine = await started(t3_dir, tmp_path, monkeypatch)
    try:
        folder = tmp_path / "t3-model"
        assert json.loads((folder / "config.json").read_text())["architectures"] == ["ChatterboxT3"]
        assert (folder / "model.safetensors").resolve() == (t3_dir / "t3_cfg.safetensors").resolve()
        kw = engine.engine_kwargs
        assert kw["model"] == str(folder.resolve())
        assert kw["tokenizer"] == "EnTokenizer" and kw["tokenizer_mode"] == "custom"
        assert kw["max_model_len"] == 600
        assert os.environ["CHATTERBOX_CFG_SCALE"] == "0.4"
    finally:
        await backend.close()
    assert engine.shut_down


async def test_deltas_are_shifted_back_and_filtered(t3_dir, tmp_path, monkeypatch):
    backend, engine = await started(t3_dir, tmp_path, monkeypatch)
    try:
        req = T3Request("r1", "hello world", conds(), max_new_tokens=50)
        deltas = [d async for d in backend.generate(req)]
    finally:
        await backend.close()
    assert sum(deltas, []) == [5, 17, 42, 6560]
    assert all(d for d in deltas)
    prompt, params = engine.requests["r1"]
    assert prompt["prompt"] == "[START]Hello world.[STOP]"
    assert params.output_kind == FAKE_DELTA and params.detokenize is False
    assert params.stop_token_ids == [6562 + 2500]


async def test_sampling_params_pass_through(t3_dir, tmp_path, monkeypatch):
    backend, engine = await started(t3_dir, tmp_path, monkeypatch)
    try:
        req = T3Request(
            "r2",
            "Hi.",
            conds(),
            temperature=0.7,
            top_p=0.85,
            min_p=0.12,
            repetition_penalty=1.3,
            max_new_tokens=3,
            seed=99,
        )
        got = [t async for d in backend.generate(req) for t in d]
        big = T3Request("r3", "Hi.", conds(), max_new_tokens=5000)
        [_ async for _ in backend.generate(big)]
    finally:
        await backend.close()
    params = engine.requests["r2"][1]
    assert (params.temperature, params.top_p, params.min_p) == (0.7, 0.85, 0.12)
    assert params.repetition_penalty == 1.3 and params.seed == 99
    assert params.max_tokens == 3 and got == [5, 17]  # the budget counts the dropped 6563
    assert engine.requests["r3"][1].max_tokens == 600  # capped at max_model_len


async def test_conditionals_follow_the_voice_and_exaggeration(t3_dir, tmp_path, monkeypatch):
    backend, engine = await started(t3_dir, tmp_path, monkeypatch)
    try:
        for rid, x in (("calm", 0.3), ("wild", 1.5)):
            [_ async for _ in backend.generate(T3Request(rid, "Hi.", conds(3), exaggeration=x))]
    finally:
        await backend.close()
    model = T3Model.from_safetensors(t3_dir / "t3_cfg.safetensors", with_backbone=False)
    c = conds(3)
    for rid, x in (("calm", 0.3), ("wild", 1.5)):
        sent = engine.requests[rid][0]["multi_modal_data"]["conditionals"]
        assert len(sent) == 1 and sent[0].device.type == "cpu" and sent[0].shape == (34, 256)
        with torch.inference_mode():
            expected = model.conditioning(c["speaker_emb"], c["cond_prompt_speech_tokens"], x)
        torch.testing.assert_close(sent[0], expected)
    calm = engine.requests["calm"][0]["multi_modal_data"]["conditionals"][0]
    wild = engine.requests["wild"][0]["multi_modal_data"]["conditionals"][0]
    torch.testing.assert_close(calm[:-1], wild[:-1])
    assert not torch.allclose(calm[-1], wild[-1])


async def test_closing_the_stream_aborts(t3_dir, tmp_path, monkeypatch):
    script = list(range(100, 400))
    backend, engine = await started(t3_dir, tmp_path, monkeypatch, script=script, delay=0.01)
    try:
        stream = backend.generate(T3Request("long", "Hi.", conds(), max_new_tokens=300))
        first = await stream.__anext__()
        assert first[0] == 100
        await stream.aclose()
        for _ in range(100):
            if "long" in engine.aborted and "long" not in engine.running:
                break
            await asyncio.sleep(0.01)
        assert "long" in engine.aborted and "long" not in engine.running

        # Cancelling the consuming task aborts too.
        async def consume() -> None:
            async for _ in backend.generate(T3Request("c2", "Hi.", conds(), max_new_tokens=300)):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if "c2" in engine.aborted:
                break
            await asyncio.sleep(0.01)
        assert "c2" in engine.aborted
    finally:
        await backend.close()


async def test_engine_errors_reach_the_consumer(t3_dir, tmp_path, monkeypatch):
    backend, _ = await started(t3_dir, tmp_path, monkeypatch, fail_after=2)
    try:
        got = []
        with pytest.raises(RuntimeError, match="fake engine failure"):
            async for delta in backend.generate(T3Request("e", "Hi.", conds())):
                got.extend(delta)
        assert got == [5, 17]
    finally:
        await backend.close()
