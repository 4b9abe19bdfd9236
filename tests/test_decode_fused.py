"""The fused CPU decode step (backends/cpu_decode.py, backends/native/decode_step.cpp) against the float32
reference: each kernel at decode shapes (batch 1 and a ragged batch of 3, positions crossing the window and the
compressors' window boundaries), and 200 whole decode steps of a ragged batch. The reference side is
`Runtime.load(..., emulate=True)` (every op the plain float32 reference, weights dequantised); the fused side
computes on the checkpoint's stored FP8 / FP4 / bf16 bytes. No timing is asserted."""

from __future__ import annotations

import copy

import pytest
import torch

from backends import cpu_decode
from tests import decode_kernels
from runtime.api import Runtime
from runtime.ops import mhc, norm_rope

# The issue's bound (1e-5); measured 2026-12-03: 4.3e-6 on 200 ragged steps' logits (against the cpu per-op
# path; 3.6e-6 before the bf16 linears ran in output panels); every kernel check below passes at it.
TOL = 1e-5
W = 128
# ragged starts whose 4 steps cross: the window's end (127 -> 128), a ratio-128 window (pos 127 / 255 close
# one), ratio 16 (15) and ratio 4 (every 4th): every layer kind of the tiny model closes an entry in them
RAGGED = [125, 253, 13]


@pytest.fixture(scope="module")
def ref_rt(tiny_ckpt):
    return Runtime.load("cpu", checkpoint=tiny_ckpt, emulate=True, progress=False)


def _prefilled(rt, starts, seed=0):
    g = torch.Generator().manual_seed(seed)
    st = rt.new_state(len(starts))
    with torch.inference_mode():
        for b, n in enumerate(starts):
            if n:
                rt.model.forward(torch.randint(2, 258, (1, n), generator=g), [st.seqs[b]])
    return st


def _same_state(a, b, layer):
    la, lb = a.layers[layer], b.layers[layer]
    torch.testing.assert_close(lb.kv.view(), la.kv.view(), atol=TOL, rtol=0)
    for x, y in ((la.comp_buf, lb.comp_buf), (la.index_buf, lb.index_buf)):
        if x is not None:
            assert (x.start, x.n) == (y.start, y.n)
            torch.testing.assert_close(y.kv, x.kv, atol=TOL, rtol=0)
            torch.testing.assert_close(y.score, x.score, atol=TOL, rtol=0)
    if la.index_keys is not None:
        torch.testing.assert_close(lb.index_keys.view(), la.index_keys.view(), atol=TOL, rtol=0)


def test_fused_decode_is_what_the_cpu_table_runs(tiny_rt, ref_rt):
    row = next(r for r in tiny_rt.dispatch.rows if r.op == "decode_block")
    assert row.impl == "cpu.native_fused"
    ref_row = next(r for r in ref_rt.dispatch.rows if r.op == "decode_block")
    assert ref_row.impl == "reference:decode.decode_block"            # --emulate is unchanged


@pytest.mark.parametrize("T", [1, 3])
def test_hc_pre_and_post_kernels(tiny_rt, ref_rt, T):
    g = torch.Generator().manual_seed(T)
    cfg = tiny_rt.config
    X = torch.randn(T, cfg.hc_mult, cfg.hidden_size, generator=g)
    for blk, ref in zip(tiny_rt.model.blocks, ref_rt.model.blocks):
        plan = cpu_decode.plan_for(blk)
        for hc_plan, h, norm in ((plan.ha, ref.hc_attn, ref.attn_norm), (plan.hf, ref.hc_ffn, ref.ffn_norm)):
            x, post, comb = decode_kernels.hc_pre(hc_plan, X)
            rx, rpost, rcomb = mhc.hc_pre(X, h.fn, h.base, h.scale, cfg.hc_eps, cfg.norm_eps, cfg.hc_sinkhorn_iters)
            torch.testing.assert_close(x, norm_rope.rms_norm(rx, norm, cfg.norm_eps), atol=TOL, rtol=0)
            torch.testing.assert_close(post, rpost, atol=TOL, rtol=0)
            torch.testing.assert_close(comb, rcomb, atol=TOL, rtol=0)
            y = torch.randn(T, cfg.hidden_size, generator=g)
            torch.testing.assert_close(decode_kernels.hc_post(y, X, rpost, rcomb), mhc.hc_post(y, X, rpost, rcomb),
                                       atol=TOL, rtol=0)


