"""CPU linears on the checkpoint's own storage (issue 15): FP8 block-scaled, FP4 experts, bf16, W8A8 int8.

Two implementations of the `linear` and `group_linear` ops, both with the float32 reference
(`runtime.ops.linear`: x @ dequantize(w).T) as oracle:
- `cpu.stored_native`: the native kernels (backends/native/stored_gemm.cpp). Up to `MAX_M` rows of x (a decode
  step, a routed expert's few tokens): one pass over the stored weight, each row's values decoded in
  registers and used for every x row. `MAX_M` < M <= `MGEMM_MAX_M` on a weight of at least `TILE_FLOATS`
  values (a prefill's routed experts, ~48 tokens each at 512 tokens and 64 experts): the small-M GEMM
  (backends/native/stored_mgemm.h), a 96-row weight panel decoded once per K block into L2 and accumulated
  into every x row in registers (AVX-512 kernel on the AVX-512 levels, the portable C++ one elsewhere:
  `mgemm_path()`). Otherwise (prefill chunks, small weights): the weight is dequantised `TILE_FLOATS` at a
  time by the native decoder and multiplied with torch's GEMM into the transposed output.
- `cpu.stored_torch_tiles` (no compiler on this machine): the same tiles dequantised with torch ops, for every M.
Either way, no whole dequantised weight exists per call, and the values are the reference's float32 values
(code x power-of-two scale is exact), accumulated in float32: only the summation order differs.
float32 weights go straight to one `F.linear`; fp16 and other plain dtypes through tiles of `.float()`.
`routed_experts_native` (`cpu.stored_grouped`): a decode step's routed experts in two native calls per layer
(every active expert's w1 + w3, then every w2). `native_gemv(x, w, isa=...)` runs one instruction-set path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.ops import moe as ref_moe
from runtime.ops.linear import project
from runtime.weights.cpu_storage import Fp4Stored, Fp8Stored, Int8Rows

from .cpu_native import Job, isa_code, kernels

MAX_M = 16                        # x rows up to which the GEMV kernels run (the library's own limit)
MGEMM_MAX_M = 256                 # x rows up to which the small-M GEMM runs; above, torch's GEMM on tiles is
                                  # faster (2 threads, 2048 x 4096 FP8 / FP4: mgemm 200-260 GFLOP/s at M 32-256
                                  # vs tiles 95-230; at M >= 512 tiles 280-300 vs mgemm 205-245). Only for a
                                  # weight (row range) of at least one tile: a smaller one is one tile in cache,
                                  # where torch's GEMM wins (128 x 256 FP4, M = 100: 44 vs 88 us)
TILE_FLOATS = 1 << 20             # dequantised weight per GEMM tile: 4 MB of float32


def _tile_rows(K: int) -> int:
    return max(16, TILE_FLOATS // max(K, 1))


def _dequant_rows(w, lo: int, hi: int, lib) -> torch.Tensor:
    """float32 rows [lo, hi) of weight `w` (the reference's values)."""
    if lib is not None and isinstance(w, (Fp8Stored, Fp4Stored)):
        K = w.shape[1]
        out = torch.empty(hi - lo, K)
        fn = lib.dsv4_fp8_dequant if isinstance(w, Fp8Stored) else lib.dsv4_fp4_dequant
        codes = w.codes if isinstance(w, Fp8Stored) else w.packed
        fn(codes.data_ptr(), codes.stride(0), w.scale.data_ptr(), w.scale.stride(0), K,
           out.data_ptr(), lo, hi, torch.get_num_threads())
        return out
    if isinstance(w, torch.Tensor):
        return w[lo:hi].float()
    return w.dequantize_rows(lo, hi)


_KIND = {Fp8Stored: 0, Fp4Stored: 1, Int8Rows: 3}


def job(x: torch.Tensor, w, lo: int, hi: int, y: torch.Tensor) -> Job | None:
    """The native job y[M, hi - lo] = x [M <= MAX_M, K] (float32, rows contiguous) @ rows [lo, hi) of w,
    transposed; None for a weight kind the kernels do not take. x, w and y must stay alive until it ran."""
    M, K = x.shape
    kind = _KIND.get(type(w))
    if kind is None:
        if not (isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16 and w.stride(1) == 1):
            return None
        return Job(2, M, K, hi - lo, lo, x.data_ptr(), x.stride(0), w.data_ptr(), w.stride(0), None, 0, None,
                   y.data_ptr(), y.stride(0))
    codes = w.packed if kind == 1 else w.codes
    if codes.stride(1) != 1:
        return None
    rs = w.scale.data_ptr() if kind == 3 else None
    s, lds = (None, 0) if kind == 3 else (w.scale.data_ptr(), w.scale.stride(0))
    return Job(kind, M, K, hi - lo, lo, x.data_ptr(), x.stride(0), codes.data_ptr(), codes.stride(0), s, lds,
               rs, y.data_ptr(), y.stride(0))


def _call(fn, refused: str, jobs: list, isa: int | None) -> None:
    arr = (Job * len(jobs))(*jobs)
    if fn(arr, len(jobs), torch.get_num_threads(), isa_code() if isa is None else isa) != 0:
        raise RuntimeError(refused)


def run_jobs(lib, jobs: list, isa: int | None = None) -> None:
    """Run native GEMV jobs (M <= MAX_M) in one call (their rows split over torch's threads)."""
    _call(lib.dsv4_gemv, "dsv4_gemv refused a job (M > MAX_M or unknown kind)", jobs, isa)


def run_mgemm(lib, jobs: list, isa: int | None = None) -> None:
    """Run native jobs of any M in one call (backends/native/stored_mgemm.h; their units over torch's threads)."""
    _call(lib.dsv4_mgemm, "dsv4_mgemm refused a job (M < 1 or unknown kind)", jobs, isa)


def _one(run, lib, x: torch.Tensor, w, lo: int, hi: int, isa: int | None) -> torch.Tensor | None:
    y = torch.empty(x.shape[0], hi - lo)
    j = job(x, w, lo, hi, y)
    if j is None:
        return None
    run(lib, [j], isa)
    return y


def _gemv(lib, x: torch.Tensor, w, lo: int, hi: int, isa: int | None = None) -> torch.Tensor | None:
    """x [M <= MAX_M, K] contiguous float32 -> [M, hi - lo] through the native kernel, or None (no kernel)."""
    return _one(run_jobs, lib, x, w, lo, hi, isa)


def _mgemm(lib, x: torch.Tensor, w, lo: int, hi: int, isa: int | None = None) -> torch.Tensor | None:
    """x [M, K] contiguous float32 -> [M, hi - lo] through the native small-M GEMM, or None (no kernel)."""
    return _one(run_mgemm, lib, x, w, lo, hi, isa)


def _rows_linear(x: torch.Tensor, w, lo: int, hi: int, native: bool) -> torch.Tensor:
    """x [M, K] float32 @ rows [lo, hi) of w, transposed -> [M, hi - lo]."""
    lib = kernels() if native else None
    x = x.contiguous()
    M = x.shape[0]
    if lib is not None and (M <= MAX_M or (M <= MGEMM_MAX_M and (hi - lo) * x.shape[1] >= TILE_FLOATS)):
        y = (_gemv if M <= MAX_M else _mgemm)(lib, x, w, lo, hi)
        if y is not None:
            return y
    yt = torch.empty(hi - lo, x.shape[0])                     # y.T: each tile's rows are contiguous
    step = _tile_rows(x.shape[1])
    for a in range(lo, hi, step):
        b = min(hi, a + step)
        torch.mm(_dequant_rows(w, a, b, lib), x.T, out=yt[a - lo:b - lo])
    return yt.T


def _linear(x: torch.Tensor, w, native: bool) -> torch.Tensor:
    if isinstance(w, torch.Tensor) and w.dtype == x.dtype:
        return F.linear(x, w)
    lead = x.shape[:-1]
    y = _rows_linear(x.reshape(-1, x.shape[-1]).float(), w, 0, w.shape[0], native)
    return y.reshape(*lead, w.shape[0])


def _group_linear(x: torch.Tensor, w, native: bool) -> torch.Tensor:
    """x [T, G, k], w [G*o, k] (group g owns rows g*o..(g+1)*o) -> [T, G, o]: per group, its row range."""
    T, G, k = x.shape
    if isinstance(w, torch.Tensor) and w.dtype == x.dtype:
        return torch.einsum("tgk,gok->tgo", x, w.view(G, -1, k))
    o = w.shape[0] // G
    return torch.stack([_rows_linear(x[:, g].float(), w, g * o, (g + 1) * o, native) for g in range(G)], dim=1)


def linear_native(x, w):
    """Same contract as `runtime.ops.linear.linear`, on stored formats through the native kernels."""
    return _linear(x, w, True)


def linear_torch_tiles(x, w):
    """Same contract as `runtime.ops.linear.linear`, stored formats dequantised per tile with torch ops."""
    return _linear(x, w, False)


def group_linear_native(x, w):
    """Same contract as `runtime.ops.linear.group_linear`, through the native kernels."""
    return _group_linear(x, w, True)


def group_linear_torch_tiles(x, w):
    """Same contract as `runtime.ops.linear.group_linear`, torch tiles."""
    return _group_linear(x, w, False)


def native_mgemm(x: torch.Tensor, w, isa: str | None = None) -> torch.Tensor:
    """x [M, K] @ w.T on the native small-M GEMM (any M) with instruction set `isa` (as `native_gemv`)."""
    return _whole(_mgemm, x, w, isa)


def _whole(run, x: torch.Tensor, w, isa: str | None) -> torch.Tensor:
    y = run(kernels(), x.float().contiguous(), w, 0, w.shape[0], None if isa is None else isa_code(isa))
    if y is None:
        raise TypeError(f"no native kernel for a {type(w).__name__} weight")
    return y


def prepare_native(fn):
    """A `prepare` hook for the native linears: the dispatch row says which kernel paths run here."""
    from .cpu_native import isa

    def prepare(ctx):
        return fn, (f"backends/native/stored_gemm.cpp on {isa()}: GEMV up to {MAX_M} rows, small-M GEMM "
                    f"({mgemm_path()}) up to {MGEMM_MAX_M} rows on weights of >= {TILE_FLOATS >> 18} MB as float32, "
                    "else float32 tiles + torch's GEMM")
    return prepare


def mgemm_path(isa: str | None = None) -> str:
    """Which small-M GEMM kernel runs on `isa` (default: the one chosen at load): "avx512" or "portable"."""
    return "avx512" if kernels().dsv4_mgemm_path(isa_code(isa)) else "portable"


def native_gemv(x: torch.Tensor, w, isa: str | None = None) -> torch.Tensor:
    """x [M <= MAX_M, K] @ w.T on the native kernels with instruction set `isa` (a `cpu_native.ISAS` name;
    default: the one chosen at load) -- every ISA path this CPU runs can be compared with the reference."""
    return _whole(_gemv, x, w, isa)


def _stage(lib, rows: list[tuple[torch.Tensor, object]]) -> list[torch.Tensor] | None:
    """One native call for every (x, weight) pair -> their outputs; None when one has no native kernel."""
    ys = [torch.empty(x.shape[0], w.shape[0]) for x, w in rows]
    jobs = [job(x, w, 0, w.shape[0], y) for (x, w), y in zip(rows, ys)]
    if any(j is None for j in jobs):
        return None
    run_jobs(lib, jobs)
    return ys


SMALL_BATCH_T = 8         # tokens up to which grouping from one host read beats the reference's grouping


def routed_experts_small_batch(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, experts,
                               limit: float, ops) -> torch.Tensor:
    """Same contract as `runtime.ops.moe.routed_experts`. For the few tokens of a decode step the groups
    come from one host read of `idx` (no unique / mask / gather per expert); a single token uses its x and
    weights as they are. Larger chunks use the reference's grouping."""
    if x.shape[0] > SMALL_BATCH_T:
        return ref_moe.routed_experts(x, idx, weights, experts, limit, ops)
    out = torch.zeros_like(x)
    groups: dict[int, list[tuple[int, int]]] = {}
    for t, row in enumerate(idx.tolist()):
        for j, e in enumerate(row):
            groups.setdefault(e, []).append((t, j))
    for e, members in sorted(groups.items()):
        w1, w2, w3 = experts[e]
        if x.shape[0] == 1:
            xe, we = x, weights[:, members[0][1]:members[0][1] + 1]
        else:
            tt = torch.tensor([t for t, _ in members], device=x.device)
            xe, we = x[tt], weights[tt, torch.tensor([j for _, j in members], device=x.device)][:, None]
        h = ops.round_act(ops.clamped_swiglu(project(ops, xe, w1), project(ops, xe, w3), limit) * we)
        y = project(ops, h, w2)
        if x.shape[0] == 1:
            out += y
        else:
            out.index_add_(0, tt, y)
    return out


def routed_experts_native(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, experts, limit: float,
                          ops) -> torch.Tensor:
    """Same contract as `runtime.ops.moe.routed_experts`, for the few tokens of a decode step (<= MAX_M per
    expert): tokens grouped per routed expert from one host read of `idx`, only the active experts touched,
    and two native calls per layer -- every active expert's w1 and w3 in one, their w2 in the other -- each
    splitting all those rows over torch's threads. The numerics between (input quantisation where the weight
    format asks, activation rounding, clamped SwiGLU, the routing weight before w2) are the table's ops, in
    the reference's order. Larger chunks (prefill) or weights without a native kernel: `cpu.small_batch`'s grouping."""
    lib = kernels()
    T = x.shape[0]
    if lib is None or T > MAX_M:
        return routed_experts_small_batch(x, idx, weights, experts, limit, ops)
    groups: dict[int, list[tuple[int, int]]] = {}
    for t, row in enumerate(idx.tolist()):
        for j, e in enumerate(row):
            groups.setdefault(e, []).append((t, j))
    if max(len(m) for m in groups.values()) > MAX_M:     # an expert named twice per token (a hash table that
        return routed_experts_small_batch(x, idx, weights, experts, limit, ops)   # repeats ids) overfills a job
    order = sorted(groups)
    xs, ws, toks = [], [], []
    for e in order:
        members = groups[e]
        if T == 1:
            xe, we, tt = x, weights[:, members[0][1]:members[0][1] + 1], None
        else:
            tt = torch.tensor([t for t, _ in members])
            xe, we = x[tt], weights[tt, torch.tensor([j for _, j in members])][:, None]
        xs.append(xe)
        ws.append(we)
        toks.append(tt)

    def inp(xe, lin):
        return (ops.quant_act(xe) if lin.quantized else xe).float().contiguous()

    first = []
    for e, xe in zip(order, xs):
        w1, _, w3 = experts[e]
        first += [(inp(xe, w1), w1.weight), (inp(xe, w3), w3.weight)]
    ys = _stage(lib, first)
    if ys is None:
        return routed_experts_small_batch(x, idx, weights, experts, limit, ops)
    hs = [ops.round_act(ops.clamped_swiglu(ops.round_act(ys[2 * i]), ops.round_act(ys[2 * i + 1]), limit) * we)
          for i, we in enumerate(ws)]
    outs = _stage(lib, [(inp(h, experts[e][1]), experts[e][1].weight) for e, h in zip(order, hs)])
    if outs is None:
        return routed_experts_small_batch(x, idx, weights, experts, limit, ops)
    out = torch.zeros_like(x)
    for y, tt in zip(outs, toks):
        y = ops.round_act(y).to(out.dtype)
        if tt is None:
            out += y
        else:
            out.index_add_(0, tt, y)
    return out
