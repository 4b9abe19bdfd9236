"""V4 completion parsing: the official vectors' assistant turns, hand-written well-formed and malformed
outputs (never an exception: content + finish_reason), and the incremental parser's chunk invariance
(random splits of every case and of every truncation must give the one-shot result)."""

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.chat import IncrementalParser, call_id_factory, encode_messages, parse_completion
from runtime.chat import tokens as T

VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "spec" / "encoding-vectors"
E = T.EOS
P, PC = T.PARAM_OPEN, T.PARAM_CLOSE


def _turns(n):
    """Assistant turns of official output n as the model would generate them (prompt opening removed)."""
    text = (VECTORS / f"output_{n}.txt").read_text(encoding="utf-8")
    out = []
    for piece in text.split(T.ASSISTANT)[1:]:
        mode = "thinking" if piece.startswith(T.THINK_START) else "chat"
        piece = piece[len(T.THINK_START if mode == "thinking" else T.THINK_END):]
        out.append((piece[:piece.index(E) + len(E)], mode))
    return out


def parse(text, mode="chat", tools=None):
    return parse_completion(text, mode, tools, call_ids=call_id_factory(0))


def block(*invokes):
    return "\n\n" + T.TOOL_CALLS_OPEN + "\n" + "\n".join(invokes) + "\n" + T.TOOL_CALLS_CLOSE


def invoke(name, *params):
    return f'{T.INVOKE_OPEN} name="{name}">\n' + "\n".join(params) + f"\n{T.INVOKE_CLOSE}"


def param(key, value, is_str=True):
    return f'{P} name="{key}" string="{"true" if is_str else "false"}">{value}{PC}'


# ---- official vectors (the expectations of the official test, encoding-vectors/README.md) --------------
def test_vector_1_turns():
    (first, m1), (second, m2) = _turns(1)
    r = parse(first, m1)
    assert r.reasoning_content == "The user wants to know the weather in Beijing. I should use the get_weather tool."
    assert r.content == "" and r.finish_reason == "tool_calls" and not r.errors
    assert [c["function"]["name"] for c in r.tool_calls] == ["get_weather"]
    assert json.loads(r.tool_calls[0]["function"]["arguments"]) == {"location": "Beijing", "unit": "celsius"}
    assert r.tool_calls[0]["function"]["arguments"] == '{"location": "Beijing", "unit": "celsius"}'
    assert r.tool_calls[0]["type"] == "function" and r.tool_calls[0]["id"].startswith("call_")
    r = parse(second, m2)
    assert r.reasoning_content == "Got the weather data. Let me format a nice response."
    assert "22°C" in r.content and r.tool_calls == [] and r.finish_reason == "stop"


def test_vector_2_last_turn():
    text, mode = _turns(2)[-1]
    r = parse(text, mode)
    assert (r.reasoning_content, r.content, r.finish_reason) == (
        "The user asks about the capital of France. It is Paris.", "The capital of France is Paris.", "stop")


def test_vector_3_tool_call_chinese_arguments():
    r = parse(*_turns(3)[0])
    assert r.reasoning_content == "用户想知道小柴胡冲剂和布洛芬能否一起服用。"
    assert json.loads(r.tool_calls[0]["function"]["arguments"]) == {"queries": "小柴胡冲剂 布洛芬 相互作用 一起吃"}


def test_vector_4_chat_turns():
    for text, mode in _turns(4):
        r = parse(text, mode)
        assert r.finish_reason == "stop" and r.reasoning_content == "" and not r.errors


# ---- hand-written well-formed ---------------------------------------------------------------------------
def test_two_calls_string_json_and_zero_parameters():
    text = "R</think>Let me check." + block(
        invoke("f", param("s", 'a "q"\nline'), param("n", "3", False), param("o", '{"k": [1, 2]}', False)),
        f'{T.INVOKE_OPEN} name="g">\n\n{T.INVOKE_CLOSE}') + E
    r = parse(text, "thinking")
    assert (r.reasoning_content, r.content, r.finish_reason, r.errors) == ("R", "Let me check.", "tool_calls", [])
    a = [c["function"]["arguments"] for c in r.tool_calls]
    assert a == ['{"s": "a \\"q\\"\\nline", "n": 3, "o": {"k": [1, 2]}}', "{}"]
    assert len({c["id"] for c in r.tool_calls}) == 2


def test_blank_line_after_invoke_header_is_accepted():
    text = block(f'{T.INVOKE_OPEN} name="f">\n\n' + param("a", "1") + f"\n{T.INVOKE_CLOSE}") + E
    r = parse(text)
    assert r.finish_reason == "tool_calls" and r.tool_calls[0]["function"]["arguments"] == '{"a": "1"}'


def test_call_ids_are_deterministic_for_a_seed_and_random_otherwise():
    text = block(invoke("f")) + E
    assert parse(text).tool_calls[0]["id"] == parse(text).tool_calls[0]["id"]
    r1, r2 = parse_completion(text), parse_completion(text)
    assert r1.tool_calls[0]["id"] != r2.tool_calls[0]["id"]
    assert len(r1.tool_calls[0]["id"]) == len("call_") + 24


