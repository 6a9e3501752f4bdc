"""Turbo's text input: its punctuation clean-up and its GPT-2 tokenizer.

Upstream (``tts_turbo.py``) loads the tokenizer with ``transformers.AutoTokenizer`` from the
model folder, which holds GPT-2's slow-tokenizer files: ``vocab.json``, ``merges.txt`` and
``added_tokens.json`` (the paralinguistic tags, ids 50257 and up; 50276 tokens in all). We build
the same byte-level BPE with the ``tokenizers`` library (what transformers' fast GPT-2
tokenizer is made of): ByteLevel pre-tokenizer without a prefix space, BPE, the added tokens
matched whole before BPE. No start or stop text tokens are added.
"""

from __future__ import annotations

import json
from pathlib import Path

from chatterbox_sidecar.engines.chatterbox.t3.text import PUNC_REPLACEMENTS, punc_norm

# The Original's replacements, less those Turbo leaves alone: "...", ";" and " - ".
_REPLACEMENTS = tuple(r for r in PUNC_REPLACEMENTS if r[0] not in ("...", ";", " - "))
#: Text ids GPT-2's tokenizer config truncates to (upstream tokenizes with truncation).
DEFAULT_MAX_TEXT_TOKENS = 1024


def turbo_punc_norm(text: str) -> str:
    """Clean punctuation as upstream's Turbo does.

    The Original's clean-up (:func:`~..t3.text.punc_norm`), except that it keeps ``...``, ``;``
    and `` - ``.
    """
    return punc_norm(text, _REPLACEMENTS)


class TurboTokenizer:
    """Turbo's GPT-2 tokenizer, built from the model folder's files.

    Args:
        folder: The folder with ``vocab.json``, ``merges.txt`` and ``added_tokens.json``.

    Raises:
        ValueError: If the files do not make a consistent tokenizer (an added token that does
            not land on its id).
    """

    def __init__(self, folder: str | Path):
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        folder = Path(folder)
        bpe = models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        tokenizer = Tokenizer(bpe)
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        added_path = folder / "added_tokens.json"
        added: dict[str, int] = json.loads(added_path.read_text()) if added_path.is_file() else {}
        for content, token_id in sorted(added.items(), key=lambda item: item[1]):
            if tokenizer.token_to_id(content) is None:
                tokenizer.add_tokens([AddedToken(content, normalized=False)])
            if tokenizer.token_to_id(content) != token_id:
                raise ValueError(
                    f"{added_path}: {content!r} should be id {token_id}, "
                    f"got {tokenizer.token_to_id(content)} (vocab.json does not match)"
                )
        self._tokenizer = tokenizer
        self.added_tokens = dict(added)
        self.max_tokens = DEFAULT_MAX_TEXT_TOKENS
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            limit = json.loads(config_path.read_text()).get("model_max_length")
            if isinstance(limit, int) and 0 < limit < 1_000_000:
                self.max_tokens = limit

    def __len__(self) -> int:
        """Returns: tokens in the vocabulary, added ones included (50276 for Turbo)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``turbo_punc_norm(text)`` (truncated as upstream's call truncates)."""
        ids = self._tokenizer.encode(turbo_punc_norm(text), add_special_tokens=False).ids
        return ids[: self.max_tokens]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (for tests and logs)."""
        return self._tokenizer.decode(ids, skip_special_tokens=False)
