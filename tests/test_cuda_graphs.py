"""CUDA graphs of the decode step (backends/cuda_graphs.py, backends/cuda_static_step.py), on the CUDA twin.

The twin (tests/twins/backends.py) runs the CUDA backend's table on the CPU, so these tests prove the static
step's math against the eager per-op step (the reference `decode_block`: Block.forward_ops), the state's attach /
detach, the bucket padding and the capturability check; the `cuda`-marked test at the end captures real graphs
on a GPU and is skipped elsewhere (no GPU was available when this was written: it has not run).

The model is the tiny preset cut so that 40 decode steps cross its boundaries many times: window 8, a CSA layer
(ratio 4, indexer top-4 of up to 16 entries) and an HCA layer of ratio 8; three ragged prompts (3, 9, 14 tokens).
"""

import dataclasses
import re

import pytest
import torch

from backends import cuda_graphs
from backends.cuda_graphs import CaptureRefused, GraphDecodeRunner, no_host_sync
from runtime.api import Runtime
from runtime.checkpoint.make import write_checkpoint
from runtime.ops import attention as ref_attention
from runtime.ops import moe as ref_moe
from runtime.ops import reference_ops
from runtime.presets import preset
from runtime.profile import load_profile
from tests.twins import backends as twins

STEPS, PROMPTS = 40, (3, 9, 14)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    cfg = {**preset("tiny"), "num_hidden_layers": 3, "compress_ratios": [0, 4, 8, 0], "num_hash_layers": 1,
           "sliding_window": 8, "index_topk": 4}
    return write_checkpoint(tmp_path_factory.mktemp("graphs"), cfg, seed=0)


def _graph_profile(name="nvidia-h100"):
    return dataclasses.replace(load_profile(name), graph_mode="cudagraph")


@pytest.fixture
def hosted():
    with twins.hosted_cuda(90):
        yield


def _load(ckpt, numerics=None, **ops):
    rt = Runtime.load(_graph_profile(), checkpoint=ckpt, numerics=numerics, progress=False)
    return rt.with_ops(**ops) if ops else rt


def _prefilled(rt, g):
    prompts = [torch.randint(2, 258, (n,), generator=g).tolist() for n in PROMPTS]
    states = []
    for _ in range(2):
        st = rt.new_state(len(prompts))
        for b, p in enumerate(prompts):
            rt.model.forward(torch.tensor([p]), [st.seqs[b]])
        states.append(st)
    return states


def _run_both(rt, seed=0):
    """Teacher-forced: the same random tokens through the eager per-op step and the graph session."""
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        eager, graph = _prefilled(rt, g)
        toks = torch.randint(2, 258, (len(PROMPTS), STEPS), generator=g)
        session = rt.decode_runner.session(graph.seqs, max(PROMPTS) + STEPS)
        assert session is not None
        pairs = []
        for i in range(STEPS):
            pairs.append((rt.model.forward(toks[:, i:i + 1], eager.seqs)[:, -1].float().cpu(),
                          session.step(toks[:, i], [0, 1, 2])))
        session.close()
    return pairs, eager, graph


def _same_states(eager, graph, tol):
    for a, b in zip(eager.seqs, graph.seqs):
        assert a.pos == b.pos
        for la, lb in zip(a.layers, b.layers):
            for ra, rb in ((la.kv, lb.kv), (la.index_keys, lb.index_keys)):
                if ra is not None:
                    assert ra.n == rb.n and (ra.view() - rb.view()).abs().max() <= tol
            for pa, pb in ((la.comp_buf, lb.comp_buf), (la.index_buf, lb.index_buf)):
                if pa is not None:
                    assert (pa.start, pa.n) == (pb.start, pb.n)
                    assert (pa.kv - pb.kv).abs().max() <= tol and (pa.score - pb.score).abs().max() <= tol


@pytest.mark.parametrize("numerics", ["exact", None])
def test_static_step_equals_the_eager_per_op_step(small_ckpt, hosted, numerics):
    """With the reference attention (float32 inside; official: DeepSeek's bf16 points) the static step is the
    eager step over 40 steps: exact numerics (dense experts) to float32 rounding (measured 4.3e-7 of the logits'
    max, 2026-12-02), H100 numerics (grouped experts, FP8 linears, FP8 KV, FP4 indexer) bitwise (measured)."""
    rt = _load(small_ckpt, numerics, sparse_attention=ref_attention.sparse_attention)
    pairs, eager, graph = _run_both(rt)
    tol = 1.5e-6 if numerics == "exact" else 0.0
    for i, (e, s) in enumerate(pairs):
        assert ((e - s).abs().amax(-1) <= tol * e.abs().amax(-1)).all(), i
    _same_states(eager, graph, 3e-6 if numerics == "exact" else 0.0)      # detach wrote back what eager holds
    routed = "static.dense_experts" if numerics == "exact" else "cuda.grouped_mm"
    assert any(f"graph step routed_experts: {routed}" in line for line in rt.placement())