def test_leading_think_repeated_by_the_model_is_dropped():
    assert parse("<think>r</think>c" + E, "thinking").reasoning_content == "r"


def test_tool_block_inside_reasoning_ends_it():
    r = parse("thinking..." + block(invoke("f", param("a", "1"))) + E, "thinking")
    assert r.reasoning_content == "thinking..." and r.finish_reason == "tool_calls"


def test_missing_eos_after_tool_block_is_accepted():
    assert parse(block(invoke("f"))).finish_reason == "tool_calls"


def test_tools_filter_and_tools_off():
    text = block(invoke("nope", param("a", "1"))) + E
    tools = [{"type": "function", "function": {"name": "f"}}]
    r = parse(text, tools=tools)
    assert r.tool_calls == [] and r.content == text[:-len(E)] and "unknown tool" in r.errors[0]
    r = parse(text, tools=[])
    assert r.tool_calls == [] and r.content == text[:-len(E)] and not r.errors


# ---- malformed / truncated: content + finish_reason, never an exception ----------------------------------
def test_malformed_block_header_becomes_content():
    text = "Hi" + "\n\n" + T.TOOL_CALLS_OPEN + "\ngarbage" + E
    r = parse(text)
    assert (r.content, r.tool_calls, r.finish_reason) == (text[:-len(E)], [], "stop") and r.errors


def test_malformed_parameter_header_becomes_content():
    body = block(invoke("f", f'{P} name="a">x{PC}'))
    r = parse(body + E)
    assert r.content == body and r.tool_calls == [] and r.finish_reason == "stop" and r.errors


def test_duplicate_parameter_is_malformed():
    r = parse(block(invoke("f", param("a", "1"), param("a", "2"))) + E)
    assert r.finish_reason == "stop" and "duplicate" in r.errors[0]


def test_bad_json_arguments_become_content():
    body = block(invoke("f", param("n", "not json", False)))
    r = parse("ok" + body + E)
    assert (r.content, r.tool_calls, r.finish_reason) == ("ok" + body, [], "stop")
    assert "not JSON" in r.errors[0]
    r = parse(block(invoke("f", param("n", "NaN", False))) + E)
    assert r.tool_calls == [] and r.errors


def test_call_broken_after_it_started_keeps_streamed_arguments():
    # the first parameter made the call visible; the broken second one goes to content, nothing invented
    body = block(invoke("f", param("s", "x"), param("n", "{bad", False)))
    r = parse(body + E)
    assert r.tool_calls[0]["function"]["arguments"] == '{"s": "x"'
    assert r.finish_reason == "stop" and r.content.startswith(f'{P} name="n"')


def test_unterminated_think():
    r = parse("still thinking", "thinking")
    assert (r.reasoning_content, r.content, r.finish_reason) == ("still thinking", "", "length")
    r = parse("gave up" + E, "thinking")
    assert (r.reasoning_content, r.content, r.finish_reason) == ("gave up", "", "stop") and r.errors


def test_truncated_content_and_text_after_eos():
    assert parse("abc").finish_reason == "length"
    r = parse("abc" + E + "junk")
    assert (r.content, r.finish_reason) == ("abc", "stop") and "after the end" in r.errors[0]


def test_text_after_tool_block_is_content():
    r = parse(block(invoke("f")) + "extra" + E)
    assert r.content == "extra" and r.finish_reason == "tool_calls" and r.errors


def test_every_truncation_of_a_tool_call_parses():
    text = "R</think>C" + block(invoke("f", param("s", "vé"), param("n", "[1]", False))) + E
    for k in range(len(text) + 1):
        r = parse(text[:k], "thinking")
        assert r.finish_reason in ("length", "stop", "tool_calls")
        ended = k == len(text) or text[:k].endswith(T.TOOL_CALLS_CLOSE)
        assert (r.finish_reason == "length") != ended
        assert r.finish_reason != "stop"        # a well-formed prefix is never reported as malformed


# ---- incremental parsing: chunk invariance ---------------------------------------------------------------
def stream(text, mode, cuts, tools=None):
    p = IncrementalParser(mode, tools, call_ids=call_id_factory(0))
    deltas, prev = [], 0
    for c in sorted(cuts) + [len(text)]:
        deltas.append(p.feed(text[prev:c]))
        prev = c
    deltas.append(p.finish())
    content = "".join(d.content for d in deltas)
    reasoning = "".join(d.reasoning_content for d in deltas)
    calls = {}
    for d in deltas:
        for tc in d.tool_calls:
            if tc.index not in calls:
                assert tc.id and tc.name, "the first delta of a call carries its id and name"
                calls[tc.index] = {"id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": ""}}
            else:
                assert tc.id is None and tc.name is None
            calls[tc.index]["function"]["arguments"] += tc.arguments
    assert sorted(calls) == list(range(len(calls)))
    return content, reasoning, [calls[i] for i in range(len(calls))], p.result()


