"""DeepSeek-V4 prompt encoding: OpenAI-format messages -> the prompt string the model was trained on.

Our own implementation of the rendering of the official `encoding/encoding_dsv4.py` (V4 release), checked
byte for byte against the official vectors. The rules:
- BOS, then the system text bare (V4 has no system token); tools and a response format follow it.
- user and developer turns open with <｜User｜>; tool results fold into the user turn after the calls, one
  `<tool_result>…</tool_result>` each, in call order; consecutive user messages join with a blank line.
- after the last user/developer message (or one followed by an assistant / latest_reminder message) comes
  <｜Assistant｜> plus `</think>` (chat mode, or an earlier turn) or `<think>` (thinking mode).
- an assistant turn is `{reasoning}</think>{content}{DSML tool calls}<｜end▁of▁sentence｜>` in thinking mode
  (reasoning kept only after the last user message unless drop_thinking is off) and
  `{content}{tool calls}<｜end▁of▁sentence｜>` in chat mode.
- drop_thinking (thinking mode) removes earlier reasoning and earlier developer messages; any `tools`
  anywhere turns it off, so a tool-using conversation keeps all its reasoning.
- reasoning_effort="max" in thinking mode prepends REASONING_EFFORT_MAX to message 0.

Deliberate differences from the official file (it asserts or renders nonsense there): bad messages raise
InputError; dict / empty `arguments` (see dsml.arguments_to_dict); with `context`, the messages rendered are
exactly the new ones (the official count is off by one when the context ends with a developer message).
"""

from __future__ import annotations

from ..errors import InputError
from . import tokens as T
from .dsml import render_tool_calls, render_tools, to_json
from .messages import (check_tool_results, merge_tool_messages, normalize_message, normalize_tools,
                       sort_tool_results)

THINKING_MODES = ("chat", "thinking")
REASONING_EFFORTS = (None, "high", "max")


def _last_user_index(msgs: list[dict]) -> int:
    for i in range(len(msgs) - 1, -1, -1):
        if msgs[i]["role"] in ("user", "developer"):
            return i
    return -1


def _drop_thinking(msgs: list[dict]) -> list[dict]:
    """Before the last user/developer message: assistant reasoning removed, developer messages dropped."""
    last = _last_user_index(msgs)
    out = []
    for i, m in enumerate(msgs):
        if i >= last or m["role"] in ("user", "system", "latest_reminder"):
            out.append(m)
        elif m["role"] == "assistant":
            out.append(dict(m, reasoning=None))
        # earlier developer messages vanish
    return out


def _extras(m: dict) -> str:
    s = ""
    if m["tools"]:
        s += "\n\n" + render_tools(m["tools"])
    if m["response_format"]:
        s += "\n\n" + T.RESPONSE_FORMAT_HEADER + to_json(m["response_format"])
    return s


def _render(i: int, msgs: list[dict], thinking: bool, drop_thinking: bool, effort, last_user: int) -> str:
    m = msgs[i]
    role = m["role"]
    out = T.REASONING_EFFORT_MAX if (i == 0 and thinking and effort == "max") else ""
    if role == "system":
        out += m["content"] + _extras(m)
    elif role == "developer":
        out += T.USER + m["content"] + _extras(m)
    elif role == "user":
        parts = [b[1] if b[0] == "text" else f"<tool_result>{b[2]}</tool_result>" for b in m["blocks"]]
        out += T.USER + "\n\n".join(parts)
    elif role == "latest_reminder":
        out += T.LATEST_REMINDER + m["content"]
    else:  # assistant
        after_task = i > 0 and msgs[i - 1]["task"] is not None
        if thinking and not after_task and (not drop_thinking or i > last_user):
            out += (m["reasoning"] or "") + T.THINK_END
        out += m["content"]
        if m["calls"]:
            out += render_tool_calls([(name, args) for _, name, args in m["calls"]])
        if not m["wo_eos"]:
            out += T.EOS
    # The generation prompt after a user/developer turn, unless another user-side message follows.
    if i + 1 < len(msgs) and msgs[i + 1]["role"] not in ("assistant", "latest_reminder"):
        return out
    if m["task"] is not None:
        if m["task"] == "action":
            out += T.ASSISTANT + (T.THINK_START if thinking else T.THINK_END) + T.TASK_TOKENS["action"]
        else:
            out += T.TASK_TOKENS[m["task"]]
    elif role in ("user", "developer"):
        opens_thinking = thinking and (not drop_thinking or i >= last_user)
        out += T.ASSISTANT + (T.THINK_START if opens_thinking else T.THINK_END)
    return out


