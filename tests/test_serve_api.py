"""The OpenAI-compatible server, end to end over loopback with the official `openai` client."""

from __future__ import annotations

import copy
import json

import httpx2 as httpx
import jsonschema
import openai
import pytest

from tests.serve_helpers import LiveServer

MODEL = "tiny"
HI = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    s = LiveServer("--checkpoint", str(tiny_ckpt), "--model-name", MODEL, "--api-key", "sk-test",
                   "--max-body-mb", "0.25", "--threads", "1")
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_health_models_and_loading(server, client):
    assert server.first_health == 503                      # asked before the model had loaded
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_nonstreaming_usage_and_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body={"thinking": {"type": "disabled"}})
    ch = r.choices[0]
    assert ch.finish_reason in ("length", "stop")
    assert r.usage.completion_tokens == len(ch.logprobs.content) <= 6
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    extra = r.usage.model_extra
    assert extra["prompt_cache_hit_tokens"] + extra["prompt_cache_miss_tokens"] == r.usage.prompt_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == extra["prompt_cache_hit_tokens"]
    for e in ch.logprobs.content:                          # greedy: the chosen token is the top one
        assert len(e.top_logprobs) == 3 and e.logprob == pytest.approx(e.top_logprobs[0].logprob)
        assert e.logprob <= 0 and sorted([t.logprob for t in e.top_logprobs], reverse=True) == \
            [t.logprob for t in e.top_logprobs]
    assert (ch.message.content or "") == b"".join(bytes(e.bytes) for e in ch.logprobs.content
                                                  if e.bytes != [1]).decode("utf-8", "replace")


def test_chat_streaming_matches_nonstreaming(client):
    kw = dict(model=MODEL, messages=HI, max_tokens=8, temperature=0, extra_body={"thinking": {"type": "enabled"}})
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    msg = full.choices[0].message
    assert reasoning == (msg.model_extra.get("reasoning_content") or "")
    assert content == (msg.content or "")


def test_thinking_on_and_off(client):
    on = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, temperature=0)     # default: on
    off = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, temperature=0,
                                         extra_body={"thinking": {"type": "disabled"}})
    # the tiny random model never writes </think>: in thinking mode everything it says is reasoning
    assert on.choices[0].message.model_extra.get("reasoning_content") and on.choices[0].message.content is None
    assert "reasoning_content" not in off.choices[0].message.model_extra
    # the prompt ends <think> (7 bytes) in thinking mode and </think> (8 bytes) in chat mode
    assert off.usage.prompt_tokens == on.usage.prompt_tokens + 1
    # reasoning_content passed back on an assistant turn is accepted
    back = HI + [{"role": "assistant", "content": "ok", "reasoning_content": "thought"},
                 {"role": "user", "content": "again"}]
    assert client.chat.completions.create(model=MODEL, messages=back, max_tokens=2).choices


def test_completions_seed_and_stop(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    c = client.completions.create(**{**kw, "seed": 8})
    assert a.choices[0].text == b.choices[0].text
    assert c.choices[0].text != a.choices[0].text
    g = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    text = g.choices[0].text
    at = next(i for i in range(2, len(text) - 1) if "\ufffd" not in text[i:i + 2] and text.find(text[i:i + 2]) == i)
    stop = text[at:at + 2]
    s = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, stop=[stop])
    assert s.choices[0].text == text[:text.index(stop)] and s.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, stop=[stop], stream=True) if ch.choices)
    assert streamed == s.choices[0].text
    lp = client.completions.create(model=MODEL, prompt="Once", max_tokens=3, temperature=0, logprobs=2)
    assert len(lp.choices[0].logprobs.token_logprobs) == 3


def test_n_choices(client):
    r = client.completions.create(model=MODEL, prompt="abc", max_tokens=5, temperature=1.0, seed=3, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 15


TOOLS = [{"type": "function", "function": {
    "name": "w", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"c": {"type": "string", "maxLength": 3},
                                                  "d": {"type": "integer", "minimum": 1, "maximum": 9}},
                   "required": ["c", "d"]}}}]


