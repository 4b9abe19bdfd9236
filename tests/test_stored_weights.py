"""The streaming weight path (issue 15): what a load keeps, and that it equals the former float32 path.

- CPU: the checkpoint's own formats, as views of the memory-mapped shards: held bytes ~ stored bytes on `cpu`
  and within 1.3x on the emulated profiles, their values bit for bit `transform_weights` of the float32
  decode (the former path, kept as oracle); a fresh process's anonymous memory grows by no more than the
  resident part plus a small bound; no load holds more than one float32 decode of a quantised tensor at a
  time (the `cpu` profile decodes none).
- Devices: per-tensor packing equals `pack_weights` of the float32 checkpoint bit for bit in value (FP8 codes
  are the checkpoint's own bytes), here with device "cpu" -- the packing runs on the host; tests/test_cuda_backend.py runs the CUDA
  ops on such weights through the CPU twins.
- The memory plan says what is resident and what is paged, and warns when the mapped weights cannot stay cached.
"""

from __future__ import annotations

import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from runtime import number_formats
from runtime.api import Runtime
from runtime.checkpoint import CheckpointReader, load_checkpoint
from runtime.checkpoint import loader as loader_mod
from runtime.weights.device_storage import Fp8Block, Int8Channel, dequantize, expert_stack
from tests.device_pack_oracle import pack_weights
from runtime.plan.memory import MemoryPlan
from runtime.profile import load_profile
from runtime.weight_transforms import transform_weights
from runtime.weights.cpu import cpu_weights
from runtime.weights.device import device_weights
from runtime.weights.cpu_storage import Fp4Stored, Fp8Stored

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def decoded(tiny_ckpt):
    return load_checkpoint(tiny_ckpt, progress=False)


def test_cpu_load_holds_the_stored_bytes_as_mapped_views(tiny_rt, tiny_ckpt):
    w = tiny_rt.weights
    assert w.held_bytes() <= 1.15 * w.stored_bytes                       # measured 1.005
    assert w.mapped_bytes() >= 0.95 * w.held_bytes()
    lin, exp = w.tensors["layers.1.attn.wq_b.weight"], w.tensors["layers.1.ffn.experts.3.w2.weight"]
    assert isinstance(lin, Fp8Stored) and isinstance(exp, Fp4Stored)
    from safetensors import safe_open

    idx = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(tiny_ckpt / idx["layers.1.attn.wq_b.weight"]), "pt") as f:
        assert torch.equal(lin.codes.view(torch.uint8), f.get_tensor("layers.1.attn.wq_b.weight").view(torch.uint8))
    assert tiny_rt.weights.tensors["embed.weight"].dtype == torch.bfloat16        # as stored, not float32


@pytest.mark.parametrize("profile,fmt", [("cpu", "float32"), ("cpu-bf16", "bf16"), ("nvidia-h100", "fp8_block"),
                                         ("ascend-910b", "w8a8_int8"), ("ascend-310p", "fp16")])
def test_cpu_storage_values_equal_the_weight_format(tiny_ckpt, decoded, profile, fmt):
    prof = load_profile(profile)
    assert prof.weight_format == fmt
    w = cpu_weights(CheckpointReader(tiny_ckpt, progress=False), fmt, prof.int8_linears)
    want, q = transform_weights(decoded.tensors, decoded.quantized, fmt, prof.int8_linears)
    assert w.quantized == q and set(w.tensors) == set(want)
    for name, t in want.items():
        assert torch.equal(dequantize(w.tensors[name]) if t.is_floating_point() else w.tensors[name], t), name
    # W8A8 holds its routed experts as int8 (1 byte + a scale per row) where the checkpoint has FP4 (0.53
    # bytes): that format's own size, ~1.36x here; the others keep the stored bytes (measured <= 1.02x).
    bound = 1.45 if fmt == "w8a8_int8" else 1.3
    assert w.held_bytes() <= bound * w.stored_bytes, (profile, w.held_bytes() / w.stored_bytes)


def test_no_two_float32_decodes_of_quantised_tensors_live_at_once(tiny_ckpt, monkeypatch):
    live: list[weakref.ref] = []
    calls = {"n": 0}

    def tracked(fn):
        def wrapper(*a, **k):
            alive = [r for r in live if r() is not None]
            assert not alive, "a float32 decode of an earlier quantised tensor is still alive"
            out = fn(*a, **k)
            calls["n"] += 1
            live.append(weakref.ref(out))
            return out
        return wrapper

    monkeypatch.setattr(loader_mod.number_formats, "dequant_fp8_block", tracked(number_formats.dequant_fp8_block))
    monkeypatch.setattr(loader_mod.number_formats, "dequant_fp4", tracked(number_formats.dequant_fp4))
    Runtime.load("cpu", checkpoint=tiny_ckpt, progress=False)
    assert calls["n"] == 0                          # exact: nothing is decoded at load
    for profile in ("cpu-bf16", "ascend-910b"):     # emulations decode one tensor at a time to derive storage
        Runtime.load(profile, checkpoint=tiny_ckpt, emulate=True, progress=False)
    assert calls["n"] > 0


