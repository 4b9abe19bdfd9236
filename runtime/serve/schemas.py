"""Request tools and JSON schemas checked before they reach the prompt or the grammar, each fault a 400.

What is refused, and why:
- a function name outside OpenAI's `^[a-zA-Z0-9_-]{1,64}$`: the name is written into the prompt and into
  the DSML call as `name="…"`, and a `"` (or a newline, a `>`) there makes a call the parser cannot read back;
- `parameters` that is not a JSON-schema object (or whose `type` is not "object": a call's arguments are an
  object), `properties` that is not an object of schemas, `required` that is not a list of strings, and a
  parameter name with `"` or a newline or over scan.NAME_MAX characters (DSML writes it as `name="…"` too);
- a length / count keyword (maxLength, minItems, ...) that is not a non-negative integer, anywhere in a
  schema: `true` passes Python's isinstance(int) and reached the grammar engine as "{0,True}".
"""

from __future__ import annotations

import re

from ..chat.scan import NAME_MAX
from .protocol import APIError

FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
COUNT_KEYWORDS = ("maxLength", "minLength", "maxItems", "minItems", "maxProperties", "minProperties",
                  "maxContains", "minContains")
_NAMED = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")   # name -> schema
_ONE = ("items", "additionalItems", "additionalProperties", "unevaluatedItems", "unevaluatedProperties",
        "contains", "propertyNames", "not", "if", "then", "else")                            # a schema
_MANY = ("allOf", "anyOf", "oneOf", "prefixItems")                                           # a list of them


def _bad(param: str, msg: str) -> APIError:
    return APIError(400, msg, param=param)


def check_schema(schema, where: str, param: str) -> None:
    """Every count keyword in `schema` (walked through its subschemas, not its data: enum, const, default)
    is a non-negative integer."""
    stack = [(schema, where)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, list):          # `items` as a list (older drafts)
            stack.extend((x, f"{at}[{i}]") for i, x in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        for k in COUNT_KEYWORDS:
            if k in node and (type(node[k]) is not int or node[k] < 0):
                raise _bad(param, f"{at}.{k} must be a non-negative integer, got {node[k]!r:.40}")
        for k in _NAMED:
            if isinstance(node.get(k), dict):
                stack.extend((sub, f"{at}.{k}.{name}") for name, sub in node[k].items())
        for k in _ONE:
            if k in node:
                stack.append((node[k], f"{at}.{k}"))
        for k in _MANY:
            if isinstance(node.get(k), list):
                stack.extend((sub, f"{at}.{k}[{i}]") for i, sub in enumerate(node[k]))


def check_tools(tools: list) -> None:
    """Request-level `tools`: the shape the prompt, the grammar and the parser rely on (module doc)."""
    for j, tool in enumerate(tools):
        where = f"tools[{j}].function"
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict):
            raise _bad("tools", f"tools[{j}] needs a `function` object (type, function.name, function.parameters)")
        name = fn.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise _bad("tools", f"{where}.name {name!r:.80} is invalid; function names are 1-64 characters of "
                                "a-z, A-Z, 0-9, _ and - (OpenAI's rule)")
        params = fn.get("parameters")
        if params is None:
            continue
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise _bad("tools", f"{where}.parameters must be a JSON-schema object "
                                f'({{"type": "object", "properties": {{...}}}}), got {params!r:.60}')
        props = params.get("properties")
        if props is not None and not isinstance(props, dict):
            raise _bad("tools", f"{where}.parameters.properties must be an object of parameter name -> JSON "
                                f"schema, got {props!r:.60}")
        for key, sub in (props or {}).items():
            if not key or len(key) > NAME_MAX or '"' in key or "\n" in key:
                raise _bad("tools", f"{where}.parameters.properties: parameter name {key!r:.80} is invalid; use "
                                    f"1-{NAME_MAX} characters without '\"' or a newline")
            if not isinstance(sub, dict):
                raise _bad("tools", f"{where}.parameters.properties.{key} must be a JSON-schema object, "
                                    f"got {sub!r:.60}")
        required = params.get("required")
        if required is not None and (not isinstance(required, list) or
                                     not all(isinstance(r, str) for r in required)):
            raise _bad("tools", f"{where}.parameters.required must be a list of parameter names, got {required!r:.60}")
        check_schema(params, f"{where}.parameters", "tools")
