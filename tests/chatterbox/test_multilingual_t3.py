"""T3 Multilingual on the torch backend: a checkpoint in the real layout (2454-entry text
vocabulary) loads, and each request's language token reaches the model's prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
from chatterbox_sidecar.engines.chatterbox.multilingual.backend import MultilingualT3Backend
from chatterbox_sidecar.engines.chatterbox.t3.backend import T3Request

from .mtl_checkpoint import TEXT_VOCAB, write_mtl_t3, write_mtl_tokenizer_files
from .test_t3_torch import make_conds

pytestmark = pytest.mark.torch

SCRIPT = [101, 202, 303, 404]


@pytest.fixture(scope="module")
def mtl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = write_mtl_tokenizer_files(tmp_path_factory.mktemp("mtl-t3"))
    write_mtl_t3(folder, [*SCRIPT, 6562], hidden=128)
    return folder


async def test_language_token_reaches_the_prompt(mtl_dir, monkeypatch):
    backend = MultilingualT3Backend(mtl_dir, max_batch_size=2, max_seq_len=256)
    await backend.start()
    try:
        decoder = backend.decoder
        assert decoder.model.config.text_vocab_size == TEXT_VOCAB  # read from the checkpoint
        assert backend.languages is not None and "fi" in backend.languages
        prompts: list[list[int]] = []
        embed = decoder.model.prompt_embeds

        def spy(cond, text_ids, *args, **kwargs):
            prompts.append(text_ids.tolist())
            return embed(cond, text_ids, *args, **kwargs)

        monkeypatch.setattr(decoder.model, "prompt_embeds", spy)
        tokens = {}
        for language in ("fi", "es", "en"):
            request = T3Request(
                f"r-{language}", "Hei maailma", make_conds(0), max_new_tokens=20, language=language
            )
            tokens[language] = [t async for delta in backend.generate(request) for t in delta]
    finally:
        await backend.close()
    tokenizer = backend.tokenizer
    # guided requests embed a conditional and an unconditional row of the same text
    assert [p[1] for p in prompts] == [2107, 2107, 635, 635, 708, 708]  # [fi] [es] [en]
    assert all(p[0] == 255 and p[-1] == 0 for p in prompts)
    assert tokenizer.decode(prompts[0]) == "[START][fi]hei maailma.[STOP]"
    assert tokens == {language: SCRIPT for language in ("fi", "es", "en")}


async def test_a_language_the_tokenizer_lacks_fails_only_its_request(mtl_dir):
    backend = MultilingualT3Backend(mtl_dir, max_batch_size=1, max_seq_len=256)
    await backend.start()
    try:
        bad = T3Request("vi", "Xin chào", make_conds(0), max_new_tokens=20, language="vi")
        with pytest.raises(Exception, match="'vi' is not available"):
            async for _ in backend.generate(bad):
                pass
        good = T3Request("de", "Hallo", make_conds(0), max_new_tokens=20, language="de")
        assert [t async for delta in backend.generate(good) for t in delta] == SCRIPT
    finally:
        await backend.close()


async def test_v3_weights_are_chosen_by_setting_and_loaded_from_their_own_file(mtl_dir, tmp_path):
    from chatterbox_sidecar.config import ConfigError, SidecarConfig
    from chatterbox_sidecar.engines import create_engine
    from chatterbox_sidecar.engines.chatterbox.model_files import (
        ModelFilesError,
        resolve_model_dir,
    )
    from chatterbox_sidecar.engines.chatterbox.models import MULTILINGUAL_WEIGHTS

    # A v3 folder: the v3 T3 file (other weights than v2's: another script) and no v2 file.
    folder = write_mtl_tokenizer_files(tmp_path / "v3")
    for name in ("s3gen.safetensors", "ve.safetensors", "conds.pt"):
        (folder / name).write_bytes(b"only named here")
    v3_script = [505, 606, 707]
    write_mtl_t3(folder, [*v3_script, 6562], MULTILINGUAL_WEIGHTS["v3"][0], hidden=128)
    env = {
        "TTS_ENGINE": "chatterbox",
        "TTS_DEVICE": "cpu",
        "TTS_MODEL": "chatterbox-multilingual",
        "TTS_MODEL_DIR": str(folder),
    }
    v2 = create_engine(SidecarConfig.from_env(env)).config.spec
    assert v2.t3_file == "t3_mtl23ls_v2.safetensors"  # the default, as upstream's
    with pytest.raises(ModelFilesError, match="lacks t3_mtl23ls_v2.safetensors"):
        resolve_model_dir(folder, files=v2.files)
    v3 = create_engine(SidecarConfig.from_env({**env, "TTS_MULTILINGUAL_WEIGHTS": "v3"})).config
    spec = v3.spec
    assert (spec.t3_file, spec.revision) == MULTILINGUAL_WEIGHTS["v3"]
    assert spec.languages == v2.languages and spec.conds_file == v2.conds_file
    assert resolve_model_dir(folder, files=spec.files) == folder
    backend = MultilingualT3Backend(folder, t3_file=spec.t3_file, max_batch_size=1, max_seq_len=256)
    await backend.start()
    try:
        request = T3Request("v3", "Hola", make_conds(0), max_new_tokens=20, language="es")
        assert [t async for delta in backend.generate(request) for t in delta] == v3_script
    finally:
        await backend.close()

    with pytest.raises(ConfigError, match="TTS_MULTILINGUAL_WEIGHTS must be one of v2, v3"):
        SidecarConfig.from_env({**env, "TTS_MULTILINGUAL_WEIGHTS": "v4"})
    with pytest.raises(ConfigError, match="TTS_MODEL=chatterbox-multilingual"):
        SidecarConfig.from_env({**env, "TTS_MODEL": "chatterbox", "TTS_MULTILINGUAL_WEIGHTS": "v3"})
