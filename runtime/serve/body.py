"""A request body read, parsed and validated, with every way it can be bad answered as an OpenAI 4xx.

- Size: the bytes are counted as they arrive, so a `Transfer-Encoding: chunked` body (no Content-Length,
  which the middleware checks up front) over `--max-body-mb` is a 413 too, cut off where it passes the limit
  rather than read whole.
- JSON: not JSON / not UTF-8 / not an object -> 400.
- Shape: nesting deeper than MAX_DEPTH -> 400 (json.loads itself raises RecursionError near 1000 levels,
  and later steps recurse too: pydantic, schema walks, json.dumps); a lone UTF-16 surrogate (`"\\ud800"`, valid
  JSON but no Unicode text: UTF-8 cannot encode it, so tokenizers and the response's own encoding fail)
  in any string or key -> 400. A surrogate pair (`"\\ud83d\\ude00"`) is one character after parsing, and fine.
- Fields: the pydantic model's first error -> 400 naming the field.
Parsing, the walk and validation run on a worker thread (an 8 MB body takes a while; the event loop feeds
every open stream).
"""

from __future__ import annotations

import json
import re

from starlette.concurrency import run_in_threadpool

from .protocol import APIError

MAX_DEPTH = 64                  # containers inside containers; chat requests and JSON schemas stay far below

_SURROGATE = re.compile("[\ud800-\udfff]")
_TEXT_OR_NESTED = frozenset((str, dict, list))


def too_large(size: int, limit: int, more: bool = False) -> APIError:
    what = f"{size:,}+" if more else f"{size:,}"
    return APIError(413, f"request body of {what} bytes exceeds the server's limit of {limit:,}; send a shorter "
                         "prompt", code="body_too_large")


async def read_bytes(request, limit: int) -> bytes:
    """The body, or a 413 as soon as more than `limit` bytes have come (whatever Content-Length said)."""
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:                    # the rest is not read: the connection closes after the answer
            raise too_large(n, limit, more=True)
        chunks.append(chunk)
    return b"".join(chunks)


def check_shape(data) -> None:
    """400 for nesting deeper than MAX_DEPTH or a lone surrogate anywhere (iterative: no recursion limit)."""
    stack = [(data, 1, "body")]
    while stack:
        v, depth, where = stack.pop()
        if isinstance(v, str):
            if not v.isascii() and _SURROGATE.search(v):
                raise APIError(400, f"{where}: the text holds a lone UTF-16 surrogate (such as \\ud800), which is "
                                    "not a Unicode character; send valid UTF-8 text (pair surrogates or drop it)",
                               param=None if where == "body" else where)
            continue
        if not isinstance(v, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            raise APIError(400, f"request body nests objects / arrays more than {MAX_DEPTH} deep (at {where}); "
                                "flatten it")
        if isinstance(v, dict):
            for k, x in v.items():
                here = k if where == "body" else f"{where}.{k}"
                stack.append((k, depth, here))
                stack.append((x, depth + 1, here))
        elif not _TEXT_OR_NESTED.isdisjoint(map(type, v)):   # (a prompt of 1M token ids: one pass in C)
            stack.extend((x, depth + 1, f"{where}[{i}]") for i, x in enumerate(v) if type(x) in _TEXT_OR_NESTED)


async def parse(request, model, limit: int):
    """The request's body as `model` (a pydantic class), or the APIError saying what is wrong with it. The
    parsing runs on a worker thread: a large body takes a while, and the event loop serves every stream."""
    return await run_in_threadpool(decode, await read_bytes(request, limit), model)


def decode(raw: bytes, model):
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "request body is not valid JSON") from None
    except RecursionError:
        raise APIError(400, f"request body nests objects / arrays more than {MAX_DEPTH} deep; flatten it") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    check_shape(data)
    try:
        return model.model_validate(data)
    except Exception as e:               # pydantic.ValidationError
        errs = getattr(e, "errors", lambda: [])()
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        raise APIError(400, f"{where or 'body'}: {first.get('msg', str(e))}"[:300], param=where or None) from None
