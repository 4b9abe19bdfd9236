"""The embedded default model: a small DeepSeek-V4 trained by `python -m runtime.train` on the Python
standard library's source (PSF licence), shipped in the official layout (config.json, index, one shard of
FP8 linears / FP4 experts / bf16 and float32 tensors, tokenizer.json with V4's special tokens).

`FOLDER` is what `Runtime.load("cpu")` reads when no checkpoint is named. `SHA256SUMS` records each file's
hash (written by `record()` when the model is swapped in, checked by `verify()` and the tests), and
`heldout.txt` is a sample of the training run's held-out split (files the model never saw) that the quality
measurements read (`runtime.parity --text`, `runtime.parity.emulation`), so they do not depend on which
standard library the measuring machine has. How it was trained: the README's "The default model" section.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FOLDER = Path(__file__).resolve().parent
SUMS = FOLDER / "SHA256SUMS"
HELDOUT = FOLDER / "heldout.txt"
FILES = ("config.json", "model.safetensors.index.json", "model-00001-of-00001.safetensors", "tokenizer.json",
         "heldout.txt")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def recorded() -> dict[str, str]:
    """file name -> recorded sha256 (the `sha256sum` format: `HASH  NAME` per line)."""
    out = {}
    for line in SUMS.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        out[name.strip()] = digest
    return out


def verify() -> list[str]:
    """The names of the shipped files whose content does not match the recorded hash (empty: all match)."""
    want = recorded()
    return [n for n in FILES if n not in want or not (FOLDER / n).is_file() or sha256(FOLDER / n) != want[n]]


def record() -> None:
    """Write SHA256SUMS for the files now in the folder (run once, when a newly trained model is swapped in)."""
    SUMS.write_text("".join(f"{sha256(FOLDER / n)}  {n}\n" for n in FILES))
