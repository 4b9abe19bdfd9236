"""One sequence's failure is its own: the engine finishes it alone (reason "error", `seq.error` saying why)
and the others decode on, token for token as alone; the server answers such a request with a 5xx, not a 200
with finish_reason "error". And the sampling that used to fail that way (a tiny temperature) now works."""

from __future__ import annotations

import threading
import time

import openai
import pytest

import runtime.serve.engine as engine_mod
from runtime.serve.engine import Engine, GenParams, Sequence, serving_runtime
from runtime.serve.output import Output
from tests.serve_helpers import LiveServer

MODEL = "tiny"
HI = [{"role": "user", "content": "Hello there"}]
OFF = {"thinking": {"type": "disabled"}}


class Out:
    """A sequence's sink; `bad_at`: raise in token() at that token (a stand-in for a failing output)."""

    def __init__(self, bad_at: int | None = None):
        self.toks, self.done, self.bad_at, self.reason = [], threading.Event(), bad_at, None

    def token(self, t, lp):
        if self.bad_at is not None and len(self.toks) == self.bad_at:
            raise RuntimeError("boom in the output")
        self.toks.append(t)
        return False

    def finish(self, reason):
        self.reason = reason
        self.done.set()


class Constrained(Out):
    """An output with a grammar hook that masks nothing: the engine must take the per-row path (`_pick`)."""
    constrained = True

    def constrain(self, logits):
        return logits


def _run(eng, jobs, max_tokens=12):
    """Submit (prompt, params, out) together (one step admits them all), then start the loop."""
    seqs = [eng.submit(Sequence(p, GenParams(max_tokens=max_tokens, ignore_eos=True, **kw), o)) for p, kw, o in jobs]
    eng.start()
    for _, _, o in jobs:
        assert o.done.wait(120)
    return seqs


@pytest.fixture(scope="module")
def srt(tiny_rt):
    return serving_runtime(tiny_rt)


PROMPT = [0] + [2 + (j * 13) % 250 for j in range(30)]
OTHER = [0] + [2 + (j * 7) % 250 for j in range(20)]


def _alone(srt, prompt, out_cls=Out):
    eng = Engine(srt)
    try:
        o = out_cls()
        _run(eng, [(prompt, {}, o)])
        return o.toks
    finally:
        eng.stop()


def test_tiny_temperature_samples_the_argmax_and_ends_nobody(srt):
    greedy = _alone(srt, PROMPT)
    eng = Engine(srt)
    try:
        tiny, other = Out(), Out()
        _run(eng, [(PROMPT, {"temperature": 1e-300, "seed": 1}, tiny), (OTHER, {}, other)])
        assert tiny.reason == other.reason == "length"
        assert tiny.toks == greedy                       # the limit of T -> 0 is the argmax
    finally:
        eng.stop()


def test_a_failing_output_ends_its_sequence_alone(srt):
    want = _alone(srt, OTHER)
    eng = Engine(srt)
    try:
        bad, good, bad_first = Out(bad_at=3), Out(), Out(bad_at=0)       # (bad_at 0: the prefill's token)
        seqs = _run(eng, [(PROMPT, {}, bad), (OTHER, {}, good), (PROMPT, {"temperature": 0.8}, bad_first)])
        assert (bad.reason, good.reason, bad_first.reason) == ("error", "length", "error")
        assert "RuntimeError: boom in the output" in seqs[0].error and seqs[1].error is None
        assert good.toks == want and len(bad.toks) == 3
        deadline = time.time() + 30                      # (the finished leave the batch at the step's end)
        while not (eng.idle() and eng.state_bytes() == 0):
            assert time.time() < deadline, "engine did not go idle"
            time.sleep(0.01)
        assert eng.thread.is_alive() and eng.error is None
    finally:
        eng.stop()


def test_greedy_fast_path_same_tokens_as_per_row_path(srt):
    """An unconstrained greedy row takes the batch argmax (no `_pick` per token); a row whose output has a
    grammar hook takes `_pick`; both give the same tokens."""
    calls = []
    eng = Engine(srt)
    pick = eng._pick
    eng._pick = lambda seq, row: calls.append(seq) or pick(seq, row)
    try:
        fast, slow = Out(), Constrained()
        seqs = _run(eng, [(PROMPT, {}, fast), (PROMPT, {}, slow)])
        assert fast.toks == slow.toks == _alone(srt, PROMPT)
        assert calls.count(seqs[0]) == 1                  # the first token only (chosen after the prefill)
        assert calls.count(seqs[1]) == 12
    finally:
        eng.stop()


