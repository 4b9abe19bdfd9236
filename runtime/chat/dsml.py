"""DSML: how V4 writes tool schemas into the prompt and tool calls into assistant turns.

A tool call renders as
    <｜DSML｜invoke name="NAME">
    <｜DSML｜parameter name="KEY" string="true">raw string</｜DSML｜parameter>
    <｜DSML｜parameter name="KEY2" string="false">JSON value</｜DSML｜parameter>
    </｜DSML｜invoke>
inside one `<｜DSML｜tool_calls>` block that follows the turn's content after a blank line. String values
are written raw with string="true"; every other value is its compact JSON (`json.dumps`, non-ASCII kept)
with string="false". The parser (parse.py) reverses this: string="true" values are JSON-quoted, string="false"
values are pasted as they are.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import InputError
from . import tokens as T


def to_json(value: Any) -> str:
    """The official `to_json`: `json.dumps` with non-ASCII characters kept and the default separators."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise InputError(f"value {value!r:.60} cannot be written as JSON ({e}); pass JSON-serialisable "
                         "tool schemas, arguments and response formats") from None


def render_tools(functions: list[dict]) -> str:
    """The tools section appended to a system/developer message: header, one JSON schema per line, footer."""
    return T.TOOLS_HEADER + "\n".join(to_json(f) for f in functions) + T.TOOLS_FOOTER


def arguments_to_dict(name: str, arguments: Any) -> dict:
    """The argument object of one tool call taken from an OpenAI-format `function.arguments`.

    A JSON string of an object is the normal case. As in the official encoder, a string that is not JSON is
    kept as one string parameter named "arguments". Deliberate differences: a dict is used as the object
    itself (the official file nests it under "arguments", a known bug; vLLM's copy accepts dicts too), an
    empty string means no arguments, and JSON that is not an object (a list, a number) is refused, where
    the official file crashes.
    """
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or arguments == "":
        return {}
    if not isinstance(arguments, str):
        raise InputError(f"tool call {name!r}: function.arguments must be a JSON string, "
                         f"got {type(arguments).__name__}")
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return {"arguments": arguments}
    if not isinstance(parsed, dict):
        raise InputError(f"tool call {name!r}: function.arguments must be a JSON object, got {arguments!r:.60}")
    return parsed


def render_parameters(args: dict) -> str:
    lines = []
    for key, value in args.items():
        if isinstance(value, str):
            flag, text = "true", value
        else:
            flag, text = "false", to_json(value)
        lines.append(f'{T.PARAM_OPEN} name="{key}" string="{flag}">{text}{T.PARAM_CLOSE}')
    return "\n".join(lines)


def render_tool_calls(calls: list[tuple[str, dict]]) -> str:
    """The block appended to an assistant turn for (name, argument dict) calls, leading blank line included."""
    invokes = [f'{T.INVOKE_OPEN} name="{name}">\n{render_parameters(args)}\n{T.INVOKE_CLOSE}'
               for name, args in calls]
    return "\n\n" + T.TOOL_CALLS_OPEN + "\n" + "\n".join(invokes) + "\n" + T.TOOL_CALLS_CLOSE
