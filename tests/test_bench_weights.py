"""`python -m runtime.bench.weights` on the tiny model: the rows it reports (load time, held vs stored bytes,
anonymous growth, decode tokens/s, bandwidth on stored bytes) are present and consistent. No timing asserted."""

from __future__ import annotations

import json

from runtime.bench import weights as bw


def test_weight_bench_rows_on_tiny(tmp_path):
    out = tmp_path / "w.json"
    assert bw.main(["--models", "tiny", "--decode-steps", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    stored = next(r for r in rows if r["engine"] == "stored")
    assert stored["held_bytes"] <= 1.15 * stored["stored_bytes"]
    assert stored["mapped_bytes"] >= 0.9 * stored["held_bytes"]
    assert stored["dispatch_linear"] == "cpu.stored_native"
    assert stored["decode_tok_s"] > 0 and stored["effective_gbps"] > 0
    f32 = next(r for r in rows if r["engine"] == "f32")          # the former path: ~8x the stored bytes
    assert f32["held_bytes"] > 4 * f32["stored_bytes"]
    assert "held/stored" in bw.format_rows(rows)


def test_v4_width_preset_has_flash_layer_dimensions():
    from runtime.config import ModelConfig

    cfg = ModelConfig.from_hf(bw.v4_width_config(), source="test")
    assert (cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank) == \
        (4096, 64, 512, 1024, 8, 1024)
    assert (cfg.n_routed_experts, cfg.moe_inter_dim, cfg.experts_per_token, cfg.n_shared_experts) == (64, 2048, 6, 1)
    assert cfg.num_layers == 2 and cfg.is_csa(0) and cfg.ratio(1) == 128 and cfg.num_mtp == 0


def test_an_unwritable_json_is_refused_before_any_run(tmp_path, capsys):
    out = tmp_path / "missing" / "w.json"
    assert bw.main(["--models", "tiny", "--json", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --json {out}: folder {out.parent} does not exist; create it or name another file"]
