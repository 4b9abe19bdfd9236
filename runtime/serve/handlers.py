"""Chat and text completions: a request turned into prompt ids and outputs, then into OpenAI responses
(one JSON body, or `chat.completion.chunk` / `text_completion` SSE chunks).

A job's constructor does the request's heavy work (tokenising the prompt, compiling a grammar) and is run on
a worker thread by the app, not on the event loop that serves every stream. A choice whose generation
failed (its sequence finished with reason "error") ends a stream with an OpenAI error event, and makes a
non-streaming request a 5xx (app.py).
"""

from __future__ import annotations

import time
import uuid

from ..chat.tokenize import decode_keep_special
from ..tokenizer import BYTE_OFFSET, ByteTokenizer
from .chat_prompt import build
from .output import Output
from .protocol import APIError

DEFAULT_MAX_TOKENS = 1024


def token_bytes(tokenizer, i: int) -> bytes:
    if isinstance(tokenizer, ByteTokenizer) and BYTE_OFFSET <= i < BYTE_OFFSET + 256:
        return bytes([i - BYTE_OFFSET])
    return decode_keep_special(tokenizer, [i]).encode()


def _max_tokens(S, req, prompt_len: int, *values) -> int:
    for v in values:
        if v is not None:
            return v
    return max(1, min(DEFAULT_MAX_TOKENS, S.engine.cfg.max_position - prompt_len))


class _Job:
    kind = ""

    def __init__(self, S, req):
        self.S, self.req, self.outputs = S, req, []
        self.id, self.created = f"{self.kind}-{uuid.uuid4().hex[:24]}", int(time.time())

    def usage(self, seqs) -> dict:
        done = sum(len(s.out) for s in seqs)
        cached = max((s.cached_tokens for s in seqs), default=0)
        n = len(self.prompt)
        return {"prompt_tokens": n, "completion_tokens": done, "total_tokens": n + done,
                "prompt_tokens_details": {"cached_tokens": cached},
                "prompt_cache_hit_tokens": cached, "prompt_cache_miss_tokens": n - cached}

    def failure(self, seqs, streamed: bool = False) -> APIError | None:
        """The error a request whose generation failed gets (503 when the engine stopped), else None (for a
        stream, whose "done" event said "error": always one)."""
        bad = next((s for s in seqs if s.finish_reason == "error"), None)
        if bad is None and not streamed:
            return None
        eng = self.S.engine
        if eng.fatal:                       # a lost peer rank ended the sequences: retry once it is back
            return APIError(503, f"the engine stopped: {eng.error}", "server_error")
        why = (bad.error if bad is not None else None) or eng.error or "unknown error"
        return APIError(500, f"generation failed: {why}"[:300], "server_error")

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.S.model_name}

    def _entry(self, tok: int, lp) -> dict:
        t = self.S.tokenizer
        b = token_bytes(t, tok)
        return {"token": b.decode("utf-8", "replace"), "logprob": lp[0], "bytes": list(b),
                "top_logprobs": [{"token": token_bytes(t, j).decode("utf-8", "replace"), "logprob": v,
                                  "bytes": list(token_bytes(t, j))} for j, v in lp[1]]}


