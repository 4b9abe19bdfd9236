"""Every torch-npu call our Ascend adapters make, held against the real torch-npu 2.14.0 wheel.

The wheel is downloaded once (`pip download --no-deps torch-npu==2.14.0`, cached in ~/.cache/dsv4rt/wheels or
$DSV4RT_WHEEL_CACHE) and never installed or imported (installed without CANN it breaks `import torch`). From the
zip we read three files:
- `torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml`: the op schemas torch-npu registers. Each op our
  adapters call is defined from its real schema in a scratch torch.library namespace, so every call goes through
  torch's own schema binding (positional vs keyword-only, names, types, defaults, the returned tuple);
- `torch_npu/op_plugin/meta/_meta_registrations.py`: the meta (shape) functions, executed with stand-ins for the
  torch-npu imports (the registration decorator collects them; `get_cann_version` answers 9.2.0); each call runs
  the op's meta function on meta copies of its arguments (its torch._check shape checks) and the CPU twin's
  output must have the shapes and dtypes the meta function gives;
- `torch_npu/_op_plugin_docs.py`: the docstrings, for the product lists our capabilities follow and for the three
  semantics the docs leave open (the adapters the self-tests guard).
The values come from the CPU twin (tests/twins): THIS IS NOT AN NPU. It runs at tiny and V4-Flash sizes.
"""

import builtins
import os
import re
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils._pytree import tree_leaves, tree_map

from backends import ascend_ops, ascend_selftest
from backends.ascend import FAMILY_CAPABILITIES
from tests.twins import torch_npu_twin as twin

VERSION = "2.14.0"
CACHE = Path(os.environ.get("DSV4RT_WHEEL_CACHE", Path.home() / ".cache" / "dsv4rt" / "wheels"))
NS = "dsv4rt_npu_wheel"


def _wheel() -> Path:
    found = sorted(CACHE.glob(f"torch_npu-{VERSION}-*.whl"))
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"torch-npu=={VERSION}", "-d",
                            str(CACHE), "--only-binary=:all:", "--python-version", "3.11", "--platform",
                            "manylinux_2_28_x86_64", "-q"], capture_output=True, text=True, timeout=900)
        found = sorted(CACHE.glob(f"torch_npu-{VERSION}-*.whl"))
        if not found:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"torch-npu {VERSION} wheel not in {CACHE} and pip could not download it ({last}): "
                        "the schema test needs the registry once")
    return found[-1]


def _load_meta(src: str) -> dict:
    """Execute _meta_registrations.py with stand-ins for its torch-npu imports; -> op name -> meta function."""
    found = {}

    class _Lib:                                   # torch.library.Library stand-in: registers nothing
        def __init__(self, *a, **k):
            pass

    def impl(_lib, name, *a, **k):
        def deco(fn):
            found.setdefault(name, fn)
            return fn
        return deco

    class _Anything:                              # torch.ops.npu.* (the npu ops do not exist here)
        def __getattr__(self, name):
            return _Anything()

    class _Torch(types.ModuleType):
        ops = _Anything()

        def __getattr__(self, name):
            return getattr(torch, name)

    class _ErrCode:
        def __getattr__(self, name):
            return name

    # torch-npu's own dtypes are enum numbers (spec ascend.md §1.2), compared against x1_dtype-style arguments
    npu = types.SimpleNamespace(ErrCode=_ErrCode(), ops_error=lambda *a: "", get_cann_version=lambda: "9.2.0",
                                get_soc_version=lambda: 253, int4=285, hifloat8=290, float8_e8m0fnu=293,
                                float4_e2m1fn_x2=296, float4_e1m2fn_x2=297)
    proxy, real_import = _Torch("torch"), builtins.__import__

    def fake_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "torch" and not fromlist:
            return proxy
        if name == "torch.library" and fromlist:
            return types.SimpleNamespace(Library=_Lib, impl=impl)
        if name == "torch.fx.node" and fromlist:
            return types.SimpleNamespace(has_side_effect=lambda *a: None)
        if name == "torch_npu" or name.startswith("torch_npu."):
            return npu
        return real_import(name, globals, locals, fromlist, level)

    env = {"__builtins__": {**vars(builtins), "__import__": fake_import}, "__name__": "npu_meta_standin"}
    exec(compile(src, "torch_npu/op_plugin/meta/_meta_registrations.py", "exec"), env)
    return found, env["TORCH_DTYPE_ENUM_VALUE_TO_SCALAR_TYPE_MAP"]


