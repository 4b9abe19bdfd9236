"""Reading a YAML file safely (`yaml.safe_load`: plain data, never objects) with one-line errors."""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import V4Error


def read_yaml(path: Path, error: type[V4Error], what: str):
    """The parsed content of `path`; a missing file or invalid YAML raises `error` naming the file."""
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
