"""Scanning helpers of the completion parser: stop strings that may be split across stream deltas, and
DSML header matching that can tell "malformed" from "not complete yet" (so chunking never changes a result).
"""

from __future__ import annotations

import re

NAME_MAX = 512          # longest tool / parameter name accepted before a header counts as malformed


def held_back(buf: str, stops) -> int:
    """Length of the longest suffix of buf that is a proper prefix of one of the stop strings."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(buf)), best, -1):
            if s.startswith(buf[-n:]):
                best = n
                break
    return best


def find(buf: str, stops):
    """(position, stop) of the earliest stop string in buf, or (-1, None)."""
    pos, hit = -1, None
    for s in stops:
        p = buf.find(s)
        if p != -1 and (pos == -1 or p < pos):
            pos, hit = p, s
    return pos, hit


def lit(buf: str, marker: str):
    """True if buf starts with marker, None if buf is a proper prefix of it (wait), False otherwise."""
    if buf.startswith(marker):
        return True
    return None if marker.startswith(buf) else False


INVOKE_HEAD = re.compile(r'\s*name="([^"]*)">\n')
PARAM_HEAD = re.compile(r' name="([^"]*)" string="(true|false)">')


def head(buf: str, regex, prefix_ok) -> object:
    """Match a header at the start of buf: the match, None (could still match: wait) or False (cannot)."""
    m = regex.match(buf)
    if m:
        return m
    return None if prefix_ok(buf) else False


def invoke_head_prefix(buf: str) -> bool:
    rest = buf.lstrip()
    if len(rest) <= len('name="'):
        return 'name="'.startswith(rest)
    if not rest.startswith('name="'):
        return False
    name_end = rest.find('"', 6)
    if name_end == -1:
        return len(rest) - 6 <= NAME_MAX and "\n" not in rest
    return '">\n'.startswith(rest[name_end:])


def param_head_prefix(buf: str) -> bool:
    if len(buf) <= len(' name="'):
        return ' name="'.startswith(buf)
    if not buf.startswith(' name="'):
        return False
    name_end = buf.find('"', 7)
    if name_end == -1:
        return len(buf) - 7 <= NAME_MAX and "\n" not in buf
    tail = buf[name_end:]
    return any(full.startswith(tail) for full in ('" string="true">', '" string="false">'))
