"""One op test for all backends: every registered implementation of every op, on every target available, against
the op's float32 reference on the shared shape cases (backends/check.py, backends/op_cases.py), with the
tolerances of backends/op_tolerances.yaml.

Targets: the CPU backend (its fast ops), the CPU TWINS of a CUDA GPU and of an Ascend NPU (tests/twins/backends.py:
NOT devices: CUDA's input constraints and torch-npu's documented semantics, computed on the CPU), and a real
GPU / NPU when this machine has one (`cuda`-marked; skipped with the probe's reason elsewhere). `python -m
backends.check --load tests.twins.backends` prints the same checks as a table.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch

from backends import check, get_backend, op_cases, use_backend
from runtime.dispatch import DispatchError, _REGISTRY, impl, implementations
from runtime.ops import OpTable
from runtime.ops.specs import BY_NAME, SPECS, TABLE_OPS
from tests.twins import backends as twins

twins.add_check_targets()
TOL = check.Tolerances.load()
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Small ops on one thread (on a shared machine, OpenMP barriers cost more than these kernels)."""
    yield


def _params():
    out = []
    for t, imp, dtype in check.plan():
        real_gpu = t.backend == "cuda" and not t.twin
        marks = [pytest.mark.cuda] if real_gpu else []
        name = f"{t.name}-unavailable" if imp is None else f"{t.name}-{imp.id}-{dtype}"
        out.append(pytest.param(t, imp, dtype, id=name, marks=marks))
    return out


@pytest.mark.parametrize("target,imp,dtype", _params())
def test_implementation_matches_the_reference(target, imp, dtype):
    if imp is None:
        pytest.skip(f"target {target.name}: {target.unavailable}")
    with target.setup():
        results = check.check_one(target, imp, dtype, TOL)
    if all(r.status == "skip" for r in results):
        pytest.skip(results[0].reason)
    bad = [f"{r.case}: err {r.err} > tol {r.tol} {r.reason}" for r in results if r.status != "pass"]
    assert not bad, f"{imp.id} on {target.name} ({dtype}): " + "; ".join(bad)
    assert {r.case for r in results} == set(op_cases.CASES)


def test_every_op_has_cases_a_reference_and_tolerances():
    for op in TABLE_OPS:
        assert BY_NAME[op].reference is not None
        for case in op_cases.CASES:
            for backend in ("cpu", "cuda", "ascend"):
                for dtype in op_cases.dtypes(op, backend):
                    if isinstance(TOL.get(op, "", dtype), str):     # the YAML names the test that checks it
                        assert "tests/" in TOL.get(op, "", dtype), (op, dtype)
                        continue
                    assert op_cases.build(op, case, dtype, backend), (op, case, dtype)
    for t, imp, dtype in check.plan():
        if imp is not None:
            TOL.get(imp.op, imp.id, dtype)               # raises on a missing entry
    # the twins cover the fused implementations they have capabilities for (none silently absent)
    planned = {(t.name, imp.id) for t, imp, _ in check.plan() if imp is not None}
    assert {("cpu", "cpu.union_flash"), ("cuda-twin", "cuda.sdpa_gathered"), ("cuda-twin", "cuda.grouped_mm"),
            ("ascend-twin", "ascend.npu_sparse_flash_attention"), ("ascend-twin", "ascend.npu_moe_gating_top_k"),
            ("ascend-twin", "ascend.npu_lightning_indexer")} <= planned


def test_shape_cases_cover_decode_prefill_batch_one_and_ragged():
    calls = op_cases.build("sparse_attention", "ragged", "float32", "cpu")
    assert [c[0][0].shape[0] for c in calls] == [7, 1, 19]                  # one call per sequence
    assert op_cases.build("hc_post", "decode-4", "float32", "cpu")[0][0][0].shape[0] == 4     # tokens batched
    idx = calls[2][0][2]
    assert (idx[2] == -1).all() and ((idx >= 0).sum(-1) > 0).any()          # an empty row, and padding
    for row in idx.tolist():                                                # valid entries distinct
        valid = [j for j in row if j >= 0]
        assert len(valid) == len(set(valid))
    x, _ = op_cases.build("linear", "decode-1", "fp8_block", "cuda")[0][0]
    from runtime.ops.numerics import quant_act_fp8
    assert torch.equal(quant_act_fp8(x), x)                                 # already what quant_act gives


def _target(name="testdev"):
    return check.Target(name, name, "cpu", frozenset({"fp32"}))


@pytest.fixture
def scratch_registry():
    saved = {k: dict(v) for k, v in _REGISTRY.items()}
    yield
    _REGISTRY.clear()
    _REGISTRY.update(saved)


