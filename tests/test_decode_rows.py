"""The fused chunk path for speculative decoding (backends/cpu_decode_rows.py): a chunk of S tokens per sequence
through the fused kernels equals S one-token steps bit for bit (logits, streams, every state tensor), and the
float32 reference within the fused step's tolerance; the fused MTP draft (`last` positions only or every one)
against the reference MTP block; the one-call greedy iteration against its parts. No timing is asserted."""

from __future__ import annotations

import copy

import pytest
import torch

from backends import cpu_decode_rows
from runtime.model.state import mark, settle
from tests.test_decode_fused import _prefilled, ref_rt  # noqa: F401  (ref_rt: the same module fixture)
from tests.test_speculative import _assert_same, _snapshot

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5            # the fused one-token step's bound against the reference (tests/test_decode_fused.py)
# ragged starts whose chunks cross the window's end (127 -> 128), ratio-128 / 16 / 4 window closes at
# either row, and a fresh sequence
STARTS = [126, 254, 14, 2, 0]


def test_the_table_routes_chunks_and_drafts_here(tiny_rt):
    db = tiny_rt.model.ops.decode_block
    assert db.whole_rows is cpu_decode_rows.decode_rows and db.mtp_step is cpu_decode_rows.mtp_step
    assert cpu_decode_rows.max_rows(cpu_decode_rows.cd.step_plan(tiny_rt.model).plans) == 4


@pytest.mark.parametrize("S", [2, 4])
def test_a_chunk_is_one_token_steps_bit_for_bit(tiny_rt, S):
    model = tiny_rt.model
    ids = torch.randint(2, 258, (len(STARTS), S), generator=torch.Generator().manual_seed(S))
    chunk, steps = _prefilled(tiny_rt, STARTS), _prefilled(tiny_rt, STARTS)
    with torch.inference_mode():
        lc, Xc = model.forward(ids, chunk.seqs, return_hidden=True)
        one = [model.forward(ids[:, i:i + 1], steps.seqs, return_hidden=True) for i in range(S)]
    assert torch.equal(lc, torch.cat([lg for lg, _ in one], 1))
    assert torch.equal(Xc, torch.cat([X for _, X in one], 1))
    for a, b in zip(chunk.seqs, steps.seqs):
        _assert_same(_snapshot(a), _snapshot(b))


def test_a_chunk_against_the_reference(tiny_rt, ref_rt):
    ids = torch.randint(2, 258, (len(STARTS), 2), generator=torch.Generator().manual_seed(7))
    fused, ref = _prefilled(tiny_rt, STARTS), _prefilled(ref_rt, STARTS)
    with torch.inference_mode():
        lf = tiny_rt.model.forward(ids, fused.seqs)
        lr = ref_rt.model.forward(ids, ref.seqs)
    torch.testing.assert_close(lf, lr, atol=TOL, rtol=0)


def _mtp_ready(rt, n, seed=0):
    """A sequence prefilled to n tokens with the MTP block fed every position but the last -> (state, the
    last position's streams [1, 1, hc, d])."""
    ids = torch.randint(2, 258, (1, n), generator=torch.Generator().manual_seed(seed))
    st = rt.new_state(1)
    with torch.inference_mode():
        _, X = rt.model.forward(ids, st.seqs, return_hidden=True)
        rt.model.forward_mtp(X[:, :-1], ids[:, 1:], st.seqs)
    return st, X[:, -1:]


@pytest.mark.parametrize("n", [5, 127, 130])
def test_mtp_draft_last_only_and_against_the_reference(tiny_rt, ref_rt, n):
    """`last`: the same last-position logits and the same MTP state, bit for bit, as computing every position;
    the fused MTP step against the reference MTP block (per-op, float32) within the tolerance."""
    (a, Xa), (b, _), (r, Xr) = _mtp_ready(tiny_rt, n), _mtp_ready(tiny_rt, n), _mtp_ready(ref_rt, n)
    H = torch.cat((Xa, Xa * 0.5), 1)                            # two positions' streams to catch up
    Hr = torch.cat((Xr, Xr * 0.5), 1)
    nxt = torch.tensor([[17, 33]])
    with torch.inference_mode():
        full = tiny_rt.model.forward_mtp(H, nxt, a.seqs)
        last = tiny_rt.model.forward_mtp(H, nxt, b.seqs, last=True)
        ref = ref_rt.model.forward_mtp(Hr, nxt, r.seqs)
    assert last.shape[1] == 1 and torch.equal(last[:, 0], full[:, -1])
    _assert_same(_snapshot(a.seqs[0]), _snapshot(b.seqs[0]))
    torch.testing.assert_close(full, ref, atol=TOL, rtol=0)
    L = tiny_rt.config.num_layers
    torch.testing.assert_close(a.seqs[0].layers[L].kv.view(), r.seqs[0].layers[L].kv.view(), atol=TOL, rtol=0)


@pytest.mark.parametrize("k", [1, 2])
def test_one_call_greedy_iteration_equals_its_parts(tiny_rt, k):
    """dsv4d_spec_step = the MTP draft (last position, argmax) then the verify forward [tok, draft]."""
    model = tiny_rt.model
    a, X = _mtp_ready(tiny_rt, 62)
    b = copy.deepcopy(a)
    H = torch.cat((X, X * 0.5), 1)[:, :k].contiguous()
    nxt = torch.tensor([[40, 41][:k]])
    tok = int(nxt[0, -1])
    with torch.inference_mode():
        ma, mb = mark(a.seqs[0], 2), mark(b.seqs[0], 2)
        g = cpu_decode_rows.spec_greedy_steps(model, a.seqs)
        flat, Xf, lf = g.step(H, nxt.tolist(), [tok])
        rows = [flat[3 * b:3 * b + 3] for b in range(len(a.seqs))]
        d = int(model.forward_mtp(H, nxt, b.seqs, last=True)[0, -1].argmax())
        lp, Xp = model.forward(torch.tensor([[tok, d]]), b.seqs, return_hidden=True)
    assert rows == [[d, int(lp[0, 0].argmax()), int(lp[0, 1].argmax())]]
    assert torch.equal(lf, lp) and torch.equal(Xf, Xp)
    assert ma.exact_rows and mb.exact_rows
    _assert_same(_snapshot(a.seqs[0]), _snapshot(b.seqs[0]))
    settle(a.seqs[0], ma, 1)
    settle(b.seqs[0], mb, 1)
    _assert_same(_snapshot(a.seqs[0]), _snapshot(b.seqs[0]))
