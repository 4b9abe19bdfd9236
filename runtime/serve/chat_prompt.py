"""A chat request's prompt ids, as /v1/chat/completions feeds them and /tokenize reports them (one code path).

From the request's `messages`, `tools`, `tool_choice`, `response_format`, `thinking` and `reasoning_effort`:
the thinking switches resolved (DeepSeek's rules: on by default), the tools and schemas checked
(schemas.py), vLLM's `reasoning` key on assistant turns taken as `reasoning_content`, then V4's encoding
with OpenAI's tool-message rules. Every fault is a 400 naming the field.

The conversation must leave the model a turn to write: the last message is a user, tool or developer
message (the encoding then ends `<｜Assistant｜><think>` or `</think>`). A system-only conversation has
no turn to answer, and a trailing assistant message is closed by `<｜end▁of▁sentence｜>`, after which the
model would write past its own end of turn: both are refused. An assistant message marked `wo_eos: true`
(DeepSeek's prefill: the official encoder leaves it open) is continued: the completion carries on its
content, after its `</think>` in thinking mode, so the output is parsed as content.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..chat import encode_chat_ids, resolve_reasoning
from ..errors import V4Error
from .protocol import APIError
from .schemas import check_schema, check_tools

ANSWERABLE = ("user", "tool", "developer")


@dataclass
class ChatPrompt:
    ids: list[int]
    thinking: bool                  # the completion starts inside the reasoning
    tools: list | None
    response_format: dict | None    # None for "text"


def _last_turn(messages: list) -> bool:
    """400 unless the conversation leaves the model a turn (module doc) -> True for a wo_eos prefill."""
    i, last = len(messages) - 1, messages[-1]
    role = last.get("role") if isinstance(last, dict) else None
    if role == "assistant" and last.get("wo_eos") is True:
        if last.get("tool_calls"):
            raise APIError(400, f"messages[{i}]: an assistant message continued with wo_eos cannot carry "
                                "tool_calls; drop them or the wo_eos", param="messages")
        return True
    if role in ANSWERABLE or role not in ("assistant", "system", "latest_reminder"):
        return False                # (an unknown role or a non-object: the encoder names that fault)
    why = ("a trailing assistant message is not continued (it ends with the end-of-sentence token); end with "
           "a user message, or mark it \"wo_eos\": true to have its content continued") if role == "assistant" \
        else f"a {role} message leaves no turn to answer; add a user message after it"
    raise APIError(400, f"messages[{i}]: the last message must be a user or tool message, got {role!r}: {why}",
                   param="messages")


def build(S, req) -> ChatPrompt:
    """The prompt of chat request `req` (a ChatRequest, or a TokenizeRequest with messages)."""
    try:
        mode, effort = resolve_reasoning(req.thinking, req.reasoning_effort)
    except V4Error as e:
        raise APIError(400, str(e), param="thinking") from None
    tools, choice = req.tools or None, req.tool_choice
    if choice not in (None, "none", "auto") and not tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if tools:
        check_tools(tools)
    rf = req.response_format if req.response_format and req.response_format.get("type") != "text" else None
    js = rf.get("json_schema") if rf is not None else None
    if isinstance(js, dict):
        check_schema(js.get("schema"), "response_format.json_schema.schema", "response_format")
    messages = []
    for m in req.messages:
        if isinstance(m, dict) and m.get("role") == "assistant" and "reasoning" in m and "reasoning_content" not in m:
            m = {**{k: v for k, v in m.items() if k != "reasoning"}, "reasoning_content": m["reasoning"]}
        messages.append(m)
    if not messages:
        raise APIError(400, "messages is empty; give at least one message", param="messages")
    prefill = _last_turn(messages)
    try:
        ids = encode_chat_ids(S.tokenizer, messages, thinking_mode=mode, reasoning_effort=effort, tools=tools,
                              response_format=rf, strict_tool_results=True)
    except V4Error as e:
        raise APIError(400, str(e), param="messages") from None
    return ChatPrompt(ids, mode == "thinking" and not prefill, tools, rf)