def test_fresh_process_anonymous_memory_grows_by_the_resident_part(tiny_ckpt):
    code = f"""
import json, torch
from runtime.api import Runtime
def anon():
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('RssAnon'))
Runtime.load('cpu', checkpoint={str(tiny_ckpt)!r}, progress=False)      # warm: imports, kernels, tokenizer
a = anon()
rt = Runtime.load('cpu', checkpoint={str(tiny_ckpt)!r}, progress=False)
print(json.dumps({{"grew": anon() - a, "stored": rt.weights.stored_bytes,
                  "resident": rt.weights.held_bytes() - rt.weights.mapped_bytes()}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    m = json.loads(r.stdout.strip().splitlines()[-1])
    print(m)
    # the former path held ~9x the stored bytes as float32 (~60 MB here); now: the resident copies + 8 MB
    assert m["grew"] <= m["resident"] + 8 * 2 ** 20


@pytest.mark.parametrize("fmt,compute", [("fp8_block", "bfloat16"), ("bf16", "bfloat16"),
                                         ("w8a8_int8", "bfloat16"), ("fp16", "float16")])
def test_device_packing_per_tensor_equals_the_float32_path(tiny_ckpt, decoded, fmt, compute):
    stored = {i.name: i.data for i in CheckpointReader(tiny_ckpt, progress=False).tensors()}
    new = device_weights(CheckpointReader(tiny_ckpt, progress=False), fmt, compute, "cpu")
    old, q_old = pack_weights(decoded.tensors, decoded.quantized, fmt, compute, "cpu")
    assert new.quantized == q_old and set(new.tensors) == set(old)
    for name, o in old.items():
        n = new.tensors[name]
        assert type(n) is type(o), name
        if isinstance(o, Fp8Block):
            # the values bit for bit; the codes are the checkpoint's bytes (re-deriving them from float32, as
            # the former path did, halves the scale of a block whose largest code had rounded down: same values)
            assert torch.equal(n.dequantize(), o.dequantize()), name
            assert torch.equal(n.codes.view(torch.uint8), stored[name].view(torch.uint8)), name
        elif isinstance(o, Int8Channel):
            assert torch.equal(n.codes_kn, o.codes_kn) and torch.equal(n.scale, o.scale)
        else:
            assert n.dtype == o.dtype and torch.equal(n, o), name
    e_old = expert_stack([old[f"layers.2.ffn.experts.{e}.w1.weight"] for e in range(8)])
    e_new = expert_stack([new.tensors[f"layers.2.ffn.experts.{e}.w1.weight"] for e in range(8)])
    if fmt == "w8a8_int8":              # W8A8 experts are per-channel int8 linears, one object each: no stack
        assert e_old is None and e_new is None
        assert isinstance(new.tensors["layers.2.ffn.experts.0.w1.weight"], Int8Channel)
    else:                               # the experts as one [E, out, in] stack in the storage dtype
        assert e_old is not None and e_new is not None
        assert e_new.shape == (8, *old["layers.2.ffn.experts.0.w1.weight"].shape) and e_new.dtype == e_old.dtype
        assert torch.equal(e_new, e_old)


def test_sharded_rank_streams_its_slices(tiny_ckpt, decoded):
    from runtime.parallel.layout import Layout
    from runtime.parallel.shard import ShardedReader

    reader = ShardedReader(tiny_ckpt, decoded.config, Layout(2, 2), 1)
    want = ShardedReader(tiny_ckpt, decoded.config, Layout(2, 2), 1).load(progress=False).tensors
    w = cpu_weights(reader, "float32")
    assert set(w.tensors) == set(want)
    for name, t in want.items():
        got = w.tensors[name]
        assert torch.equal(dequantize(got) if t.is_floating_point() else got, t), name
    assert isinstance(w.tensors["layers.1.attn.wq_b.weight"], Fp8Stored)       # 128-row blocks: kept as stored
    assert w.tensors["layers.1.attn.wo_a.weight"].dtype == torch.float32        # 64-row slice cuts blocks


def test_memory_plan_says_resident_and_paged_and_warns(tiny_rt):
    m = tiny_rt.memory
    assert "memory-mapped from the checkpoint" in m.format()
    assert m.paging_warning(ram=(64 * 2 ** 30, 32 * 2 ** 30)) is None
    big = MemoryPlan(tiny_rt.config, tiny_rt.profile, 100 * 2 ** 30, mapped=99 * 2 ** 30, active=2 * 2 ** 30)
    warn = big.paging_warning(ram=(24 * 2 ** 30, 20 * 2 ** 30))
    assert warn.startswith("warning:") and "per decoded token" in warn
    # 99 GiB mapped, ~20.6 GiB of page cache: ~79% of the 2 GiB (2.15 GB) a token reads, from disk at 2 GB/s
    assert "79%" in warn and "0.9 s per decoded token" in warn


def test_without_native_kernels_the_table_and_one_line_say_so(tiny_ckpt, tmp_path):
    """A machine without a compiler (simulated with DSV4RT_NO_NATIVE) runs the torch tile path: the dispatch
    table names it, one stderr line says why, and the logits stay the reference's."""
    import os

    code = f"""
import torch
from runtime.api import Runtime
rt = Runtime.load('cpu', checkpoint={str(tiny_ckpt)!r}, progress=False)
print([r.impl for r in rt.dispatch.rows if r.op == 'linear'][0])
torch.save(rt.forward([[0, 72, 105, 3]]), {str(tmp_path / "logits.pt")!r})
"""
    env = {**os.environ, "DSV4RT_NO_NATIVE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["cpu.stored_torch_tiles"]
    notes = [ln for ln in r.stderr.splitlines() if "native CPU kernels unavailable" in ln]
    assert len(notes) == 1 and "DSV4RT_NO_NATIVE" in notes[0]
    got = torch.load(tmp_path / "logits.pt")
    ref = Runtime.load("cpu", checkpoint=tiny_ckpt, progress=False).forward([[0, 72, 105, 3]])
    # elementwise: measured 2026-12-03 max |tiles - native| 5.2e-6 (|logit| <= 6.7; float32 summation order
    # only, the same at 1 and 2 threads): bound ~3x
    assert got.shape == ref.shape and (got - ref).abs().max().item() <= 1.6e-5
