"""The checkpoints the runtime provides itself: the trained default model shipped in the package, and the
random tiny preset generated once into the cache folder (runtime.cache) for tests of other shapes and the bench."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..cache import build_once, cache_dir
from ..presets import preset
from .make import CHECKPOINT_FORMAT_VERSION, make_preset


def default_checkpoint() -> Path:
    """The embedded default: the trained small V4 shipped in the package (runtime/default_model)."""
    from ..default_model import FOLDER

    return FOLDER


def random_checkpoint(seed: int = 0) -> Path:
    """The random-weight tiny preset (tests of other shapes, the bench), generated once into the cache folder."""
    # Keyed by the generator's inputs, so a changed preset or format never reuses a stale folder.
    key = hashlib.sha256(json.dumps([preset("tiny"), seed, CHECKPOINT_FORMAT_VERSION], sort_keys=True).encode())
    path = cache_dir() / f"tiny-seed{seed}-{key.hexdigest()[:12]}"
    return build_once(path, "model.safetensors.index.json", lambda tmp: make_preset(tmp, "tiny", seed=seed))