class _Queue:
    """The handler side of a served Output: its event loop runs queue.put_nowait at once, into a list."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def call_soon_threadsafe(self, fn, ev):
        fn(ev)

    def put_nowait(self, ev):
        self.events.append(ev)
        if ev[1] == "done":
            self.done.set()


def test_a_failing_finish_still_tells_the_handler(srt):
    """Output.finish failing (a parser bug at the end) still sends the choice's "done" event, as "error", and
    the sequence counts as failed: the handler never waits forever."""
    q = _Queue()
    out = Output(q, q, srt.tokenizer, [], chat=True)

    def broken():
        raise RuntimeError("parser broke")

    out.parser.finish = broken
    eng = Engine(srt).start()
    try:
        seq = eng.submit(Sequence(PROMPT, GenParams(max_tokens=3, ignore_eos=True), out))
        assert q.done.wait(60)
        assert q.events[-1][1:] == ("done", "error")
        assert seq.finish_reason == "error" and "parser broke" in seq.error
    finally:
        eng.stop()


# ---- through the server --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_ckpt):
    s = LiveServer("--checkpoint", str(tiny_ckpt), "--model-name", MODEL, "--threads", "1")
    yield s
    s.close()


def test_tiny_temperature_through_the_server(server):
    c = server.client()
    kw = dict(model=MODEL, messages=HI, max_tokens=8, extra_body={**OFF, "ignore_eos": True})
    greedy = c.chat.completions.create(temperature=0, **kw)
    for t in (1e-38, 1e-300):
        r = c.chat.completions.create(temperature=t, **kw)
        assert r.choices[0].finish_reason == "length"
        assert r.choices[0].message.content == greedy.choices[0].message.content
    r = c.completions.create(model=MODEL, prompt="Once", max_tokens=4, temperature=1e-300)
    assert r.choices[0].finish_reason == "length"


def test_failed_generation_is_a_5xx_and_others_go_on(server, monkeypatch):
    real = engine_mod.sample

    def flaky(logits, params, gen):               # a sampling bug, for requests at temperature 0.123 only
        if params.temperature == 0.123:
            raise RuntimeError("sampling broke")
        return real(logits, params, gen)

    monkeypatch.setattr(engine_mod, "sample", flaky)
    c = server.client()
    kw = dict(model=MODEL, messages=HI, max_tokens=6, extra_body=OFF)
    before = c.chat.completions.create(temperature=0, **kw).choices[0].message.content
    with pytest.raises(openai.InternalServerError) as e:
        c.chat.completions.create(temperature=0.123, **kw)
    err = e.value.response.json()["error"]
    assert e.value.status_code == 500 and err["type"] == "server_error"
    assert "generation failed: RuntimeError: sampling broke" in err["message"]
    with pytest.raises(openai.APIError) as e:                   # streaming: OpenAI's error event
        list(c.chat.completions.create(temperature=0.123, stream=True, **kw))
    assert "generation failed" in str(e.value)
    with pytest.raises(openai.InternalServerError):
        c.completions.create(model=MODEL, prompt="Once", max_tokens=3, temperature=0.123)
    assert c.chat.completions.create(temperature=0, **kw).choices[0].message.content == before
    server.wait_idle()


def test_served_greedy_rows_take_the_batch_argmax(server, monkeypatch):
    """A served greedy request without a grammar is chosen by the batch argmax: `_pick` (the per-row path)
    runs for its first token only; one with a grammar takes `_pick` at every token."""
    eng, calls = server.S.engine, []
    pick = eng._pick
    monkeypatch.setattr(eng, "_pick", lambda seq, row: calls.append(seq.params.max_tokens) or pick(seq, row))
    c = server.client()
    plain = c.chat.completions.create(model=MODEL, messages=HI, max_tokens=7, temperature=0,
                                      extra_body={**OFF, "ignore_eos": True})
    assert plain.usage.completion_tokens == 7 and calls == [7]
    calls.clear()
    c.chat.completions.create(model=MODEL, messages=HI, max_tokens=9, temperature=0, extra_body=OFF,
                              response_format={"type": "json_object"})
    assert calls and set(calls) == {9} and len(calls) > 1
