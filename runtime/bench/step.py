"""`python -m runtime.bench.step`: one decode step of a batch, the figure the batched kernels are tuned on.

    python -m runtime.bench.step                              # the shipped default, B = 1 2 4 16 32, 2 threads
    python -m runtime.bench.step --model v4-width-16e --batch 1 4 16 --steps 20 --threads 2

For each batch size B: B sequences prefilled with short prompts of different lengths (24 + b tokens, a ragged
batch), then `--steps` one-token steps of all B together (`model.forward`, the route `generate` and the server's
engine take); prints the median step in ms, per row, and the share of it spent in the fused step's native call
where the CPU backend runs one. `--model` names a bench model (`runtime.bench.weights`: v4-width-16e,
v4-width), `--checkpoint` a folder. One line per batch size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.bench.step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the shipped model)")
    ap.add_argument("--model", default=None, help="a bench model instead: v4-width-16e or v4-width")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 16, 32])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    if min(a.batch) < 1 or a.steps < 1 or a.threads < 1:
        print("error: --batch, --steps and --threads take values >= 1", file=sys.stderr)
        return 2
    import torch

    from ..api import Runtime
    from ..errors import V4Error

    torch.set_num_threads(a.threads)
    try:
        ckpt = a.checkpoint
        if a.model is not None:
            from .weights import bench_model

            ckpt = str(bench_model(a.model))
        rt = Runtime.load(a.profile, checkpoint=ckpt, progress=False)
    except V4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lib, restore = _timed_native()
    try:
        for B in a.batch:
            _one(rt, B, a, lib)
    finally:
        restore()
    return 0


def _one(rt, B: int, a, lib: dict) -> None:
    """Batch size B's line: B ragged prefills, then `a.steps` timed one-token steps of all B."""
    import torch

    st = rt.new_state(B, context=64 + B + a.steps + 8)
    with torch.inference_mode():
        for b in range(B):
            prompt = [rt.config.bos_token_id] + [2 + (b * 31 + j * 7) % 250 for j in range(23 + b)]
            rt.model.forward(torch.tensor([prompt]), [st.seqs[b]])
        ids = torch.tensor([[5 + b % 200] for b in range(B)])
        total, native = [], []
        for _ in range(a.steps):
            lib["t"] = 0.0
            t = time.perf_counter()
            rt.model.forward(ids, st.seqs)
            total.append(time.perf_counter() - t)
            native.append(lib["t"])
    ms, nat = statistics.median(total) * 1e3, statistics.median(native) * 1e3
    print(f"B={B:<3d} step {ms:8.3f} ms  per row {ms / B:7.3f} ms  native call {nat:8.3f} ms ({a.threads} thread(s))")


def _timed_native():
    """Wrap the fused step's native entry point (backends.cpu_decode's library) to sum its time per step ->
    (the sum, a function that puts the entry point back). No library: the native column reads 0."""
    from backends import cpu_decode

    acc, lib = {"t": 0.0}, cpu_decode.library()
    if lib is None:
        return acc, lambda: None
    inner = lib.dsv4d_run

    def timed(*args):
        t = time.perf_counter()
        r = inner(*args)
        acc["t"] += time.perf_counter() - t
        return r

    lib.dsv4d_run = timed
    return acc, lambda: setattr(lib, "dsv4d_run", inner)


if __name__ == "__main__":
    sys.exit(main())
