"""Completion text -> content / reasoning_content / tool_calls, in one go or incrementally for streaming.

The official parser (`parse_message_from_completion_text`) asserts on anything but well-formed output; a
server must not fail on what a model writes, so this one never raises. Rules:
- thinking mode: text up to `</think>` is reasoning (a leading `<think>` the model repeats is dropped);
  a tool-call block may also end the reasoning (V4 sometimes opens one without closing `</think>`).
- content runs to EOS or to a `\\n\\n<｜DSML｜tool_calls` block; the block is parsed with the official DSML
  grammar (`>\\n` separators, `name="…" string="true|false"` parameters, no duplicate names). String
  parameters become JSON strings, string="false" ones are pasted as JSON after checking they parse.
- anything malformed becomes plain content from the point where it broke, with an entry in `errors`. A
  call becomes visible (id, name, "{") only with its first argument text: a string parameter's header, a
  checked JSON value, or the invoke's end. A call that breaks before that (bad header, a string="false"
  value that is not JSON, ...) is content as a whole; one that breaks after keeps the arguments streamed
  so far (never completed by guesswork) and finish_reason is then "stop", not "tool_calls".
- finish_reason: "tool_calls" when well-formed calls were parsed, "stop" at EOS otherwise, "length" when the
  text ends without EOS (truncated; the server overrides this when it stopped on a stop string).
- text after EOS is ignored. The EOS string must be in the text (decode with special tokens kept).

`IncrementalParser.feed` returns deltas as soon as they are certain (text that may begin a marker is held
back); `parse_completion` is the same parser fed the whole text, so a stream's concatenated deltas always
equal the one-shot result, however the text was split.
"""

from __future__ import annotations

import json
import random
import secrets
from dataclasses import dataclass, field

from . import tokens as T
from .scan import (INVOKE_HEAD, PARAM_HEAD, find, head, held_back, invoke_head_prefix, lit,
                   param_head_prefix)


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def call_id_factory(seed: int | None = None):
    """A function () -> "call_" + 24 hex digits; random by default, a fixed sequence for a given seed."""
    if seed is None:
        return lambda: "call_" + secrets.token_hex(12)
    rng = random.Random(seed)
    return lambda: "call_" + f"{rng.getrandbits(96):024x}"


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None          # set on the first delta of a call (with name)
    name: str | None = None
    arguments: str = ""


@dataclass
class ParseDelta:
    content: str = ""
    reasoning_content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self):
        return bool(self.content or self.reasoning_content or self.tool_calls)


