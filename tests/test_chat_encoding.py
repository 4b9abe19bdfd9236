"""V4 chat encoding: the official vectors byte for byte, then one hand-written case per rendering rule
(expected strings written from the spec, ../shared/spec/serving.md §1), then the one-line input errors."""

import json
from pathlib import Path

import pytest

from runtime.chat import encode_messages
from runtime.chat import tokens as T
from runtime.errors import InputError

VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "spec" / "encoding-vectors"
B, E, U, A = T.BOS, T.EOS, T.USER, T.ASSISTANT
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                            "parameters": {"type": "object", "properties": {}}}}
WEATHER_TOOLS = (T.TOOLS_HEADER + '{"name": "get_weather", "description": "Weather", "parameters": '
                 '{"type": "object", "properties": {}}}' + T.TOOLS_FOOTER)


def _vector(n):
    data = json.loads((VECTORS / f"input_{n}.json").read_text(encoding="utf-8"))
    if isinstance(data, dict):              # case 1: tools go on messages[0] (the official test does this)
        data["messages"][0]["tools"] = data["tools"]
        data = data["messages"]
    return data, (VECTORS / f"output_{n}.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize("n,mode", [(1, "thinking"), (2, "thinking"), (3, "thinking"), (4, "chat")])
def test_official_vectors_byte_for_byte(n, mode):
    messages, expected = _vector(n)
    assert encode_messages(messages, thinking_mode=mode) == expected


def test_vector_1_with_request_level_tools_is_the_same():
    data = json.loads((VECTORS / "input_1.json").read_text(encoding="utf-8"))
    _, expected = _vector(1)
    assert encode_messages(data["messages"], "thinking", tools=data["tools"]) == expected


def test_tools_template_matches_vector_text():
    # the template constants reproduce the block of vector 1 between the system text and the schemas
    _, out = _vector(1)
    assert T.TOOLS_HEADER in out and T.TOOLS_FOOTER in out


# ---- one case per rule -----------------------------------------------------------------------------------
SU = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]


def test_bos_then_bare_system_text_chat_opening():
    assert encode_messages(SU, "chat") == f"{B}S{U}Hi{A}</think>"


def test_add_bos_false():
    assert encode_messages(SU, "chat", add_bos=False) == f"S{U}Hi{A}</think>"


def test_thinking_mode_opens_think():
    assert encode_messages(SU, "thinking") == f"{B}S{U}Hi{A}<think>"


def test_reasoning_effort_max_prefix_thinking_only():
    assert encode_messages(SU, "thinking", reasoning_effort="max") == f"{B}{T.REASONING_EFFORT_MAX}S{U}Hi{A}<think>"
    assert encode_messages(SU, "chat", reasoning_effort="max") == f"{B}S{U}Hi{A}</think>"
    assert encode_messages(SU, "thinking", reasoning_effort="high") == f"{B}S{U}Hi{A}<think>"
    assert T.REASONING_EFFORT_MAX.startswith("Reasoning Effort: Absolute maximum with no shortcuts permitted.\n")
    assert T.REASONING_EFFORT_MAX.endswith("no assumption is left unchecked.\n\n")


def test_reasoning_effort_max_goes_before_a_leading_user_turn():
    out = encode_messages([{"role": "user", "content": "Hi"}], "thinking", reasoning_effort="max")
    assert out == f"{B}{T.REASONING_EFFORT_MAX}{U}Hi{A}<think>"


CONV = [{"role": "user", "content": "A"},
        {"role": "assistant", "reasoning_content": "r1", "content": "c1"},
        {"role": "user", "content": "B"}]


def test_earlier_reasoning_dropped_in_thinking_mode():
    assert encode_messages(CONV, "thinking") == f"{B}{U}A{A}</think>c1{E}{U}B{A}<think>"


def test_drop_thinking_off_keeps_reasoning():
    assert encode_messages(CONV, "thinking", drop_thinking=False) == \
        f"{B}{U}A{A}<think>r1</think>c1{E}{U}B{A}<think>"


def test_chat_mode_never_renders_reasoning():
    assert encode_messages(CONV, "chat", drop_thinking=False) == f"{B}{U}A{A}</think>c1{E}{U}B{A}</think>"


