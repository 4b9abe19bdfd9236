"""The continuous-batching engine and the exact prefix cache, without HTTP: results do not depend on batching,
and a prefix-cache hit is bit-identical to the same request served cold."""

from __future__ import annotations

import threading

import pytest
import torch

from runtime.serve.engine import Engine, GenParams, Sequence, serving_runtime
from runtime.serve.prefix_cache import PrefixCache


class Out:
    """Collects a sequence's tokens and (chosen-token) logprobs."""

    def __init__(self):
        self.toks, self.lps, self.done = [], [], threading.Event()

    def token(self, t, lp):
        self.toks.append(t)
        self.lps.append(None if lp is None else lp[0])
        return False

    def finish(self, reason):
        self.reason = reason
        self.done.set()


def serve(eng, prompts, max_tokens=6):
    outs = [Out() for _ in prompts]
    seqs = [eng.submit(Sequence(p, GenParams(max_tokens=max_tokens, logprobs=0, ignore_eos=True), o))
            for p, o in zip(prompts, outs)]
    for o in outs:
        assert o.done.wait(120)
    return outs, seqs


@pytest.fixture(scope="module")
def srt(tiny_rt):
    return serving_runtime(tiny_rt)


def prompt(i: int, n: int) -> list[int]:
    return [0] + [2 + (i * 37 + j * 11) % 250 for j in range(n)]


def test_greedy_same_alone_or_among_16(srt):
    eng = Engine(srt).start()
    try:
        prompts = [prompt(i, 20 + 9 * i) for i in range(17)]
        alone = [serve(eng, [prompts[i]])[0][0] for i in (0, 8, 16)]
        together, _ = serve(eng, prompts)
        for o, i in zip(alone, (0, 8, 16)):
            assert o.toks == together[i].toks
            assert o.lps == together[i].lps                 # logprobs bit for bit, not approximately
    finally:
        eng.stop()


def test_steady_batch_is_the_forward(srt):
    """The executor's steady batch (the fused step's buffers and state addresses reused step after step) gives
    model.forward's logits and greedy tokens bit for bit and advances the states alike, also across a batch
    change (a sequence leaving) and after buffers grew (the step's make-room retry)."""
    from types import SimpleNamespace

    from runtime.serve.executor import Executor

    m = srt.model
    assert getattr(m.ops.decode_block, "step_batch", None) is not None      # the fused CPU step runs here
    ex = Executor(srt)
    a, b = srt.new_state(3, context=64), srt.new_state(3, context=64)
    with torch.inference_mode():
        for st in (a, b):
            for i in range(3):
                m.forward(torch.tensor([prompt(i, 20 + 7 * i)]), [st.seqs[i]])
        toks = [5, 6, 7]
        for step in range(40):
            n = 3 if step < 20 else 2
            got = ex.decode([SimpleNamespace(state=s) for s in a.seqs[:n]], toks[:n])
            assert ex._steady is not None and ex._steady.logits is got
            want = m.forward(torch.tensor([[t] for t in toks[:n]]), b.seqs[:n], last=True)
            assert torch.equal(got, want)
            assert list(got.argmax_rows) == want.argmax(-1).tolist()
            assert [s.pos for s in a.seqs] == [s.pos for s in b.seqs]
            toks = list(got.argmax_rows) + toks[n:]


def test_plain_table_is_not_batch_invariant(tiny_rt):
    """Why invariant.py exists: with the CPU table's per-op decode step (what runs where the fused step does
    not: official numerics, TP/EP ranks), a decode row's logits change with the batch."""
    import dataclasses

    from runtime.bench.decode_ops import _swap_ops
    from runtime.ops import decode

    m = tiny_rt.model
    fused = m.ops
    _swap_ops(m, dataclasses.replace(fused, decode_block=decode.decode_block))
    try:
        st = tiny_rt.new_state(4)
        with torch.inference_mode():
            for b in range(4):
                m.forward(torch.tensor([prompt(b, 21 + b)]), [st.seqs[b]])
            one = tiny_rt.new_state(1)
            m.forward(torch.tensor([prompt(0, 21)]), [one.seqs[0]])
            together = m.forward(torch.tensor([[5]] * 4), st.seqs)[0, -1]
            alone = m.forward(torch.tensor([[5]]), one.seqs)[0, -1]
    finally:
        _swap_ops(m, fused)
    assert not torch.equal(together, alone)


