"""Hardware profiles (validation), dispatch resolution (strict / fallback / preferences) and backends."""

import copy
import os
import subprocess
import sys

import pytest
import yaml

from runtime.dispatch import DispatchError, _REGISTRY, impl, resolve
from runtime.ops.numerics import MODES
from runtime.profile import PROFILE_DIR, ProfileError, load_profile, parse_profile, shipped_profiles

SHIPPED = ["ascend-310p", "ascend-910b", "ascend-910c", "ascend-950", "cpu", "cpu-bf16", "nvidia-a100",
           "nvidia-h100", "nvidia-h200", "onnx-cann", "onnx-cpu", "onnx-cuda", "rtx-4090"]


def test_every_shipped_profile_loads():
    assert shipped_profiles() == SHIPPED
    for name in SHIPPED:
        p = load_profile(name)
        assert p.name == name and p.memory_gib.value > 0 and p.bandwidth_gbps.source
    assert load_profile("cpu").numerics == MODES["exact"]
    assert load_profile("nvidia-h100").numerics == MODES["official"]
    assert not load_profile("ascend-910b").supports("fp8_gemm")
    assert load_profile("ascend-310p").compute_dtype == "float16"
    p = load_profile(PROFILE_DIR / "cpu-bf16.yaml")
    assert load_profile(p) is p


def _raw(name="ascend-910b"):
    return yaml.safe_load((PROFILE_DIR / f"{name}.yaml").read_text())


@pytest.mark.parametrize("edit,msg", [
    (lambda r: r.update(turbo=True), "key 'turbo' is not a profile key; allowed: act_quant"),
    (lambda r: r.update(compute_dtype=16), "key 'compute_dtype' must be a string"),
    (lambda r: r["memory_gib"].update(value=-64), "key 'memory_gib.value' must be a positive number"),
    (lambda r: r.update(backend="tpu"), "key 'backend' is 'tpu'; allowed: cpu, cuda, ascend"),
    (lambda r: r.update(weight_format="fp8_block"), "key 'weight_format' is 'fp8_block' but the chip lacks capability 'fp8_gemm'"),
    (lambda r: r.update(kv_dtype="fp8_e4m3"), "key 'kv_dtype' is 'fp8_e4m3' but the chip lacks capability 'fp8_gemm'"),
    (lambda r: r.pop("capabilities"), "key 'capabilities' is missing"),
    (lambda r: r["bandwidth_gbps"].update(confidence="sure"), "bandwidth_gbps.confidence' must be one of high"),
    (lambda r: r.update(kernel_limits={"window": 0}), "kernel_limits' must map names to positive integers"),
    (lambda r: r.update(capabilities=["warp_drive"]), "capabilities' must be a list drawn from"),
])
def test_bad_profiles(edit, msg):
    raw = _raw()
    edit(raw)
    with pytest.raises(ProfileError) as e:
        parse_profile(raw, "bad.yaml")
    assert str(e.value).startswith("bad.yaml: ") and msg in str(e.value)


def test_profile_file_errors(tmp_path):
    with pytest.raises(ProfileError, match="unknown profile 'h900'; shipped: ascend-310p"):
        load_profile("h900")
    (tmp_path / "x.yaml").write_text("name: [unclosed")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(tmp_path / "x.yaml")
    (tmp_path / "y.yaml").write_text("!!python/object/apply:os.system ['true']")  # safe_load refuses objects
    with pytest.raises(ProfileError):
        load_profile(tmp_path / "y.yaml")


def test_cpu_dispatch_is_fast_ops_then_the_reference():
    import backends.cpu  # noqa: F401  (registers the fast CPU implementations)

    t = resolve(load_profile("cpu"), "cpu", "cpu", frozenset({"fp32"}), MODES["exact"], False, False)
    impl = {r.op: r.impl for r in t.rows}
    assert impl["sparse_attention"] == "cpu.union_flash" and impl["indexer_topk"] == "cpu.topk_exact_ties"
    # without the native kernels (no compiler): the torch tile path on stored formats, shown in the table
    assert impl["linear"] == "cpu.stored_torch_tiles" and impl["compress_pool"].startswith("reference:")
    assert all(r.where == "cpu" for r in t.rows)
    n = resolve(load_profile("cpu"), "cpu", "cpu", frozenset({"fp32", "native_kernels"}), MODES["exact"], False, False)
    assert {r.op: r.impl for r in n.rows}["linear"] == "cpu.stored_native"
    assert t.as_dict()["ops"][0]["op"] == "linear"
    # emulation (and the parity/ground-truth runs that use it) is the float32 reference for every op
    e = resolve(load_profile("cpu"), "cpu", "cpu", frozenset({"fp32"}), MODES["exact"], True, False)
    assert all(r.impl.startswith(("reference:", "numerics:")) for r in e.rows)
    assert "sparse_attention  reference:attention.sparse_attention" in e.format()


