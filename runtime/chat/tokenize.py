"""Token ids for rendered V4 prompts, and decoding that keeps the special tokens the parser needs.

The rendered prompt already holds BOS and every special token as text, so it is tokenised WITHOUT adding
special tokens again (as vLLM does: `add_special_tokens=False`); a tokenizer.json that knows V4's special
tokens maps each of their strings to one id (BOS 0, EOS 1, <｜User｜> 128803, ...).

The tiny default's byte tokenizer has only two special ids, BOS (0) and EOS (1). For it the BOS and EOS
strings map to those ids, so a prompt starts with exactly one BOS id and each earlier assistant turn ends in
the id the model emits to stop; every other V4 special token (<｜User｜>, <think>, ｜DSML｜, ...) is written
as its UTF-8 bytes, and decodes back to the same string. Completions are decoded with special tokens kept,
because the parser needs `</think>`, DSML and EOS in the text.
"""

from __future__ import annotations

import codecs

from ..tokenizer import BYTE_OFFSET, ByteTokenizer, HFTokenizer
from . import tokens as T
from .encoding import encode_messages


def _byte_encode(tok: ByteTokenizer, text: str) -> list[int]:
    ids: list[int] = []
    i = 0
    while i < len(text):
        b, e = text.find(T.BOS, i), text.find(T.EOS, i)
        cands = [(p, s) for p, s in ((b, T.BOS), (e, T.EOS)) if p != -1]
        if not cands:
            ids += tok.encode(text[i:], add_bos=False)
            break
        p, s = min(cands)
        ids += tok.encode(text[i:p], add_bos=False)
        ids.append(tok.bos if s == T.BOS else tok.eos)
        i = p + len(s)
    return ids


def encode_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Ids of a rendered prompt string; special-token strings map to their ids, nothing is added."""
    if isinstance(tokenizer, ByteTokenizer):
        return _byte_encode(tokenizer, prompt)
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.tok.encode(prompt, add_special_tokens=False).ids
    raise TypeError(f"unsupported tokenizer {type(tokenizer).__name__}")


def encode_chat_ids(tokenizer, messages, **kw) -> list[int]:
    """encode_messages(messages, **kw) tokenised without adding special tokens again."""
    return encode_prompt_ids(tokenizer, encode_messages(messages, **kw))


def missing_special_tokens(tokenizer) -> list[str]:
    """V4 special-token strings this tokenizer has no single id for (they then tokenise as plain text)."""
    if isinstance(tokenizer, ByteTokenizer):
        return [s for s in T.SPECIAL_TOKENS if s not in (T.BOS, T.EOS)]
    return [s for s in T.SPECIAL_TOKENS if tokenizer.tok.token_to_id(s) is None]


def decode_keep_special(tokenizer, ids) -> str:
    """Text of ids with special tokens written out (EOS as <｜end▁of▁sentence｜>, and so on)."""
    ids = list(ids)
    if isinstance(tokenizer, ByteTokenizer):
        out, run = [], bytearray()
        for i in ids:
            if BYTE_OFFSET <= i < BYTE_OFFSET + 256:
                run.append(i - BYTE_OFFSET)
                continue
            out.append(run.decode("utf-8", "replace"))
            run = bytearray()
            out.append(T.BOS if i == tokenizer.bos else T.EOS if i == tokenizer.eos else "")
        out.append(run.decode("utf-8", "replace"))
        return "".join(out)
    return tokenizer.tok.decode(ids, skip_special_tokens=False)


def stream_decoder_keep_special(tokenizer):
    """A function: next token id -> newly printable text (special tokens kept; a multi-byte character
    waits for its last piece). Incremental: each step decodes only the last few ids."""
    if isinstance(tokenizer, ByteTokenizer):
        dec = codecs.getincrementaldecoder("utf-8")("replace")

        def byte_step(i: int) -> str:
            if BYTE_OFFSET <= i < BYTE_OFFSET + 256:
                return dec.decode(bytes([i - BYTE_OFFSET]))
            pending = dec.decode(b"", final=True)
            dec.reset()
            return pending + (T.BOS if i == tokenizer.bos else T.EOS if i == tokenizer.eos else "")
        return byte_step

    ids: list[int] = []
    offsets = [0, 0]                       # prefix offset, read offset (vLLM's incremental detokenisation)

    def step(i: int) -> str:
        ids.append(i)
        prefix, read = offsets
        before = tokenizer.tok.decode(ids[prefix:read], skip_special_tokens=False)
        now = tokenizer.tok.decode(ids[prefix:], skip_special_tokens=False)
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        offsets[0], offsets[1] = read, len(ids)
        return now[len(before):]
    return step
