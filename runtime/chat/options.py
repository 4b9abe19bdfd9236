"""Request-level thinking switches (DeepSeek API style) -> encode_messages' thinking_mode / reasoning_effort.

DeepSeek's API: thinking is on unless `thinking: {"type": "disabled"}`; `reasoning_effort` maps
minimal/low -> low, medium/high/xhigh -> high, max/ultra -> max (api-docs.deepseek.com/guides/thinking_mode).
The V4 prompt has one effort text, for "max"; low and high render alike (no prefix). "none" turns thinking
off, as in vLLM's V4 tokenizer.
"""

from __future__ import annotations

from ..errors import InputError

_EFFORT = {"minimal": "high", "low": "high", "medium": "high", "high": "high", "xhigh": "high",
           "max": "max", "ultra": "max"}


def resolve_reasoning(thinking=None, reasoning_effort: str | None = None) -> tuple[str, str | None]:
    """(thinking_mode, reasoning_effort) for encode_messages from a request's `thinking` (None, a bool, or
    {"type": "enabled" | "disabled"}) and `reasoning_effort` (DeepSeek's values, or "none")."""
    if thinking is None:
        enabled = True
    elif isinstance(thinking, bool):
        enabled = thinking
    elif isinstance(thinking, dict) and thinking.get("type") in ("enabled", "disabled"):
        enabled = thinking["type"] == "enabled"
    else:
        raise InputError(f"thinking {thinking!r} is invalid; use {{\"type\": \"enabled\"}} or "
                         "{\"type\": \"disabled\"}")
    if reasoning_effort is None:
        effort = None
    elif reasoning_effort == "none":
        enabled, effort = False, None
    elif reasoning_effort in _EFFORT:
        effort = _EFFORT[reasoning_effort]
    else:
        raise InputError(f"reasoning_effort {reasoning_effort!r} is invalid; use one of none, "
                         + ", ".join(_EFFORT))
    return ("thinking", effort) if enabled else ("chat", None)