def test_cuda_dispatch_table():
    import backends.cuda  # noqa: F401  (registers the CUDA implementations)

    prof = load_profile("nvidia-h100")
    t = resolve(prof, "cuda", "cuda:0", frozenset({"fp32", "bf16", "fp8_gemm"}), prof.numerics, False, False)
    impl = {r.op: r.impl for r in t.rows}
    assert impl["linear"] == "cuda.scaled_mm_fp8+bf16_gemm" and impl["sparse_attention"] == "cuda.sdpa_gathered"
    assert impl["routed_experts"] == "cuda.grouped_mm" and impl["hc_pre"] == "cuda.torch"
    assert all(r.where == "cuda" for r in t.rows)


def test_strict_dispatch_refuses_and_fallback_is_recorded():
    raw = _raw("nvidia-h100")
    raw["prefer"] = {"sparse_attention": ["cuda.flash_sparse_v9"]}
    prof = parse_profile(raw, "pref.yaml")
    caps = frozenset({"fp32", "bf16", "fp8_gemm"})
    with pytest.raises(DispatchError, match="profile nvidia-h100: op sparse_attention has no usable cuda "
                                            "implementation .cuda.flash_sparse_v9 is not in this build"):
        resolve(prof, "cuda", "cuda:0", caps, prof.numerics, False, False)
    t = resolve(prof, "cuda", "cuda:0", caps, prof.numerics, False, True)
    row = next(r for r in t.rows if r.op == "sparse_attention")
    assert row.reason.startswith("fallback") and row.where == "cpu" and row.impl.startswith("reference:")


def test_registered_implementation_is_chosen_only_with_its_capability():
    saved = copy.deepcopy({k: dict(v) for k, v in _REGISTRY.items()})
    try:
        impl("linear", "testdev.fp8_scaled_mm", "testdev", lambda x, w: x @ w.T, requires=("fp8_gemm",))
        prof = load_profile("nvidia-h100")
        t = resolve(prof, "testdev", "testdev:0", frozenset({"fp8_gemm", "bf16"}), prof.numerics, False, True)
        assert t.rows[0].impl == "testdev.fp8_scaled_mm" and t.rows[0].where == "testdev"
        t = resolve(prof, "testdev", "testdev:0", frozenset({"bf16"}), prof.numerics, False, True)
        assert t.rows[0].impl.startswith("reference") and "needs fp8_gemm" in t.rows[0].reason
        with pytest.raises(DispatchError, match="op linear has no usable testdev implementation"):
            resolve(prof, "testdev", "testdev:0", frozenset({"bf16"}), prof.numerics, False, False)
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)


def test_profile_preference_for_a_missing_implementation():
    raw = _raw("cpu")
    raw["prefer"] = {"sparse_attention": ["cpu.flash_sparse"]}
    prof = parse_profile(raw, "pref.yaml")
    with pytest.raises(DispatchError, match="op sparse_attention .*cpu.flash_sparse is not in this build"):
        resolve(prof, "cpu", "cpu", frozenset(), MODES["exact"], False, False)


def _run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "runtime.run", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_cli_unavailable_backends_exit_2_with_one_line():
    r = _run("--backend", "ascend")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "torch-npu is not installed" in r.stderr and "CANN" in r.stderr and "--emulate" in r.stderr
    # the GPU hidden from the child (CUDA_VISIBLE_DEVICES=""), so the cuda backend is unavailable on a machine
    # with an NVIDIA GPU too: the same refusal everywhere, never a run that happens to find a device
    r = _run("--profile", "nvidia-a100", env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: backend 'cuda' unavailable: torch.cuda.is_available() is False"), r.stderr


def test_cli_emulate_shows_dispatch(tiny_ckpt):
    r = _run("--profile", "ascend-910b", "--emulate", "--show-dispatch", "--checkpoint", str(tiny_ckpt),
             "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
    assert "EMULATED on CPU" in r.stderr and "quant_act         numerics:int8_per_token" in r.stderr


def test_imports_have_no_device_side_effects():
    code = ("import sys, runtime, runtime.api, runtime.run, backends, backends.ascend, backends.cuda; "
            "assert 'torch_npu' not in sys.modules, 'torch_npu imported at import time'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("op,what", [("sparse_atention", "which is not an op"),
                                     ("round_act", "which is set by the profile's numerics, not by prefer")])
def test_prefer_naming_an_unknown_op_is_refused(op, what):
    raw = _raw("cpu")
    raw["prefer"] = {op: ["cpu.union_flash"]}
    prof = parse_profile(raw, "pref.yaml")           # parsing does not know the op names: resolve does
    with pytest.raises(DispatchError) as e:
        resolve(prof, "cpu", "cpu", frozenset({"fp32"}), MODES["exact"], False, True)
    msg = str(e.value)
    assert msg.startswith(f"profile cpu: prefer names {op!r}, {what}; ops: linear, group_linear,") and "\n" not in msg


def test_capabilities_are_the_probe_intersected_with_the_profile():
    from runtime.dispatch import effective_capabilities

    prof = load_profile("ascend-910b")
    probed = frozenset({"fp32", "bf16", "fused_indexer", "fused_mhc"})
    assert effective_capabilities(prof, probed) == {"fp32", "bf16", "fused_indexer"}
    t = resolve(prof, "cpu", "cpu", probed, prof.numerics, False, True)
    assert t.capabilities == {"fp32", "bf16", "fused_indexer"} and t.as_dict()["kernel_limits"]["window"] == 128