def test_tools_anywhere_keep_reasoning():
    out = encode_messages(CONV, "thinking", tools=[WEATHER])
    assert out == f"{B}\n\n{WEATHER_TOOLS}{U}A{A}<think>r1</think>c1{E}{U}B{A}<think>"


def test_request_tools_attach_to_leading_system_message():
    out = encode_messages(SU, "chat", tools=[WEATHER])
    assert out == f"{B}S\n\n{WEATHER_TOOLS}{U}Hi{A}</think>"


def test_response_format_block():
    rf = {"type": "object", "properties": {"a": {"type": "integer"}}}
    out = encode_messages(SU, "chat", response_format=rf)
    assert out == (f"{B}S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
                   f'{{"type": "object", "properties": {{"a": {{"type": "integer"}}}}}}{U}Hi{A}</think>')


def test_latest_reminder_after_system():
    msgs = [SU[0], {"role": "latest_reminder", "content": "2026-01-01"}, SU[1]]
    assert encode_messages(msgs, "chat") == f"{B}S{T.LATEST_REMINDER}2026-01-01{U}Hi{A}</think>"


def test_latest_reminder_after_user_follows_the_generation_prompt():
    # official behaviour (spec §1.8.6): the reminder lands after <｜Assistant｜><think>
    msgs = SU + [{"role": "latest_reminder", "content": "R"}]
    assert encode_messages(msgs, "thinking") == f"{B}S{U}Hi{A}<think>{T.LATEST_REMINDER}R"


def test_developer_role_is_a_user_turn_with_tools():
    msgs = [SU[0], {"role": "developer", "content": "D", "tools": [WEATHER]}]
    assert encode_messages(msgs, "chat") == f"{B}S{U}D\n\n{WEATHER_TOOLS}{A}</think>"


def test_earlier_developer_message_dropped_with_drop_thinking():
    msgs = [{"role": "developer", "content": "D"}, {"role": "assistant", "content": "x"},
            {"role": "user", "content": "U2"}]
    assert encode_messages(msgs, "thinking") == f"{B}x{E}{U}U2{A}<think>"
    assert encode_messages(msgs, "chat") == f"{B}{U}D{A}</think>x{E}{U}U2{A}</think>"


def _call(cid, name, args):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def test_tool_call_dsml_string_and_json_parameters():
    args = {"s": "x y", "n": 3, "b": True, "l": [1, "a"], "o": {"k": "é"}, "z": None}
    msgs = [{"role": "user", "content": "U"},
            {"role": "assistant", "content": "C", "tool_calls": [_call("c1", "f", args)]}]
    P, PC = T.PARAM_OPEN, T.PARAM_CLOSE
    expected = (f"{B}{U}U{A}</think>C\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
                f'{P} name="s" string="true">x y{PC}\n'
                f'{P} name="n" string="false">3{PC}\n'
                f'{P} name="b" string="false">true{PC}\n'
                f'{P} name="l" string="false">[1, "a"]{PC}\n'
                f'{P} name="o" string="false">{{"k": "é"}}{PC}\n'
                f'{P} name="z" string="false">null{PC}\n'
                f"</｜DSML｜invoke>\n</｜DSML｜tool_calls>{E}")
    assert encode_messages(msgs, "chat") == expected


def test_tool_call_arguments_variants():
    def render(arguments):
        msgs = [{"role": "user", "content": "U"}, {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}]}]
        return encode_messages(msgs, "chat", add_bos=False)
    head = f"{U}U{A}</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
    tail = f"\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>{E}"
    # not JSON: kept as one string parameter "arguments" (official)
    assert render("oops") == head + f'{T.PARAM_OPEN} name="arguments" string="true">oops{T.PARAM_CLOSE}' + tail
    # a dict is the argument object itself (the official file nests it; vLLM accepts it like this)
    assert render({"a": 1}) == head + f'{T.PARAM_OPEN} name="a" string="false">1{T.PARAM_CLOSE}' + tail
    # empty / "{}" arguments: no parameter lines
    assert render("") == head + tail == render("{}")


def test_tool_results_fold_into_user_turn_in_call_order():
    msgs = [{"role": "user", "content": "U"},
            {"role": "assistant", "tool_calls": [_call("a", "f", {}), _call("b", "g", {})]},
            {"role": "tool", "tool_call_id": "b", "content": "RB"},
            {"role": "tool", "tool_call_id": "a", "content": "RA"},
            {"role": "user", "content": "more"}]
    out = encode_messages(msgs, "chat")
    assert out.endswith(f"{E}{U}<tool_result>RA</tool_result>\n\n<tool_result>RB</tool_result>\n\nmore{A}</think>")