@pytest.fixture(scope="module")
def wheel():
    with zipfile.ZipFile(_wheel()) as z:
        spec = yaml.safe_load(z.read("torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"))
        meta_src = z.read("torch_npu/op_plugin/meta/_meta_registrations.py").decode("utf-8")
        docs_src = z.read("torch_npu/_op_plugin_docs.py").decode("utf-8")
    funcs = [e["func"] for sec in spec.values() if isinstance(sec, list) for e in sec
             if isinstance(e, dict) and "func" in e]
    schemas = {f.split("(", 1)[0]: f for f in funcs}           # overloads have "name.overload" keys
    meta, dtypes = _load_meta(meta_src)
    docs = dict(re.findall(r'_add_torch_npu_docstr\(\s*"(\w+)",\s*"""(.*?)"""', docs_src, re.S))
    return types.SimpleNamespace(schemas=schemas, meta=meta, dtypes=dtypes, docs=docs)


def _called_ops() -> set[str]:
    """Every torch-npu op backends/ascend_ops.py calls (read from the source, so a new call cannot escape)."""
    return set(re.findall(r"\bnpu\.(npu_\w+)\(", Path(ascend_ops.__file__).read_text()))


def _to_meta(v):
    return v.to("meta") if isinstance(v, torch.Tensor) else v


def _check_against_meta(name, expect, got):
    want, have = tree_leaves(expect), tree_leaves(got)
    assert len(want) == len(have), f"{name}: meta gives {len(want)} outputs, the twin {len(have)}"
    for i, (w, h) in enumerate(zip(want, have)):
        assert tuple(w.shape) == tuple(h.shape) and w.dtype == h.dtype, \
            f"{name} output {i}: meta {tuple(w.shape)} {w.dtype}, twin {tuple(h.shape)} {h.dtype}"


@pytest.fixture(scope="module")
def schema_npu(wheel):
    """A torch-npu namespace whose ops are defined from the wheel's schemas; each call is bound by torch, runs
    the wheel's meta function and the CPU twin, and checks the twin's outputs against the meta's."""
    lib = torch.library.Library(NS, "DEF")
    calls = []
    ops = {}
    for name in sorted(_called_ops()):
        assert name in wheel.schemas, f"{name}: no such op in torch-npu {VERSION}"
        lib.define(wheel.schemas[name])
        meta, fn = wheel.meta.get(name), getattr(twin, name)

        def kernel(*args, _name=name, _meta=meta, _fn=fn, **kwargs):
            calls.append(_name)
            expect = None if _meta is None else _meta(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))
            # `int? output_dtype` and friends arrive as ScalarType numbers, as they do on the device
            kw = {k: wheel.dtypes[v] if k.endswith("dtype") and isinstance(v, int) else v for k, v in kwargs.items()}
            out = _fn(*args, **kw)
            if expect is not None:
                _check_against_meta(_name, expect, out)
            return out

        lib.impl(name, kernel, "CompositeExplicitAutograd")
        ops[name] = getattr(getattr(torch.ops, NS), name)
    ns = types.SimpleNamespace(**ops, get_npu_format=twin.get_npu_format, npu=twin.npu,
                               __version__=twin.__version__, calls=calls)
    yield ns
    lib._destroy()


def _g():
    return torch.Generator().manual_seed(0)


def _bf16(g, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).bfloat16().float()