@dataclass
class ParsedCompletion:
    content: str
    reasoning_content: str
    tool_calls: list[dict]         # OpenAI format: {"id", "type": "function", "function": {"name", "arguments"}}
    finish_reason: str             # "stop" | "tool_calls" | "length"
    errors: list[str] = field(default_factory=list)   # what was malformed, for logs; empty when well-formed

    def to_message(self) -> dict:
        """The OpenAI assistant message (content None when empty; reasoning_content only when present)."""
        msg = {"role": "assistant", "content": self.content or None}
        if self.reasoning_content:
            msg["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


class IncrementalParser:
    """Feed completion text deltas; get content / reasoning / tool-call deltas. Call finish() at the end,
    then result() for the whole ParsedCompletion."""

    def __init__(self, thinking_mode: str = "chat", tools=None, call_ids=None):
        self.thinking = thinking_mode == "thinking"
        # tools=None: any tool name accepted; tools=[]: tool-call parsing off (DSML stays content).
        self.parse_tools = tools is None or len(tools) > 0
        self.tool_names = None if not tools else {
            (t.get("function") or t).get("name") if isinstance(t, dict) else None for t in tools}
        self.new_id = call_ids or call_id_factory()
        self.mode = "reasoning" if self.thinking else "content"
        self.at_start = True
        self.buf = ""
        self.content, self.reasoning = [], []
        self.calls: list[dict] = []        # visible calls: {"id", "name", "arguments": [str], "params"}
        self.errors: list[str] = []
        self.eos = False
        self.clean_end = False             # text ended right after a closed tool-call block
        self.broken = False                # a started call broke
        self.pending = None                # a parsed invoke header whose call is not visible yet
        self.cur = None                    # the call being parsed (pending or started)
        self.finished = False
        self._after_eos = False            # non-blank text came after EOS (ignored, reported)
        self._delta = ParseDelta()

    # ---- emission -------------------------------------------------------------------------------------
    def _emit_content(self, s: str):
        if s:
            self.content.append(s)
            self._delta.content += s

    def _emit_reasoning(self, s: str):
        if s:
            self.reasoning.append(s)
            self._delta.reasoning_content += s

    def _emit_args(self, s: str):
        """Append argument text to the current call; the first piece starts the call (id, name, "{")."""
        tcs = self._delta.tool_calls
        if self.pending is not None:         # the call becomes visible only with its first argument text
            call, self.pending = self.pending, None
            call["id"] = self.new_id()
            self.calls.append(call)
            self.call_open = True
            s = "{" + s
            tcs.append(ToolCallDelta(len(self.calls) - 1, call["id"], call["name"], ""))
        idx = len(self.calls) - 1
        self.calls[idx]["arguments"].append(s)
        if tcs and tcs[-1].index == idx:
            tcs[-1].arguments += s
        else:
            tcs.append(ToolCallDelta(idx, arguments=s))
        self.raw = ""          # everything consumed so far is now represented in the output

    # ---- public ---------------------------------------------------------------------------------------
    def feed(self, text: str) -> ParseDelta:
        if not isinstance(text, str):
            from ..errors import InputError
            raise InputError(f"the parser reads completion text (str), got {type(text).__name__}")
        if self.finished:
            raise RuntimeError("feed() after finish()")
        if self.mode == "end":
            if text.strip():
                self._after_eos = True
            return ParseDelta()
        self.buf += text
        while self.mode != "end" and self._step():
            pass
        if self.mode == "end" and self.buf.strip():
            self._after_eos = True
        delta, self._delta = self._delta, ParseDelta()
        return delta

    def finish(self) -> ParseDelta:
        if self.finished:
            return ParseDelta()
        self.finished = True
        if self.mode == "reasoning":
            self._emit_reasoning(self.buf)
            self.errors.append("reasoning was not closed with </think>")
        elif self.mode == "content":
            self._emit_content(self.buf)
        elif self.mode == "block":
            if self.sub == "after":
                self.clean_end = not self.buf
                if self.buf:
                    self.errors.append("text after the tool-call block")
                    self._emit_content(self.buf)
            else:
                if self.call_open:
                    self.broken = True
                    self.errors.append(f"tool call {len(self.calls) - 1} was not closed")
                elif self.pending is not None:
                    self.errors.append("tool call was not closed")
                else:
                    self.errors.append("tool-call block was not closed")
                self._emit_content(self.raw + self.buf)
        self.buf = ""
        if self._after_eos:
            self.errors.append("text after the end-of-sentence token was ignored")
        delta, self._delta = self._delta, ParseDelta()
        return delta

    def result(self) -> ParsedCompletion:
        if not self.finished:
            self.finish()
        calls = [{"id": c["id"], "type": "function",
                  "function": {"name": c["name"], "arguments": "".join(c["arguments"])}} for c in self.calls]
        if not (self.eos or self.clean_end):
            reason = "length"
        elif calls and not self.broken:
            reason = "tool_calls"
        else:
            reason = "stop"
        return ParsedCompletion("".join(self.content), "".join(self.reasoning), calls, reason, list(self.errors))

    # ---- the state machine: each _step consumes from self.buf and returns True if it made progress -----
    def _step(self) -> bool:
        if self.mode == "reasoning":
            return self._step_text(reasoning=True)
        if self.mode == "content":
            return self._step_text(reasoning=False)
        return self._step_block()

    def _step_text(self, reasoning: bool) -> bool:
        buf = self.buf
        if reasoning and self.at_start:
            ok = lit(buf, T.THINK_START)
            if ok is None:
                return False
            self.at_start = False
            if ok:
                self.buf = buf = buf[len(T.THINK_START):]
        stops = [T.EOS]
        if reasoning:
            stops.append(T.THINK_END)
        if self.parse_tools:
            stops.append(T.TOOL_BLOCK_START)
        emit = self._emit_reasoning if reasoning else self._emit_content
        pos, hit = find(buf, stops)
        if hit is None:
            keep = held_back(buf, stops)
            emit(buf[:len(buf) - keep])
            self.buf = buf[len(buf) - keep:]
            return False
        emit(buf[:pos])
        self.buf = buf[pos + len(hit):]
        if hit == T.EOS:
            if reasoning:
                self.errors.append("reasoning was not closed with </think>")
            self.eos, self.mode = True, "end"
        elif hit == T.THINK_END:
            self.mode = "content"
        else:
            self.mode, self.sub, self.raw, self.call_open = "block", "open", hit, False
        return True

    def _fail(self, why: str) -> bool:
        """Malformed DSML: what was consumed but not yet represented becomes content; rescan as content."""
        self.errors.append(why)
        if self.call_open:
            self.broken, self.call_open = True, False
        self.pending = None                # a call not yet visible is dropped: its text becomes content
        self._emit_content(self.raw)
        self.raw, self.mode = "", "content"
        return True

    def _take(self, n: int) -> str:
        s, self.buf = self.buf[:n], self.buf[n:]
        self.raw += s
        return s

    def _step_block(self) -> bool:
        buf, sub = self.buf, self.sub
        if sub == "open":
            ok = lit(buf, ">\n")
            if ok is None:
                return False
            if not ok:
                return self._fail("tool-call block: expected '>\\n' after <｜DSML｜tool_calls")
            self._take(2)
            self.sub = "between"
            return True
        if sub == "between":                       # expecting an invoke or the block's end
            for marker, nxt in ((T.INVOKE_OPEN, "invoke_head"), (T.TOOL_CALLS_CLOSE, "after")):
                ok = lit(buf, marker)
                if ok:
                    self._take(len(marker))
                    self.sub = nxt
                    if nxt == "after":
                        self.raw = ""
                    return True
                if ok is None:
                    return False
            return self._fail("tool-call block: expected <｜DSML｜invoke or </｜DSML｜tool_calls>")
        if sub == "invoke_head":
            m = head(buf, INVOKE_HEAD, invoke_head_prefix)
            if m is None:
                return False
            if m is False:
                return self._fail('tool call: malformed invoke header (expected name="…">\\n)')
            name = m.group(1)
            if self.tool_names is not None and name not in self.tool_names:
                return self._fail(f"tool call: unknown tool {name!r}")
            self._take(m.end())
            self.pending = self.cur = {"id": None, "name": name, "arguments": [], "params": set()}
            self.sub = "params"
            return True
        if sub == "params":                        # expecting a parameter or the invoke's end
            call = self.cur
            opts = [(T.PARAM_OPEN, "param_head"), (T.INVOKE_CLOSE + "\n", "invoke_end")]
            if not call["params"]:         # the official grammar allows a blank line after the header
                opts += [("\n" + T.PARAM_OPEN, "param_head"), ("\n" + T.INVOKE_CLOSE + "\n", "invoke_end")]
            waiting = False
            for marker, nxt in opts:
                ok = lit(buf, marker)
                if ok:
                    self._take(len(marker))
                    if nxt == "invoke_end":
                        self.call_open = False
                        self._emit_args("}")
                        self.sub = "between"
                    else:
                        self.sub = nxt
                    return True
                waiting |= ok is None
            if waiting:
                return False
            return self._fail("tool call: expected <｜DSML｜parameter or </｜DSML｜invoke>")
        if sub == "param_head":
            m = head(buf, PARAM_HEAD, param_head_prefix)
            if m is None:
                return False
            if m is False:
                return self._fail('tool call: malformed parameter header (expected name="…" string="true|false">)')
            key, flag = m.group(1), m.group(2)
            call = self.cur
            if key in call["params"]:
                return self._fail(f"tool call: duplicate parameter {key!r}")
            self._take(m.end())
            self.key_json = ("" if not call["params"] else ", ") + json.dumps(key, ensure_ascii=False) + ": "
            call["params"].add(key)
            self.is_str, self.value = flag == "true", ""
            if self.is_str:
                self._emit_args(self.key_json + '"')
            self.sub = "value"
            return True
        if sub == "value":
            stops = (f"</{T.DSML}parameter", T.EOS)
            pos, hit = find(buf, stops)
            end = pos if hit is not None else len(buf) - held_back(buf, stops)
            piece = self._take(end)
            if self.is_str:
                if piece:
                    self._emit_args(json.dumps(piece, ensure_ascii=False)[1:-1])
            else:
                self.value += piece
            if hit is None:
                return False
            if hit == T.EOS:
                return self._fail("tool call: parameter value not closed before EOS")
            if not self.is_str:
                try:
                    json.loads(self.value, parse_constant=_reject_constant)
                except ValueError:
                    return self._fail(f"tool call: parameter {self.key_json.strip(', :')} has "
                                      'string="false" but its value is not JSON')
            self._take(len(hit))
            self.sub = "param_end"
            return True
        if sub == "param_end":
            ok = lit(buf, ">\n")
            if ok is None:
                return False
            if not ok:
                return self._fail("tool call: expected '>\\n' after </｜DSML｜parameter")
            self._take(2)
            self._emit_args('"' if self.is_str else self.key_json + self.value)
            self.sub = "params"
            return True
        # sub == "after": the block is closed; only EOS (or the end of the text) may follow
        ok = lit(buf, T.EOS)
        if ok is None:
            return False
        if ok:
            self.buf = buf[len(T.EOS):]
            self.eos, self.mode = True, "end"
            return True
        self.errors.append("text after the tool-call block")
        self.mode = "content"
        return True


def parse_completion(text: str, thinking_mode: str = "chat", tools=None, call_ids=None) -> ParsedCompletion:
    """Parse a whole completion (decoded with special tokens kept). Never raises on model output.

    tools: the request's tools (OpenAI format); None accepts any tool name, [] turns tool-call parsing off
    (DSML then stays content, e.g. for tool_choice "none"). call_ids: a () -> id function (call_id_factory).
    """
    p = IncrementalParser(thinking_mode, tools, call_ids)
    p.feed(text)
    p.finish()
    return p.result()