@pytest.mark.parametrize("starts", [[W - 1], RAGGED], ids=["batch1-window-edge", "ragged3"])
def test_attention_kernel_every_layer_kind(tiny_rt, ref_rt, starts):
    """Each layer's attention sub-block (projections, norms, RoPE, ring, compressors, indexer, attention,
    output projections) on one token per sequence, 4 steps, outputs and updated states vs the reference."""
    cfg = tiny_rt.config
    ref_state = _prefilled(ref_rt, starts)
    got_state = copy.deepcopy(ref_state)
    g = torch.Generator().manual_seed(7)
    kinds = set()
    with torch.inference_mode():
        for step in range(4):
            pos = [p + step for p in starts]
            positions = torch.tensor(pos)[:, None]
            for blk, ref in zip(tiny_rt.model.blocks, ref_rt.model.blocks):
                kinds.add(cfg.layer_kind(blk.layer))
                x = torch.randn(len(pos), cfg.hidden_size, generator=g)
                want = ref.attn(x[:, None], positions, pos, [s.layers[ref.layer] for s in ref_state.seqs])
                got = decode_kernels.attention(blk, x, pos, got_state.seqs)
                torch.testing.assert_close(got, want[:, 0], atol=TOL, rtol=0)
                for a, b in zip(ref_state.seqs, got_state.seqs):
                    _same_state(a, b, blk.layer)
    assert len(kinds) >= 3                                  # window-only, CSA and HCA layers all checked


def test_moe_kernel_hash_and_learned_layers(tiny_rt, ref_rt):
    cfg = tiny_rt.config
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, cfg.hidden_size, generator=g)
    ids = torch.tensor([5, 77, 250])
    hashed = set()
    with torch.inference_mode():
        for blk, ref in zip(tiny_rt.model.blocks, ref_rt.model.blocks):
            hashed.add(ref.ffn.hash)
            want = ref.ffn(x[:, None], ids[:, None])[:, 0]
            torch.testing.assert_close(decode_kernels.moe(blk, x, ids), want, atol=TOL, rtol=0)
    assert hashed == {True, False}


def test_200_fused_decode_steps_ragged_batch(tiny_rt, ref_rt, one_thread):
    """A ragged batch of 3 (one fresh sequence) decoded 200 steps: the fused step's logits stay within 1e-5 of
    the reference's at every step (the path crosses the window and many compressor windows)."""
    starts = [0, 60, 130]
    ref_state, got_state = _prefilled(ref_rt, starts, seed=1), _prefilled(ref_rt, starts, seed=1)
    g = torch.Generator().manual_seed(11)
    worst = 0.0
    with torch.inference_mode():
        for _ in range(200):
            tok = torch.randint(2, 258, (3, 1), generator=g)
            want = ref_rt.model.forward(tok, ref_state.seqs)
            got = tiny_rt.model.forward(tok, got_state.seqs)
            worst = max(worst, (got - want).abs().max().item())
    assert worst <= TOL, worst
    assert [s.pos for s in got_state.seqs] == [200, 260, 330]


