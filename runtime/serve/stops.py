"""How much of a growing text must be held back because it could still begin a stop string.

The held-back part is the longest suffix of the text that is a proper prefix of one of the stop strings.
Recomputing it from the text's end at every token costs O(len(stop)^2) per stop string (every prefix
length tried, each compared); a Knuth-Morris-Pratt matcher per stop string keeps it up to date instead, in
amortised O(1) per character appended, so a long stop string costs no more per token than a short one.
"""

from __future__ import annotations


def _failure(s: str) -> list[int]:
    """KMP's failure function: f[i] = length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    f, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f


class StopHold:
    """feed(piece) after each piece appended to the text -> how many of the text's last characters could
    still be the start of a stop string (0 when none). A stop string found whole is the caller's to see (it
    searches the text); this only tracks partial matches at the end."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.fail = [_failure(s) for s in self.stops]
        self.state = [0] * len(self.stops)        # per stop string: the longest prefix the text ends with

    def feed(self, piece: str) -> int:
        best = 0
        for j, s in enumerate(self.stops):
            k, f, n = self.state[j], self.fail[j], len(s)
            for c in piece:
                if k == n:                        # a whole match ended just before: continue from its border
                    k = f[k - 1]
                while k and s[k] != c:
                    k = f[k - 1]
                if s[k] == c:
                    k += 1
            self.state[j] = k
            hold = k if k < n else f[n - 1]       # (k == n: the whole string, which the caller finds)
            if hold > best:
                best = hold
        return best
