"""MTP speculative decoding (runtime.speculative): greedy identity, exact rollback, distribution preservation.

On the random tiny model the MTP block's drafts are almost never accepted, so the accept branch is forced by
test-side draft functions: an oracle that proposes plain greedy's next token (always kept), an adversary
that never does (always rejected), and a mix of the two.
"""

import copy
import dataclasses
import math

import pytest
import torch

from runtime import speculative
from runtime.errors import InputError
from runtime.model.state import mark, settle
from runtime.sampling import SamplingParams

PROMPTS = [[0, 72, 105, 33], [0] + list(range(40, 70)), [0, 5], [0] + [7, 9, 11] * 42]   # 4, 31, 2, 127 tokens
N_NEW = 16


# Decoding's many small kernels run far faster on one thread on a shared machine.
pytestmark = pytest.mark.usefixtures("one_thread")


_PLAIN: dict = {}


def _plain(rt, prompts, n=N_NEW):
    """Plain greedy tokens (cached: the same model throughout the session)."""
    key = (id(rt), repr(prompts), n)
    if key not in _PLAIN:
        _PLAIN[key] = rt.generate(prompts, max_new_tokens=n, stop_at_eos=False).tokens
    return _PLAIN[key]


@pytest.mark.parametrize("rows", [[0], [1], [3], [0, 1, 2], [1, 3, 2]])
def test_greedy_mtp_equals_plain_greedy(tiny_rt, rows):
    prompts = [PROMPTS[r] for r in rows]
    got = tiny_rt.generate(prompts, max_new_tokens=N_NEW, stop_at_eos=False, speculative="mtp")
    assert got.tokens == _plain(tiny_rt, prompts)
    kept, drafted = tiny_rt.last_acceptance
    assert drafted > 0 and 0 <= kept <= drafted


def _oracle(prompts, plain, right):
    """A draft proposing plain greedy's token (when `right(step)`) or a wrong one, as one-hot logits."""
    V = 320

    def draft(hists):
        out = torch.full((len(hists), V), -30.0)
        for j, h in enumerate(hists):
            b = next(i for i, p in enumerate(prompts) if h[:len(p)] == p)
            k = len(h) - len(prompts[b])                      # index of the token to draft in plain[b]
            tok = plain[b][k] if k < len(plain[b]) else 3
            out[j, tok if right(k) else (tok + 1) % V] = 0.0
        return out
    return draft


@pytest.mark.parametrize("mode", ["always", "never", "mixed"])
@pytest.mark.parametrize("rows", [[2], [0, 1, 3]])
def test_greedy_identity_on_both_branches(tiny_rt, mode, rows):
    prompts = [PROMPTS[r] for r in rows]
    plain = _plain(tiny_rt, prompts)
    right = {"always": lambda k: True, "never": lambda k: False, "mixed": lambda k: k % 3 != 1}[mode]
    params = SamplingParams(0.0, 1.0, None, N_NEW, False)
    got = speculative.generate(tiny_rt, prompts, params, None, draft=_oracle(prompts, plain, right))
    assert got.tokens == plain
    kept, drafted = tiny_rt.last_acceptance
    if mode == "always":
        assert kept == drafted > 0 and drafted <= len(rows) * (N_NEW // 2)   # two tokens per step
    elif mode == "never":
        assert kept == 0 and drafted == len(rows) * (N_NEW - 1)
    else:
        assert 0 < kept < drafted


@pytest.mark.parametrize("at", [3, 4])      # EOS as a kept draft, and as the bonus token of a kept draft
def test_eos_and_budget_stop_inside_an_accepted_step(tiny_rt, at):
    prompts = [PROMPTS[1]]
    plain = [_plain(tiny_rt, prompts)[0][:7]]
    params = SamplingParams(0.0, 1.0, None, 7, False)
    got = speculative.generate(tiny_rt, prompts, params, None, draft=_oracle(prompts, plain, lambda k: True))
    assert got.tokens == plain and len(got.tokens[0]) == 7          # an odd budget: the bonus token is cut
    # The same run with plain greedy's token `at` taken as EOS stops right after it, as plain decoding does.
    rt = copy.copy(tiny_rt)
    rt.config = dataclasses.replace(tiny_rt.config, eos_token_id=plain[0][at])
    assert plain[0][at] not in plain[0][:at]
    params = SamplingParams(0.0, 1.0, None, 7, True)
    got = speculative.generate(rt, prompts, params, None, draft=_oracle(prompts, plain, lambda k: True))
    assert got.tokens == [plain[0][:at + 1]]


# ------------------------------------------------------------------ exact rollback

def _snapshot(seq) -> dict:
    """Every tensor and counter of a sequence's state, copied."""
    out = {"pos": seq.pos, "mtp_pos": seq.mtp_pos}
    for i, L in enumerate(seq.layers):
        out[f"{i}.kv"] = L.kv.view().clone()
        if L.index_keys is not None:
            out[f"{i}.index_keys"] = L.index_keys.view().clone()
        for name in ("comp_buf", "index_buf"):
            buf = getattr(L, name)
            if buf is not None:
                out[f"{i}.{name}"] = (buf.kv.clone(), buf.score.clone(), buf.start, buf.retain)
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, tuple):
            assert x[2:] == y[2:], k
            assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]), k
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), k           # bit for bit
        else:
            assert x == y, k


