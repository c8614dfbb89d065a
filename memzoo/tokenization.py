"""The default tokenizer: bytes, so nothing needs downloading and any text round-trips."""

from __future__ import annotations

from transformers import ByT5Tokenizer

__all__ = ["tokenizer", "VOCAB_SIZE"]

#: 256 byte values + pad (0), eos (1), unk (2); byte value x is token x + 3.
VOCAB_SIZE = 259


def tokenizer() -> ByT5Tokenizer:
    """The default byte-level tokenizer (transformers' ByT5 tokenizer without extra ids).

    Encode with ``add_special_tokens=False`` for prompts (ByT5 appends ``</s>`` otherwise).
    Every memzoo checkpoint saves it, so ``AutoTokenizer.from_pretrained(path)`` works offline.
    """
    return ByT5Tokenizer(extra_ids=0)