def test_the_check_fails_a_wrong_implementation(scratch_registry):
    """Plausible mistakes fail their rows: a sink left out of the softmax, the inverse rotation ignored, a
    result in bf16, a kernel that raises; the right formula passes."""
    from runtime.ops import attention, norm_rope

    def no_sink(q, kv, idx, sink, scale, rnd=None):
        return attention.sparse_attention(q, kv, idx, torch.full_like(sink, -math.inf), scale)

    impl("sparse_attention", "testdev.no_sink", "testdev", no_sink)
    impl("apply_rope", "testdev.forward_only", "testdev", lambda x, c, s, inverse=False: norm_rope.apply_rope(x, c, s))
    impl("hc_post", "testdev.bf16_out", "testdev", lambda *a: BY_NAME["hc_post"].reference(*a).bfloat16())
    impl("rms_norm", "testdev.raises", "testdev", lambda *a: (_ for _ in ()).throw(RuntimeError("no kernel\nmore")))
    impl("rms_norm", "testdev.right", "testdev", lambda x, w, eps: x * torch.rsqrt((x * x).mean(-1, keepdim=True)
                                                                                + eps) * (1 if w is None else w))
    tol = dataclasses.replace(TOL, table={**TOL.table, "rms_norm": {**TOL.table["rms_norm"], "testdev.right":
                                                                    {"float32": 1e-6}}})
    ids = ("testdev.no_sink", "testdev.forward_only", "testdev.bf16_out", "testdev.raises", "testdev.right")
    results = [r for i in ids for r in check.check_one(_target(), implementations(_op_of(i))[i], "float32", tol)]
    rows = {r.impl: r for r in check.summarize(results)}
    assert rows["testdev.no_sink"].status == "FAIL" and rows["testdev.no_sink"].err > 1e-2
    assert rows["testdev.forward_only"].status == "FAIL" and rows["testdev.forward_only"].err > 0.1
    assert rows["testdev.bf16_out"].status == "FAIL" and math.isinf(rows["testdev.bf16_out"].err)
    assert rows["testdev.raises"].status == "FAIL" and "raised RuntimeError: no kernel" in rows["testdev.raises"].reason
    assert rows["testdev.right"].status == "pass" and rows["testdev.right"].err < 1e-6


def _op_of(impl_id: str) -> str:
    return next(op for op in TABLE_OPS if impl_id in implementations(op))


def test_a_target_skips_what_its_device_lacks(scratch_registry):
    impl("linear", "testdev.fp8", "testdev", lambda x, w: x @ w.T, requires=("fp8_gemm",))
    [row] = check.check_one(_target(), implementations("linear")["testdev.fp8"], "float32", TOL)
    assert row.status == "skip" and row.reason == "needs fp8_gemm (not on this device)"


def test_check_cli_prints_one_row_per_implementation_and_dtype(capsys):
    assert check.main(["--op", "rms_norm", "--load", "tests.twins.backends"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["op", "backend", "impl", "dtype", "max", "err", "tol", "result"]
    rows = {tuple(line.split()[:4]): line for line in lines[1:]}
    assert rows[("rms_norm", "cpu", "cpu.fused", "float32")].endswith("pass")
    assert rows[("rms_norm", "ascend-twin", "ascend.npu_rms_norm", "bf16")].endswith("pass")
    assert "skip (plain torch is the reference itself" in rows[("rms_norm", "cuda-twin", "cuda.torch", "float32")]
    assert check.main(["--load", "no_such_module_xyz"]) == 2


def test_the_op_table_and_the_onnx_rows_derive_from_the_specs():
    import backends.onnx  # noqa: F401

    assert [f.name for f in dataclasses.fields(OpTable)] == [s.name for s in SPECS] + ["numerics"]
    for spec in SPECS:
        if spec.is_numerics:
            assert spec.reference is None and implementations(spec.name) == {}
            continue
        onnx = [i for i in implementations(spec.name).values() if i.backend == "onnx"]
        assert [i.id for i in onnx] == [f"onnx:{spec.onnx or 'standard ops'}"]
    from export import custom_ops                        # the custom nodes the specs name exist in the exporter

    for spec in SPECS:
        if spec.onnx:
            domain, name = spec.onnx.split("::")
            assert domain == custom_ops.DOMAIN and hasattr(custom_ops, name), spec.onnx


def test_impl_refuses_what_is_not_a_table_op():
    with pytest.raises(DispatchError, match="'sparse_atention' is not an op; table ops: linear, group_linear"):
        impl("sparse_atention", "x.y", "x", lambda: None)
    with pytest.raises(DispatchError, match="'round_act' is set by the profile's numerics"):
        impl("round_act", "x.y", "x", lambda: None)


def test_backends_register_implementations_one_way():
    """Product code registers every implementation through `runtime.dispatch.impl` (no decorator, no tables
    of implementations bound in loops)."""
    # backends/__init__.py's `register(name, entry)` adds a *backend* to the registry, not an op implementation
    files = [f for f in [*ROOT.glob("backends/*.py"), *ROOT.glob("runtime/**/*.py")]
             if f.relative_to(ROOT).as_posix() != "backends/__init__.py"]
    bad = [f"{f.relative_to(ROOT)}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1)
           if re.search(r"(^|[^\w.])register\(|^(IMPLS|ADAPTERS)\b", line) and "def register(" not in line]
    assert not bad, bad


def test_use_backend_registers_a_backend_for_the_block():
    real = type(get_backend("cuda"))
    with use_backend("cuda", lambda: twins.CpuHostedCuda(80)):
        assert get_backend("cuda").probe().details == {"sm": 80}
        with use_backend("cuda", twins.CpuHostedCuda):
            assert get_backend("cuda").probe().details == {"sm": 90}
        assert get_backend("cuda").probe().details == {"sm": 80}
    assert type(get_backend("cuda")) is real


def test_an_implementation_without_a_tolerance_fails_its_row_saying_so():
    [row] = check.check_one(_target(), implementations("rms_norm")["cpu.fused"], "float32", check.Tolerances({}))
    assert row.status == "FAIL" and row.reason == "backends/op_tolerances.yaml has no tolerance for rms_norm / " \
        "cpu.fused / float32"