# Positions where the verify chunk [n, n+1] closes CSA (4), HCA-16 and HCA-128 windows at either token.
@pytest.mark.parametrize("n", [2, 3, 14, 15, 126, 127, 190])
def test_rollback_is_exact(tiny_rt, n):
    """Verify [t0, draft] then settle(0) and feed t0 alone == a run that only ever fed t0, tensor by tensor;
    settle(0) alone == the state before the verify step; settle(2) == the 2-token forward without marking."""
    ids = torch.randint(2, 258, (1, n + 1), generator=torch.Generator().manual_seed(n))
    model = tiny_rt.model
    with torch.inference_mode():
        never = tiny_rt.new_state(1)
        model.forward(ids[:, :n], never.seqs)
        before = _snapshot(never.seqs[0])
        model.forward(ids[:, n:], never.seqs)
        for draft in (5, 77, 250):
            st = tiny_rt.new_state(1)
            model.forward(ids[:, :n], st.seqs)
            m = mark(st.seqs[0], 2)
            model.forward(torch.tensor([[int(ids[0, n]), draft]]), st.seqs)
            settle(st.seqs[0], m, 0)
            _assert_same(_snapshot(st.seqs[0]), before)
            model.forward(ids[:, n:], st.seqs)
            _assert_same(_snapshot(st.seqs[0]), _snapshot(never.seqs[0]))
        plain, marked = tiny_rt.new_state(1), tiny_rt.new_state(1)
        chunk = torch.tensor([[int(ids[0, n]), 9]])
        for st in (plain, marked):
            model.forward(ids[:, :n], st.seqs)
        m = mark(marked.seqs[0], 2)
        model.forward(chunk, marked.seqs)
        settle(marked.seqs[0], m, 2)
        model.forward(chunk, plain.seqs)
        _assert_same(_snapshot(marked.seqs[0]), _snapshot(plain.seqs[0]))


@pytest.mark.parametrize("n", [2, 3, 14, 15, 126, 127, 190])
def test_keeping_the_decided_row_equals_a_plain_step(tiny_rt, n):
    """The no-re-feed rejection: verify [t0, draft] on the fused path, settle(1) == a run that fed t0 alone as a
    one-token step, tensor by tensor (and the verify's row 0 is that step's logits and streams); both then
    continue identically."""
    ids = torch.randint(2, 258, (1, n + 2), generator=torch.Generator().manual_seed(n))
    model = tiny_rt.model
    with torch.inference_mode():
        plain = tiny_rt.new_state(1)
        model.forward(ids[:, :n], plain.seqs)
        lp, Xp = model.forward(ids[:, n:n + 1], plain.seqs, return_hidden=True)
        for draft in (5, 77, 250):
            st = tiny_rt.new_state(1)
            model.forward(ids[:, :n], st.seqs)
            m = mark(st.seqs[0], 2)
            lv, Xv = model.forward(torch.tensor([[int(ids[0, n]), draft]]), st.seqs, return_hidden=True)
            assert m.exact_rows                              # the fused chunk ran (no re-feed needed)
            assert torch.equal(lv[:, :1], lp) and torch.equal(Xv[:, :1], Xp)
            settle(st.seqs[0], m, 1)
            _assert_same(_snapshot(st.seqs[0]), _snapshot(plain.seqs[0]))
            a = model.forward(ids[:, n + 1:], st.seqs)
            b = model.forward(ids[:, n + 1:], copy.deepcopy(plain).seqs)
            assert torch.equal(a, b)


def test_rollback_keeps_a_prefix_and_rejects_bad_use(tiny_rt):
    """settle(keep=1) leaves the layout of a sequence one token further (positions, row counts, pending
    starts); a settle without a matching mark is refused."""
    with torch.inference_mode():
        st, ref = tiny_rt.new_state(1), tiny_rt.new_state(1)
        ids = torch.randint(2, 258, (1, 16), generator=torch.Generator().manual_seed(2))
        tiny_rt.model.forward(ids[:, :15], st.seqs)
        tiny_rt.model.forward(ids, ref.seqs)
        m = mark(st.seqs[0], 2)
        tiny_rt.model.forward(torch.tensor([[int(ids[0, 15]), 4]]), st.seqs)
        settle(st.seqs[0], m, 1)
        a, b = _snapshot(st.seqs[0]), _snapshot(ref.seqs[0])
        for k in a:
            if isinstance(a[k], tuple):
                assert a[k][2:] == b[k][2:] and a[k][0].shape == b[k][0].shape, k
            elif isinstance(a[k], torch.Tensor):
                assert a[k].shape == b[k].shape and (a[k] - b[k]).abs().max() <= 1e-4, k
        with pytest.raises(ValueError):
            settle(st.seqs[0], m, 1)