def test_tool_call_round_trip_required(client):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, tool_choice="required",
                                                 max_tokens=250, temperature=0, stream=True,
                                                 extra_body={"thinking": {"type": "disabled"}}))
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["tool_calls"]
    deltas = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
    head = deltas[0]
    assert head.index == 0 and head.id.startswith("call_") and head.function.name == "w"
    pieces = [tc.function.arguments for tc in deltas if tc.function.arguments]
    assert len(pieces) > 1                                  # the arguments stream in pieces
    args = json.loads("".join(pieces))
    jsonschema.validate(args, TOOLS[0]["function"]["parameters"])
    # the call goes back as the assistant turn, its result as a tool message
    call = {"id": head.id, "type": "function", "function": {"name": "w", "arguments": "".join(pieces)}}
    first = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=1,
                                           extra_body={"thinking": {"type": "disabled"}})
    msgs += [{"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": head.id, "content": '{"temp": 21}'}]
    again = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=2,
                                           extra_body={"thinking": {"type": "disabled"}})
    assert again.usage.prompt_tokens > first.usage.prompt_tokens + len("<tool_result>")


def test_json_schema_output_validates(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A person as JSON"}], max_tokens=80, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        extra_body={"thinking": {"type": "disabled"}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    obj = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=60, temperature=0,
                                         response_format={"type": "json_object"},
                                         extra_body={"thinking": {"type": "disabled"}})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_tokenize_detokenize(server):
    h = {"Authorization": "Bearer sk-test"}
    t = httpx.post(server.url + "/tokenize", json={"prompt": "héllo"}, headers=h).json()
    assert t["count"] == len(t["tokens"]) == 7
    assert httpx.post(server.url + "/detokenize", json={"tokens": t["tokens"]}).json()["prompt"] == "héllo"
    m = httpx.post(server.url + "/tokenize", json={"messages": HI}).json()
    assert m["tokens"][0] == 0


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=2, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("dsv4:num_requests_running", "dsv4:num_requests_waiting", "dsv4:prompt_tokens_total",
                 "dsv4:generation_tokens_total", "dsv4:time_to_first_token_seconds_bucket",
                 "dsv4:inter_token_latency_seconds_bucket", "dsv4:prefix_cache_hits_total",
                 "dsv4:prefix_cache_cached_tokens_total", "dsv4:state_memory_bytes"):
        assert name in text, name


def _status(fn):
    with pytest.raises(openai.APIStatusError) as e:
        fn()
    body = e.value.response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"} and body["error"]["message"]
    return e.value.status_code, e.value.response