def test_static_step_through_the_cuda_attention(small_ckpt, hosted):
    """cuda.sdpa_gathered in bf16 sees each row's keys padded to a fixed count, so its sums round differently
    from the eager step's: measured KL 9.6e-5 mean / top-1 agreement 1.0 over 40 x 3 steps (2026-12-02), bound 3x."""
    rt = _load(small_ckpt)
    assert {r.op: r.impl for r in rt.dispatch.rows}["sparse_attention"] == "cuda.sdpa_gathered"
    pairs, eager, graph = _run_both(rt)
    e, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    pe, ps = torch.log_softmax(e, -1), torch.log_softmax(s, -1)
    kl = (pe.exp() * (pe - ps)).sum(-1).mean().item()
    agree = (e.argmax(-1) == s.argmax(-1)).float().mean().item()
    assert kl <= KL_BOUND and agree >= 0.95, (kl, agree)


KL_BOUND = 3e-4


def test_padding_rows_do_not_change_real_rows(small_ckpt, hosted):
    rt = _load(small_ckpt)
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        _, st = _prefilled(rt, g)
        graph = rt.decode_runner.graph(4, 256)
        for j, seq in enumerate(st.seqs):
            graph.state.attach(j, seq)
        saved = [t.clone() for L in graph.state.layers for t in _tensors(L)]
        ids, pos = torch.tensor([5, 6, 7, 0]), torch.tensor([s.pos for s in st.seqs] + [0])
        clean = graph.run(ids, pos).clone()
        for t, s in zip([t for L in graph.state.layers for t in _tensors(L)], saved):
            t.copy_(s)
            t[3] = torch.randn(t[3].shape, generator=g) * 50                  # junk in the padding slot
        junk = graph.run(torch.tensor([5, 6, 7, 311]), torch.cat((pos[:3], torch.tensor([200]))))
        assert torch.equal(clean[:3], junk[:3])
        assert not torch.equal(clean[3], junk[3])


def test_more_rows_than_the_largest_bucket(small_ckpt, hosted):
    """33 rows: a group of 32 and one of 1, each in its own graph's slots (exact numerics, float32 attention)."""
    rt = _load(small_ckpt, "exact", sparse_attention=ref_attention.sparse_attention)
    g = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        eager, graph = rt.new_state(33), rt.new_state(33)
        for b in range(33):
            p = torch.randint(2, 258, (1, 2 + b % 5), generator=g)
            rt.model.forward(p, [eager.seqs[b]])
            rt.model.forward(p, [graph.seqs[b]])
        session = rt.decode_runner.session(graph.seqs, 16)
        assert [(grp.rows, lo, n) for grp, lo, n in session.groups] == [(32, 0, 32), (1, 32, 1)]
        for _ in range(3):
            t = torch.randint(2, 258, (33,), generator=g)
            e, s = rt.model.forward(t[:, None], eager.seqs)[:, -1], session.step(t, list(range(33)))
            assert ((e - s).abs().amax(-1) <= 1.5e-6 * e.abs().amax(-1)).all()


def _tensors(L):
    out = [L.kv]
    for ring in (L.comp, L.icomp):
        if ring is not None:
            out += [ring.kv, ring.score]
    return out + ([L.ik] if L.ik is not None else [])


def test_checker_refuses_host_syncs():
    x, idx = torch.randn(6, 4), torch.tensor([0, 2, 2, 1])
    with no_host_sync():
        torch.where(x > 0, x, 0).sum(0)                                      # static shapes pass
        for call, what in ((lambda: x.sum().item(), "Tensor.item"), (lambda: bool(x.sum() > 0), "Tensor.__bool__"),
                           (lambda: x.tolist(), "Tensor.tolist"), (lambda: torch.nonzero(x), "nonzero"),
                           (lambda: torch.bincount(idx), "aten.bincount"), (lambda: x[x > 0], "boolean-mask"),
                           (lambda: torch.tensor([1.0, 2.0]), "aten.lift_fresh"),
                           (lambda: torch.unique(idx), "aten._unique"),
                           (lambda: idx.repeat_interleave(idx), "aten.repeat_interleave")):
            with pytest.raises(CaptureRefused, match=what):
                call()
        # the eager reference experts group by torch.unique().tolist(): not capturable, and said where
        from runtime.model.v4 import Linear

        experts = [tuple(Linear(torch.randn(8, 4) if j != 1 else torch.randn(4, 8), False) for j in range(3))
                   for _ in range(3)]
        with pytest.raises(CaptureRefused, match=r"runtime/ops/moe.py:\d+ routed_experts"):
            ref_moe.routed_experts(x[:4], idx[:, None], torch.ones(4, 1), experts, 10.0, reference_ops())
    assert not cuda_graphs.capturing()


