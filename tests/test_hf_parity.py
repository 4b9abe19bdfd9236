"""Independent parity: our float32 reference vs Hugging Face transformers' `DeepseekV4ForCausalLM`.

Both models get the same dequantised weights (our loader decodes the generated FP8 / FP4 checkpoint; the
float32 values are mapped onto HF's module names) and must give the same logits, max |dlogit| <= 1e-4.

Like with like — where transformers departs from DeepSeek's official inference code (spec §16, §18), we
follow the official code and the comparison is arranged so the difference cannot hide a bug:
- transformers runs full precision: no FP8 round trip of the KV, no FP8 activation quantisation, no
  Hadamard + FP4 simulation in the indexer. We compare with our `exact` numerics mode, which is the same
  float32 math (the Hadamard rotation is orthonormal on both q and k, so exact scores are unchanged).
- transformers' indexer takes `torch.topk`, which breaks exact score ties arbitrarily; ours breaks them
  lower-index-first. ReLU makes ties likely when few heads see a positive dot product, so the configs use
  16 indexer heads with real-valued weights: tied scores then have probability ~0.
- transformers applies the routing weight after the expert's down projection, the official code before it;
  the two are equal in exact arithmetic (a linear map commutes with the scalar), so only rounding differs.
- transformers maps only ratios 0/4/128 from `compress_ratios`; the small-HCA config passes HF's
  `layer_types` + `compress_rates` explicitly (one HCA ratio per model, as HF allows).
- transformers has no MTP block (it drops `mtp.*`), so the MTP weights are not compared here.
- transformers' YaRN frequencies come from its own rope utilities; the test asserts they equal ours.
"""

from __future__ import annotations

import pytest
import torch

from runtime.checkpoint import load_checkpoint, write_checkpoint
from runtime.model.state import ModelState
from runtime.model.v4 import Transformer
from runtime.ops import reference_ops
from runtime.ops.norm_rope import rope_frequencies
from runtime.presets import preset

from transformers import DeepseekV4ForCausalLM  # noqa: E402

from runtime.bench.hf_reference import hf_config as _hf_config  # noqa: E402
from runtime.bench.hf_reference import hf_state_dict as _hf_state_dict  # noqa: E402

TOL = 1e-4

# (compress_ratios incl. the MTP entry, num_hash_layers, sequence length)
CONFIGS = {
    "swa-csa-hca128": ([0, 4, 128, 4, 0], 2, 640),     # > 600 tokens: 5 windows, 5 HCA entries, 160 CSA
    "csa-hca16-swa": ([4, 16, 0, 16, 0], 1, 300),      # smaller HCA ratio, CSA first, learned routing
}
def _ours_config(ratios, n_hash) -> dict:
    raw = preset("tiny")
    raw.update(num_hidden_layers=len(ratios) - 1, compress_ratios=ratios, num_hash_layers=n_hash)
    return raw


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    ratios, n_hash, seq = CONFIGS[name]
    raw = _ours_config(ratios, n_hash)
    ck = load_checkpoint(write_checkpoint(tmp_path / name, raw, seed=11), progress=False)
    ours = Transformer(ck.config, ck.tensors, ck.quantized, reference_ops("exact"))

    hf = DeepseekV4ForCausalLM(_hf_config(raw)).float().eval()
    sd = _hf_state_dict(ck.tensors, ck.config.num_layers, ck.config.n_routed_experts)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    hf_freqs = hf.model.rotary_emb.compress_inv_freq
    assert torch.allclose(hf_freqs, rope_frequencies(ck.config.rope_dim, ck.config.compress_rope_theta, ck.config.yarn),
                          rtol=1e-6)

    ids = torch.randint(2, raw["vocab_size"], (2, seq), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = hf(input_ids=ids, use_cache=False).logits.float()
        got = ours.forward(ids, ModelState(ck.config, 2).seqs)
    # the comparison is only meaningful if the indexer really selects: more entries than index_topk
    assert seq // 4 > 4 * ck.config.index_topk
    err = (got - ref).abs().max().item()
    print(f"{name}: max |dlogit| = {err:.3g}, logit std {ref.std():.3g}")
    assert err <= TOL, f"max |dlogit| = {err:.3g} (logit std {ref.std():.3g})"
