"""Tokenizers: the byte-level default, and a checkpoint's own tokenizer.json through `tokenizers`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.api import Runtime
from runtime.errors import CheckpointError
from runtime.tokenizer import ByteTokenizer


def test_byte_tokenizer_roundtrip_and_streaming():
    tok = ByteTokenizer(320)
    ids = tok.encode("héllo ✓")
    assert ids[0] == 0 and ids[1:] == [b + 2 for b in "héllo ✓".encode()]
    assert tok.decode(ids) == "héllo ✓"
    step = tok.stream_decoder()
    # multi-byte characters are printed once complete
    assert "".join(step(i) for i in ids[1:]) == "héllo ✓"
    assert tok.decode([1, 300, 2 + 65]) == "A"                 # specials and unused ids print nothing
    with pytest.raises(CheckpointError, match="too small for the byte tokenizer"):
        ByteTokenizer(100)


@pytest.fixture(scope="module")
def ckpt_with_tokenizer(tiny_ckpt, tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    dst = tmp_path_factory.mktemp("tok") / "ck"
    shutil.copytree(tiny_ckpt, dst)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<eos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    tok.save(str(dst / "tokenizer.json"))
    return dst


def test_checkpoint_tokenizer_json_is_used(ckpt_with_tokenizer):
    rt = Runtime.load("cpu", checkpoint=ckpt_with_tokenizer, progress=False)
    assert rt.tokenizer.name == "tokenizer.json"
    ids = rt.encode("the lazy dog")
    assert ids[0] == 0 and len(ids) < 1 + len("the lazy dog")        # merges applied, BOS first
    assert rt.tokenizer.decode(ids) == "the lazy dog"
    g = rt.generate("the quick", max_new_tokens=5, stop_at_eos=False)
    assert len(g.tokens[0]) == 5 and isinstance(g.texts[0], str)


def test_corrupt_tokenizer_json(ckpt_with_tokenizer, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(ckpt_with_tokenizer, dst)
    (dst / "tokenizer.json").write_text("{broken")
    r = subprocess.run([sys.executable, "-m", "runtime.run", "--checkpoint", str(dst)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "tokenizer.json: cannot be read" in r.stderr and "Traceback" not in r.stderr


def test_a_foreign_checkpoint_without_its_tokenizer_json_is_refused(tiny_ckpt, tmp_path):
    """An official checkpoint copied without tokenizer.json (its index metadata names no dsv4rt generator) is
    refused with one line, not read through the byte tokenizer (ids 2..257 are BPE tokens there); this
    runtime's own generated checkpoints keep the byte tokenizer."""
    assert Runtime.load("cpu", checkpoint=tiny_ckpt, progress=False).tokenizer.name == "bytes"
    foreign = tmp_path / "official"
    shutil.copytree(tiny_ckpt, foreign)
    index = json.loads((foreign / "model.safetensors.index.json").read_text())
    index["metadata"] = {"total_size": index["metadata"]["total_size"]}        # what an official index holds
    (foreign / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="no tokenizer.json .*copy the checkpoint's tokenizer.json"):
        Runtime.load("cpu", checkpoint=foreign, progress=False)
    (foreign / "tokenizer.json").write_bytes((Path(__file__).resolve().parents[1] / "runtime" / "default_model"
                                              / "tokenizer.json").read_bytes())
    assert Runtime.load("cpu", checkpoint=foreign, progress=False).tokenizer.name == "tokenizer.json"
