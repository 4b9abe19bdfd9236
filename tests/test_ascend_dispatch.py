"""What the Ascend dispatch table shows is what runs: capabilities from the probe AND the profile, rejected
candidates with their reasons, and the one-time self-tests of the three adapters whose kernel semantics
torch-npu does not document (norm_type=2 gating, `sinks`, the indexer's order and -1 fill).

The device is a TWIN: `CpuHostedAscend` (tests/twins/backends.py) is the Ascend backend probing as an A2 / A3 / 310P while computing on
the CPU, and the torch-npu namespace is the CPU semantic twin (tests/twins/torch_npu_twin.py), or a copy of it
made deliberately wrong in one semantic. Nothing here ran on an NPU.
"""

import types

import pytest
import torch

from backends import ascend_ops, ascend_selftest
from runtime.dispatch import resolve
from runtime.profile import load_profile, parse_profile
from tests.twins import torch_npu_twin as twin
from tests.twins.backends import CpuHostedAscend, hosted_ascend

FAMILIES = {"ascend-910b": ("ascend-a2", 223), "ascend-910c": ("ascend-a3", 253), "ascend-310p": ("ascend-310p", 202)}
FUSED = {"moe_gate": "ascend.npu_moe_gating_top_k", "indexer_topk": "ascend.npu_lightning_indexer",
         "sparse_attention": "ascend.npu_sparse_flash_attention"}


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Each test has its own self-test cache (runtime.cache.cache_dir() honours DSV4RT_HOME)."""
    monkeypatch.setenv("DSV4RT_HOME", str(tmp_path / "home"))


def _namespace(**ops):
    """The twin's namespace with some ops replaced: a torch-npu build whose kernel means something else."""
    ns = types.SimpleNamespace(**{n: getattr(twin, n) for n in dir(twin) if not n.startswith("__")})
    ns.__version__ = twin.__version__
    for name, fn in ops.items():
        setattr(ns, name, fn)
    return ns


def _table(monkeypatch, profile="ascend-910b", npu=twin, prof=None):
    family, soc = FAMILIES[profile]
    monkeypatch.setattr(ascend_ops, "get_torch_npu", lambda: npu)
    backend = CpuHostedAscend(family, soc)
    prof = prof or load_profile(profile)
    info = backend.probe()
    return resolve(prof, "ascend", info.device, backend.capabilities(info), prof.numerics, False, False)


def _rows(table):
    return {r.op: r for r in table.rows}


@pytest.mark.parametrize("profile", ["ascend-910b", "ascend-910c"])
def test_a2_a3_choose_every_fused_adapter_after_its_self_test(monkeypatch, profile):
    t = _table(monkeypatch, profile)
    rows = _rows(t)
    for op, impl in FUSED.items():
        assert rows[op].impl == impl and rows[op].where == "ascend", rows[op]
        assert "self-test passed" in rows[op].reason and "ran at load" in rows[op].reason, rows[op].reason
    assert rows["apply_rope"].impl == "ascend.npu_rotary_mul"
    assert rows["clamped_swiglu"].impl == "ascend.npu_clipped_swiglu"
    assert "quant_matmul_max_n=65535" in rows["linear"].reason
    assert {"fused_indexer", "fused_rope_interleave"} <= t.capabilities and "fp8_gemm" not in t.capabilities
    # the measured errors are in the rows: the twin computes the reference's semantics
    assert "experts differ in 0/32 rows" in rows["moe_gate"].reason
    assert "0/10 rows differ" in rows["indexer_topk"].reason
    # a second load on the same device reads the cached outcome instead of running the tests again
    calls = []

    def counting(*a, **kw):
        calls.append(1)
        return twin.npu_moe_gating_top_k(*a, **kw)

    again = _rows(_table(monkeypatch, profile, _namespace(npu_moe_gating_top_k=counting)))
    assert not calls and "cached" in again["moe_gate"].reason and again["moe_gate"].impl == FUSED["moe_gate"]


def test_310p_runs_plain_torch_and_the_rows_say_which_kernels_were_rejected(monkeypatch):
    rows = _rows(_table(monkeypatch, "ascend-310p"))
    for op in ("apply_rope", "clamped_swiglu", *FUSED):
        assert rows[op].impl == "ascend.torch" and rows[op].why_not, rows[op]
    assert rows["apply_rope"].why_not == ("ascend.npu_rotary_mul needs fused_rope_interleave (neither the device "
                                          "probe nor profile ascend-310p has it)",)
    assert "ascend.npu_sparse_flash_attention needs fused_sparse_attention" in rows["sparse_attention"].why_not[0]
    assert rows["rms_norm"].impl == "ascend.npu_rms_norm"