def _prepare(messages, label: str) -> list[dict]:
    if not isinstance(messages, list):
        raise InputError(f"{label} must be a list of message objects")
    return [normalize_message(m, i, label) for i, m in enumerate(messages)]


def _attach(msgs: list[dict], key: str, value) -> None:
    """Request-level tools / response_format go on a leading system or developer message (replacing what it
    had, as vLLM does), else on a new empty system message in front."""
    if msgs and msgs[0]["role"] in ("system", "developer"):
        msgs[0] = dict(msgs[0], **{key: value})
    else:
        head = normalize_message({"role": "system", "content": ""}, 0)
        head[key] = value
        msgs.insert(0, head)


def encode_messages(messages, thinking_mode: str = "chat", reasoning_effort: str | None = None, tools=None,
                    response_format=None, context=None, drop_thinking: bool = True, add_bos: bool = True,
                    strict_tool_results: bool = False) -> str:
    """Render OpenAI-format `messages` as a V4 prompt string (special tokens as text).

    thinking_mode: "chat" (the prompt ends `<｜Assistant｜></think>`) or "thinking" (ends `<｜Assistant｜><think>`).
    reasoning_effort: None, "high" (same prompt as None) or "max" (the max-effort prefix, thinking mode only).
    tools / response_format: request-level values, attached to the leading system/developer message.
    context: earlier messages whose rendering is already in the model's state; only `messages` are rendered
    (no BOS then), with `context` taken into account for merging order, call order and dropped reasoning.
    strict_tool_results: OpenAI's rules for tool messages (messages.check_tool_results), as the server applies.
    """
    if thinking_mode not in THINKING_MODES:
        raise InputError(f"thinking_mode {thinking_mode!r} is invalid; use \"chat\" or \"thinking\"")
    if reasoning_effort not in REASONING_EFFORTS:
        raise InputError(f"reasoning_effort {reasoning_effort!r} is invalid; use None, \"high\" or \"max\"")
    msgs = _prepare(messages, "messages")
    ctx = _prepare(context, "context") if context else []
    if not msgs and not ctx:
        raise InputError("messages is empty; give at least one message")
    # (before a system message may be put in front for the tools: the indices the errors name are the caller's)
    check_tool_results(ctx + msgs, "context+messages" if ctx else "messages", strict=strict_tool_results)
    if tools:
        if ctx:
            raise InputError("request-level tools cannot be attached when context is given; put them on the "
                             "context's system message")
        _attach(msgs, "tools", normalize_tools(tools, "tools"))
    if response_format:
        if ctx:
            raise InputError("request-level response_format cannot be attached when context is given")
        _attach(msgs, "response_format", response_format)
    ctx, msgs = merge_tool_messages(ctx), merge_tool_messages(msgs)
    full = ctx + msgs
    sort_tool_results(full)
    for m in full:
        m["from_context"] = False
    for m in full[:len(ctx)]:
        m["from_context"] = True

    thinking = thinking_mode == "thinking"
    drop = drop_thinking and not any(m["tools"] for m in full)
    if thinking and drop:
        full = _drop_thinking(full)
    last_user = _last_user_index(full)
    prompt = T.BOS if add_bos and not ctx else ""
    for i, m in enumerate(full):
        if not m["from_context"]:
            prompt += _render(i, full, thinking, drop, reasoning_effort, last_user)
    return prompt
