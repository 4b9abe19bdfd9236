"""Shape-true dry-run checkpoints (`make --sparse`): the real V4-Flash / V4-Pro inventories as sparse files.

The expected inventory below is written out by hand from spec v4-architecture.md §2.3 / §3.1 / §4 (itself read
from the model-info reports of the shipped checkpoints, [S4]) — literal shapes, not the runtime's formulas — so a
wrong formula in runtime/checkpoint/inventory.py or a wrong preset fails here. Totals (tensor counts, GiB,
parameter counts) are the figures [S4] reports for the official folders; the Flash shard byte sizes are those of
the official snapshot (deepseek-ai/DeepSeek-V4-Flash @ 60d8d70, as recorded by a public pinned-snapshot loader).
"""

import json
import math
import os
import struct

import pytest
from safetensors import safe_open

from runtime.checkpoint.__main__ import main as checkpoint_cli
from runtime.checkpoint.inventory import expected_tensors, scale_shape, stored_shape
from runtime.checkpoint.sparse import check_extents, disk_usage, write_sparse_checkpoint
from runtime.config import ModelConfig
from runtime.errors import CheckpointError
from runtime.number_formats import decode_e8m0
from runtime.plan.memory import MemoryPlan
from runtime.plan import plan, weight_bytes
from runtime.presets import preset
from runtime.profile import load_profile

FLASH_CSA = list(range(2, 43, 2))                       # spec §2.3
FLASH_HCA = list(range(3, 42, 2))
PRO_CSA = list(range(2, 61, 2))
PRO_HCA = [0, 1] + list(range(3, 60, 2))

# suffix -> (Flash (shape, scale shape), Pro (shape, scale shape), dtype, which layers). Spec §4, literally.
FP8, E8M0, BF16, F32, I8, I64 = "F8_E4M3", "F8_E8M0", "BF16", "F32", "I8", "I64"
LAYER_TABLE = {
    "attn_norm.weight": (([4096], None), ([7168], None), BF16, "all"),
    "ffn_norm.weight": (([4096], None), ([7168], None), BF16, "all"),
    "attn.wq_a.weight": (([1024, 4096], [8, 32]), ([1536, 7168], [12, 56]), FP8, "all"),
    "attn.q_norm.weight": (([1024], None), ([1536], None), BF16, "all"),
    "attn.wq_b.weight": (([32768, 1024], [256, 8]), ([65536, 1536], [512, 12]), FP8, "all"),
    "attn.wkv.weight": (([512, 4096], [4, 32]), ([512, 7168], [4, 56]), FP8, "all"),
    "attn.kv_norm.weight": (([512], None), ([512], None), BF16, "all"),
    "attn.wo_a.weight": (([8192, 4096], [64, 32]), ([16384, 4096], [128, 32]), FP8, "all"),
    "attn.wo_b.weight": (([4096, 8192], [32, 64]), ([7168, 16384], [56, 128]), FP8, "all"),
    "attn.attn_sink": (([64], None), ([128], None), F32, "all"),
    "attn.compressor.norm.weight": (([512], None), ([512], None), BF16, "csa+hca"),
    "attn.indexer.wq_b.weight": (([8192, 1024], [64, 8]), ([8192, 1536], [64, 12]), FP8, "csa"),
    "attn.indexer.weights_proj.weight": (([64, 4096], None), ([64, 7168], None), BF16, "csa"),
    "attn.indexer.compressor.wkv.weight": (([256, 4096], None), ([256, 7168], None), BF16, "csa"),
    "attn.indexer.compressor.wgate.weight": (([256, 4096], None), ([256, 7168], None), BF16, "csa"),
    "attn.indexer.compressor.ape": (([4, 256], None), ([4, 256], None), F32, "csa"),
    "attn.indexer.compressor.norm.weight": (([128], None), ([128], None), BF16, "csa"),
    "ffn.gate.weight": (([256, 4096], None), ([384, 7168], None), BF16, "all"),
    "ffn.gate.bias": (([256], None), ([384], None), F32, "learned"),
    "ffn.gate.tid2eid": (([129280, 6], None), ([129280, 6], None), I64, "hash"),
    "ffn.shared_experts.w1.weight": (([2048, 4096], [16, 32]), ([3072, 7168], [24, 56]), FP8, "all"),
    "ffn.shared_experts.w3.weight": (([2048, 4096], [16, 32]), ([3072, 7168], [24, 56]), FP8, "all"),
    "ffn.shared_experts.w2.weight": (([4096, 2048], [32, 16]), ([7168, 3072], [56, 24]), FP8, "all"),
    "hc_attn_fn": (([24, 16384], None), ([24, 28672], None), F32, "all"),
    "hc_ffn_fn": (([24, 16384], None), ([24, 28672], None), F32, "all"),
    "hc_attn_base": (([24], None), ([24], None), F32, "all"),
    "hc_ffn_base": (([24], None), ([24], None), F32, "all"),
    "hc_attn_scale": (([3], None), ([3], None), F32, "all"),
    "hc_ffn_scale": (([3], None), ([3], None), F32, "all"),
}
# The compressor's width depends on the layer kind: CSA 2 x 512 with a 4-row ape, HCA 1 x 512 with 128 rows.
COMPRESSOR = {"csa": (([1024, 4096], [4, 1024]), ([1024, 7168], [4, 1024])),
              "hca": (([512, 4096], [128, 512]), ([512, 7168], [128, 512]))}
