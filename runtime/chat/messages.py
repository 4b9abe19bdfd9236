"""OpenAI-format chat messages checked and brought into the encoder's internal form.

Accepted: roles system / developer / user / assistant / tool / latest_reminder; `content` as a string or a
list of `{"type": "text", "text": ...}` parts (joined by "\\n", as vLLM does); assistant `tool_calls`
(`function.name`, `function.arguments` as a JSON string) and `reasoning_content` (or vLLM's `reasoning`);
tool messages with `tool_call_id`; DeepSeek's internal `task` and `wo_eos` keys. Everything else a client can
get wrong raises InputError with one line naming the message index and the fix.

Internal form (dicts): role, content (str), tools (list of function schemas or None), response_format,
calls (list of (id, name, argument dict)), reasoning (str or None), task, wo_eos, and for merged user turns
`blocks`, a list of ("text", text) and ("tool_result", call_id, text) pairs.
"""

from __future__ import annotations

from ..errors import InputError
from . import tokens as T
from .dsml import arguments_to_dict

ROLES = ("system", "developer", "user", "assistant", "tool", "latest_reminder")


def _text(content, where: str, required: bool = True) -> str | None:
    if content is None:
        if required:
            raise InputError(f"{where}: missing content; give `content` as a string or a list of text parts")
        return None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, dict) and part.get("type") == "text":
                raise InputError(f"{where}: content part {j} is a text part whose `text` is not a string "
                                 f"(got {type(part.get('text')).__name__})")
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InputError(f"{where}: content part {j} has type {kind!r}; only text parts "
                                 '({"type": "text", "text": ...}) are supported')
        return "\n".join(parts)
    raise InputError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")


def normalize_tools(tools, where: str) -> list[dict]:
    """OpenAI `tools` ([{"type": "function", "function": {...}}]) -> the list of function schemas."""
    if not isinstance(tools, list):
        raise InputError(f"{where}: tools must be a list of {{\"type\": \"function\", \"function\": {{...}}}}")
    out = []
    for j, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InputError(f"{where}: tools[{j}] needs a `function` object with a non-empty `name`")
        if tool.get("type", "function") != "function":
            raise InputError(f"{where}: tools[{j}] has type {tool.get('type')!r}; only \"function\" tools exist")
        out.append(fn)
    return out