# ------------------------------------------------------------------ distribution preservation

V_SMALL = 6
P = torch.tensor([0.30, 0.05, 0.25, 0.02, 0.18, 0.20])
Q = torch.tensor([0.05, 0.40, 0.10, 0.25, 0.05, 0.15])
N_DRAWS = 200_000
DELTA = 1e-9


def _l1_bound(n: int, k: int, delta: float) -> float:
    """Weissman et al. (2003): P(||p_hat - p||_1 >= eps) <= (2^k - 2) exp(-n eps^2 / 2)."""
    return math.sqrt(2 * (math.log(2 ** k - 2) + math.log(1 / delta)) / n)


def _wrong_accept(p, q, draft, gen):
    """A deliberately wrong rule: on rejection draw from p itself instead of the residual."""
    kept, _ = speculative.accept(p, q, draft, gen)
    return kept, torch.where(kept, draft, torch.multinomial(p, 1, generator=gen)[:, 0])


def _emitted(rule, seed):
    gen = torch.Generator().manual_seed(seed)
    p, q = P.expand(N_DRAWS, -1), Q.expand(N_DRAWS, -1)
    draft = torch.multinomial(q, 1, generator=gen)[:, 0]
    kept, tok = rule(p, q, draft, gen)
    return kept, torch.bincount(tok, minlength=V_SMALL).double() / N_DRAWS


def test_speculative_sampling_preserves_the_target_distribution():
    eps = _l1_bound(N_DRAWS, V_SMALL, DELTA)                       # ~0.022
    kept, freq = _emitted(speculative.accept, 0)
    assert (freq - P.double()).abs().sum().item() < eps
    # The acceptance rate is sum_v min(p, q) (a binomial: 6 sigma).
    rate = torch.minimum(P, Q).sum().item()
    assert abs(kept.double().mean().item() - rate) < 6 * math.sqrt(rate * (1 - rate) / N_DRAWS)
    # The wrong rule's output distribution, exactly: p_wrong = min(p, q) + (1 - sum min(p, q)) * p; it lies
    # well outside the bound, and the bound rejects its samples: the check can tell the rules apart.
    wrong = torch.minimum(P, Q) + (1 - rate) * P
    assert (wrong - P).abs().sum().item() > 3 * eps
    _, freq_wrong = _emitted(_wrong_accept, 0)
    assert (freq_wrong - P.double()).abs().sum().item() > eps


def test_sampled_mtp_generation_is_seeded_and_valid(tiny_rt):
    a = tiny_rt.generate(PROMPTS[:3], max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3, speculative="mtp")
    b = tiny_rt.generate(PROMPTS[:3], max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3, speculative="mtp")
    assert a.tokens == b.tokens
    assert all(0 < len(t) <= 8 and all(0 <= x < tiny_rt.config.vocab_size for x in t) for t in a.tokens)


def test_unknown_speculative_method_is_one_line(tiny_rt):
    with pytest.raises(InputError, match="unknown speculative method 'eagle'"):
        tiny_rt.generate([PROMPTS[0]], max_new_tokens=2, speculative="eagle")


def test_cli_speculative_flag(tiny_ckpt, capsys):
    from runtime.run import main

    assert main(["--checkpoint", str(tiny_ckpt), "--prompt", "Hi", "--max-new-tokens", "5", "--quiet",
                 "--speculative", "mtp"]) == 0
    spec = capsys.readouterr().out
    assert main(["--checkpoint", str(tiny_ckpt), "--prompt", "Hi", "--max-new-tokens", "5", "--quiet"]) == 0
    assert capsys.readouterr().out == spec


def test_chunked_prefill_feeds_the_mtp_block_every_position(tiny_rt, monkeypatch):
    """The MTP block's state after a prefill in chunks (streams carried across chunk edges) equals the one
    after a single-chunk prefill, and it has read every prompt position but the last."""
    row = PROMPTS[3][:40]
    states = []
    for chunk in (1000, 7):
        st = tiny_rt.new_state(1)
        with torch.inference_mode():
            logits, carry = speculative._prefill(tiny_rt.model, row, st.seqs[0], chunk)
        assert st.seqs[0].pos == 40 and st.seqs[0].mtp_pos == 39 and carry.shape[1] == 1
        states.append((logits, _snapshot(st.seqs[0])))
    (l1, a), (l2, b) = states
    assert (l1 - l2).abs().max() <= 5e-5
    mtp = f"{tiny_rt.config.num_layers}.kv"
    assert (a[mtp] - b[mtp]).abs().max() <= 5e-5 and a[mtp].abs().sum() > 0