def test_capabilities_are_the_probe_and_the_profile(monkeypatch):
    """The chip has the kernel but the profile does not declare it (and the reverse): neither runs it."""
    raw = dict(load_profile("ascend-910b").__dict__)
    prof = parse_profile({"name": "a2-no-indexer", "backend": "ascend", "device_family": "ascend-a2",
                          "memory_gib": {"value": 64, "source": "test", "confidence": "low"},
                          "bandwidth_gbps": {"value": 1600, "source": "test", "confidence": "low"},
                          "compute_dtype": "bfloat16", "kv_dtype": "bfloat16", "indexer_dtype": "int8",
                          "weight_format": "w8a8_int8", "act_quant": "int8_per_token",
                          "capabilities": sorted(raw["capabilities"] - {"fused_indexer"} | {"fused_mhc"}),
                          "kernel_limits": {"quant_matmul_max_n": 65535, "gating_max_experts": 2048}},
                         "a2-no-indexer.yaml")
    t = _table(monkeypatch, "ascend-910b", prof=prof)
    rows = _rows(t)
    assert "fused_mhc" not in t.capabilities and "fused_indexer" not in t.capabilities
    assert rows["indexer_topk"].impl == "ascend.torch"
    assert rows["indexer_topk"].why_not == ("ascend.npu_lightning_indexer needs fused_indexer (the device has it; "
                                            "profile a2-no-indexer does not declare it)",)
    # no sparse-attention kernel limit is needed; the gate's limit is declared and bound
    assert rows["moe_gate"].impl == FUSED["moe_gate"] and "gating_max_experts=2048" in rows["moe_gate"].reason
    prof2 = parse_profile({**{k: v for k, v in _raw_910b().items()}, "kernel_limits": {"quant_matmul_max_n": 4096}},
                          "no-gate-limit.yaml")
    rows = _rows(_table(monkeypatch, "ascend-910b", prof=prof2))
    assert rows["moe_gate"].impl == "ascend.torch" and "needs kernel_limits gating_max_experts declared in profile " \
        "ascend-910b" in rows["moe_gate"].why_not[0]


def _raw_910b():
    import yaml

    from runtime.profile import PROFILE_DIR

    return yaml.safe_load((PROFILE_DIR / "ascend-910b.yaml").read_text())


# ---- twins wrong in exactly the semantic the docs leave open ----
def _gate_softplus_without_sqrt(x, k, **kw):
    """norm_type=2 read as softplus (the docs' name for it) instead of sqrt(softplus)."""
    if kw.get("norm_type") == 2:
        return twin.npu_moe_gating_top_k(torch.log(torch.expm1(torch.nn.functional.softplus(x.float()) ** 2)),
                                         k, **kw)
    return twin.npu_moe_gating_top_k(x, k, **kw)


def _sfa_without_sinks(*a, sinks=None, **kw):
    return twin.npu_sparse_flash_attention(*a, sinks=None, **kw)


def _indexer_in_index_order(*a, **kw):
    """Returns the selected keys in ascending index order, not best first."""
    idx, val = twin.npu_lightning_indexer(*a, **kw)
    srt = torch.where(idx < 0, torch.iinfo(torch.int32).max, idx).sort(-1).values
    return torch.where(srt == torch.iinfo(torch.int32).max, -1, srt).to(torch.int32), val


def _indexer_pads_with_zero(*a, **kw):
    idx, val = twin.npu_lightning_indexer(*a, **kw)
    return idx.clamp(min=0), val