# (d model, heads, head dim, rope dim, indexer keys, top-k, experts, expert inter, q_lora): tiny / V4-Flash
SIZES = {"tiny": dict(d=64, H=4, rope=16, N=300, k=16, E=16, inter=32, q_lora=128, T=6, n_exp=3),
         "flash": dict(d=4096, H=64, rope=64, N=1024, k=512, E=256, inter=2048, q_lora=1024, T=4, n_exp=2)}


@pytest.mark.parametrize("size", list(SIZES))
def test_every_adapter_call_binds_the_wheel_schema_and_meta(schema_npu, wheel, size):
    s, g, npu = SIZES[size], _g(), schema_npu
    npu.calls.clear()
    T, H = s["T"], s["H"]
    # norm: the weighted [T, d] norm and the weightless per-head query norm
    assert ascend_ops.rms_norm(npu, torch.randn(T, s["d"], generator=g), torch.randn(s["d"], generator=g),
                               1e-6).shape == (T, s["d"])
    assert ascend_ops.rms_norm(npu, torch.randn(T, H, 512, generator=g), None, 1e-6).shape == (T, H, 512)
    # interleaved RoPE on the trailing rope dims of every head (a strided slice of the head)
    x = torch.randn(T, H, 512, generator=g)[..., -s["rope"]:]
    ang = torch.randn(T, 1, s["rope"] // 2, generator=g)
    assert ascend_ops.apply_rope(npu, x, ang.cos(), ang.sin(), inverse=True).shape == x.shape
    # clipped SwiGLU on the experts' rows
    gu = torch.randn(2, T * 6, s["inter"], generator=g)
    assert ascend_ops.clamped_swiglu(npu, gu[0], gu[1], 10.0).shape == (T * 6, s["inter"])
    # W8A8 linear: wq_b (q_lora -> H * 512), ND and FRACTAL_NZ weights; V4-Pro's N = 65536 is split
    w = torch.randn(H * 512, s["q_lora"], generator=g) / 32
    xa = torch.randn(T, s["q_lora"], generator=g)
    w_kn, scale = ascend_ops.prepare_w8a8(w)
    assert ascend_ops.linear_w8a8(npu, xa, w_kn, scale).shape == (T, H * 512)
    w_nz, scale_nz = ascend_ops.prepare_w8a8_nz(npu, w)
    assert ascend_ops.linear_w8a8(npu, xa, w_nz, scale_nz).shape == (T, H * 512)
    wp, sp = ascend_ops.prepare_w8a8(torch.randn(65536, 64, generator=g))
    assert ascend_ops.linear_w8a8(npu, torch.randn(2, 64, generator=g), wp, sp).shape == (2, 65536)
    # MoE gate: learned (bias) and hash routing
    xg, gw = torch.randn(T, s["d"], generator=g), torch.randn(s["E"], s["d"], generator=g) / 8
    idx, wt = ascend_ops.moe_gate(npu, xg, gw, torch.randn(s["E"], generator=g) / 8, None, 6, 2.5)
    assert idx.shape == wt.shape == (T, 6)
    hashed = torch.stack([torch.randperm(s["E"], generator=g)[:6] for _ in range(T)])
    assert torch.equal(ascend_ops.moe_gate(npu, xg, gw, None, hashed, 6, 1.5)[0], hashed)
    # lightning indexer: 64 heads x 128, paged keys, one batch per visible count
    q, wi, keys = _bf16(g, T, 64, 128), _bf16(g, T, 64, scale=0.1), _bf16(g, s["N"], 128)
    visible = torch.linspace(0, s["N"], T).long()
    assert ascend_ops.indexer_topk(npu, q, wi, keys, visible, s["k"]).shape == (T, s["k"])
    # sparse attention with sinks: head dim 512, top-k compressed entries + a 128-token window
    kv = _bf16(g, s["N"], 512)
    sidx = torch.randint(0, s["N"], (T, s["k"] + 128), generator=g)
    sidx[torch.rand(sidx.shape, generator=g) < 0.2] = -1
    out = ascend_ops.sparse_attention(npu, _bf16(g, T, H, 512), kv, sidx, torch.randn(H, generator=g), 512 ** -0.5)
    assert out.shape == (T, H, 512)
    # routed experts: two grouped matmuls with counts group lists
    experts = [(torch.randn(s["inter"], s["d"], generator=g) / 8, torch.randn(s["d"], s["inter"], generator=g) / 8,
                torch.randn(s["inter"], s["d"], generator=g) / 8) for _ in range(s["n_exp"])]
    w13, w2 = ascend_ops.prepare_expert_weights(experts)
    ridx = torch.randint(0, s["n_exp"], (T, 2), generator=g)
    y = ascend_ops.expert_ffn(npu, torch.randn(T, s["d"], generator=g), ridx, torch.rand(T, 2, generator=g), w13, w2,
                              10.0)
    assert y.shape == (T, s["d"])
    assert set(npu.calls) == _called_ops(), "an adapter call was not exercised against the wheel"
    assert _called_ops() - set(wheel.meta) == {"npu_format_cast"}      # the only one without a meta function


def test_the_meta_functions_catch_a_wrong_call(schema_npu):
    """The binding is real: a wrong keyword or a wrong layout is refused by torch's schema or the meta checks."""
    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="epsilon|eps"):
        schema_npu.npu_rms_norm(x, torch.ones(16), eps=1e-6)                  # the schema says epsilon
    with pytest.raises(RuntimeError):
        schema_npu.npu_moe_gating_top_k(x, 2, None)                           # bias is keyword-only
    q = torch.randn(2, 8, 512).bfloat16()
    with pytest.raises(RuntimeError, match="TND, the query dimension must be 3"):
        schema_npu.npu_sparse_flash_attention(q[None], q[:, :1], q[:, :1], torch.zeros(2, 1, 4, dtype=torch.int32),
                                              0.1, layout_query="TND", layout_kv="TND")


