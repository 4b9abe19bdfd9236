"""Per-choice outputs: turn a sequence's tokens into text, stop strings, parsed chat deltas and events.

An Output lives on the engine thread (`token`, `constrain`, `finish` are called there) and hands events to
the HTTP handler's asyncio queue through `loop.call_soon_threadsafe`. Events: ("text", str, [logprob
entries]) for completions, ("delta", ParseDelta, [entries]) for chat, then ("done", finish_reason).
Stop strings are matched on the raw completion text; text that could still be the start of a stop string
is held back until it cannot (stops.py keeps that amount up to date in O(1) per character).
`reasoning_tokens` counts the tokens generated in thinking mode up to the one that completes `</think>`.
"""

from __future__ import annotations

from ..chat import IncrementalParser, stream_decoder_keep_special
from ..chat import tokens as T
from ..chat.tokenize import decode_keep_special
from .stops import StopHold


class Output:
    def __init__(self, loop, queue, tokenizer, stop: list[str], grammar=None, chat: bool = False,
                 thinking: bool = False, tools=None, index: int = 0):
        self.loop, self.queue, self.tok, self.stop, self.index = loop, queue, tokenizer, stop, index
        self.decode = stream_decoder_keep_special(tokenizer) if chat else tokenizer.stream_decoder()
        self.parser = IncrementalParser("thinking" if thinking else "chat", tools=tools) if chat else None
        self.grammar, self.grammar_on = grammar, grammar is not None and not thinking
        self.constrained = grammar is not None     # (the engine's greedy argmax is for unconstrained rows)
        self.raw, self.sent, self.stopped, self.entries = "", 0, False, []
        self.hold = StopHold(stop) if stop else None
        self.thinking = thinking                   # still inside the reasoning (no `</think>` yet)
        self.reasoning_tokens = 0
        self.ids: list[int] = []
        self.chat = chat
        self.eos = tokenizer.eos

    def _put(self, ev) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index,) + ev)

    def _release(self, text: str) -> None:
        if not text and not self.entries:
            return
        entries, self.entries = self.entries, []
        if self.parser is None:
            self._put(("text", text, entries))
        else:
            self._put(("delta", self.parser.feed(text), entries))

    # ---- engine thread ----------------------------------------------------------------------------
    def constrain(self, logits):
        if self.grammar_on:
            self.grammar.mask(logits)
        return logits

    def token(self, tok: int, lp) -> bool:
        """Take one generated token; True to stop the sequence (a stop string or the grammar's end)."""
        self.ids.append(tok)
        if self.grammar is not None:
            if self.grammar_on:
                self.grammar.accept(tok)
        if lp is not None:
            self.entries.append((tok, lp))
        piece = self.decode(tok) if (self.parser is not None or tok != self.eos) else ""
        self.raw += piece
        if self.thinking:
            self.reasoning_tokens += 1
            # only the end can hold a new `</think>` (searching all of raw each token would be quadratic)
            if T.THINK_END in self.raw[-(len(piece) + len(T.THINK_END) - 1):]:
                self.thinking = False
                if self.grammar is not None:
                    self.grammar_on = True          # structured output constrains the answer, not the reasoning
        if self.stop:
            keep = self.hold.feed(piece)
            for s in self.stop:
                at = self.raw.find(s, max(0, self.sent - len(s)))
                if at != -1:
                    self.stopped = True
                    self._release(self.raw[self.sent:at])
                    self.sent = len(self.raw)
                    return True
        else:
            keep = 0
        upto = len(self.raw) - keep
        self._release(self.raw[self.sent:upto])
        self.sent = max(self.sent, upto)
        return self.grammar is not None and self.grammar.done()

    def finish(self, reason: str) -> None:
        """The choice's last text and its ("done", reason) event, which the handler always gets: if the
        flush fails, as ("done", "error") (and the exception goes on to the engine)."""
        try:
            reason = self._flush(reason)
        except Exception:
            reason = "error"
            raise
        finally:
            self._put(("done", reason))

    def _flush(self, reason: str) -> str:
        if not self.stopped and reason != "cancelled":
            # characters the incremental decoder still holds (an unfinished multi-byte sequence) come out
            full = decode_keep_special(self.tok, self.ids) if self.chat else self.tok.decode(self.ids)
            if full.startswith(self.raw):
                self.raw = full
            self._release(self.raw[self.sent:])
        self.sent = len(self.raw)
        if self.parser is not None:
            delta = self.parser.finish()
            if delta or self.entries:
                self._put(("delta", delta, self.entries))
            parsed = self.parser.result()
            if reason == "stop" and not self.stopped and parsed.finish_reason == "tool_calls":
                reason = "tool_calls"
        return reason
