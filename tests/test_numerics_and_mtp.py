"""The `official` numerics emulation and the MTP block."""

import torch

from runtime import number_formats
from runtime.api import Runtime
from runtime.ops import numerics


def test_official_numerics_ops():
    x = torch.randn(3, 48) * 5
    assert torch.equal(numerics.round_bf16(x), x.to(torch.bfloat16).float())
    assert torch.equal(numerics.quant_act_fp8(x), number_formats.fp8_roundtrip(x, 128))
    v = torch.randn(4, 32)
    y = numerics.indexer_fp4_qat(v)
    H = torch.tensor([[1.0]])
    while H.shape[0] < 32:
        H = torch.cat((torch.cat((H, H), 1), torch.cat((H, -H), 1)), 0)
    h = (v @ H.T / 32 ** 0.5).to(torch.bfloat16).float()           # rotated (explicit Sylvester matrix), bf16
    s = torch.exp2(torch.ceil(torch.log2(h.abs().amax(-1, keepdim=True) / 6)))
    # every value is an e2m1 magnitude times the block's power-of-two scale, and the nearest one
    assert torch.all(torch.isin((y / s).abs(), torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6.])))
    assert torch.all((y - h).abs() <= s)


def test_official_emulation_stays_close_to_exact(tiny_ckpt, tiny_rt):
    off = Runtime.load("cpu", checkpoint=tiny_ckpt, numerics="official", progress=False)
    ids = torch.randint(2, 258, (2, 300), generator=torch.Generator().manual_seed(3))
    a, b = tiny_rt.forward(ids), off.forward(ids)
    assert not torch.equal(a, b)                                   # the emulation does change numbers
    pa, pb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (pa.exp() * (pa - pb)).sum(-1).mean().item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    # measured on the tiny default: KL ~0.02 nats, top-1 agreement ~0.89
    assert kl < 0.1 and agree > 0.8, (kl, agree)


def test_mtp_block_runs_chunked_like_full(tiny_rt):
    ids = torch.randint(2, 258, (2, 200), generator=torch.Generator().manual_seed(5))
    full = tiny_rt.mtp_logits(ids)
    assert full.shape == (2, 199, tiny_rt.config.vocab_size) and torch.isfinite(full).all()
    # the same through decode state: main model in two chunks, MTP block in two chunks
    st = tiny_rt.new_state(2)
    with torch.inference_mode():
        _, X1 = tiny_rt.model.forward(ids[:, :150], st.seqs, return_hidden=True)
        _, X2 = tiny_rt.model.forward(ids[:, 150:], st.seqs, return_hidden=True)
        X = torch.cat((X1, X2), 1)
        m1 = tiny_rt.model.forward_mtp(X[:, :77], ids[:, 1:78], st.seqs)
        m2 = tiny_rt.model.forward_mtp(X[:, 77:-1], ids[:, 78:], st.seqs)
    assert (torch.cat((m1, m2), 1) - full).abs().max().item() <= 1e-5
    # the draft depends on the next token's embedding
    other = ids.clone()
    other[:, 100] = (other[:, 100] + 1) % 256 + 2
    assert not torch.allclose(tiny_rt.mtp_logits(other)[:, 99], full[:, 99])
