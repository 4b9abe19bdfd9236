"""The `official` numerics emulation and the MTP block."""

import torch

from runtime import number_formats
from runtime.api import Runtime
from runtime.ops import numerics


def bf16_rne_oracle(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16 -> float32 on the bits (finite inputs): add 0x7FFF plus the kept part's lowest bit, then
    drop the low 16 bits (round to nearest, ties to even). Integer arithmetic only, no float casts."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    r = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    r = torch.where(r >= 2 ** 31, r - 2 ** 32, r)                 # back to int32's signed range
    return r.to(torch.int32).view(torch.float32)


def act_quant_oracle(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """DeepSeek `act_quant` from its definition, on runtime.number_formats' bit-level e4m3 table (no float8
    casts): per `block` of the last dim a power-of-two scale, the smallest 2^k >= max(amax, 1e-4) / 448
    (math.frexp), then each x / scale to the nearest finite e4m3 value, a tie to the even code."""
    import math

    grid = number_formats.E4M3_TABLE[:127].double()               # codes 0x00-0x7E: 0 .. 448, increasing
    rows = x.reshape(-1, x.shape[-1]).double()
    out = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        for s0 in range(0, rows.shape[1], block):
            b = rows[r, s0:s0 + block]
            m, e = math.frexp(max(float(b.abs().max()), 1e-4) / 448.0)       # m * 2^e, 0.5 <= m < 1
            scale = 2.0 ** (e - 1 if m == 0.5 else e)
            v = b / scale                                                     # exact: a power of two
            d = (v.abs()[:, None] - grid[None, :]).abs()
            lo = d.argmin(-1)                                                 # the first (lower) nearest code
            hi = (lo + 1).clamp(max=126)
            tie = (hi > lo) & (d.gather(1, hi[:, None])[:, 0] == d.gather(1, lo[:, None])[:, 0])
            code = torch.where(tie & (lo % 2 == 1), hi, lo)
            out[r, s0:s0 + block] = torch.sign(v) * grid[code] * scale
    return out.float().view(x.shape)


def test_official_numerics_ops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 48, generator=g) * 5
    # ties and a carry at bf16's 7 stored mantissa bits (ulp 2^-7 in [1, 2)): 1 + 2^-8 -> 1 (even),
    # 1 + 3 * 2^-8 -> 1 + 2^-6 (even), 2 - 2^-8 -> 2 (carry into the exponent), and a value just below a tie
    x[0, :4] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, 2 - 2 ** -8, -(1 + 2 ** -8 - 2 ** -20)])
    want = bf16_rne_oracle(x)
    assert want[0, :4].tolist() == [1.0, 1 + 2 ** -6, 2.0, -1.0]
    assert torch.equal(numerics.round_bf16(x), want)
    a = torch.randn(3, 300, generator=g) * torch.logspace(-3, 3, 300)          # scales per block; a trailing partial block
    a[0, :6] = torch.tensor([448.0, 17.0, 19.0, 31.6, 1.5 * 2 ** -9, -0.0])      # ties to even, a carry, subnormal
    a[1, 128:256] = 0.0                                           # a zero block: amax floored at 1e-4
    want = act_quant_oracle(a)
    assert want[0, 1] == 16.0 and want[0, 2] == 20.0 and want[0, 3] == 32.0
    assert torch.equal(numerics.quant_act_fp8(a), want)
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
    # measured 2026-12-03 on the tiny default, these ids (seed 3): KL 0.0161 nats, top-1 agreement 0.895 (seeds
    # 0-4: KL 0.015-0.022, agreement 0.87-0.90); bounds ~3x the KL, and agreement within 2x its 0.105 deficit
    assert kl < 0.05 and agree > 0.8, (kl, agree)


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