# Routed experts, FP4 packed two per int8 byte, ue8m0 scale per 32 inputs: (w1 = w3, w2), each (weight, scale).
EXPERTS = {"flash": (([2048, 2048], [2048, 128]), ([4096, 1024], [4096, 64])),
           "pro": (([3072, 3584], [3072, 224]), ([7168, 1536], [7168, 96]))}
TOP = {"flash": {"embed.weight": ([129280, 4096], BF16), "head.weight": ([129280, 4096], BF16),
                 "norm.weight": ([4096], BF16), "hc_head_fn": ([4, 16384], F32), "hc_head_base": ([4], F32),
                 "hc_head_scale": ([1], F32)},
       "pro": {"embed.weight": ([129280, 7168], BF16), "head.weight": ([129280, 7168], BF16),
               "norm.weight": ([7168], BF16), "hc_head_fn": ([4, 28672], F32), "hc_head_base": ([4], F32),
               "hc_head_scale": ([1], F32)}}
MTP_EXTRA = {"flash": {"e_proj.weight": ([4096, 4096], FP8), "e_proj.scale": ([32, 32], E8M0),
                       "h_proj.weight": ([4096, 4096], FP8), "h_proj.scale": ([32, 32], E8M0),
                       "enorm.weight": ([4096], BF16), "hnorm.weight": ([4096], BF16)},
             "pro": {"e_proj.weight": ([7168, 7168], FP8), "e_proj.scale": ([56, 56], E8M0),
                     "h_proj.weight": ([7168, 7168], FP8), "h_proj.scale": ([56, 56], E8M0),
                     "enorm.weight": ([7168], BF16), "hnorm.weight": ([7168], BF16)}}
# [S4]: tensors, shards, GiB of tensor data, parameters (elements as stored).
TOTALS = {"flash": (69187, 46, 148.65, 158_069_433_298), "pro": (145116, 64, 805.32, 861_608_274_846)}
MODEL = {"flash": (43, 256, FLASH_CSA, FLASH_HCA), "pro": (61, 384, PRO_CSA, PRO_HCA)}
# Official V4-Flash shard files, bytes: embed, layer 0 (SWA, hash), layer 2 (CSA, hash), layer 3 (HCA),
# layer 4 (CSA), layer 10 (CSA), layer 11 (HCA), the head, the MTP block.
FLASH_SHARD_BYTES = {1: 1_059_061_856, 2: 3_566_321_192, 4: 3_596_229_272, 5: 3_568_768_976, 6: 3_590_024_776,
                     12: 3_590_026_352, 13: 3_568_770_544, 45: 1_059_332_516, 46: 3_593_956_092}


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    return {name: write_sparse_checkpoint(root / name, preset(name)) for name in ("flash", "pro")}


@pytest.fixture(scope="module")
def headers(sparse):
    return {name: _headers(folder) for name, folder in sparse.items()}