@pytest.mark.parametrize("op,name,wrong,measured", [
    ("moe_gate", "npu_moe_gating_top_k", _gate_softplus_without_sqrt, "max |w - ref|"),
    ("sparse_attention", "npu_sparse_flash_attention", _sfa_without_sinks, "max |out - ref| / max |ref|"),
    ("indexer_topk", "npu_lightning_indexer", _indexer_in_index_order, "rows differ from the reference"),
    ("indexer_topk", "npu_lightning_indexer", _indexer_pads_with_zero, "rows differ from the reference"),
])
def test_a_kernel_with_other_semantics_is_rejected_with_its_measured_error(monkeypatch, op, name, wrong, measured):
    t = _table(monkeypatch, "ascend-910b", _namespace(**{name: wrong}))
    row = _rows(t)[op]
    assert row.impl == "ascend.torch" and row.where == "ascend"                       # the next candidate runs
    assert len(row.why_not) == 1 and row.why_not[0].startswith(f"{FUSED[op]}: self-test FAILED: ")
    assert measured in row.why_not[0]
    assert f"rejected {FUSED[op]}: self-test FAILED" in t.format()            # --show-dispatch shows it
    others = [o for o in FUSED if o != op]
    assert all(_rows(t)[o].impl == FUSED[o] for o in others)


def test_measured_errors_of_the_wrong_twins_are_far_over_the_limits():
    """The self-tests separate right from wrong by a wide margin (measured on the twins)."""
    gate = lambda ns: ascend_selftest.check_moe_gate(lambda *a: ascend_ops.moe_gate(ns, *a), "cpu")   # noqa: E731
    ok, text = gate(twin)
    assert ok and ascend_selftest.gate_margin() > 0.02, text               # no near-ties at the k-th expert
    assert not gate(_namespace(npu_moe_gating_top_k=_gate_softplus_without_sqrt))[0]
    sfa = lambda ns: ascend_selftest.check_sparse_attention(                                            # noqa: E731
        lambda *a: ascend_ops.sparse_attention(ns, *a), "cpu")
    ok, text = sfa(twin)
    good = float(text.split("max |out - ref| / max |ref| ")[1].split(" ")[0])
    bad = float(sfa(_namespace(npu_sparse_flash_attention=_sfa_without_sinks))[1].split("|ref| ")[1].split(" ")[0])
    assert ok and good < 1e-2 and bad > 10 * ascend_selftest.SFA_TOL, (good, bad)


def test_a_kernel_that_raises_is_rejected_not_run(monkeypatch):
    def missing(*a, **kw):
        raise RuntimeError("aclnnLightningIndexer not in libopapi.so\nsecond line")

    row = _rows(_table(monkeypatch, "ascend-910b", _namespace(npu_lightning_indexer=missing)))["indexer_topk"]
    assert row.impl == "ascend.torch"
    assert "self-test FAILED: raised RuntimeError: aclnnLightningIndexer not in libopapi.so [" in row.why_not[0]


def test_show_dispatch_on_an_a2_twin(monkeypatch, tiny_ckpt, capsys):
    """`--show-dispatch` on an A2 twin probe: each fused adapter chosen after its self-test. The tiny model's
    head dim (64) is not the sparse-attention kernel's 512, so the run then stops with one line saying so."""
    from runtime import run

    with hosted_ascend("ascend-a2", 223, twin):
        code = run.main(["--profile", "ascend-910b", "--show-dispatch", "--checkpoint", str(tiny_ckpt),
                         "--max-new-tokens", "1", "--prompt", "Hi"])
    err = capsys.readouterr().err
    with capsys.disabled():
        print("\n" + err)
    assert "# dispatch for profile ascend-910b on ascend (cpu); numerics" in err
    for op, impl in FUSED.items():
        assert any(line.split()[1:3] == [op, impl] and "self-test passed" in line for line in err.splitlines()), op
    assert code == 2 and err.strip().splitlines()[-1].count("npu_sparse_flash_attention takes head dim 512") == 1


def test_the_self_test_cache_is_per_device_and_survives_a_corrupt_file(monkeypatch, tmp_path):
    _table(monkeypatch)                                                   # runs and caches the three tests
    path = tmp_path / "home" / "ascend-selftest.json"
    import json

    keys = sorted(json.loads(path.read_text()))
    assert len(keys) == 3 and all("CPU twin of torch-npu (not an NPU), torch-npu 2.14.0+cpu-twin" in k for k in keys)
    other = _namespace()
    other.npu = types.SimpleNamespace(get_device_name=lambda device=None: "another twin")
    assert "ran at load" in _rows(_table(monkeypatch, npu=other))["moe_gate"].reason     # a new device: tested
    assert "cached" in _rows(_table(monkeypatch))["moe_gate"].reason
    path.write_text("{not json")                                          # a corrupt cache is ignored, rewritten
    assert "ran at load" in _rows(_table(monkeypatch))["moe_gate"].reason
    assert len(json.loads(path.read_text())) == 3
