"""Prefill + one-token decode, and chunked prefill of any chunk size, equal one full forward (float32).

The tiny model has window 128, ratios 4 / 128 / 16, so 300+ tokens cross two windows, two 128-token
compression boundaries, many 4- and 16-token ones, and make the indexer selective (index_topk 16 < entries).

The state logic is checked on the reference op table (`emulate=True` on the cpu profile: every op the
float32 reference), where chunking changes no op's arithmetic; the cpu backend's fast ops take different
paths for one token and for blocks (double-precision Sinkhorn, fused kernels), so they get a rounding-sized
tolerance in their own check.
"""

import pytest
import torch

TOL = 1e-5
TOL_FAST = 5e-5
N = 300


@pytest.fixture(scope="module")
def ref_rt(tiny_ckpt):
    from runtime.api import Runtime

    rt = Runtime.load("cpu", checkpoint=tiny_ckpt, emulate=True, progress=False)
    assert all(r.impl.startswith(("reference:", "numerics:")) for r in rt.dispatch.rows)
    return rt


@pytest.fixture(scope="module")
def ids():
    return torch.randint(2, 258, (2, N), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def full(ref_rt, ids):
    return ref_rt.forward(ids)


@pytest.mark.parametrize("prefill", [1, 7, 131, 258])   # not aligned to 4 or 128
def test_prefill_then_decode_matches_full(ref_rt, ids, full, prefill):
    state = ref_rt.new_state(2)
    outs = [ref_rt.forward(ids[:, :prefill], state=state)]
    for t in range(prefill, N):
        outs.append(ref_rt.forward(ids[:, t:t + 1], state=state))
    got = torch.cat(outs, dim=1)
    assert state.positions == [N, N]
    assert (got - full).abs().max().item() <= TOL


@pytest.mark.parametrize("chunk", [3, 5, 64, 127, 129])
def test_chunked_prefill_matches_full(ref_rt, ids, full, chunk):
    state = ref_rt.new_state(2)
    got = torch.cat([ref_rt.forward(ids[:, s:s + chunk], state=state) for s in range(0, N, chunk)], dim=1)
    assert (got - full).abs().max().item() <= TOL


def test_fast_ops_prefill_then_decode_match_full(tiny_rt, ids, full):
    """The cpu profile (fast ops): full forward, and prefill 131 + one-token decode, against the reference."""
    assert (tiny_rt.forward(ids) - full).abs().max().item() <= TOL_FAST
    state = tiny_rt.new_state(2)
    outs = [tiny_rt.forward(ids[:, :131], state=state)]
    outs += [tiny_rt.forward(ids[:, t:t + 1], state=state) for t in range(131, N)]
    assert (torch.cat(outs, dim=1) - full).abs().max().item() <= TOL_FAST


def test_batch_rows_are_independent(ref_rt, ids, full):
    one = ref_rt.forward(ids[1:2])
    assert (one[0] - full[1]).abs().max().item() <= TOL


def test_sequences_at_different_positions_in_one_batch(ref_rt, ids, full):
    """Row 0 prefilled with 40 tokens, row 1 with 170; then both decode together."""
    state = ref_rt.new_state(2)
    a = ref_rt.model.forward(ids[0:1, :40], [state.seqs[0]])
    b = ref_rt.model.forward(ids[1:2, :170], [state.seqs[1]])
    assert state.positions == [40, 170]
    steps = [ref_rt.forward(torch.stack([ids[0, 40 + k], ids[1, 170 + k]])[:, None], state=state)
             for k in range(20)]
    got = torch.cat(steps, dim=1)
    assert (a[0] - full[0, :40]).abs().max() <= TOL and (b[0] - full[1, :170]).abs().max() <= TOL
    assert (got[0] - full[0, 40:60]).abs().max().item() <= TOL
    assert (got[1] - full[1, 170:190]).abs().max().item() <= TOL


def test_state_reset_forgets_the_previous_prompt(ref_rt, ids, full):
    state = ref_rt.new_state(2)
    ref_rt.forward(ids[:, 100:103], state=state)       # a short prompt leaves partial compressor state
    state.reset()
    got = ref_rt.forward(ids[:, :50], state=state)
    assert (got - full[:, :50]).abs().max().item() <= TOL
    state.reset(0)
    assert state.positions == [0, 50]


def test_state_bytes_follow_the_layer_schedule(tiny_rt, ids):
    """Fixed window per layer + growth only in compressed layers + bounded compressor buffers (float32)."""
    state = tiny_rt.new_state(1)
    tiny_rt.forward(ids[:1], state=state)                       # 300 tokens
    c, f = tiny_rt.config, 4
    D, I = c.head_dim, c.index_head_dim
    windows = (c.num_layers + c.num_mtp) * c.window * D * f
    csa = 2 * ((300 // 4) * (D + I) * f + 4 * 2 * (2 * D + 2 * I) * f)   # entries + [prev window] kv/score rows
    hca128 = (300 // 128) * D * f + (300 % 128) * 2 * D * f
    hca16 = (300 // 16) * D * f + (300 % 16) * 2 * D * f
    assert state.nbytes() == windows + csa + hca128 + hca16
