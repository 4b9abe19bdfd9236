"""Tokenizers: `tokenizer.json` through the `tokenizers` library when a checkpoint ships one, otherwise
the byte-level tokenizer of the checkpoints this runtime generates (id 0 = BOS, 1 = EOS, 2 + b = byte b); a
foreign checkpoint without its tokenizer.json is refused."""

from __future__ import annotations

import codecs
from pathlib import Path

from .errors import CheckpointError

BYTE_OFFSET = 2


class ByteTokenizer:
    name = "bytes"

    def __init__(self, vocab_size: int, bos: int = 0, eos: int = 1):
        if vocab_size < BYTE_OFFSET + 256:
            raise CheckpointError(f"vocab_size {vocab_size} is too small for the byte tokenizer (needs 258); "
                                  "ship a tokenizer.json with the checkpoint")
        self.bos, self.eos = bos, eos

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([self.bos] if add_bos else []) + [BYTE_OFFSET + b for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < BYTE_OFFSET + 256).decode("utf-8", "replace")

    def stream_decoder(self):
        """A function token id -> newly printable text (multi-byte characters wait for their last byte)."""
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        return lambda i: dec.decode(bytes([i - BYTE_OFFSET])) if BYTE_OFFSET <= i < BYTE_OFFSET + 256 else ""


class HFTokenizer:
    name = "tokenizer.json"

    def __init__(self, path: Path, bos: int, eos: int):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise CheckpointError(f"{path}: cannot be read as a tokenizers tokenizer.json ({e})") from None
        self.bos, self.eos = bos, eos

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos] if add_bos else []) + ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def stream_decoder(self):
        seen: list[int] = []
        printed = [""]

        def step(i: int) -> str:
            seen.append(i)
            text = self.decode(seen)
            if text.endswith("\ufffd"):          # an incomplete multi-byte character: wait
                return ""
            new, printed[0] = text[len(printed[0]):], text
            return new
        return step


def _generated_here(folder: Path) -> bool:
    """Whether `folder`'s index names this runtime's generator (runtime.checkpoint.make / .sparse, runtime.train,
    the bench's models write it in its metadata); a folder without an index (an ONNX export's) counts as ours."""
    import json

    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return True
    try:
        meta = json.loads(index.read_text(encoding="utf-8")).get("metadata") or {}
    except (OSError, ValueError, AttributeError):
        return True                    # a corrupt index is the loader's to report, with its own message
    # official indexes hold only total_size; ours name the generator (or, older ones, our format version)
    return isinstance(meta, dict) and (str(meta.get("generator", "")).startswith("dsv4rt ") or "format_version" in meta)


def load_tokenizer(checkpoint: Path | None, cfg):
    if checkpoint is not None and (Path(checkpoint) / "tokenizer.json").is_file():
        return HFTokenizer(Path(checkpoint) / "tokenizer.json", cfg.bos_token_id, cfg.eos_token_id)
    # The byte tokenizer fits only the checkpoints this runtime generates. For any other (an official one copied
    # without its tokenizer.json) ids 2..257 are real BPE tokens: bytes would be a silent wrong answer.
    if checkpoint is not None and not _generated_here(Path(checkpoint)):
        raise CheckpointError(f"{checkpoint}: no tokenizer.json (the byte tokenizer only fits checkpoints "
                              "runtime.checkpoint generated); copy the checkpoint's tokenizer.json into the folder")
    return ByteTokenizer(cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id)
