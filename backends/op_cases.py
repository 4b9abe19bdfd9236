"""The shared shape cases of the op check (backends/check.py): the same inputs for every implementation.

Four cases per op, at V4's per-head shapes (the fused kernels' fixed ones: 512-wide shared KV heads, 64 x 128
indexer heads) and small token counts: `decode-1` (one sequence, one token), `decode-4` (four sequences, one
token each), `prefill-1` (one sequence of 32 tokens) and `ragged` (three sequences of 7, 1 and 19 tokens). A
token-wise op gets the batch's tokens as one call; a per-sequence op (attention, indexer) gets one call per
sequence, each with its own cache length and padding.

A `dtype` says what the model feeds the op under that numerics: `float32` inputs as they are; `bf16` / `fp16`
inputs rounded to that dtype (values a bf16 / fp16 profile produces) and, for the linears, weights stored in
it; `fp8_block` / `fp4` / `w8a8_int8` weights in that storage with the activation quantised as the model's
`quant_act` does before such a linear. Linear weights take the storage the backend's own loader gives
(`storage()`, from each backend's `weight_formats`): the CPU keeps the checkpoint's formats, CUDA FP8 blocks, Ascend INT8 channels.

`build(op, case, dtype, backend, device)` -> a list of calls `(args, kwargs)`, deterministic per
(op, case, dtype): the reference runs on the CPU build, the implementation on the `device` build.
"""

from __future__ import annotations

import zlib

import torch

from runtime.weights.device_storage import Fp8Block, Int8Channel
from runtime.number_formats import quant_fp4, quant_fp8_block
from runtime.model.v4 import Linear
from runtime.ops import norm_rope, reference_ops
from runtime.ops.numerics import int8_roundtrip, quant_act_fp8, rounder
from runtime.weight_transforms import quantize_int8_per_channel
from runtime.weights.cpu_storage import Fp4Stored, Fp8Stored, Int8Rows

CASES = {"decode-1": (1,), "decode-4": (1, 1, 1, 1), "prefill-1": (32,), "ragged": (7, 1, 19)}
FLOAT_DTYPES = ("float32", "bf16")

