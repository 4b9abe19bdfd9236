"""The chat prompt through the real server: /tokenize reports exactly what /v1/chat/completions feeds (the same
fields, the same code path), the heavy work runs off the event loop, and the usage and metrics that count it."""

from __future__ import annotations

import asyncio
import threading

import httpx2 as httpx
import pytest

import runtime.serve.app as app_mod
import runtime.serve.handlers as handlers_mod
from tests.serve_helpers import LiveServer

MODEL = "tiny"
HI = [{"role": "user", "content": "Hello there"}]
TOOLS = [{"type": "function", "function": {"name": "w", "description": "Weather for a city", "parameters": {
    "type": "object", "properties": {"c": {"type": "string", "maxLength": 3}}, "required": ["c"]}}}]


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    s = LiveServer("--checkpoint", str(tiny_ckpt), "--model-name", MODEL, "--threads", "1")
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.mark.parametrize("fields", [
    {},                                                          # thinking on by default
    {"thinking": {"type": "disabled"}},
    {"reasoning_effort": "max"},
    {"reasoning_effort": "none"},
    {"tools": TOOLS},
    {"tools": TOOLS, "tool_choice": "required", "thinking": {"type": "disabled"}},
    {"response_format": {"type": "json_object"}, "thinking": {"type": "disabled"}},
    {"messages": HI + [{"role": "assistant", "content": "ok", "reasoning": "hm"}, {"role": "user", "content": "go"}]},
])
def test_tokenize_is_the_chat_prompt(server, client, fields):
    body = {"messages": HI, **fields}
    tok = httpx.post(server.url + "/tokenize", json=body).json()
    chat = {k: v for k, v in body.items() if k != "messages"}
    r = client.chat.completions.create(model=MODEL, messages=body["messages"], max_tokens=1, extra_body=chat)
    assert tok["count"] == len(tok["tokens"]) == r.usage.prompt_tokens, fields


def test_tokenize_refuses_what_chat_refuses(server):
    for body, param in (({"messages": HI, "thinking": {"type": "maybe"}}, "thinking"),
                        ({"messages": HI, "tool_choice": "required"}, "tool_choice"),
                        ({"messages": HI, "tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools")):
        r = httpx.post(server.url + "/tokenize", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def _off_loop(where: list):
    """Record, for each call, whether it ran on a thread with a running asyncio loop (the event loop)."""
    def wrap(fn):
        def run(*a, **kw):
            try:
                asyncio.get_running_loop()
                where.append("event loop")
            except RuntimeError:
                where.append(threading.current_thread().name)
            return fn(*a, **kw)
        return run
    return wrap


def test_tokenising_and_grammar_compiling_run_off_the_event_loop(server, client, monkeypatch):
    where: list = []
    wrap = _off_loop(where)
    monkeypatch.setattr(handlers_mod, "build", wrap(handlers_mod.build))
    monkeypatch.setattr(app_mod, "build", wrap(app_mod.build))
    monkeypatch.setattr(server.S.grammars, "compile", wrap(server.S.grammars.compile))
    monkeypatch.setattr(server.S.tokenizer, "encode", wrap(server.S.tokenizer.encode))
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, tools=TOOLS, tool_choice="required",
                                   extra_body={"thinking": {"type": "disabled"}})
    client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=1)
    httpx.post(server.url + "/tokenize", json={"messages": HI})
    httpx.post(server.url + "/tokenize", json={"prompt": "x"})
    assert len(where) >= 6 and "event loop" not in where, where   # chat: build + compile; completion; 2x tokenize


def test_usage_reports_reasoning_tokens(client):
    # the tiny random model never writes </think>: in thinking mode every generated token is reasoning
    on = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=5, temperature=0)
    assert on.usage.completion_tokens_details.reasoning_tokens == on.usage.completion_tokens
    off = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=5, temperature=0,
                                         extra_body={"thinking": {"type": "disabled"}})
    assert off.usage.completion_tokens_details.reasoning_tokens == 0
    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, max_tokens=5, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == chunks[-1].usage.completion_tokens


def _requests(server) -> dict:
    text = httpx.get(server.url + "/metrics").text
    return {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
            if line.startswith("dsv4:requests_total{")}


def test_requests_counter_counts_finished_choices(server, client):
    before = _requests(server)
    client.completions.create(model=MODEL, prompt="abc", max_tokens=3, temperature=0, n=2,
                              extra_body={"ignore_eos": True})
    server.wait_idle()
    after = _requests(server)
    assert after.get("length", 0) - before.get("length", 0) == 2
