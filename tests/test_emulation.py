"""Weight-format transforms (pure functions) and emulated deployments of the shipped (trained) default model
vs float32, on its held-out text.

The emulation figures and their tolerances come from runtime/parity/emulation.py, whose command
(`python -m runtime.parity.emulation`) prints the README's table: tolerances ~3x the measured KL and top-1
disagreement, and the README's rows are checked against what this test measures.
"""

import math
from pathlib import Path

import pytest
import torch

from runtime.checkpoint import load_checkpoint
from runtime.parity.emulation import LABELS, TOLERANCES, kl_and_top1, measure, table_row
from runtime.weight_transforms import dequantize_int8_per_channel, quantize_int8_per_channel, transform_weights

README = Path(__file__).resolve().parent.parent / "README.md"


def test_int8_per_channel_quantisation():
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 7)[:, None]
    codes, scale = quantize_int8_per_channel(w)
    assert codes.dtype == torch.int8 and codes.abs().max() == 127
    for r in range(6):                                         # independent per-row computation
        s = float(w[r].abs().max()) / 127
        assert abs(float(scale[r]) - s) <= 1e-6 * s
        assert torch.equal(codes[r], torch.round(w[r] / scale[r]).to(torch.int8))
    err = (dequantize_int8_per_channel(codes, scale) - w).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-6)


def test_transforms_touch_only_what_the_format_says(tiny_ckpt):
    ck = load_checkpoint(tiny_ckpt, progress=False)
    t = ck.tensors
    w8, q8 = transform_weights(t, ck.quantized, "w8a8_int8")
    assert "layers.1.attn.wq_b.weight" in q8 and "layers.1.ffn.experts.3.w2.weight" in q8
    assert "layers.1.attn.indexer.wq_b.weight" in q8 and "layers.1.ffn.shared_experts.w1.weight" in q8
    assert "layers.1.attn.wq_a.weight" not in q8 and "layers.1.attn.compressor.wkv.weight" not in q8
    assert torch.equal(w8["layers.1.attn.wq_a.weight"], t["layers.1.attn.wq_a.weight"].bfloat16().float())
    wq = t["layers.1.attn.wq_b.weight"]
    assert torch.equal(w8["layers.1.attn.wq_b.weight"], dequantize_int8_per_channel(*quantize_int8_per_channel(wq)))
    for name in ("layers.1.hc_attn_fn", "layers.1.attn.attn_sink", "layers.2.ffn.gate.bias",
                 "layers.0.ffn.gate.tid2eid"):
        assert w8[name] is t[name]                              # fp32 / int64 parameters are never touched
    f16, q = transform_weights(t, ck.quantized, "fp16")
    assert not q and torch.equal(f16["embed.weight"], t["embed.weight"].half().float())
    same, q = transform_weights(t, ck.quantized, "fp8_block")
    assert q == ck.quantized and same["layers.1.attn.wq_b.weight"] is wq
    with pytest.raises(ValueError, match="unknown weight format"):
        transform_weights(t, ck.quantized, "int3")


@pytest.fixture(scope="module")
def default_rt():
    from runtime.api import Runtime

    return Runtime.load("cpu", progress=False)                 # the shipped trained model, float32


@pytest.mark.parametrize("profile", list(TOLERANCES))
def test_emulated_profiles_stay_within_documented_tolerance(profile, default_rt):
    """The README table's measurement (runtime.parity.emulation, the command that prints it) on the trained
    default and its held-out text, held to its tolerance (~3x the measured KL, top-1 disagreement and
    perplexity change), and the README's row is what was measured."""
    fig = measure(profile, reference=default_rt)
    assert not fig["identical"]
    max_kl, min_agree, max_ppl = TOLERANCES[profile]
    assert fig["kl"] <= max_kl and fig["top1"] >= min_agree and abs(fig["ppl_delta"]) <= max_ppl, (profile, fig)
    row = next(ln for ln in README.read_text().splitlines() if ln.startswith(f"| {LABELS[profile]} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == table_row(profile, fig).strip("|").split("|")[4].strip()      # the tolerance: from the code
    ppl_doc, kl_doc, top1_doc = float(cells[1].rstrip("%")) / 100, float(cells[2]), float(cells[3])
    # the figures: as printed by `python -m runtime.parity.emulation`, up to the run-to-run jitter of a
    # threaded float32 reduction order
    assert abs(kl_doc - fig["kl"]) <= 0.05 * fig["kl"] and abs(top1_doc - fig["top1"]) <= 0.005, (row, fig)
    assert abs(ppl_doc - fig["ppl_delta"]) <= 0.0005 + 0.05 * abs(fig["ppl_delta"]), (row, fig)


def test_kl_and_top1_on_known_answers():
    ref = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]))
    cand = torch.log(torch.tensor([[0.25, 0.5, 0.25], [0.1, 0.6, 0.3]]))
    kl, top1 = kl_and_top1(ref, cand)
    assert kl == pytest.approx((0.5 * math.log(2) + 0.25 * math.log(0.5)) / 2) and top1 == 0.5