class ChatJob(_Job):
    kind = "chatcmpl"

    def __init__(self, S, req):
        super().__init__(S, req)
        p = build(S, req)
        self.prompt, self.thinking, tools, rf = p.ids, p.thinking, p.tools, p.response_format
        choice = req.tool_choice
        self.parse_tools = [] if (not tools or choice == "none") else tools
        grammar = None
        if isinstance(choice, dict) or choice == "required":
            grammar = S.grammars.tool_call(tools, choice["function"]["name"] if isinstance(choice, dict) else None)
        elif rf is not None:
            grammar = S.grammars.response_format(rf)
        self.grammar = None if grammar is None else S.grammars.compile(grammar)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        self.logprobs = (req.top_logprobs or 0) if req.logprobs else None
        self.max_tokens = _max_tokens(S, req, len(self.prompt), req.max_completion_tokens, req.max_tokens)

    def output(self, loop, queue, i: int) -> Output:
        g = self.S.grammars.matcher(self.grammar) if self.grammar is not None else None
        out = Output(loop, queue, self.S.tokenizer, self.req.stop, g, chat=True, thinking=self.thinking,
                     tools=self.parse_tools, index=i)
        self.outputs.append(out)
        return out

    def usage(self, seqs) -> dict:
        u = super().usage(seqs)
        u["completion_tokens_details"] = {"reasoning_tokens": sum(o.reasoning_tokens for o in self.outputs)}
        return u

    @staticmethod
    def _delta(d) -> dict:
        out = {}
        if d.reasoning_content:
            out["reasoning_content"] = d.reasoning_content
        if d.content:
            out["content"] = d.content
        if d.tool_calls:
            calls = []
            for c in d.tool_calls:
                call = {"index": c.index, "function": {"arguments": c.arguments}}
                if c.id is not None:
                    call.update(id=c.id, type="function")
                    call["function"]["name"] = c.name
                calls.append(call)
            out["tool_calls"] = calls
        return out

    async def stream(self, queue, seqs):
        head, n, left = self._head("chat.completion.chunk"), len(seqs), len(seqs)
        for i in range(n):
            yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]}
        while left:
            ev = await queue.get()
            i, kind = ev[0], ev[1]
            if kind == "delta":
                delta, entries = self._delta(ev[2]), ev[3]
                if delta or entries:
                    lp = {"content": [self._entry(t, e) for t, e in entries]} if self.logprobs is not None else None
                    yield {**head, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": None}]}
            elif kind == "done":
                if ev[2] == "error":
                    yield self.failure(seqs, streamed=True).body()     # (OpenAI's error event; the app ends the stream)
                    return
                left -= 1
                yield {**head, "choices": [{"index": i, "delta": {}, "logprobs": None, "finish_reason": ev[2]}]}
        opts = self.req.stream_options
        if opts is not None and opts.include_usage:
            yield {**head, "choices": [], "usage": self.usage(seqs)}

    async def collect(self, queue, seqs):
        n, left = len(seqs), len(seqs)
        reasons, entries = [None] * n, [[] for _ in range(n)]
        while left:
            ev = await queue.get()
            if ev[1] == "delta":
                entries[ev[0]] += [self._entry(t, e) for t, e in ev[3]]
            elif ev[1] == "done":
                reasons[ev[0]] = ev[2]
                left -= 1
        choices = []
        for i, out in enumerate(self.outputs):
            msg = out.parser.result().to_message()
            choices.append({"index": i, "message": msg, "finish_reason": reasons[i],
                            "logprobs": {"content": entries[i]} if self.logprobs is not None else None})
        return {**self._head("chat.completion"), "choices": choices, "usage": self.usage(seqs)}


class CompletionJob(_Job):
    kind = "cmpl"

    def __init__(self, S, req):
        super().__init__(S, req)
        V = S.engine.cfg.vocab_size
        if isinstance(req.prompt, str):
            self.prompt = S.tokenizer.encode(req.prompt)
        else:
            bad = [t for t in req.prompt if not 0 <= t < V]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is out of range [0, {V})", param="prompt")
            self.prompt = list(req.prompt)
        self.logprobs = req.logprobs
        self.max_tokens = _max_tokens(S, req, len(self.prompt), req.max_tokens if req.max_tokens is not None else 16)

    def output(self, loop, queue, i: int) -> Output:
        out = Output(loop, queue, self.S.tokenizer, self.req.stop, None, index=i)
        self.outputs.append(out)
        return out

    def _lp(self, entries, offset: int) -> dict | None:
        if self.logprobs is None:
            return None
        toks = [self._entry(t, e) for t, e in entries]
        offs, o = [], offset
        for e in toks:
            offs.append(o)
            o += len(e["token"])
        return {"tokens": [e["token"] for e in toks], "token_logprobs": [e["logprob"] for e in toks],
                "top_logprobs": [{x["token"]: x["logprob"] for x in e["top_logprobs"]} for e in toks],
                "text_offset": offs}

    async def stream(self, queue, seqs):
        head, left, offs = self._head("text_completion"), len(seqs), [0] * len(seqs)
        while left:
            ev = await queue.get()
            i = ev[0]
            if ev[1] == "text":
                yield {**head, "choices": [{"index": i, "text": ev[2], "logprobs": self._lp(ev[3], offs[i]),
                                            "finish_reason": None}]}
                offs[i] += len(ev[2])
            elif ev[1] == "done":
                if ev[2] == "error":
                    yield self.failure(seqs, streamed=True).body()
                    return
                left -= 1
                yield {**head, "choices": [{"index": i, "text": "", "logprobs": None, "finish_reason": ev[2]}]}
        opts = self.req.stream_options
        if opts is not None and opts.include_usage:
            yield {**head, "choices": [], "usage": self.usage(seqs)}

    async def collect(self, queue, seqs):
        n, left = len(seqs), len(seqs)
        texts, entries, reasons = [""] * n, [[] for _ in range(n)], [None] * n
        while left:
            ev = await queue.get()
            if ev[1] == "text":
                texts[ev[0]] += ev[2]
                entries[ev[0]] += ev[3]
            elif ev[1] == "done":
                reasons[ev[0]] = ev[2]
                left -= 1
        choices = [{"index": i, "text": texts[i], "logprobs": self._lp(entries[i], 0), "finish_reason": reasons[i]}
                   for i in range(n)]
        return {**self._head("text_completion"), "choices": choices, "usage": self.usage(seqs)}
