"""Batch-invariant op layout for serving: a sequence's results must not depend on what it is batched with.

A continuous-batching step runs every running sequence's token through one forward, so each token-wise op
sees as many rows as there are sequences (an expert: as many as tokens routed to it). On the CPU two things
then change a row's bits, both measured on this build (MKL 2024.2, AVX-512, torch 2.13):
- BLAS picks its kernel by the row count and the kernels reduce in different orders: a float32 `F.linear`
  row is bit-identical for every row count >= 4 but differs for 1 and for 2-3 rows;
- ATen's element-wise loops run whole vectors and finish a tensor's tail (numel mod 32) with scalar code,
  whose exp / log1p differ from the vector ones in the last bit: a row whose elements land in the tail of a
  small tensor (one sequence's [1, n_experts] gate scores) differs from the same row inside a batch. The CPU
  table's `hc_pre` / `routed_experts` also switch layouts above 8 tokens.
The wrappers here pad the token dimension of every token-wise op up to a multiple of ROWS (32) with zero rows
and drop the padding after: a decode step of up to 32 sequences then runs exactly the same shapes whoever is
in it, every row in the BLAS class of >= 4 rows and every element in the vector body. The math is the table's
own; only the row count changes.
Linears (`linear`, `group_linear`) of up to `small` rows (a decode step, a routed expert's few tokens) run
instead in blocks of LINEAR_ROWS (16) rows, the last one zero-padded: the CPU table's stored-format linears
take their GEMV kernels up to 16 rows (one pass over the stored weight, decoded in registers; a row's bits do
not depend on the other rows, measured for bf16 / FP8 / FP4 weights), where 32 padded rows would send every
decode linear down the dequantise-a-tile-then-GEMM path, which decodes the whole weight per call. A float32
weight's 16-row `F.linear` is in the >= 4 rows class. Larger calls (128-token prefill chunks) keep the
32-row padding; the boundary depends only on the call's own row count, so a prefill chunk is the same
computation whoever else runs, and a decode step of up to `small` rows always runs the same 16-row blocks. Per-sequence ops (attention, indexer, compressor) already see one sequence
at a time. `tests/test_serve_engine.py` checks the result bit for bit; `python -m runtime.bench serve`
measures the cost. The replacement goes through `Runtime.with_ops`, so the dispatch table records it.
"""

from __future__ import annotations

import functools

import torch

from ..errors import V4Error

ROWS = 32

# op -> positions of the arguments that carry the token dimension first (the rest pass through)
TOKEN_ARGS = {
    "linear": (0,),
    "group_linear": (0,),
    "rms_norm": (0,),
    "apply_rope": (0, 1, 2),
    "clamped_swiglu": (0, 1),
    "moe_gate": (0, 3),            # x, and the hash table's expert ids (None on learned layers)
    "hc_pre": (0,),
    "hc_post": (0, 1, 2, 3),
    "hc_head": (0,),
}


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    out = x.new_zeros(rows, *x.shape[1:])
    out[:x.shape[0]] = x
    return out


def padded(fn, args: tuple[int, ...], rows: int = ROWS):
    """`fn` with the token dimension of arguments `args` padded to a multiple of `rows`; outputs sliced back."""
    @functools.wraps(fn)
    def run(*a, **kw):
        T = a[args[0]].shape[0]
        target = -(-T // rows) * rows
        if T == target:
            return fn(*a, **kw)
        a = list(a)
        for i in args:
            if i < len(a) and isinstance(a[i], torch.Tensor) and a[i].dim() and a[i].shape[0] == T:
                a[i] = _pad(a[i], target)
        out = fn(*a, **kw)
        if isinstance(out, tuple):
            return tuple(o[:T] for o in out)
        return out[:T]
    run.__name__ = f"rows%{rows}:{getattr(fn, '__name__', 'op')}"
    return run


LINEAR_ROWS = 16
SMALL = 64                   # default: decode rows of up to 32 sequences x 2 (a speculative verify step)


def blocked(fn, small: int, rows: int = LINEAR_ROWS):
    """A linear (token dimension first in argument 0) run in zero-padded blocks of `rows` rows when it has at
    most `small` rows, else padded to a multiple of ROWS as the other ops."""
    wide = padded(fn, (0,))

    @functools.wraps(fn)
    def run(x, *a, **kw):
        T = x.shape[0]
        if T > small:
            return wide(x, *a, **kw)
        outs = []
        for s in range(0, T, rows):
            xb = x[s:s + rows]
            n = xb.shape[0]
            outs.append(fn(xb if n == rows else _pad(xb, rows), *a, **kw)[:n])
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    run.__name__ = f"rows%{rows}<={small}:{getattr(fn, '__name__', 'op')}"
    return run


def batch_invariant_ops(table, small: int = SMALL) -> dict:
    """Replacements (op name -> callable) for `Runtime.with_ops`, wrapping the ops of `table` (an OpTable);
    `small`: the most rows a decode step feeds (max_num_seqs, twice that when speculative)."""
    ops = {op: padded(getattr(table, op), args) for op, args in TOKEN_ARGS.items()}
    for op in ("linear", "group_linear"):
        ops[op] = blocked(getattr(table, op), small)
    return ops


def serving_runtime(rt, decode_rows: int = 64):
    """`rt` with the batch-invariant op layout (this module's) for decode steps of up to `decode_rows` rows; the
    dispatch table records the replacement."""
    if getattr(rt, "weights", None) is None:
        raise V4Error(f"profile {rt.profile.name} runs an exported graph, which the server cannot batch "
                      "(it has no per-sequence state slots for ragged batches); serve a torch profile "
                      "(cpu, cuda, ascend) of the same checkpoint")
    out = rt.with_ops(**batch_invariant_ops(rt.dispatch.ops, decode_rows))
    out.decode_rows = decode_rows
    return out
