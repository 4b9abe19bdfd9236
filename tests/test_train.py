"""runtime.train: data split, tokenizer, the objective (LM / MTP / indexer KL), resume, QAT and export.

Fast: a tiny slice of the standard library, batch 2 x 32 tokens, a handful of steps on one thread.
"""

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from runtime.api import Runtime
from runtime.chat.tokens import ASSISTANT, BOS, DSML, EOS, SPECIAL_TOKENS, THINK_END, THINK_START, USER
from runtime.config import ModelConfig
from runtime.presets import preset
from runtime.train import data
from runtime.train.loop import TrainArgs, Trainer
from runtime.train.objective import compute_losses, fake_quant
from runtime.train.tokenizer import train_tokenizer

VOCAB = 400


# Training's many small kernels run far faster on one thread on a shared machine.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus():
    return data.split_texts(max_bytes=60_000)


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_tokenizer(corpus[0], VOCAB, path), path


@pytest.fixture(scope="module")
def setup(tok, corpus):
    hf = preset("tiny")
    hf["vocab_size"] = tok[0].get_vocab_size()
    cfg = ModelConfig.from_hf(hf)
    stream = data.token_stream(tok[0], corpus[0], 0, 1)
    return hf, cfg, stream


def test_split_is_deterministic_and_disjoint():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f.relative_to(root) for f in data.stdlib_files()]
    assert files == [f.relative_to(root) for f in data.stdlib_files()] and len(files) > 100
    held = [f for f in files if data.is_heldout(f.as_posix(), 0.05)]
    assert 0.01 * len(files) < len(held) < 0.15 * len(files)
    assert not any({"site-packages", "test"} & set(f.parts) for f in files)
    tr, ho = data.split_texts(max_bytes=20_000)
    assert tr and ho and not set(tr) & set(ho)
    assert (tr, ho) == data.split_texts(max_bytes=20_000)


def test_tokenizer_has_v4_special_tokens(tok):
    t, path = tok
    assert t.token_to_id(BOS) == 0 and t.token_to_id(EOS) == 1
    for s in SPECIAL_TOKENS:
        assert t.token_to_id(s) is not None
    text = f"{USER}def f(x):\n    return x  # é{ASSISTANT}{THINK_START}ok{THINK_END}<{DSML}invoke>"
    ids = t.encode(text, add_special_tokens=False).ids
    for s in (USER, ASSISTANT, THINK_START, THINK_END, DSML):
        assert t.token_to_id(s) in ids                                        # one id each
    assert t.decode(ids, skip_special_tokens=False) == text                   # byte-level: round trip
    assert json.loads(path.read_text())["model"]["type"] == "BPE"


def test_steps_lower_the_loss_and_the_indexer_kl(setup, tmp_path):
    hf, cfg, stream = setup
    args = TrainArgs(steps=10, qat_steps=0, batch=2, seq=32, lr=3e-3, warmup=1)
    tr = Trainer(cfg, hf, args, tmp_path)
    batch = next(data.batches(stream, 2, 32, torch.Generator().manual_seed(0)))

    def losses():
        with torch.no_grad():
            L = compute_losses(cfg, {**tr.params, **tr.fixed}, tr.quantized, batch)
        return L.lm.item(), L.mtp.item(), float(L.indexer)

    lm0, mtp0, kl0 = losses()
    assert kl0 > 0                                    # 8 compressed entries per CSA layer: a real distribution
    for _ in range(6):
        tr.train_step(batch)
    lm1, mtp1, kl1 = losses()
    assert lm1 < lm0 - 0.5 and mtp1 < mtp0 - 0.3 and kl1 < kl0 * 0.8, (lm0, lm1, mtp0, mtp1, kl0, kl1)


def test_resume_continues_exactly(setup, tmp_path):
    hf, cfg, stream = setup
    args = TrainArgs(steps=4, qat_steps=1, batch=2, seq=16, warmup=1)
    a = Trainer(cfg, hf, args, tmp_path / "a")
    gen_batches = data.batches(stream, 2, 16, a.gen)
    for _ in range(2):
        a.train_step(next(gen_batches))
    a.save()
    b = Trainer(cfg, hf, args, tmp_path / "a")
    assert b.load() and b.step == 2
    for n in a.params:
        assert torch.equal(a.params[n], b.params[n]) and torch.equal(a.opt.v[n], b.opt.v[n]), n
    ra = [a.train_step(next(gen_batches)) for _ in range(2)]           # the last one is a QAT step
    gb = data.batches(stream, 2, 16, b.gen)
    rb = [b.train_step(next(gb)) for _ in range(2)]
    assert ra == rb and ra[-1]["qat"]
    assert not any(p.endswith(".pkl") or p.endswith(".pt") for p in map(str, (tmp_path / "a").iterdir()))
    other = dict(hf, hidden_size=128)
    with pytest.raises(Exception, match="another model config"):
        Trainer(ModelConfig.from_hf(other), other, args, tmp_path / "a").load()


