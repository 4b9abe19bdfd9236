"""A byte-level BPE tokenizer for the trained default, written as an official-style tokenizer.json.

The special tokens come first, so `<｜begin▁of▁sentence｜>` is id 0 and `<｜end▁of▁sentence｜>` id 1 as in
V4's config, followed by the other chat tokens of `runtime.chat.tokens` (so the chat encoding of issue 10 maps
each to one id); the byte alphabet and the learned merges follow. Pre-tokenisation and decoding are
byte-level (every string round-trips), without a prefix space.
"""

from __future__ import annotations

from pathlib import Path

from ..chat.tokens import BOS, EOS, SPECIAL_TOKENS


def special_tokens() -> list[str]:
    rest = [t for t in SPECIAL_TOKENS if t not in (BOS, EOS)]
    return [BOS, EOS, *rest]


def train_tokenizer(texts, vocab_size: int, out: str | Path | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens(), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    if out is not None:
        tok.save(str(out))
    return tok