CASES = [t for n in (1, 2, 3, 4) for t in _turns(n)] + [
    ("R</think>C" + block(invoke("f", param("s", 'a"\\b\n</x>'), param("n", "3.5", False)), invoke("g")) + E,
     "thinking"),
    ("Hi" + "\n\n" + T.TOOL_CALLS_OPEN + "\ngarbage" + E, "chat"),
    (block(invoke("f", param("s", "x"), param("n", "{bad", False))) + E, "chat"),
    (block(invoke("f", param("n", "nope", False))) + "tail" + E, "chat"),
    ("<think>r\n\n</think>c\n\n" + E + "after", "thinking"),
    ("x\n\n<｜DSML｜tool_c" + E, "chat"),
    (block(f'{T.INVOKE_OPEN} name="f">\n\n' + param("a", "1") + f"\n{T.INVOKE_CLOSE}",
           invoke("g", param("d", "x", True), param("d", "y", True))) + E, "chat"),
]


def test_random_splits_equal_one_shot_on_all_cases_and_truncations():
    rng = random.Random(0)
    for text, mode in CASES:
        for k in sorted({len(text), *rng.sample(range(len(text) + 1), min(12, len(text) + 1))}):
            prefix = text[:k]
            one = parse(prefix, mode)
            for _ in range(6):
                cuts = rng.sample(range(len(prefix) + 1), rng.randint(0, min(len(prefix), 30)))
                content, reasoning, calls, res = stream(prefix, mode, cuts)
                assert (content, reasoning, calls) == (one.content, one.reasoning_content, one.tool_calls)
                assert res == one


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(CASES), st.floats(0, 1), st.lists(st.floats(0, 1), max_size=40))
def test_hypothesis_splits_equal_one_shot(case, cut_at, fractions):
    text, mode = case
    text = text[:round(cut_at * len(text))] if cut_at < 0.5 else text     # half the draws truncated
    one = parse(text, mode)
    content, reasoning, calls, res = stream(text, mode, [round(f * len(text)) for f in fractions])
    assert (content, reasoning, calls, res) == (one.content, one.reasoning_content, one.tool_calls, one)


def test_char_by_char_streams_string_arguments_incrementally():
    text = block(invoke("write", param("body", "x" * 50))) + E
    p = IncrementalParser("chat", call_ids=call_id_factory(0))
    arg_pieces = [tc.arguments for ch in text for tc in p.feed(ch).tool_calls]
    # the value arrives while it is generated, not in one piece at </｜DSML｜invoke>
    assert sum(1 for a in arg_pieces if "x" in a) >= 40


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80), st.lists(st.integers(0, 80), max_size=10))
def test_random_text_and_splits_never_raise(text, cuts):
    for mode in ("chat", "thinking"):
        cuts2 = [c for c in cuts if c <= len(text)]
        content, reasoning, calls, res = stream(text, mode, cuts2)
        assert (content, reasoning, calls) == (res.content, res.reasoning_content, res.tool_calls)


# ---- render -> parse round trip: the encoder's DSML and the parser's agree --------------------------------
KEYS = st.sampled_from(["a", "b_1", "query", "n", "x" * 12, "é"])
SAFE_TEXT = st.text(max_size=20).filter(lambda s: "｜" not in s)
VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | SAFE_TEXT |
                      st.floats(allow_nan=False, allow_infinity=False),
                      lambda c: st.lists(c, max_size=3) | st.dictionaries(KEYS, c, max_size=3), max_leaves=6)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.dictionaries(KEYS, VALUES, max_size=4), min_size=1, max_size=3), st.booleans())
def test_rendered_tool_calls_parse_back(arg_dicts, thinking):
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": f"tool{i}", "arguments": json.dumps(a)}}
             for i, a in enumerate(arg_dicts)]
    msgs = [{"role": "user", "content": "U"},
            {"role": "assistant", "content": "C", "reasoning_content": "R", "tool_calls": calls}]
    mode = "thinking" if thinking else "chat"
    prompt = encode_messages(msgs, mode, drop_thinking=False)
    turn = prompt.split(T.ASSISTANT, 1)[1][len(T.THINK_START if thinking else T.THINK_END):]
    r = parse(turn, mode)
    assert r.finish_reason == "tool_calls" and not r.errors and r.content == "C"
    assert r.reasoning_content == ("R" if thinking else "")
    assert [c["function"]["name"] for c in r.tool_calls] == [f"tool{i}" for i in range(len(arg_dicts))]
    assert [json.loads(c["function"]["arguments"]) for c in r.tool_calls] == arg_dicts


def test_to_message_openai_shape():
    r = parse("R</think>" + block(invoke("f", param("a", "1"))) + E, "thinking")
    m = r.to_message()
    assert m["role"] == "assistant" and m["content"] is None and m["reasoning_content"] == "R"
    assert m["tool_calls"] == r.tool_calls
    assert parse("hi" + E).to_message() == {"role": "assistant", "content": "hi"}


@pytest.mark.parametrize("text", [None, 5, b"x"])
def test_text_of_the_wrong_type_is_one_line(text):
    from runtime.errors import InputError

    with pytest.raises(InputError) as e:
        parse_completion(text)
    assert str(e.value) == f"the parser reads completion text (str), got {type(text).__name__}"