def _cache(srt, budget=64 << 20, every=2):
    return PrefixCache(srt.config.num_layers, 128, every, budget)


def test_prefix_hit_is_bit_identical_to_cold(srt):
    base = prompt(3, 600)
    a, b = base + [7, 8, 9], base[:450] + [40, 41, 42]
    cold_eng = Engine(srt, cache=None).start()
    try:
        (cold_b,), _ = serve(cold_eng, [b])
    finally:
        cold_eng.stop()
    cache = _cache(srt, every=3)
    eng = Engine(srt, cache=cache).start()
    try:
        serve(eng, [a])                                    # 604 tokens: blocks 0..3, checkpoints after 3 and 4
        (hot_b,), (seq,) = serve(eng, [b])
    finally:
        eng.stop()
    assert seq.cached_tokens == 384                        # b's 454 tokens: 3 whole blocks, all shared
    assert hot_b.toks == cold_b.toks and hot_b.lps == cold_b.lps


def test_stale_window_is_not_read(srt):
    """A hit resumes from the checkpointed ring of the hit boundary, not from the ring of the request that
    filled the cache (ROCm/ATOM #1417). Request A runs on past the boundary, so its live ring is stale for B;
    B must still equal B cold, and the stale ring must actually matter (else this test could not fail)."""
    shared = prompt(5, 255)                                # 256 tokens
    a = shared + prompt(6, 300)[1:]
    b = shared + [9] * 20
    cache = _cache(srt, every=2)                           # a (556 tokens): checkpoints after 256 and 512
    eng = Engine(srt, cache=None).start()
    try:
        (cold_b,), _ = serve(eng, [b])
    finally:
        eng.stop()
    eng = Engine(srt, cache=cache).start()
    try:
        serve(eng, [a])
        hit, chain = cache.lookup(b)
        assert hit == 256 and chain[-1].ckpt is not None
        (hot_b,), (seq,) = serve(eng, [b])
    finally:
        eng.stop()
    assert seq.cached_tokens == 256 and hot_b.toks == cold_b.toks and hot_b.lps == cold_b.lps
    # the wrong restore: same entries, but A's final ring and pending rows instead of the checkpoint's
    state_a = srt.model.new_state(1).seqs[0]
    with torch.inference_mode():
        for i in range(0, len(a), 128):
            srt.model.forward(torch.tensor([a[i:i + 128]]), [state_a])
        good = srt.model.new_state(1).seqs[0]
        cache.restore(chain, good)
        bad = srt.model.new_state(1).seqs[0]
        cache.restore(chain, bad)
        for la, lb in zip(state_a.layers, bad.layers):
            lb.window.copy_(la.window)
        x = torch.tensor([b[256:]])
        assert not torch.equal(srt.model.forward(x, [good]), srt.model.forward(x, [bad]))


def test_eviction_under_small_budget_stays_exact(srt):
    prompts = [prompt(10 + i, 300) for i in range(4)]
    eng = Engine(srt, cache=None).start()
    try:
        cold = [serve(eng, [p])[0][0] for p in prompts]
    finally:
        eng.stop()
    one_block = _cache(srt)
    probe = Engine(srt, cache=one_block).start()
    try:
        serve(probe, [prompts[0]])
    finally:
        probe.stop()
    cache = _cache(srt, budget=one_block.bytes + 1)       # room for about one prompt's blocks
    eng = Engine(srt, cache=cache).start()
    try:
        for rnd in range(2):
            for p, c in zip(prompts, cold):
                (o,), _ = serve(eng, [p])
                assert o.toks == c.toks and o.lps == c.lps
    finally:
        eng.stop()
    assert cache.evictions > 0 and cache.bytes <= cache.budget


def test_cancel_frees_state_within_a_step(srt):
    eng = Engine(srt).start()
    try:
        outs = [Out() for _ in range(3)]
        seqs = [eng.submit(Sequence(prompt(i, 40), GenParams(max_tokens=10_000, ignore_eos=True), o))
                for i, o in enumerate(outs)]
        while not all(o.toks for o in outs):
            threading.Event().wait(0.01)
        for s in seqs:
            eng.cancel(s)
        for o in outs:
            assert o.done.wait(10) and o.reason == "cancelled"
        assert all(s.state is None for s in seqs) and eng.state_bytes() == 0
        assert max(len(o.toks) for o in outs) < 10_000
    finally:
        eng.stop()