def test_a_refused_capture_says_why_and_decode_runs_eager(small_ckpt, hosted, capsys):
    def syncing_hc_post(x, res, post, comb):
        if post.sum() > 1e9:                        # a host read of a device value: what a graph cannot hold
            raise AssertionError
        return ref_hc_post(x, res, post, comb)

    from runtime.ops.mhc import hc_post as ref_hc_post

    rt = _load(small_ckpt, "exact", hc_post=syncing_hc_post)
    plain = Runtime.load("nvidia-h100", checkpoint=small_ckpt, numerics="exact", progress=False)
    assert plain.decode_runner is None and not any(line.startswith("decode:") for line in plain.placement())
    got = rt.generate([[5, 6, 7], [8, 9]], max_new_tokens=6)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("decode: CUDA graph capture refused (Tensor.__bool__ reads a device "
                                               "value on the host at ")
    assert re.search(r"at [\w/]+\.py:\d+ \w+\); running the eager per-op step$", err[0])
    assert rt.placement()[-1].startswith("decode: eager per-op step (CUDA graph capture refused: Tensor.__bool__")
    assert got.tokens == plain.generate([[5, 6, 7], [8, 9]], max_new_tokens=6).tokens


def test_a_profile_without_graph_capture_is_refused_in_one_line(small_ckpt, hosted, capsys):
    prof = dataclasses.replace(_graph_profile(), capabilities=_graph_profile().capabilities - {"graph_capture"})
    rt = Runtime.load(prof, checkpoint=small_ckpt, progress=False)
    assert rt.placement()[-1].startswith("decode: eager per-op step (CUDA graph capture refused: capability "
                                         "graph_capture is not in probe ∩ profile nvidia-h100")
    assert len(rt.generate("Hi", max_new_tokens=3, stop_at_eos=False).tokens[0]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("decode: CUDA graph capture refused (capability graph_capture")


def test_generate_through_graphs_equals_eager_generate(small_ckpt, hosted):
    """Greedy tokens of ragged prompts, rows stopping at different steps (eos off: max_new_tokens per row)."""
    rt = _load(small_ckpt, "exact", sparse_attention=ref_attention.sparse_attention)
    assert isinstance(rt.decode_runner, GraphDecodeRunner)
    assert rt.placement()[0].startswith("decode: the checked static step run eagerly (CPU-hosted twin")
    eager = _without_runner(rt)
    prompts = [[5, 6, 7], list(range(20, 31)), [40, 41]]
    a = rt.generate(prompts, max_new_tokens=24, temperature=0.8, seed=1, stop_at_eos=False)
    b = eager.generate(prompts, max_new_tokens=24, temperature=0.8, seed=1, stop_at_eos=False)
    assert a.tokens == b.tokens


def _without_runner(rt):
    import copy

    out = copy.copy(rt)
    out.decode_runner = None
    return out


# ------------------------------------------------------------------ on a real GPU (skipped elsewhere)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_on_gpu_captured_graphs_match_the_eager_step(small_ckpt):
    """Real capture and replay: float32 attention bitwise-close as on the twin, and the shipped CUDA attention
    within the twin's KL bound; every bucket's graph is captured."""
    name = "nvidia-h100" if torch.cuda.get_device_capability(0) >= (8, 9) else "nvidia-a100"
    rt = Runtime.load(_graph_profile(name), checkpoint=small_ckpt, numerics="exact", progress=False)
    rt = rt.with_ops(sparse_attention=ref_attention.sparse_attention)
    assert rt.placement()[0].startswith("decode: CUDA graphs")
    pairs, eager, graph = _run_both(rt)
    for e, s in pairs:
        assert ((e - s).abs().amax(-1) <= 1e-4 * e.abs().amax(-1)).all()
    _same_states(eager, graph, 1e-4)
    assert all(g.graph is not None for g in rt.decode_runner._graphs.values())
    full = Runtime.load(_graph_profile(name), checkpoint=small_ckpt, progress=False)
    pairs, _, _ = _run_both(full)
    e, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    pe, ps = torch.log_softmax(e, -1), torch.log_softmax(s, -1)
    assert (pe.exp() * (pe - ps)).sum(-1).mean().item() <= KL_BOUND
    with torch.inference_mode():
        for rows in cuda_graphs.BUCKETS:
            assert full.decode_runner.graph(rows, 256).graph is not None
