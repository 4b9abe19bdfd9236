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
own; only the row count changes. Per-sequence ops (attention, indexer, compressor) already see one sequence
at a time. `tests/test_serve_engine.py` checks the result bit for bit; `python -m runtime.bench serve`
measures the cost. The replacement goes through `Runtime.with_ops`, so the dispatch table records it.
"""

from __future__ import annotations

import functools

import torch

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
    return torch.cat((x, x.new_zeros(rows - x.shape[0], *x.shape[1:])))


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


def batch_invariant_ops(table) -> dict:
    """Replacements (op name -> callable) for `Runtime.with_ops`, wrapping the ops of `table` (an OpTable)."""
    return {op: padded(getattr(table, op), args) for op, args in TOKEN_ARGS.items()}