def _headers(folder):
    """name -> (dtype, shape, shard file), read from the raw safetensors headers."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            meta = json.loads(fh.read(n))
        out.update({k: (v["dtype"], v["shape"], f.name) for k, v in meta.items() if k != "__metadata__"})
    return out


def _expected(model: str) -> dict:
    """name -> (dtype, shape) for the whole checkpoint, from the tables above."""
    m = 0 if model == "flash" else 1
    n_layers, n_experts, csa, hca = MODEL[model]
    want = {k: (dt, shape) for k, (shape, dt) in TOP[model].items()}

    def block(prefix, layer, hash_layer):
        kind = "csa" if layer in csa else "hca" if layer in hca else "swa"
        for suffix, (*shapes, dt, where) in LAYER_TABLE.items():
            present = {"all": True, "csa+hca": kind != "swa", "csa": kind == "csa", "hash": hash_layer,
                       "learned": not hash_layer}[where]
            if present:
                shape, sshape = shapes[m]
                want[prefix + suffix] = (dt, shape)
                if sshape:
                    want[prefix + suffix.removesuffix(".weight") + ".scale"] = (E8M0, sshape)
        if kind != "swa":
            (wshape, ape) = COMPRESSOR[kind][m]
            want[prefix + "attn.compressor.wkv.weight"] = (BF16, wshape)
            want[prefix + "attn.compressor.wgate.weight"] = (BF16, wshape)
            want[prefix + "attn.compressor.ape"] = (F32, ape)
        (w13, s13), (w2, s2) = EXPERTS[model]
        for e in range(n_experts):
            for j, (w, s) in (("w1", (w13, s13)), ("w3", (w13, s13)), ("w2", (w2, s2))):
                want[f"{prefix}ffn.experts.{e}.{j}.weight"] = (I8, w)
                want[f"{prefix}ffn.experts.{e}.{j}.scale"] = (E8M0, s)

    for i in range(n_layers):
        block(f"layers.{i}.", i, hash_layer=i < 3)
    block("mtp.0.", -1, hash_layer=False)                 # the MTP block: ratio 0, learned routing
    want.update({f"mtp.0.{k}": (dt, shape) for k, (shape, dt) in {**TOP[model], **MTP_EXTRA[model]}.items()
                 if k not in ("embed.weight", "head.weight")})
    return want


@pytest.mark.parametrize("model", ["flash", "pro"])
def test_sparse_inventory_is_the_official_one(headers, model):
    got = headers[model]
    want = _expected(model)
    assert set(got) == set(want), (sorted(set(want) - set(got))[:5], sorted(set(got) - set(want))[:5])
    wrong = [n for n in want if (got[n][0], got[n][1]) != want[n]]
    assert not wrong, [(n, got[n][:2], want[n]) for n in wrong[:5]]
    n_tensors, n_shards, gib, params = TOTALS[model]
    assert len(got) == n_tensors
    shards = {v[2] for v in got.values()}
    assert shards == {f"model-{k:05d}-of-{n_shards:05d}.safetensors" for k in range(1, n_shards + 1)}
    itemsize = {FP8: 1, E8M0: 1, I8: 1, BF16: 2, F32: 4, I64: 8}
    numel = {n: 1 for n in got}
    for n, (_, shape, _) in got.items():
        for d in shape:
            numel[n] *= d
    assert sum(numel.values()) == params
    assert round(sum(numel[n] * itemsize[got[n][0]] for n in got) / 2 ** 30, 2) == gib


@pytest.mark.parametrize("model", ["flash", "pro"])
def test_sparse_shards_follow_the_official_layout(sparse, headers, model):
    got = headers[model]
    n_shards = TOTALS[model][1]
    shard_of = {n: int(v[2][6:11]) for n, v in got.items()}                # model-0000k-of-...
    assert shard_of["embed.weight"] == 1
    assert {shard_of[n] for n in TOP[model] if n != "embed.weight"} == {n_shards - 1}
    for n, k in shard_of.items():
        if n.startswith("layers."):
            assert k == int(n.split(".")[1]) + 2, n
        elif n.startswith("mtp."):
            assert k == n_shards, n
    index = json.loads((sparse[model] / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {n: v[2] for n, v in got.items()}
    if model == "flash":                       # the same bytes as the official files, header and all
        for k, size in FLASH_SHARD_BYTES.items():
            assert os.path.getsize(sparse[model] / f"model-{k:05d}-of-00046.safetensors") == size, k


@pytest.mark.parametrize("model", ["flash", "pro"])
def test_sparse_checkpoint_is_tiny_on_disk_and_reads_as_zeros(sparse, model):
    folder = sparse[model]
    apparent = sum(p.stat().st_size for p in folder.iterdir())
    assert apparent > TOTALS[model][2] * 2 ** 30
    assert disk_usage(folder) < 48 * 2 ** 20            # headers + index only (12.5 / 26.4 MiB measured)
    with safe_open(str(folder / "model-00002-of-{:05d}.safetensors".format(TOTALS[model][1])), "pt") as f:
        scale = f.get_tensor("layers.0.attn.wkv.scale")              # a zero ue8m0 byte: 2^-127, finite
        assert scale.shape == (4, 32 if model == "flash" else 56) and (decode_e8m0(scale) == 2.0 ** -127).all()
        assert (f.get_tensor("layers.0.attn.wkv.weight").float() == 0).all()
        assert (f.get_tensor("layers.0.attn_norm.weight") == 0).all()


@pytest.mark.parametrize("model", ["flash", "pro"])
def test_check_passes_and_the_memory_plan_matches_the_headers(sparse, model, capsys):
    folder = sparse[model]
    assert checkpoint_cli(["check", str(folder)]) == 0
    line = capsys.readouterr().out
    assert f"{TOTALS[model][0]} tensors in {TOTALS[model][1]} shards" in line and "data not read" in line
    cfg = ModelConfig.from_file(folder / "config.json")
    stored = check_extents(folder, sorted(p.name for p in folder.glob("*.safetensors")))
    # the headers' bytes are the official inventory's, counted here from its shapes and kinds alone
    size = {"fp8": 1, "fp4": 1, "bf16": 2, "f32": 4, "i64": 8}
    inventory = sum(math.prod(stored_shape(kind, shape)) * size[kind]
                    + math.prod(scale_shape(kind, shape) or (0,)) for shape, kind in
                    expected_tensors(cfg, cfg.expert_dtype or "fp4").values())
    assert "experts fp4" in line and stored == inventory
    # An H200 holds more than the checkpoint (the FP4 experts as bf16 stacks: runtime.plan.sizes), and the
    # memory plan counts what it holds.
    h200 = load_profile("nvidia-h200")
    held = weight_bytes(cfg, h200)
    assert held > 3 * stored
    mp = MemoryPlan(cfg, h200, held)
    assert f"weights {held / 2 ** 30:,.3f} GiB" in mp.format()
    assert mp.max_context(1) == 0                        # the weights alone exceed one H200 (141 GiB less 10%)
    p = plan(cfg, h200, context=65536, devices=8 if model == "flash" else 32)
    assert p["weights"] == held and p["fits"]


def test_a_truncated_sparse_shard_is_named_in_one_line(tmp_path, capsys):
    folder = write_sparse_checkpoint(tmp_path / "tiny", preset("tiny"))
    shard = sorted(folder.glob("*.safetensors"))[1]
    os.truncate(shard, shard.stat().st_size - 1)
    with pytest.raises(CheckpointError, match=f"shard .*{shard.name} is .* bytes but its header describes"):
        check_extents(folder, [shard.name])
    assert checkpoint_cli(["check", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_full_size_presets_need_sparse(tmp_path, capsys):
    assert checkpoint_cli(["make", "--preset", "flash", "--out", str(tmp_path / "f")]) == 2
    assert "--sparse" in capsys.readouterr().err


def test_the_runtime_loads_and_runs_a_sparse_checkpoint(tmp_path):
    """The tiny preset as a sparse checkpoint: the loader takes holes for data, the forward stays finite."""
    from runtime.api import Runtime

    assert checkpoint_cli(["make", "--preset", "tiny", "--sparse", "--out", str(tmp_path / "t")]) == 0
    rt = Runtime.load("cpu", checkpoint=tmp_path / "t", progress=False)
    logits = rt.forward([[0, 72, 105, 33]])
    assert logits.shape == (1, 4, 320) and bool(logits.isfinite().all())


def test_the_dry_run_bench_loads_runs_and_watches_memory(tmp_path):
    """runtime.bench.dry_run on the tiny sparse checkpoint: a child process loads it, prefills 8 tokens, decodes 2,
    and reports its anonymous memory; a run that passes the memory cap is stopped and says so."""
    from runtime.bench.dry_run import run

    folder = write_sparse_checkpoint(tmp_path / "t", preset("tiny"))
    res = run(folder, "cpu", max_anon_gib=8, timeout_s=300)
    assert "error" not in res, res.get("error")
    assert res["finite"] and len(res["decode_s"]) == 2 and res["prefill_s"] > 0 and res["load_s"] > 0
    assert 0 < res["anon_after_load_gib"] <= res["peak_anon_gib"] + 0.05 < 8
    stopped = run(folder, "cpu", max_anon_gib=0.02, timeout_s=300)      # below an interpreter's own footprint
    assert stopped["error"].startswith("stopped: anonymous memory passed 0.02 GiB")


def test_the_dry_run_refuses_an_unwritable_json_or_out_before_any_run(tmp_path, capsys):
    from runtime.bench.dry_run import main

    out = tmp_path / "missing" / "r.json"
    assert main(["--preset", "tiny", "--out", str(tmp_path / "t"), "--json", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --json {out}: folder {out.parent} does not exist; create it or name another file"]
    (tmp_path / "file").write_text("x")
    assert main(["--preset", "tiny", "--out", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --out {tmp_path / 'file'} exists and is not a folder; name a folder"]
    assert not (tmp_path / "t").exists()                   # nothing was written
