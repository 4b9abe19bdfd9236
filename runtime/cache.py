"""The runtime's cache folder (`DSV4RT_HOME`, default ~/.cache/dsv4rt): what is built once and reused.

`cache_dir()` is the folder; `build_once(path, done, build)` builds a folder in it atomically (concurrent
builders, failed builds and half-built folders are handled). Users: the random checkpoint
(runtime.checkpoint.builtin), the ONNX export cache (backends/onnx.py), the shard digests of
the checkpoint fingerprint (runtime.checkpoint.fingerprint), the native kernels (backends/cpu_native.py), the
Ascend self-test and bench's generated models.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import V4Error


def cache_dir() -> Path:
    return Path(os.environ.get("DSV4RT_HOME", Path.home() / ".cache" / "dsv4rt"))


def build_once(path: Path, done: str, build: Callable[[Path], object]) -> Path:
    """`path`, built by `build(folder)` into a temporary sibling and renamed into place unless `path/done`
    exists: a concurrent builder either wins the rename or is discarded, so readers see all of it or none.
    A build that fails leaves no temporary folder; a folder at `path` without `done` (half-built by hand or by
    an older runtime) is moved aside and rebuilt rather than failing every later load."""
    if (path / done).is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    except OSError as e:
        raise V4Error(f"cache folder {path.parent} cannot be written ({e.strerror or e}); set DSV4RT_HOME to a "
                      "writable folder, or pass --checkpoint DIR") from None
    try:
        build(tmp)
        if path.exists() and not (path / done).is_file():
            stale = Path(tempfile.mkdtemp(dir=path.parent, prefix=".stale-"))
            try:
                path.rename(stale / path.name)
            except OSError:
                pass                                  # another process moved or replaced it first
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(path)
        except OSError:
            pass                                      # a concurrent builder won the rename: use its folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)        # gone already when the rename succeeded
    if not (path / done).is_file():
        raise V4Error(f"{path} could not be built (no {done} after the build); remove the folder and retry")
    return path
