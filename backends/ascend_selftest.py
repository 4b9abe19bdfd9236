"""One-time self-tests of the Ascend adapters whose kernel semantics torch-npu does not document.

Three fused ops rest on behaviour the torch-npu 2.14 docs leave open: `npu_moe_gating_top_k` with
norm_type=2 (the docs define only 0 softmax and 1 sigmoid; cann-recipes' golden says sqrt(softplus)), the
`sinks` input of `npu_sparse_flash_attention` (absent from the docs: dtype, shape and place in the softmax
assumed), and `npu_lightning_indexer`'s output order and -1 fill. Before dispatch chooses one of these
adapters on a device, it runs the adapter once on small inputs against the float32 reference op and keeps it
only if the answers agree; the outcome (with the measured error) goes into the dispatch table's row, and is
cached per (adapter, device name, torch-npu version) in `<cache_dir>/ascend-selftest.json`, so a device is
tested once, not at every load. A kernel that computes something else is rejected, never run silently.

The inputs are built so the answer is unambiguous on any hardware: well-separated gate scores (no near-ties
at the k-th expert), integer indexer scores (exact in bf16 and in any accumulation order), bf16-exact
attention inputs. Each test returns (passed, measured-error text).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from runtime.ops import attention, moe

SELFTEST_VERSION = 1          # bump when a test changes: cached outcomes of older tests are not reused
GATE_TOL = 1e-3               # max |weight - reference| (fp32 logits in; weights ~0.1-1)
SFA_TOL = 2e-2                # max |out - reference| / max |reference| (bf16 inputs and output: ~4e-3 expected)


def _gate_inputs():
    """gate_w = I, so the logits are x exactly: per token a permutation of a 64-point grid, with a bias of 0,
    0.25 or 0.5 per expert. The seed is one whose k-th and (k+1)-th selection scores are >= 0.02 apart."""
    g = torch.Generator().manual_seed(32)
    T, E, k = 16, 64, 6
    x = torch.stack([torch.linspace(-1, 5, E)[torch.randperm(E, generator=g)] for _ in range(T)])
    bias = torch.randint(0, 3, (E,), generator=g).float() * 0.25
    hashed = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return x, torch.eye(E), bias, hashed, k, 2.5


def gate_margin() -> float:
    """The smallest gap between the k-th and (k+1)-th selection score of the gate test (no near-ties)."""
    x, gw, bias, _, k, _ = _gate_inputs()
    sel = torch.sort(torch.sqrt(torch.nn.functional.softplus(x @ gw.T)) + bias, dim=-1, descending=True).values
    return float((sel[:, k - 1] - sel[:, k]).min())


def check_moe_gate(run: Callable, device: str) -> tuple[bool, str]:
    x, gw, bias, hashed, k, scale = _gate_inputs()
    worst, rows_off, rows = 0.0, 0, 0
    for b, h in ((bias, None), (None, hashed)):
        ref_i, ref_w = moe.moe_gate(x, gw, b, h, k, scale)
        got_i, got_w = run(x.to(device), gw.to(device), None if b is None else b.to(device),
                           None if h is None else h.to(device), k, scale)
        got_i, got_w = got_i.cpu().long(), got_w.cpu().float()
        ro, go = ref_i.sort(-1), got_i.sort(-1)          # compare per expert: the kernel's order is its own
        same = (ro.values == go.values).all(-1)
        rows_off += int((~same).sum())
        rows += same.numel()
        if same.any():
            err = (ref_w.gather(-1, ro.indices) - got_w.gather(-1, go.indices))[same].abs().max()
            worst = max(worst, float(err))
    ok = rows_off == 0 and worst <= GATE_TOL
    return ok, f"experts differ in {rows_off}/{rows} rows, max |w - ref| {worst:.2g} (limit {GATE_TOL:g})"


def _indexer_inputs():
    """Head 0 alone is weighted and its query is a one-hot on dim d_t, so token t's score of key j is the
    integer keys[j, d_t] (a per-column permutation of 1..N): distinct, exact in bf16, order-independent."""
    g = torch.Generator().manual_seed(11)
    T, H, D, N, k = 10, 64, 128, 200, 16
    keys = torch.randn(N, D, generator=g).bfloat16().float()
    dims = torch.randperm(D, generator=g)[:T]
    for d in dims.tolist():
        keys[:, d] = (torch.randperm(N, generator=g) + 1).float()
    q = torch.randn(T, H, D, generator=g).bfloat16().float()
    q[:, 0] = torch.nn.functional.one_hot(dims, D).float()
    w = torch.zeros(T, H)
    w[:, 0] = 1.0
    visible = torch.tensor([0, 5, 16, 17, 100, 128, 129, 200, 200, 3])
    return q, w, keys, visible, k


def check_indexer_topk(run: Callable, device: str) -> tuple[bool, str]:
    q, w, keys, visible, k = _indexer_inputs()
    ref = attention.indexer_topk(q, w, keys, visible, k)
    got = run(q.to(device), w.to(device), keys.to(device), visible.to(device), k).cpu().long()
    if got.shape != ref.shape:
        return False, f"indices of shape {list(got.shape)}, expected {list(ref.shape)}"
    off = (got != ref).any(-1)
    text = f"{int(off.sum())}/{off.numel()} rows differ from the reference (best first, -1 after the visible keys)"
    if off.any():
        r = int(off.nonzero()[0])
        text += f"; row {r}: got {got[r, :6].tolist()}.. want {ref[r, :6].tolist()}.."
    return not bool(off.any()), text


def _sfa_inputs():
    g = torch.Generator().manual_seed(13)
    T, H, N, K = 6, 8, 40, 12
    q = (torch.randn(T, H, 512, generator=g) * 0.5).bfloat16().float()
    kv = torch.randn(N, 512, generator=g).bfloat16().float()
    idx = torch.randint(0, N, (T, K), generator=g)
    idx[torch.rand(T, K, generator=g) < 0.3] = -1          # padding anywhere; every row keeps a valid entry
    idx[:, 0] = torch.arange(T)
    sink = torch.tensor([3.0, -2.0, 0.5, 1.0, 2.0, -1.0, 0.0, 2.5])   # large sinks: their place shows
    return q, kv, idx, sink, 512 ** -0.5


def check_sparse_attention(run: Callable, device: str) -> tuple[bool, str]:
    q, kv, idx, sink, scale = _sfa_inputs()
    ref = attention.sparse_attention(q, kv, idx, sink, scale)
    got = run(q.to(device), kv.to(device), idx.to(device), sink.to(device), scale).cpu().float()
    rel = float((got - ref).abs().max() / ref.abs().max())
    return rel <= SFA_TOL, f"max |out - ref| / max |ref| {rel:.2g} (limit {SFA_TOL:g}; sinks up to 3)"


SELF_TESTS = {"moe_gate": check_moe_gate, "indexer_topk": check_indexer_topk,
              "sparse_attention": check_sparse_attention}


def _device_key(npu) -> str:
    name = "unknown device"
    try:
        name = str(npu.npu.get_device_name(0))
    except Exception:          # a build without the query: the version alone keys the cache
        pass
    return f"{name}, torch-npu {getattr(npu, '__version__', 'unknown')}"


def _cache_file() -> Path:
    from runtime.cache import cache_dir

    return cache_dir() / "ascend-selftest.json"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path: Path, data: dict) -> None:
    """Atomic replace; an unwritable cache only means the test runs again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".selftest-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def run_cached(op: str, impl_id: str, npu, run: Callable, device: str) -> tuple[bool, str]:
    """The self-test of `op` for the bound adapter `run`, from the cache when this device already ran it.
    -> (passed, "self-test passed|failed: <measured error> [<device>, cached]")."""
    where = _device_key(npu)
    key = f"{impl_id} | {where} | v{SELFTEST_VERSION}"
    path = _cache_file()
    cached = _read(path).get(key)
    if isinstance(cached, dict) and isinstance(cached.get("ok"), bool) and isinstance(cached.get("detail"), str):
        ok, detail, how = cached["ok"], cached["detail"], "cached"
    else:
        try:
            with torch.inference_mode():
                ok, detail = SELF_TESTS[op](run, device)
        except Exception as e:     # the kernel is missing or refuses the call: that is a failed self-test
            first = (str(e).splitlines() or [""])[0][:200]
            ok, detail = False, f"raised {type(e).__name__}: {first}"
        how = "ran at load"
        data = _read(path)
        data[key] = {"ok": ok, "detail": detail}
        _write(path, data)
    return ok, f"self-test {'passed' if ok else 'FAILED'}: {detail} [{where}, {how}]"
