"""Bad input through the real server: each is an OpenAI 4xx naming the problem, never a 500, a hang or a
wrong answer; and the inputs next to them that are fine still are (nulls, emoji escapes, prefills)."""

from __future__ import annotations

import json

import httpx2 as httpx
import openai
import pytest

from tests.serve_helpers import LiveServer

MODEL = "tiny"
HI = [{"role": "user", "content": "Hello there"}]
OFF = {"thinking": {"type": "disabled"}}
AUTH = {"Authorization": "Bearer sk-test"}


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    s = LiveServer("--checkpoint", str(tiny_ckpt), "--model-name", MODEL, "--api-key", "sk-test",
                   "--max-body-mb", "0.25", "--threads", "1")
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def post(server, path, body, status=None, needle=None, param=...):
    """POST `body` (a dict, or raw bytes) -> the response JSON, checked against status / needle / param."""
    kw = {"content": body, "headers": {**AUTH, "content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body, "headers": AUTH}
    r = httpx.post(server.url + path, timeout=120, **kw)
    if status is not None:
        assert r.status_code == status, r.text
    data = r.json()
    if status is not None and status >= 400:
        err = data["error"]
        assert set(err) >= {"message", "type", "param", "code"} and "Traceback" not in err["message"]
        assert needle is None or needle in err["message"], err
        assert param is ... or err["param"] == param, err
    return data


def chat(server, status=200, needle=None, param=..., **body):
    return post(server, "/v1/chat/completions", {"model": MODEL, "max_tokens": 2, **OFF, **body}, status, needle,
                param)


# ---- 1. the conversation must leave the model a turn ---------------------------------------------------
def test_no_turn_to_answer_is_a_400(server):
    chat(server, 400, "the last message must be a user or tool message", "messages",
         messages=[{"role": "system", "content": "Be nice"}])
    chat(server, 400, "a trailing assistant message is not continued", "messages",
         messages=HI + [{"role": "assistant", "content": "Hel"}])
    post(server, "/tokenize", {"messages": HI + [{"role": "assistant", "content": "Hel"}]}, 400, "trailing assistant")
    chat(server, messages=[{"role": "system", "content": "Be nice"}] + HI)
    chat(server, messages=HI + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}])


def test_wo_eos_prefill_is_continued_as_content(server):
    pre = HI + [{"role": "assistant", "content": "Sure,", "wo_eos": True}]
    ids = post(server, "/tokenize", {"messages": pre}, 200)["tokens"]
    assert bytes(i - 2 for i in ids[-5:]) == b"Sure,"                # the prompt ends with the open turn
    r = chat(server, messages=pre, max_tokens=4, temperature=0, thinking={"type": "enabled"}, ignore_eos=True)
    msg = r["choices"][0]["message"]
    assert msg["content"] and "reasoning_content" not in msg            # after its </think>: content
    chat(server, 400, "cannot carry tool_calls", messages=HI + [{"role": "assistant", "wo_eos": True, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}])


# ---- 2. tool_choice, tools and schemas ----------------------------------------------------------------
def _tools(params, name="f"):
    return [{"type": "function", "function": {"name": name, "parameters": params}}]


GOOD = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}}, "required": ["a"]}
BAD_TOOLS = [
    (_tools("x"), "parameters must be a JSON-schema object"),
    (_tools({"type": "array"}), "parameters must be a JSON-schema object"),
    (_tools({"type": "object", "properties": ["a"]}), "properties must be an object"),
    (_tools({"type": "object", "properties": {"a": "string"}}), "properties.a must be a JSON-schema object"),
    (_tools({**GOOD, "required": 5}), "required must be a list of parameter names"),
    (_tools({**GOOD, "required": [1]}), "required must be a list of parameter names"),
    (_tools({"type": "object", "properties": {"a": {"type": "string", "maxLength": True}}}), "maxLength must be a "
                                                                                            "non-negative integer"),
    (_tools({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string", "minLength": 1.5}}}}),
     "items.minLength must be a non-negative integer"),
    (_tools(GOOD, name='f"x'), "function names are 1-64 characters"),
    (_tools(GOOD, name="f" * 65), "function names are 1-64 characters"),
    (_tools(GOOD, name="get weather"), "function names are 1-64 characters"),
    (_tools({"type": "object", "properties": {'a"b': {"type": "string"}}}), "parameter name"),
]


@pytest.mark.parametrize("tools,needle", BAD_TOOLS, ids=[f"{i}" for i in range(len(BAD_TOOLS))])
@pytest.mark.parametrize("choice", ["required", "auto"])
def test_bad_tools_are_a_400(server, tools, needle, choice):
    chat(server, 400, needle, "tools", messages=HI, tools=tools, tool_choice=choice)


@pytest.mark.parametrize("choice", [{"function": "f"}, {"type": "function", "function": {}}, {"type": "web"},
                                    "sometimes", 5, ["f"]])
def test_bad_tool_choice_is_a_400(server, choice):
    chat(server, 400, "tool_choice must be", "tool_choice", messages=HI, tools=_tools(GOOD), tool_choice=choice)


def test_good_tools_still_pass(server):
    odd = {"type": "object", "properties": {"maxLength": {"type": "integer"}, "items": {"type": "string"}}}
    r = chat(server, messages=HI, tools=_tools(odd, "get_weather-2"), tool_choice="required", max_tokens=40,
             temperature=0)
    assert r["choices"][0]["finish_reason"] in ("tool_calls", "length")
    chat(server, messages=HI, tools=[{"type": "function", "function": {"name": "noargs"}}], tool_choice="auto")
    chat(server, 400, "maxLength must be a non-negative integer", "response_format", messages=HI, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "maxLength": -1}}})


