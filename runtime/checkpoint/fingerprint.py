"""A checkpoint's fingerprint: what identifies its weights, for the ONNX export cache key, the export manifest
and the parity report.

The fingerprint covers config.json, the index and every shard's CONTENTS (a streaming sha256 of each
`*.safetensors` file): two checkpoints of the same layout with different weights (a fine-tune, a negated
head) differ. Hashing a 160 GB checkpoint takes minutes, so each shard's digest is cached in
`<cache_dir>/shard-sha256.json`, keyed by its absolute path, size, mtime_ns and inode: a shard is read once
until it changes. The cache is only a shortcut: an unreadable, corrupt or unwritable cache file means the
shards are hashed again, never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

CACHE_NAME = "shard-sha256.json"
CHUNK = 16 << 20                      # bytes read per step: bounded memory whatever the shard's size


def _cache_file() -> Path:
    from ..cache import cache_dir

    return cache_dir() / CACHE_NAME


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict) -> None:
    """Atomic replace (a concurrent reader sees the old or the new file); any OSError: keep no cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".shard-sha256-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=0)
            os.replace(tmp, path)
        except OSError:
            os.unlink(tmp)
            raise
    except OSError:
        pass


def _stamp(st: os.stat_result) -> list:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def shard_digests(shards: list[Path]) -> list[str]:
    """sha256 of each file, from the cache where (path, size, mtime_ns, inode) still match."""
    cache_path = _cache_file()
    cache = _read_cache(cache_path)
    out, changed = [], False
    for shard in shards:
        key = str(shard.resolve())
        stamp = _stamp(shard.stat())
        hit = cache.get(key)
        if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
            out.append(hit["sha256"])
            continue
        digest = file_sha256(shard)
        if _stamp(shard.stat()) == stamp:             # not rewritten while we read it: safe to remember
            cache[key] = {"stamp": stamp, "sha256": digest}
            changed = True
        out.append(digest)
    if changed:
        _write_cache(cache_path, cache)
    return out


def checkpoint_fingerprint(path: Path) -> str:
    """sha256 over config.json, the index, and every shard's name and content digest."""
    path = Path(path)
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        if (path / name).is_file():
            h.update(name.encode() + b"\0" + (path / name).read_bytes() + b"\0")
    shards = sorted(path.glob("*.safetensors"))
    for shard, digest in zip(shards, shard_digests(shards)):
        h.update(shard.name.encode() + b"\0" + digest.encode() + b"\0")
    return h.hexdigest()