def test_tool_call_ids_never_in_prompt():
    msgs = [{"role": "user", "content": "U"}, {"role": "assistant", "tool_calls": [_call("secret_id", "f", {})]},
            {"role": "tool", "tool_call_id": "secret_id", "content": "R"}]
    out = encode_messages(msgs, "thinking")
    assert "secret_id" not in out and out.endswith(f"{U}<tool_result>R</tool_result>{A}<think>")


def test_consecutive_user_messages_join_with_blank_line():
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert encode_messages(msgs, "chat") == f"{B}{U}a\n\nb{A}</think>"


def test_content_list_of_text_parts():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert encode_messages(msgs, "chat") == f"{B}{U}a\nb{A}</think>"


def test_reasoning_alias_and_last_turn_reasoning():
    for key in ("reasoning_content", "reasoning"):
        msgs = [{"role": "user", "content": "U"}, {"role": "assistant", key: "why", "content": "ans"}]
        assert encode_messages(msgs, "thinking") == f"{B}{U}U{A}<think>why</think>ans{E}"


def test_wo_eos_leaves_assistant_open_for_prefill():
    msgs = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "Sure,", "wo_eos": True}]
    assert encode_messages(msgs, "chat") == f"{B}{U}U{A}</think>Sure,"


def test_task_tokens():
    assert encode_messages([{"role": "user", "content": "U", "task": "query"}], "chat") == f"{B}{U}U<｜query｜>"
    assert encode_messages([{"role": "user", "content": "U", "task": "action"}], "thinking") == \
        f"{B}{U}U{A}<think><｜action｜>"


def test_context_renders_only_new_messages():
    ctx = [SU[0], SU[1], {"role": "assistant", "content": "yo"}]
    new = [{"role": "user", "content": "again"}]
    full = encode_messages(ctx + new, "chat")
    assert encode_messages(new, "chat", context=ctx) == f"{U}again{A}</think>"
    assert full == encode_messages(ctx[:2], "chat") + f"yo{E}" + f"{U}again{A}</think>"


# ---- bad input: one line, InputError ------------------------------------------------------------------
BAD = [
    ([{"role": "wizard", "content": "x"}], {}, "unknown role"),
    ([{"role": "user"}], {}, "missing content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], {}, "only text parts"),
    ([{"role": "developer", "content": ""}], {}, "developer"),
    ([{"role": "assistant"}], {}, "assistant message needs"),
    ([{"role": "user", "content": "U"}, {"role": "tool", "tool_call_id": "x", "content": "r"}], {}, "must follow"),
    ([{"role": "user", "content": "U"}, {"role": "assistant", "tool_calls": [_call("a", "f", {})]},
      {"role": "tool", "tool_call_id": "zzz", "content": "r"}], {}, "matches no call"),
    ([{"role": "user", "content": "U"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}]}], {}, "JSON object"),
    ([{"role": "user", "content": "U", "task": "dance"}], {}, "task"),
    (SU, {"thinking_mode": "deep"}, "thinking_mode"),
    (SU, {"reasoning_effort": "ultra"}, "reasoning_effort"),
    (SU, {"tools": [{"type": "function"}]}, "tools[0]"),
    ([], {}, "empty"),
    ("hello", {}, "list"),
]


@pytest.mark.parametrize("messages,kw,needle", BAD, ids=[b[2] for b in BAD])
def test_bad_messages_raise_one_line_input_error(messages, kw, needle):
    with pytest.raises(InputError) as e:
        encode_messages(messages, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_resolve_reasoning_deepseek_mapping():
    from runtime.chat import resolve_reasoning
    assert resolve_reasoning() == ("thinking", None)
    assert resolve_reasoning({"type": "disabled"}, "max") == ("chat", None)
    assert resolve_reasoning({"type": "enabled"}, "medium") == ("thinking", "high")
    assert resolve_reasoning(None, "ultra") == ("thinking", "max")
    assert resolve_reasoning(True, "none") == ("chat", None)
    for bad in (({"type": "maybe"}, None), (None, "extreme")):
        with pytest.raises(InputError):
            resolve_reasoning(*bad)
