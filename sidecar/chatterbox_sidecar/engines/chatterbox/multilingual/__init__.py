"""Chatterbox Multilingual: text preparation, tokenizer and T3 backend.

:mod:`.text` prepares each language's text as upstream does and tokenizes it;
:mod:`.backend` is the Original's torch T3 backend with that tokenizer.
"""