def _calls(tool_calls, where: str) -> list[tuple[str, str, dict]]:
    if not isinstance(tool_calls, list):
        raise InputError(f"{where}: tool_calls must be a list")
    out = []
    for j, call in enumerate(tool_calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InputError(f"{where}: tool_calls[{j}] needs `function` with a non-empty `name`")
        if call.get("type", "function") != "function":
            raise InputError(f"{where}: tool_calls[{j}] has type {call.get('type')!r}; only \"function\"")
        call_id = call.get("id") or ""
        if not isinstance(call_id, str):
            raise InputError(f"{where}: tool_calls[{j}].id must be a string")
        out.append((call_id, fn["name"], arguments_to_dict(fn["name"], fn.get("arguments"))))
    return out


def normalize_message(msg, i: int, label: str = "messages") -> dict:
    where = f"{label}[{i}]"
    if not isinstance(msg, dict):
        raise InputError(f"{where}: each message must be an object with a `role`")
    role = msg.get("role")
    if role not in ROLES:
        raise InputError(f"{where}: unknown role {role!r}; use one of {', '.join(ROLES)}")
    out = {"role": role, "tools": None, "response_format": None, "calls": [], "reasoning": None,
           "task": None, "wo_eos": bool(msg.get("wo_eos", False))}
    task = msg.get("task")
    if task is not None:
        if role != "user" or task not in T.TASK_TOKENS:
            raise InputError(f"{where}: task {task!r} is only valid on a user message and must be one of "
                             f"{', '.join(T.TASK_TOKENS)}")
        out["task"] = task
    if role in ("system", "developer"):
        if msg.get("tools"):
            out["tools"] = normalize_tools(msg["tools"], where)
        out["response_format"] = msg.get("response_format") or None
        # a system message may carry only tools / a response format (content "", as the official file allows)
        optional = role == "system" and (out["tools"] or out["response_format"])
        out["content"] = _text(msg.get("content"), where, required=not optional) or ""
        if role == "developer" and not out["content"]:
            raise InputError(f"{where}: a developer message needs non-empty content")
    elif msg.get("tools") or msg.get("response_format"):
        raise InputError(f"{where}: tools/response_format may only sit on a system or developer message")
    elif role == "assistant":
        if msg.get("tool_calls"):
            out["calls"] = _calls(msg["tool_calls"], where)
        reasoning = msg.get("reasoning_content", msg.get("reasoning"))
        if reasoning is not None and not isinstance(reasoning, str):
            raise InputError(f"{where}: reasoning_content must be a string")
        out["reasoning"] = reasoning
        if msg.get("content") is None and not out["calls"] and reasoning is None:
            raise InputError(f"{where}: an assistant message needs content, tool_calls or reasoning_content")
        out["content"] = _text(msg.get("content"), where, required=False) or ""
    elif role == "tool":
        call_id = msg.get("tool_call_id") or ""
        if not isinstance(call_id, str):
            raise InputError(f"{where}: tool_call_id must be a string")
        out["tool_call_id"] = call_id
        out["content"] = _text(msg.get("content"), where)
    else:  # user, latest_reminder
        out["content"] = _text(msg.get("content"), where)
    return out


def check_tool_results(msgs: list[dict], label: str, strict: bool = False) -> None:
    """Each tool message must answer the latest assistant message, which must hold tool calls; a given
    tool_call_id must name one of those calls (when the calls carry ids: the official vectors have none).

    strict (the server: OpenAI's rules): a tool message needs its tool_call_id; the tool messages come right
    after the assistant message, one per call and no call answered twice; and every call is answered before
    the next message (a user message, another assistant turn)."""
    calls, at, answered = None, -1, []
    for i, m in enumerate(msgs):
        if m["role"] == "tool":
            if not calls:
                after = " (right after it, before any other message)" if strict else ""
                raise InputError(f"{label}[{i}]: a tool message must follow an assistant message with "
                                 f"tool_calls{after}")
            ids = {c[0] for c in calls if c[0]}
            cid = m["tool_call_id"]
            if ids and cid and cid not in ids:
                raise InputError(f"{label}[{i}]: tool_call_id {cid!r} matches no call of the "
                                 f"preceding assistant message ({', '.join(sorted(ids))})")
            if strict:
                if not cid:
                    raise InputError(f"{label}[{i}]: a tool message needs `tool_call_id`, the id of the tool call "
                                     f"of {label}[{at}] it answers")
                if cid in answered:
                    raise InputError(f"{label}[{i}]: tool call {cid!r} of {label}[{at}] is answered twice; send "
                                     "one tool message per call")
                answered.append(cid)
                if len(answered) > len(calls):
                    raise InputError(f"{label}[{i}]: more tool messages than the {len(calls)} tool call(s) of "
                                     f"{label}[{at}]")
            continue
        if strict:
            _all_answered(calls, answered, label, at, f"before {label}[{i}]")
            calls = None
        if m["role"] == "assistant":
            calls, at, answered = m["calls"], i, []
    if strict and answered:                 # (a last assistant message with calls is the caller's to refuse)
        _all_answered(calls, answered, label, at, "at the end of the conversation")


def _all_answered(calls, answered: list, label: str, at: int, when: str) -> None:
    if not calls or len(answered) == len(calls):
        return
    left = [c[0] for c in calls if c[0] and c[0] not in answered]
    which = ", ".join(left) if left else f"{len(calls) - len(answered)} of {len(calls)}"
    raise InputError(f"{label}[{at}]: its tool calls were not all answered {when} (missing: {which}); an "
                     "assistant message with tool_calls must be followed by one tool message per call")


def merge_tool_messages(msgs: list[dict]) -> list[dict]:
    """Fold tool results and consecutive user messages into user turns of blocks (official merge rules:
    a tool result joins the previous user turn; a user message joins a previous user turn without a task)."""
    merged: list[dict] = []
    for m in msgs:
        prev = merged[-1] if merged else None
        if m["role"] == "tool":
            block = ("tool_result", m["tool_call_id"], m["content"])
            if prev is not None and prev["role"] == "user":
                prev["blocks"].append(block)
            else:
                merged.append(dict(m, role="user", content="", blocks=[block], task=None, wo_eos=False))
        elif m["role"] == "user":
            if prev is not None and prev["role"] == "user" and prev["task"] is None:
                prev["blocks"].append(("text", m["content"]))   # the later message's task is dropped too
            else:
                merged.append(dict(m, blocks=[("text", m["content"])]))
        else:
            merged.append(dict(m))
    return merged


def sort_tool_results(msgs: list[dict]) -> None:
    """Reorder the tool results inside each user turn to the call order of the latest assistant tool calls
    (in place; text blocks keep their slots; results with unknown or no ids sort as call 0, officially)."""
    order: dict[str, int] = {}
    for m in msgs:
        if m["role"] == "assistant" and m["calls"]:
            order = {cid: k for k, (cid, _, _) in enumerate(m["calls"]) if cid}
        elif m["role"] == "user":
            results = [b for b in m["blocks"] if b[0] == "tool_result"]
            if len(results) > 1 and order:
                results.sort(key=lambda b: order.get(b[1], 0))
                it = iter(results)
                m["blocks"] = [next(it) if b[0] == "tool_result" else b for b in m["blocks"]]
