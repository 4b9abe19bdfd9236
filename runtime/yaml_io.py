"""Reading the runtime's input files (config.json, indexes, manifests, profiles, tolerance rules, prompts) with
one-line errors.

Every reader turns what can go wrong with a user's file (missing, a folder, unreadable, not UTF-8, not valid
JSON / YAML, nested too deeply) into the caller's `V4Error` subclass naming the file and the fix, so a parse
site never lets an `OSError`, `UnicodeError` or parser exception escape. YAML goes through `yaml.safe_load`
(plain data, never objects); JSON through the standard library.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .errors import V4Error


def read_text(path: Path, error: type[V4Error], what: str) -> str:
    """The UTF-8 text of the file `path` (`what` names it in errors, e.g. "config file")."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a folder, not a file") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror or e})") from None
    except ValueError as e:                       # an embedded NUL byte in the path
        raise error(f"{what} path {str(path)!r} is not a valid path ({e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                    f"save the {what} as UTF-8") from None


def read_json(path: Path, error: type[V4Error], what: str):
    """The parsed JSON of `path` (any JSON value: callers check the shape they need)."""
    text = read_text(path, error, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to be a {what}") from None
    except ValueError as e:                       # e.g. an integer literal over Python's digit limit
        raise error(f"{path}: not valid JSON ({str(e).splitlines()[0][:120]})") from None


def read_yaml(path: Path, error: type[V4Error], what: str):
    """The parsed content of `path`; a missing, unreadable or non-UTF-8 file or invalid YAML raises `error`."""
    text = read_text(path, error, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({' '.join(str(e).split())[:160]})") from None
    except RecursionError:
        raise error(f"{path}: YAML nested too deeply to be a {what}") from None
    except (ValueError, TypeError, OverflowError) as e:    # e.g. an impossible date such as 2024-13-45
        raise error(f"{path}: a YAML value cannot be read ({' '.join(str(e).split())[:120]})") from None


def require_text(text, error: type[V4Error], what: str) -> str:
    """`text` if it is a str that can be written as UTF-8. A command-line argument holding bytes that are not
    UTF-8 arrives as lone surrogates (Python's surrogateescape), and JSON can spell one (\\ud800): neither can be
    tokenized, so they are refused here rather than failing deep inside an encoder."""
    if not isinstance(text, str):
        raise error(f"{what} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = ord(text[e.start])
        detail = f"byte 0x{ch - 0xDC00:02x}" if 0xDC80 <= ch <= 0xDCFF else f"lone surrogate U+{ch:04X}"
        raise error(f"{what} is not valid Unicode text ({detail} at character {e.start}); pass UTF-8 text") from None
    return text
