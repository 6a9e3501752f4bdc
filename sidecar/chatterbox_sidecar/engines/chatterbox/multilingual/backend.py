"""The multilingual T3 backend: the Original's torch backend with the multilingual tokenizer.

T3 Multilingual is the Original's Llama T3; only the text embedding and text head are wider
(2454 rows instead of 704), which :class:`~..t3.model.T3Model` reads from the checkpoint's
shapes. Each request's ``language`` picks the language token and text preparation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chatterbox_sidecar.engines.chatterbox.multilingual.text import MultilingualTokenizer
from chatterbox_sidecar.engines.chatterbox.t3.torch_backend import TorchT3Backend


class MultilingualT3Backend(TorchT3Backend):
    """T3 Multilingual, decoded in batches by the Original's torch backend.

    Args:
        model_dir: Folder with the T3 weights, ``grapheme_mtl_merged_expanded_v1.json`` and
            ``Cangjie5_TC.json``.
        t3_file: T3 weights file (``t3_mtl23ls_v2.safetensors``).
        chinese_segmenter: See :class:`MultilingualTokenizer` (``"auto"``: spacy-pkuseg's when
            it can be loaded).
        **kwargs: As :class:`TorchT3Backend`.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        t3_file: str = "t3_mtl23ls_v2.safetensors",
        chinese_segmenter: Any = "auto",
        **kwargs: Any,
    ):
        super().__init__(model_dir, **kwargs)
        self.t3_file = t3_file
        self._chinese_segmenter = chinese_segmenter
        self.tokenizer: MultilingualTokenizer | None = None

    @property
    def languages(self) -> tuple[str, ...] | None:
        """Returns: the languages the loaded tokenizer offers (None before :meth:`start`)."""
        return self.tokenizer.languages if self.tokenizer is not None else None

    def _load_tokenizer(self) -> MultilingualTokenizer:
        self.tokenizer = MultilingualTokenizer(self.model_dir, self._chinese_segmenter)
        return self.tokenizer
