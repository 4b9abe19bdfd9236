"""The training corpus: the Python standard library's own source files (PSF licence), read from this
interpreter's installation (`sysconfig.get_paths()["stdlib"]`), so every machine with Python has it.

Files are listed in sorted relative-path order; a file goes to the held-out split when the first byte of the
SHA-256 of its relative path is below `heldout_fraction * 256`, so the split does not depend on which files a
given Python version ships or on the order they are found. Test suites (`test/`, `idlelib/idle_test/`) and
vendored third-party code (`site-packages/`) are left out.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import torch

SKIP_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not SKIP_PARTS & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_heldout(rel: str, fraction: float) -> bool:
    return hashlib.sha256(rel.encode()).digest()[0] < fraction * 256


def split_texts(max_bytes: int | None = None, heldout_fraction: float = 0.05, root=None) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts), each capped at `max_bytes` characters in total (None: all)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    train, held, sizes = [], [], [0, 0]
    for p in stdlib_files(root):
        rel = p.relative_to(root).as_posix()
        which = 1 if is_heldout(rel, heldout_fraction) else 0
        if max_bytes is not None and sizes[which] >= (max_bytes if which == 0 else max(max_bytes // 8, 1)):
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (held if which else train).append(text)
        sizes[which] += len(text)
    return train, held


def token_stream(tok, texts: list[str], bos: int, eos: int) -> torch.Tensor:
    """One int64 stream: BOS file EOS BOS file EOS ..."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids += [bos, *enc.ids, eos]
    return torch.tensor(ids, dtype=torch.int64)


def batches(stream: torch.Tensor, batch: int, seq: int, gen: torch.Generator):
    """Endless random windows [batch, seq + 2] (inputs plus the next and next-next targets)."""
    n = stream.numel() - seq - 2
    while True:
        starts = torch.randint(0, n, (batch,), generator=gen)
        yield torch.stack([stream[s:s + seq + 2] for s in starts.tolist()])


def eval_windows(stream: torch.Tensor, seq: int, limit: int) -> torch.Tensor:
    """Consecutive non-overlapping windows [n, seq + 2] from the start of the held-out stream (deterministic)."""
    n = min(limit, (stream.numel() - 2) // seq)
    return torch.stack([stream[i * seq:i * seq + seq + 2] for i in range(n)])