def test_error_statuses(server, client):
    chat = client.chat.completions.create
    assert _status(lambda: chat(model=MODEL, messages=HI, temperature=5))[0] == 400
    assert _status(lambda: chat(model=MODEL, messages=[], max_tokens=1))[0] == 400
    assert _status(lambda: chat(model=MODEL, messages=[{"role": "wizard", "content": "x"}]))[0] == 400
    assert _status(lambda: chat(model=MODEL, messages=HI, max_tokens=-1))[0] == 400
    assert _status(lambda: chat(model=MODEL, messages=HI, max_tokens=0))[0] == 400
    assert _status(lambda: chat(model=MODEL, messages=HI, seed=2 ** 70))[0] == 400
    assert _status(lambda: chat(model=MODEL, messages=HI, top_p=0))[0] == 400
    assert _status(lambda: chat(model=MODEL, messages=HI, logprobs=True, top_logprobs=21))[0] == 400
    assert _status(lambda: chat(model=MODEL, messages=HI, stop=["a", "b", "c", "d", "e"]))[0] == 400
    assert _status(lambda: chat(model=MODEL, messages=[{"role": "user", "content": 5}]))[0] == 400
    assert _status(lambda: chat(model=MODEL, messages=HI, response_format={"type": "yaml"}))[0] == 400
    assert _status(lambda: chat(model=MODEL, messages=HI, tools=TOOLS,
                                tool_choice={"type": "function", "function": {"name": "nope"}}))[0] == 400
    assert _status(lambda: chat(model=MODEL, messages=HI, tool_choice="required"))[0] == 400
    assert _status(lambda: chat(model=MODEL, messages=HI, extra_body={"thinking": {"type": "maybe"}}))[0] == 400
    assert _status(lambda: chat(model=MODEL, messages=HI, stream_options={"include_usage": True}))[0] == 400
    assert _status(lambda: client.completions.create(model=MODEL, prompt=[999999]))[0] == 400
    for batch in (["a", "b"], [[0, 5], [0, 6]]):
        code, resp = _status(lambda: client.completions.create(model=MODEL, prompt=batch))
        assert code == 400 and "one prompt per request" in resp.json()["error"]["message"]
    assert httpx.post(server.url + "/v1/completions", content=b"{not json", headers={
        "Authorization": "Bearer sk-test", "content-type": "application/json"}).status_code == 400
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "x"},     # missing model: pydantic -> 400
                      headers={"Authorization": "Bearer sk-test"}).status_code == 400
    assert _status(lambda: server.client(api_key="wrong").models.list())[0] == 401
    code, resp = _status(lambda: chat(model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]))
    assert code == 400 and "is a text part whose `text` is not a string (got int)" in resp.json()["error"]["message"]
    auth = {"Authorization": "Bearer sk-test"}
    for method, path, code in (("get", "/v1/nope", 404), ("get", "/v1/chat/completions", 405)):
        r = getattr(httpx, method)(server.url + path, headers=auth)      # routing's answers in OpenAI's JSON too
        assert r.status_code == code and set(r.json()["error"]) >= {"message", "type", "param", "code"}, r.text
    r = httpx.post(server.url + "/tokenize", json={"prompt": "x", "messages": HI})
    assert r.status_code == 400 and r.json()["error"]["message"] == "give prompt or messages, not both"
    assert _status(lambda: chat(model="gpt-4o", messages=HI))[0] == 404
    assert _status(lambda: chat(model=MODEL, messages=[{"role": "user", "content": "x" * 300_000}]))[0] == 413
    assert _status(lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=2_000_000))[0] == 413
    eng = server.S.engine
    eng.max_queue, old = 0, eng.max_queue
    try:
        code, resp = _status(lambda: chat(model=MODEL, messages=HI, max_tokens=1))
        assert code == 503 and resp.headers["retry-after"]
    finally:
        eng.max_queue = old
    plan = eng.rt.memory
    eng.rt.memory = small = copy.copy(plan)
    small.budget = plan.needed([64])                        # room for one 64-token sequence, no more
    try:
        code, resp = _status(lambda: client.completions.create(model=MODEL, prompt="x" * 10, max_tokens=200))
        assert code == 503 and "memory plan" in resp.json()["error"]["message"]
    finally:
        eng.rt.memory = plan
    assert client.completions.create(model=MODEL, prompt="still fine", max_tokens=1).choices


def test_parameters_not_applied_are_refused_unless_neutral(client):
    """presence / frequency penalties, logit_bias, best_of and suffix are not applied: a 400 naming the field
    (ignoring them would answer as if they had been), while their neutral values pass."""
    chat, comp = client.chat.completions.create, client.completions.create
    one = {"model": MODEL, "messages": HI, "max_tokens": 1}
    for call, field in ((lambda: chat(**one, presence_penalty=0.5), "presence_penalty"),
                        (lambda: chat(**one, frequency_penalty=-1), "frequency_penalty"),
                        (lambda: chat(**one, logit_bias={"5": 10}), "logit_bias"),
                        (lambda: comp(model=MODEL, prompt="x", max_tokens=1, best_of=2), "best_of"),
                        (lambda: comp(model=MODEL, prompt="x", max_tokens=1, suffix="y"), "suffix")):
        code, resp = _status(call)
        err = resp.json()["error"]
        assert code == 400 and err["param"] == field and err["message"].startswith(field + ": "), err
    assert chat(**one, presence_penalty=0, frequency_penalty=0, logit_bias={}).choices
    assert comp(model=MODEL, prompt="x", max_tokens=1, best_of=1).choices


def test_cli_bad_arguments_exit_2():
    import subprocess
    import sys

    for args in (["--cache-block", "100"], ["--max-num-seqs", "0"], ["--port", "70000"]):
        r = subprocess.run([sys.executable, "-m", "runtime.serve", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv, says", [
    (["--profile", "onnx-cpu"], "profile onnx-cpu runs the exported ONNX graphs, which the server cannot batch"),
    (["--speculative", "mtp", "--tp", "2"], "--speculative mtp runs on one device"),
    (["--tp", "0"], "--tp must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--max-body-mb", "0"], "--max-body-mb must be > 0 and --cache-mb >= 0"),
    (["--cache-mb", "-1"], "--max-body-mb must be > 0 and --cache-mb >= 0"),
    (["--api-key", ""], "--api-key is empty; give a value or leave the flag out")])
def test_cli_refusals_are_one_line(capsys, argv, says):
    from runtime.serve.__main__ import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err
