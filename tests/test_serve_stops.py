"""The held-back amount for stop strings: what the old per-token search gave, in O(1) per character."""

from __future__ import annotations

import random
import time

from runtime.serve.output import Output
from runtime.serve.stops import StopHold
from runtime.tokenizer import BYTE_OFFSET, ByteTokenizer


def _brute(raw: str, stops: list[str]) -> int:
    return max((k for s in stops for k in range(len(s) - 1, 0, -1) if raw.endswith(s[:k])), default=0)


def test_hold_equals_the_longest_stop_prefix_at_the_end():
    rng = random.Random(1)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 7))) for _ in range(rng.randint(1, 4))]
        hold, raw = StopHold(stops), ""
        for _ in range(12):
            piece = "".join(rng.choice("abc") for _ in range(rng.randint(0, 3)))
            raw += piece
            assert hold.feed(piece) == _brute(raw, stops), (stops, raw)


class _Loop:
    """Output's event-loop side: runs the handler's queue.put_nowait at once, into a list."""

    def __init__(self):
        self.events = []

    def call_soon_threadsafe(self, fn, ev):
        fn(ev)

    def put_nowait(self, ev):
        self.events.append(ev)


def test_long_stop_strings_cost_little_per_token():
    # 4 stop strings of the 512-character cap that the text keeps almost matching: the old search tried every
    # prefix of each at every token (~2,000 endswith calls a token, seconds for these 8,000 tokens)
    tok, loop = ByteTokenizer(320), _Loop()
    out = Output(loop, loop, tok, ["a" * 511 + "b", "a" * 510 + "bc", "ab" * 256, "a" * 300 + "d" * 212])
    t0 = time.perf_counter()
    for i in range(8000):
        assert not out.token(BYTE_OFFSET + ord("a" if i % 600 else "c"), None)
    assert time.perf_counter() - t0 < 1.0
    out.finish("length")
    text = "".join(ev[2] for ev in loop.events if ev[1] == "text")
    assert text == "".join("a" if i % 600 else "c" for i in range(8000))