@pytest.mark.parametrize("T", [1, 3])
def test_hc_head_kernel(tiny_rt, ref_rt, T):
    cfg, head = tiny_rt.config, ref_rt.model.head
    X = torch.randn(T, cfg.hc_mult, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    row = next(r for r in tiny_rt.dispatch.rows if r.op == "hc_head")
    assert row.impl == "cpu.native_small"
    want = mhc.hc_head(X, head.fn, head.base, head.scale, cfg.hc_eps, cfg.norm_eps)
    torch.testing.assert_close(cpu_decode.hc_head(X, head.fn, head.base, head.scale, cfg.hc_eps, cfg.norm_eps),
                               want, atol=TOL, rtol=0)


def _blocks(rt, X, ids, seqs):
    """The fused step of every block on X [B, 1, hc, d] (the head is not part of it) -> the final streams."""
    starts = [s.pos for s in seqs]
    positions = torch.tensor(starts)[:, None]
    for blk in rt.model.blocks:
        X = cpu_decode.decode_block(blk, X, ids, positions, starts, seqs)
    for s in seqs:
        s.pos += 1
    return X


def test_batch_of_16_equals_each_sequence_alone_bit_for_bit(tiny_rt):
    """Batch invariance of the fused step (issue 16): 16 ragged sequences (positions crossing the window and
    every compressor's window boundaries) stepped together on 2 threads give, for every row, exactly the bits
    of the same sequence stepped alone on 1 thread -- streams and every state row."""
    cfg = tiny_rt.config
    starts = [0, 3, 13, 15, 60, 100, 125, 126, 127, 128, 129, 200, 253, 254, 255, 300]
    together = _prefilled(tiny_rt, starts, seed=2)
    alone = copy.deepcopy(together)
    g = torch.Generator().manual_seed(13)
    n = torch.get_num_threads()
    with torch.inference_mode():
        for _ in range(6):
            X = torch.randn(len(starts), 1, cfg.hc_mult, cfg.hidden_size, generator=g)
            ids = torch.randint(2, 258, (len(starts), 1), generator=g)
            torch.set_num_threads(2)
            try:
                got = _blocks(tiny_rt, X, ids, together.seqs)
            finally:
                torch.set_num_threads(1)
            try:
                for b, s in enumerate(alone.seqs):
                    one = _blocks(tiny_rt, X[b:b + 1], ids[b:b + 1], [s])
                    assert torch.equal(got[b], one[0]), f"row {b} (position {s.pos - 1}) differs"
            finally:
                torch.set_num_threads(n)
    for a, b in zip(together.seqs, alone.seqs):
        for la, lb in zip(a.layers[:cfg.num_layers], b.layers[:cfg.num_layers]):
            assert torch.equal(la.kv.view(), lb.kv.view())
            if la.index_keys is not None:
                assert torch.equal(la.index_keys.view(), lb.index_keys.view())


def test_whole_step_is_the_blocks_then_the_head(tiny_rt):
    """The one-call step Transformer.forward takes (`decode_step`: every block, then the head, issue 16) gives
    exactly the per-block fused path's streams and states, and the per-op head's logits within TOL, on a
    ragged batch crossing window and compressor boundaries."""
    cfg, m = tiny_rt.config, tiny_rt.model
    starts = [0, 13, 125, 253]
    whole, blocks = _prefilled(tiny_rt, starts, seed=4), _prefilled(tiny_rt, starts, seed=4)
    g = torch.Generator().manual_seed(17)
    with torch.inference_mode():
        for _ in range(5):
            ids = torch.randint(2, 258, (len(starts), 1), generator=g)
            X = m.embed[ids].float()[:, :, None, :].expand(-1, -1, cfg.hc_mult, -1).contiguous()
            Xw, logits = cpu_decode.decode_step(m, X, ids, [s.pos for s in whole.seqs], whole.seqs)
            for s in whole.seqs:
                s.pos += 1
            Xb = _blocks(tiny_rt, X, ids, blocks.seqs)
            assert torch.equal(Xw, Xb)
            torch.testing.assert_close(logits, m.head(Xb), atol=TOL, rtol=0)
            assert list(logits.argmax_rows) == logits[:, 0].argmax(-1).tolist()     # the step's greedy tokens
    for a, b in zip(whole.seqs, blocks.seqs):
        for la, lb in zip(a.layers[:cfg.num_layers], b.layers[:cfg.num_layers]):
            assert torch.equal(la.kv.view(), lb.kv.view())


def test_step_reads_the_states_own_arrays_through_copies_and_replaced_buffers(tiny_rt):
    """The one-call step reads each sequence's counters and buffer addresses from the state's own arrays
    (state.py `_c`) and keeps their addresses per sequence: it embeds the tokens itself exactly as the streams
    the per-block path builds; a deep copy steps independently of its original; buffers replaced the way the
    prefix cache restores them (new Rows / Pending objects) and buffers regrown are read at their new
    addresses; a bad token id is refused before any state changes."""
    from runtime.model.state import Rows

    cfg, m = tiny_rt.config, tiny_rt.model
    starts = [0, 13, 125, 253]
    a = _prefilled(tiny_rt, starts, seed=5)
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(19)
    with torch.inference_mode():
        for step in range(8):
            if step == 3:                        # replace b's buffer objects (prefix-cache restore's way)
                for s in b.seqs:
                    for st in s.layers[:cfg.num_layers]:
                        st.kv = Rows.from_tensor(st.kv.view(), st.kv.n + 1)   # full: the next entry regrows it
                        if st.comp_buf is not None:
                            st.comp_buf = st.comp_buf.copy()
                        if st.index_buf is not None:
                            st.index_buf, st.index_keys = st.index_buf.copy(), Rows.from_tensor(st.index_keys.view())
            ids = torch.randint(2, 258, (len(starts), 1), generator=g)
            Xa, la = cpu_decode.decode_step(m, None, ids, [s.pos for s in a.seqs], a.seqs)
            Xb, lb = cpu_decode.decode_step(m, m.streams(ids), ids, [s.pos for s in b.seqs], b.seqs)
            for s in a.seqs + b.seqs:
                s.pos += 1
            assert torch.equal(Xa, Xb) and torch.equal(la, lb), f"step {step}"
        for sa, sb in zip(a.seqs, b.seqs):
            for layer in range(cfg.num_layers):
                _same_state(sa, sb, layer)
                assert sa.layers[layer].kv._buf.data_ptr() != sb.layers[layer].kv._buf.data_ptr()
        before = [(s.pos, [(st.kv.n, st.comp_buf.start if st.comp_buf is not None else 0) for st in s.layers])
                  for s in a.seqs]
        with pytest.raises(IndexError):
            m.forward(torch.tensor([[2], [3], [cfg.vocab_size], [4]]), a.seqs)
        assert before == [(s.pos, [(st.kv.n, st.comp_buf.start if st.comp_buf is not None else 0)
                                   for st in s.layers]) for s in a.seqs]
    r = a.seqs[0].layers[1].kv
    c = copy.copy(r)
    c.n += 1
    assert c.n == r.n + 1                    # a copy's counters are its own


def test_greedy_rule_is_torch_argmax():
    """The fused step's greedy token per row (decode_step.cpp argmax_row, `argmax_rows` of its logits) is
    torch.argmax's: the first maximum, a NaN counting as the maximum (the first NaN)."""
    import array

    nan, inf = float("nan"), float("inf")
    rows = torch.tensor([[1.0, 3.0, 3.0, 2.0], [nan, 1.0, nan, 5.0], [1.0, 2.0, nan, 9.0], [-inf, -inf, -inf, -inf],
                         [0.0, -0.0, 0.0, -1.0], [-2.0, inf, inf, 1.0]])
    rows = torch.cat((rows, torch.randn(4, 4, generator=torch.Generator().manual_seed(3))))
    out = array.array("q", bytes(8 * rows.shape[0]))
    cpu_decode.library().dsv4d_argmax(rows.shape[0], rows.shape[1], rows.data_ptr(), out.buffer_info()[0])
    assert list(out) == rows.argmax(-1).tolist()


def test_a_models_kernels_do_not_depend_on_models_loaded_before(tiny_ckpt, monkeypatch):
    """Whether FP8 / FP4 linears are widened to bf16 (which kernels run, hence the bits) is each model's own rule:
    a load after others that widened up to the budget computes what a first load does (a process-wide count
    once sent later models to the stored-format kernels: two loads of one checkpoint disagreed in the last bit)."""
    def step(rt):
        st = rt.new_state(1)
        with torch.inference_mode():
            rt.model.forward(torch.tensor([[0, 40, 50, 60, 70]]), [st.seqs[0]])
            return rt.model.forward(torch.tensor([[80]]), [st.seqs[0]])

    first = Runtime.load("cpu", checkpoint=tiny_ckpt, progress=False)
    a = step(first)
    monkeypatch.setattr(cpu_decode, "WIDEN_BUDGET", cpu_decode._widened_bytes(first.model.blocks[0]) * 10)
    later = [Runtime.load("cpu", checkpoint=tiny_ckpt, progress=False) for _ in range(3)]
    outs = [step(rt) for rt in later]
    kinds = [[lin.kind for lin in (p.A.wq_a, p.A.wkv, p.A.wo_b)] for p in cpu_decode.step_plan(later[-1].model).plans]
    assert all(k == [4, 4, 4] for k in kinds)            # every later load is widened (bf16 panels) too
    for o in outs:
        assert torch.equal(o, a)