_PLAIN = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ROUND = {"float32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _cpu_storage(fmt: str, w: torch.Tensor):
    if fmt == "fp8_block":
        return Fp8Stored(*quant_fp8_block(w))
    if fmt == "fp4":
        return Fp4Stored(*quant_fp4(w))
    if fmt == "w8a8_int8":
        return Int8Rows(*quantize_int8_per_channel(w))
    return w.to(_PLAIN[fmt])


def _device_storage(fmt: str, w: torch.Tensor):
    if fmt == "fp8_block":
        return Fp8Block.from_float(w)
    if fmt == "w8a8_int8":
        return Int8Channel.from_float(w)
    return w.to(_PLAIN[fmt])


_ORDER = ("float32", "bf16", "fp16", "fp8_block", "fp4", "w8a8_int8")


def storage(backend: str):
    """(the linear weight formats `backend`'s loader produces, how it stores one), read from the backend's own
    declaration (`Backend.weight_formats`): the CPU keeps every checkpoint format (FP4 experts included) as
    stored, a device backend lays weights out in its device storage."""
    from backends import BackendUnavailable, get_backend

    try:
        b = get_backend(backend)
    except BackendUnavailable:      # an implementation registered for a backend not (yet) in the registry
        return ("float32", "bf16", "fp16"), _device_storage
    formats = set(b.weight_formats) | ({"fp4"} if b.computes_every_format else set())
    return tuple(f for f in _ORDER if f in formats), (_cpu_storage if b.computes_every_format else _device_storage)


def dtypes(op: str, backend: str) -> tuple[str, ...]:
    """The dtypes the op is checked in on `backend`."""
    if op == "linear":
        return storage(backend)[0]
    if op == "group_linear":
        return ("float32", "bf16", "fp16")
    if op in ("moe_gate", "hc_pre", "hc_head", "compress_pool", "decode_block"):   # computed in float32
        return ("float32",)
    return FLOAT_DTYPES


def _act(dtype: str, x: torch.Tensor) -> torch.Tensor:
    """What the model feeds a linear under `dtype`: the activation rounded, and quantised before a quantised
    weight (FP8 per-128 block / INT8 per token, as `quant_act`)."""
    if dtype == "fp8_block":
        return quant_act_fp8(rounder("bfloat16")(x))
    if dtype == "fp4":
        return quant_act_fp8(x)
    if dtype == "w8a8_int8":
        return int8_roundtrip(rounder("bfloat16")(x))
    return rounder(_ROUND[dtype])(x)


class _Inputs:
    """Seeded random inputs, rounded to the case's dtype and put on the device."""

    def __init__(self, key: str, dtype: str, device: str):
        self.g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        self.rnd = rounder(_ROUND.get(dtype, "float32"))
        self.device = device

    def randn(self, *shape, scale: float = 1.0) -> torch.Tensor:
        return self.rnd(torch.randn(*shape, generator=self.g) * scale).to(self.device)

    def host(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g)

    def perm(self, n: int) -> torch.Tensor:
        return torch.randperm(n, generator=self.g)


def _attention_idx(r: _Inputs, T: int, N: int, window: int, picks: int) -> torch.Tensor:
    """idx [T, window + picks] over a pool [ring of `window` rows | compressed rows], as the model lays it out:
    per query its ring rows (-1 for slots before the sequence start), then distinct compressed rows (-1 where
    fewer are visible). A query's valid indices are distinct (an implementation may rely on it)."""
    rows = []
    for t in range(T):
        # a prefill chunk (T > 16) starts a fresh sequence: its ring is filled up to the query, the rest is
        # padding before the compressed rows; a decode step or short chunk continues a filled cache
        pos = t if T > 16 else N - window - T + t
        ring = [j if j <= pos else -1 for j in range(window)]
        comp = (r.perm(N - window)[:picks] + window).tolist()
        rows.append(ring + [j if t % 5 != 3 else -1 for j in comp])        # some rows see fewer entries
    idx = torch.tensor(rows, dtype=torch.int64)                          # host
    if T > 2:
        idx[2] = -1                                  # a query that sees nothing: the reference gives zeros
    return idx.to(r.device)


def _calls(op: str, lens: tuple[int, ...], dtype: str, backend: str, r: _Inputs) -> list[tuple[tuple, dict]]:
    T = sum(lens)
    dev = r.device
    if op == "linear":
        store = storage(backend)[1]
        w = store(dtype, (r.host(256, 320) / 16).to(torch.float32))      # K = 2.5 FP8 blocks: a partial one
        w = w.to(dev) if hasattr(w, "to") else w
        x = _act(dtype, r.host(T, 320)).to(dev)
        return [((x, w), {})]
    if op == "group_linear":
        w = (r.host(4 * 32, 64) / 8).to(_PLAIN[dtype]).to(dev)
        return [((r.randn(T, 4, 64), w), {})]
    if op == "rms_norm":
        x, w = r.randn(T, 3, 64, scale=3.0), r.randn(64)
        return [((x, w, 1e-6), {}), ((x, None, 1e-6), {})]
    if op == "apply_rope":
        cos, sin = norm_rope.rope_cos_sin(norm_rope.rope_frequencies(64, 10000.0, None), r.perm(4096)[:T])
        cos, sin = cos.to(dev), sin.to(dev)
        heads = r.randn(T, 4, 192)[..., -64:]                               # strided: the rope slice of a head
        flat = r.randn(T, 64)                                                # compressed entries: no head dim
        return [((heads, cos[:, None], sin[:, None]), {"inverse": inv}) for inv in (False, True)] + \
            [((flat, cos, sin), {})]
    if op == "sparse_attention":
        out = []
        for n, S in zip((160, 40, 300, 90), lens):
            q, kv, sink = r.randn(S, 8, 512, scale=0.5), r.randn(n, 512), r.randn(8)
            out.append(((q, kv, _attention_idx(r, S, n, 16, 24), sink, 512 ** -0.5), {}))
        return out
    if op == "indexer_topk":
        out = []
        for n, S in zip((200, 10, 120, 64), lens):     # 10 keys: fewer than k
            vis = torch.clamp(torch.arange(n - S + 1, n + 1) if n >= S else torch.arange(1, S + 1), max=n)
            vis[0] = min(3, n)                                               # a row that sees fewer than k
            out.append(((r.randn(S, 64, 128), r.randn(S, 64, scale=0.1), r.randn(n, 128), vis.to(dev), 16), {}))
        return out
    if op == "compress_pool":
        kv, score = r.randn(T + 2, 8, 64), r.randn(T + 2, 8, 64)
        score[0, :4] = float("-inf")                                         # CSA's missing first window
        return [((kv, score), {})]
    if op == "moe_gate":
        x, gw, bias = r.randn(T, 32), r.randn(64, 32, scale=0.25), r.randn(64, scale=0.25)
        hashed = torch.stack([r.perm(64)[:6] for _ in range(T)]).to(dev)
        return [((x, gw, bias, None, 6, 2.5), {}), ((x, gw, None, hashed, 6, 1.5), {})]
    if op == "routed_experts":
        E, d, inter = 6, 64, 32
        stacks = [(r.host(E, *s) / 8).to(_PLAIN[dtype]).to(dev) for s in ((inter, d), (d, inter), (inter, d))]
        experts = [tuple(Linear(s[e], False) for s in stacks) for e in range(E)]   # views of one stack each
        idx = torch.stack([r.perm(E)[:2] for _ in range(T)])
        idx[idx == 5] = 4                                                    # expert 5 idle, 4 busy
        return [((r.randn(T, d, scale=2.0), idx.to(dev), torch.rand(T, 2, generator=r.g).to(dev), experts, 10.0,
                  reference_ops("exact")), {})]
    if op == "clamped_swiglu":
        return [((r.randn(T, 32, scale=8.0), r.randn(T, 32, scale=8.0), 10.0), {})]
    if op == "hc_pre":
        return [((r.randn(T, 4, 32), r.randn(24, 128, scale=0.1), r.randn(24), r.randn(3).abs(), 1e-6, 1e-6, 20), {})]
    if op == "hc_post":
        return [((r.randn(T, 32), r.randn(T, 4, 32), r.randn(T, 4), r.randn(T, 4, 4)), {})]
    if op == "hc_head":
        return [((r.randn(T, 4, 32), r.randn(4, 128, scale=0.1), r.randn(4), r.randn(1).abs(), 1e-6, 1e-6), {})]
    raise KeyError(f"no op-check case for op {op!r}")


def build(op: str, case: str, dtype: str, backend: str, device: str = "cpu") -> list[tuple[tuple, dict]]:
    return _calls(op, CASES[case], dtype, backend, _Inputs(f"{op}/{case}/{dtype}", dtype, device))