# ---- 3. tool results as OpenAI requires them ------------------------------------------------------------
CALLS = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": "x"}'}},
    {"id": "c2", "type": "function", "function": {"name": "f", "arguments": '{"a": "y"}'}}]}


@pytest.mark.parametrize("tail,needle", [
    ([{"role": "user", "content": "and?"}], "were not all answered before messages[2] (missing: c1, c2)"),
    ([{"role": "tool", "tool_call_id": "c1", "content": "1"}], "were not all answered at the end"),
    ([{"role": "tool", "content": "1"}], "a tool message needs `tool_call_id`"),
    ([{"role": "tool", "tool_call_id": "c1", "content": "1"}, {"role": "tool", "tool_call_id": "c1", "content": "1"}],
     "answered twice"),
    ([{"role": "tool", "tool_call_id": "c1", "content": "1"}, {"role": "tool", "tool_call_id": "c2", "content": "2"},
      {"role": "tool", "tool_call_id": "c2", "content": "2"}], "answered twice"),
    ([{"role": "tool", "tool_call_id": "c1", "content": "1"}, {"role": "user", "content": "x"},
      {"role": "tool", "tool_call_id": "c2", "content": "2"}], "were not all answered"),
])
def test_tool_results_must_answer_every_call(server, tail, needle):
    chat(server, 400, needle, "messages", messages=HI + [CALLS] + tail, tools=_tools(GOOD))


def test_complete_tool_results_pass(server):
    done = [{"role": "tool", "tool_call_id": "c2", "content": "2"},
            {"role": "tool", "tool_call_id": "c1", "content": "1"}]
    chat(server, messages=HI + [CALLS] + done, tools=_tools(GOOD))


# ---- 4. the body: encoding, nesting, size ------------------------------------------------------------
@pytest.mark.parametrize("path,raw,where", [
    ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}',
     "messages[0].content"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": '
                             b'"function", "function": {"name": "f", "description": "\\ud83d"}}]}',
     "tools[0].function.description"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "\\ud800": 1}', "\\ud800"),
    ("/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
])
def test_lone_surrogates_are_a_400(server, path, raw, where):
    err = post(server, path, raw, 400, "lone UTF-16 surrogate")["error"]
    assert err["param"] == where


def test_surrogate_pairs_and_emoji_are_fine(server):
    r = post(server, "/v1/completions", b'{"model": "tiny", "prompt": "hi \\ud83d\\ude00", "max_tokens": 1}', 200)
    assert r["usage"]["prompt_tokens"] == 1 + 3 + 4                   # BOS, "hi ", the emoji's 4 UTF-8 bytes


@pytest.mark.parametrize("depth", [100_000, 65])
def test_deep_nesting_is_a_400(server, depth):
    raw = b'{"model": "tiny", "prompt": "a", "max_tokens": 1, "x": ' + b"[" * depth + b"]" * depth + b"}"
    post(server, "/v1/completions", raw, 400, "nests objects / arrays more than 64 deep")


def test_chunked_body_over_the_limit_is_a_413(server):
    def chunks():                                # no Content-Length: Transfer-Encoding chunked
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(40):
            yield b"x" * 10_000
        yield b'"}'
    json_headers = {**AUTH, "content-type": "application/json"}
    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers=json_headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
    assert "limit of 262,144" in r.json()["error"]["message"]

    def small():
        yield b'{"model": "tiny", "prompt": "hi", '
        yield b'"max_tokens": 1}'
    r = httpx.post(server.url + "/v1/completions", content=small(), headers=json_headers)
    assert r.status_code == 200, r.text


# ---- 5. parameters --------------------------------------------------------------------------------------
def test_stop_strings_are_capped(server, client):
    chat(server, 400, "stop strings are limited to 512 characters each (got one of 513)", "stop", messages=HI,
         stop=["x" * 513])
    r = client.completions.create(model=MODEL, prompt="Once", max_tokens=3, temperature=0, stop=["y" * 512] * 4)
    assert r.choices[0].finish_reason == "length"


def test_echo_is_refused_unless_false(server, client):
    post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1, "echo": True}, 400,
         "echo (the prompt returned with the completion) is not supported", "echo")
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=1, echo=False).choices


def test_null_means_not_given(server, client):
    nulls = {k: None for k in ("temperature", "top_p", "n", "stream", "max_tokens", "stop", "seed", "stream_options",
                               "presence_penalty", "frequency_penalty", "logit_bias", "ignore_eos")}
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "ab", "logprobs": None, "echo": None,
                                         "best_of": None, "suffix": None, **nulls}, 200)
    assert r["usage"]["completion_tokens"] == 16 and len(r["choices"]) == 1       # the defaults
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": HI, "logprobs": None, "top_logprobs": None,
                                              "tools": None, "tool_choice": None, "response_format": None,
                                              "thinking": None, "reasoning_effort": None,
                                              "max_completion_tokens": None, **nulls, "max_tokens": 2}, 200)
    assert r["choices"][0]["finish_reason"] == "length"
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, temperature=None, top_p=None, n=None,
                                       stop=None, seed=None, logprobs=None, presence_penalty=None)
    assert r.choices[0].finish_reason == "length"
    post(server, "/v1/completions", {"model": None, "prompt": "x"}, 400, None, "model")     # required: still refused
    post(server, "/v1/chat/completions", {"model": MODEL, "messages": None}, 400, None, "messages")


# ---- 6. routes ---------------------------------------------------------------------------------------------
def test_models_retrieve(server, client):
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.response.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.retrieve(MODEL)


def test_no_body_stays_a_400(server):
    post(server, "/v1/completions", b"", 400, "not valid JSON")
    post(server, "/v1/completions", json.dumps([1, 2]).encode(), 400, "must be a JSON object")
