"""T3 Multilingual on the torch backend: a checkpoint in the real layout (2454-entry text
vocabulary) loads, and each request's language token reaches the model's prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
from chatterbox_sidecar.engines.chatterbox.multilingual.backend import MultilingualT3Backend
from chatterbox_sidecar.engines.chatterbox.t3.backend import T3Request

from .mtl_checkpoint import T3_FILE, TEXT_VOCAB, write_mtl_tokenizer_files
from .t3_checkpoint import scripted_t3_state
from .test_t3_torch import make_conds

pytestmark = pytest.mark.torch

SCRIPT = [101, 202, 303, 404]


@pytest.fixture(scope="module")
def mtl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import save_file

    folder = write_mtl_tokenizer_files(tmp_path_factory.mktemp("mtl-t3"))
    state = scripted_t3_state([*SCRIPT, 6562], text_vocab=TEXT_VOCAB, hidden=128)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / T3_FILE))
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
