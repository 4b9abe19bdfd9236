"""The shipped default model (runtime/default_model): it is what `Runtime.load("cpu")` and the README's first
command load, its files are the recorded ones, it holds every V4 layer kind in the official layout, it has
learned its text (against an independent unigram baseline), the demo prints the recorded greedy text, and
the chat encoding runs on its trained tokenizer.
"""

import hashlib
import json
import math
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from runtime import default_model
from runtime.api import Runtime
from runtime.chat import encode_messages
from runtime.chat.tokens import ASSISTANT, BOS, SPECIAL_TOKENS, USER

# The README's first command, as written there (its defaults: greedy, 32 new tokens, stop at EOS), and what it
# printed when the model was swapped in (2026-12-02; the 32-token form recorded 2026-12-03).
DEMO_COMMAND = 'python3 -m runtime.run --backend cpu --prompt "def "'
DEMO_OUTPUT = 'def genertor(map, x, x, **kw):\n    """Return the val'


@pytest.fixture(scope="module")
def rt():
    return Runtime.load("cpu", progress=False)


def test_files_match_their_recorded_hashes():
    sums = {}
    for line in default_model.SUMS.read_text().splitlines():
        digest, name = line.split()
        sums[name] = digest
    assert sorted(sums) == sorted(default_model.FILES)
    for name, digest in sums.items():
        assert hashlib.sha256((default_model.FOLDER / name).read_bytes()).hexdigest() == digest, name
    assert default_model.verify() == []


def test_default_is_the_shipped_trained_model_with_every_layer_kind(rt):
    assert rt.checkpoint == default_model.FOLDER
    cfg = json.loads((default_model.FOLDER / "config.json").read_text())
    ratios = cfg["compress_ratios"][:cfg["num_hidden_layers"]]
    assert 0 in ratios and 4 in ratios and 128 in ratios                 # window-only, CSA, HCA-128
    assert 0 < cfg["num_hash_layers"] < cfg["num_hidden_layers"]          # hash-routed and learned-routed MoE
    assert cfg["hc_mult"] > 1 and cfg["num_nextn_predict_layers"] >= 1    # mHC, MTP
    assert rt.tokenizer.name == "tokenizer.json" and rt.tokenizer.tok.get_vocab_size() == cfg["vocab_size"]
    shard = default_model.FOLDER / "model-00001-of-00001.safetensors"
    with safe_open(str(shard), "pt") as f:
        dtypes = {n: f.get_slice(n).get_dtype() for n in f.keys()}
    assert dtypes["layers.1.attn.wq_b.weight"] == "F8_E4M3"              # FP8 linears
    assert dtypes["layers.1.ffn.experts.0.w1.weight"] in ("I8", "F4", "U8")  # FP4 experts, packed
    assert any(n.startswith("mtp.0.") for n in dtypes) and any(".indexer." in n for n in dtypes)
    size = sum((default_model.FOLDER / n).stat().st_size for n in default_model.FILES)
    assert size < 20e6


def test_it_has_learned_its_held_out_text(rt):
    """Next-token perplexity on held-out text far below the text's own unigram perplexity (a model that
    learned nothing cannot beat the token frequencies it is scored on), and a top-1 well above the unigram's."""
    from runtime.parity.quality import scores, side_logits, text_windows

    w = text_windows(rt.tokenizer, rt.config.bos_token_id, default_model.HELDOUT.read_text(), 256, 512)
    got = scores(side_logits(rt, w), w)
    tgt = w[:, 1:].flatten().tolist()
    counts = Counter(tgt)
    unigram_ppl = math.exp(-sum(c * math.log(c / len(tgt)) for c in counts.values()) / len(tgt))
    unigram_top1 = counts.most_common(1)[0][1] / len(tgt)
    # measured 2026-12-02: perplexity 37.1 vs the unigram's 67.7 (0.55x), top-1 0.176 vs the unigram's 0.063
    assert got["ppl"] < 0.7 * unigram_ppl and got["top1"] > unigram_top1 + 0.07, (got, unigram_ppl, unigram_top1)


def test_demo_prints_the_recorded_greedy_text():
    """The README's demo command prints the recorded text, and the README quotes both as they are here."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert DEMO_COMMAND in readme.split("\n## ")[0]                  # the opening command block runs it
    quoted = DEMO_OUTPUT.replace("\n", "\\n")                        # the README writes newlines as \n
    assert f"`{quoted}`" in readme
    r = subprocess.run([sys.executable, *shlex.split(DEMO_COMMAND)[1:]], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == DEMO_OUTPUT


def test_chat_encoding_runs_on_the_trained_tokenizer(rt):
    prompt = encode_messages([{"role": "user", "content": "def add(a, b):"}], thinking_mode="chat")
    ids = rt.tokenizer.encode(prompt, add_bos=False)                       # the prompt holds its BOS
    tok = rt.tokenizer.tok
    for s in (BOS, USER, ASSISTANT):                                       # one id each, as V4's tokenizer
        assert ids.count(tok.token_to_id(s)) == prompt.count(s) >= 1
    assert all(tok.token_to_id(s) is not None for s in SPECIAL_TOKENS)
    g = rt.generate([ids], max_new_tokens=4, stop_at_eos=False)
    assert len(g.tokens[0]) == 4 and all(0 <= t < rt.config.vocab_size for t in g.tokens[0])
    assert torch.equal(torch.tensor(ids[:1]), torch.tensor([rt.config.bos_token_id]))
