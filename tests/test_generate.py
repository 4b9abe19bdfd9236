"""Generation: greedy equals the argmax of full forwards, sampling is reproducible, EOS stops, ragged
batches equal single runs, and the CLI streams text and reports speed."""

import dataclasses
import subprocess
import sys

import torch

from runtime.sampling import SamplingParams, sample


def test_greedy_is_argmax_of_full_forward(tiny_rt):
    prompt = tiny_rt.encode("The quick brown fox")
    g = tiny_rt.generate([prompt], max_new_tokens=12, stop_at_eos=False)
    seq = list(prompt)
    for tok in g.tokens[0]:
        assert tok == int(tiny_rt.forward([seq])[0, -1].argmax())
        seq.append(tok)


def test_ragged_batch_equals_single_runs(tiny_rt):
    prompts = [tiny_rt.encode("a"), tiny_rt.encode("a much longer prompt than the first one")]
    both = tiny_rt.generate(prompts, max_new_tokens=10, stop_at_eos=False)
    for p, toks in zip(prompts, both.tokens):
        assert tiny_rt.generate([p], max_new_tokens=10, stop_at_eos=False).tokens[0] == toks


def test_sampling_reproducible_and_seed_sensitive(tiny_rt):
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, stop_at_eos=False)
    a = tiny_rt.generate("Hello", seed=11, **kw).tokens
    assert a == tiny_rt.generate("Hello", seed=11, **kw).tokens
    assert a != tiny_rt.generate("Hello", seed=12, **kw).tokens


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, SamplingParams(1.0, 0.7), gen)) for _ in range(300)}
    assert draws == {0, 1}                                    # 0.5 + 0.3 reaches 0.7; 2 and 3 are cut
    draws = {int(sample(logits, SamplingParams(1.0, 0.1), gen)) for _ in range(50)}
    assert draws == {0}


def test_stops_at_eos(tiny_rt):
    eos = tiny_rt.config.eos_token_id
    head = tiny_rt.model.head.head_w
    saved = head[eos].clone()
    logits = tiny_rt.forward([tiny_rt.encode("x")])[0, -1]
    first = int(logits.argmax())
    assert logits[first] > 0
    try:
        head[eos] = head[first] * 3          # EOS's logit is now 3x the greedy choice's: EOS comes first
        assert tiny_rt.generate("x", max_new_tokens=5).tokens[0] == [eos]
        assert len(tiny_rt.generate("x", max_new_tokens=5, stop_at_eos=False).tokens[0]) == 5
    finally:
        head[eos] = saved


def test_cli_streams_and_reports_speed(tiny_ckpt):
    r = subprocess.run([sys.executable, "-m", "runtime.run", "--backend", "cpu", "--checkpoint", str(tiny_ckpt),
                        "--prompt", "Hi", "--max-new-tokens", "8", "--no-eos-stop"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hi")
    assert "tokens/s" in r.stderr.splitlines()[-1]


def test_random_checkpoint_is_generated_once(tmp_path, monkeypatch, tiny_rt):
    from runtime.api import Runtime
    from runtime.checkpoint.builtin import random_checkpoint

    monkeypatch.setenv("DSV4RT_HOME", str(tmp_path))
    path = random_checkpoint()                                # the random tiny preset, into the cache folder
    rt = Runtime.load("cpu", checkpoint=path, progress=False)
    assert path.parent == tmp_path
    stamp = (path / "model.safetensors.index.json").stat().st_mtime_ns
    assert random_checkpoint() == path
    assert (path / "model.safetensors.index.json").stat().st_mtime_ns == stamp      # reused, not rewritten
    # the same seed and preset as the session fixture: identical logits
    ids = [[0, 40, 50, 60]]
    assert torch.equal(rt.forward(ids), tiny_rt.forward(ids))


def test_greedy_lean_steps_equal_the_forward_route(tiny_rt, monkeypatch):
    """generate's greedy loop takes the backend's one-call steps (`decode_block.greedy_steps`) where it has
    them, else Transformer.forward: the same tokens, callbacks and decode-token count, with a row stopping
    early (at an EOS chosen among its tokens)."""
    from backends import cpu_decode

    prompts = [tiny_rt.encode("a"), tiny_rt.encode("a much longer prompt"), tiny_rt.encode("xyz")]
    eos = tiny_rt.generate(prompts, max_new_tokens=9, stop_at_eos=False).tokens[1][3]
    monkeypatch.setattr(tiny_rt, "config", dataclasses.replace(tiny_rt.config, eos_token_id=eos))
    made = []
    make = cpu_decode.decode_block.greedy_steps
    monkeypatch.setattr(cpu_decode.decode_block, "greedy_steps", lambda m, s: made.append(len(s)) or make(m, s))

    def run():
        events = []
        g = tiny_rt.generate(prompts, max_new_tokens=9, on_token=lambda b, t: events.append((b, t)))
        return g.tokens, g.decode_tokens, events

    lean = run()
    assert made[0] == 3 and min(made) < 3 and len(lean[0][1]) <= 4     # the one-call steps ran; row 1 stopped
    monkeypatch.delattr(cpu_decode.decode_block, "greedy_steps")
    assert run() == lean