def test_dense_attention_of_training_equals_the_reference_op():
    """Training scores attention densely (a mask over the pool) instead of gathering rows: the same values and
    the same gradients as the reference `sparse_attention`, padding (-1) and the sink included."""
    from runtime.ops.attention import sparse_attention
    from runtime.train.objective import dense_sparse_attention

    g = torch.Generator().manual_seed(3)
    T, H, D, N, K = 24, 4, 16, 60, 14
    q = torch.randn(T, H, D, generator=g, requires_grad=True)
    kv = torch.randn(N, D, generator=g, requires_grad=True)
    sink = torch.randn(H, generator=g)
    idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(T)])
    idx[::3, -5:] = -1
    outs = []
    for fn in (sparse_attention, dense_sparse_attention):
        o = fn(q, kv, idx, sink, 0.25)
        outs.append((o, *torch.autograd.grad((o * torch.arange(D)).sum(), (q, kv))))
    for a, b in zip(*outs):
        assert (a - b).abs().max().item() <= 1e-5 * (1 + a.abs().max().item())
    with pytest.raises(ValueError, match="exact numerics"):
        dense_sparse_attention(q, kv, idx, sink, 0.25, rnd=object())


def test_fake_quant_is_straight_through():
    w = torch.randn(256, 256, requires_grad=True)
    for kind in ("fp8", "fp4", "bf16"):
        q = fake_quant(w, kind)
        assert not torch.equal(q, w) and (q - w).abs().max() < 0.5 * w.abs().max()
        (g,) = torch.autograd.grad((q * 3).sum(), w)
        assert torch.equal(g, torch.full_like(w, 3.0))


def test_export_is_what_the_runtime_loads(setup, tok, tmp_path):
    """The exported official-layout folder loads with Runtime.load and computes the trainer's fake-quantised
    model (the QAT forward) bit for bit; its tokenizer is the trained one."""
    hf, cfg, stream = setup
    tr = Trainer(cfg, hf, TrainArgs(steps=1, qat_steps=0, batch=2, seq=16), tmp_path)
    folder = tr.export(tmp_path / "model", tok[1])
    rt = Runtime.load("cpu", checkpoint=folder, emulate=True, progress=False)
    assert rt.tokenizer.name == "tokenizer.json" and rt.encode("def") == [0] + tok[0].encode("def").ids
    ids = stream[:40][None]
    got = rt.forward(ids)
    from runtime.model.v4 import Transformer
    from runtime.ops import reference_ops
    from runtime.train.objective import storage_kinds

    kinds = storage_kinds(cfg)
    with torch.no_grad():
        q = {n: fake_quant(t, kinds[n]) for n, t in tr.params.items()}
        model = Transformer(cfg, {**q, **tr.fixed}, tr.quantized, reference_ops("exact"))
        want = model.forward(ids, model.new_state(1).seqs)
    # measured 2026-12-03: max |got - want| = 0.0 (|logit| <= 7.7) at 1 and 2 threads, 40 and 200 tokens: the
    # emulated cpu runtime runs the same float32 reference ops on the same fake-quantised values, so bit for bit
    assert torch.equal(got, want), (got - want).abs().max().item()
    # Held-out figures through the runtime (runtime.train.evaluate) are the trainer's fake-quantised ones.
    from runtime.train.evaluate import heldout_quality

    windows = data.eval_windows(stream, 16, 3)
    ours, theirs = heldout_quality(rt, windows), tr.evaluate(windows, qat=True)
    assert ours["tokens"] == theirs["tokens"] == 48 and ours["top1"] == theirs["top1"]
    assert abs(ours["ppl"] / theirs["ppl"] - 1) < 1e-4
    assert sum(p.stat().st_size for p in folder.iterdir()) < 20e6


def test_cli_bad_arguments_exit_2(tmp_path, capsys):
    from runtime.train.__main__ import main

    assert main(["--out", str(tmp_path / "r"), "--steps", "0"]) == 2
    assert main(["--out", str(tmp_path / "r"), "--heldout", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert main(["--out", str(tmp_path / "r"), "--threads", "0"]) == 2
    (tmp_path / "f").write_text("x")
    assert main(["--out", str(tmp_path / "f")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --threads must be >= 1 (default: torch's), got 0",
        f"error: --out {tmp_path / 'f'} exists and is not a folder; name a folder"]
    assert not (tmp_path / "r").exists()                   # nothing written for a refused run