def test_capabilities_follow_the_docs_product_lists(wheel):
    swiglu = wheel.docs["npu_clipped_swiglu"].split("支持的型号:")[1].split("调用示例")[0]
    assert re.findall(r"Atlas \w+", swiglu) == ["Atlas A2", "Atlas A3"]
    rope = wheel.docs["npu_rotary_mul"].split("interleave模式：")[-1].split("jit_compile=True")[0]   # the constraints
    assert "支持Atlas A2训练系列产品，Atlas A3训练系列产品" in rope and "推理系列" not in rope
    for cap in ("fused_clipped_swiglu", "fused_rope_interleave"):
        assert {f for f, caps in FAMILY_CAPABILITIES.items() if cap in caps} == {"ascend-a2", "ascend-a3"}, cap
    # npu_quant_matmul's documented limit is what the profiles declare and the adapter splits at
    assert ascend_ops.QUANT_MATMUL_MAX_N == 65535


def test_the_self_tested_semantics_are_the_ones_the_docs_leave_open(wheel):
    gate = wheel.docs["npu_moe_gating_top_k"]
    norm_type = gate.split("**norm_type**")[1].split("-   **")[0]                   # norm_type 2: not in the docs
    assert "`1`表示使用Sigmoid函数，`0`表示Softmax函数" in norm_type and "`2`" not in norm_type
    assert "sinks" in wheel.schemas["npu_sparse_flash_attention"] and "sinks" not in \
        wheel.docs["npu_sparse_flash_attention"]                                          # sinks: schema only
    li = wheel.docs["npu_lightning_indexer"]
    assert "custom.npu_lightning_indexer(" in li and "-> (Tensor, Tensor)" in wheel.schemas["npu_lightning_indexer"]
    assert "-1" not in li.split("out（Tensor）")[1][:200]                              # the -1 fill: not described
    from runtime.dispatch import implementations

    guarded = {i.split(".", 1)[1] for op in ascend_selftest.SELF_TESTS for i in implementations(op)
               if i.startswith("ascend.npu_")}
    assert guarded == {"npu_moe_gating_top_k", "npu_sparse_flash_attention", "npu_lightning_indexer"}
