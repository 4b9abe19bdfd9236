"""One benchmark scenario in a fresh process (its peak RSS is its own). Reads a JSON spec from argv[1],
prints one JSON result line on stdout. Run by `python -m runtime.bench`; not a user command."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

COUNTED_STEPS = 4           # decode steps whose ATen ops are counted: every position mod the CSA ratio once


def _status_mib(key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not getrusage's ru_maxrss: Linux carries that across
    exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _engine(spec: dict):
    from .engines import HFEngine, OnnxEngine, TorchEngine
    from ..api import Runtime

    kind, ck = spec["engine"], Path(spec["checkpoint"])
    if kind == "transformers":
        return HFEngine(ck)
    rt = Runtime.load(spec["profile"], checkpoint=ck, progress=False)
    if kind == "onnx":
        return OnnxEngine(rt, chunk=spec["chunk"])
    dense = spec["context"] + spec["decode_steps"] + 8 if kind == "dense" else None
    return TorchEngine(rt, dense_context=dense, chunk=spec["chunk"])


def count_aten_ops(fn):
    """(fn(), how many ATen operators it ran): every op torch dispatches below Python, views and copies
    included. On a small model a decode step's time follows this count (each op costs ~1-3 us of dispatch
    here, more than its arithmetic), so the bench reports it per engine to explain the decode ratios."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        out = fn()
    return out, Count.n


def run(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec.get("mem_limit_gib"):               # fail with an error instead of meeting the OOM killer
        lim = int(spec["mem_limit_gib"] * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    t0 = time.perf_counter()
    eng = _engine(spec)
    res = {"load_s": time.perf_counter() - t0, "threads": torch.get_num_threads()}
    g = torch.Generator().manual_seed(spec.get("seed", 0))
    N, vocab = spec["context"], spec["vocab"]
    warm = eng.new_state()                      # warm-up: allocator, kernels, first-call work
    eng.prefill(torch.randint(2, vocab, (1, 256), generator=g), warm)
    for _ in range(3):
        eng.step(5, warm)
    del warm
    res["rss_after_load_mib"] = _status_mib("VmRSS")
    ids = torch.randint(2, vocab, (1, N), generator=g)
    times, state = [], None
    if spec["fill"] == "random":
        state = eng.new_state()
        eng.fill(state, N)
        res["filled"], tok = "random", 5
    else:
        for _ in range(spec["repeats"]):
            state = None                        # free the previous state before the next prefill
            state = eng.new_state()
            t = time.perf_counter()
            tok = int(eng.prefill(ids, state).argmax())     # reading the token waits for a device to finish
            times.append(time.perf_counter() - t)
        res["prefill_s"] = times
        res["prefill_tok_s"] = N / statistics.median(times)
    steps, tokens = [], [tok]
    for _ in range(spec["decode_steps"]):
        t = time.perf_counter()
        tok = int(eng.step(tok, state).argmax())            # synchronous: the step is done when this returns
        steps.append(time.perf_counter() - t)
        tokens.append(tok)
    res["decode_step_ms"] = [1e3 * s for s in steps]
    if spec["engine"] != "onnx":                # 4 more, untimed steps (a CSA window's cycle): the torch ops
        counts = []                             # one step dispatches, on average
        for _ in range(COUNTED_STEPS):
            logits, n = count_aten_ops(lambda t=tok: eng.step(t, state))
            tok = int(logits.argmax())
            counts.append(n)
            tokens.append(tok)
        res["decode_aten_ops"] = sum(counts) / len(counts)
    res["greedy_tokens"] = tokens               # engines on the same weights should agree (same model)
    res["state_bytes"] = eng.state_bytes(state)
    if spec["engine"] == "ours":                # the planner's figure for the same sequence length
        res["planned_state_bytes"] = eng.rt.memory.state_bytes([N + len(tokens) - 1])
    # The kernel's RSS counters are per-CPU approximations read at different moments: VmHWM was seen 0.2 MiB
    # below an earlier VmRSS. A peak is at least every RSS this process observed.
    res["peak_rss_mib"] = max(_status_mib("VmHWM"), _status_mib("VmRSS"), res["rss_after_load_mib"])
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:   # a CUDA profile's device memory
        res["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return res


# What torch and Python say when an allocation fails (the CPU allocator under RLIMIT_AS, CUDA's caching
# allocator): only these count as running out of memory.
OOM_MESSAGES = ("can't allocate memory", "cannot allocate memory", "not enough memory", "out of memory")


def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in OOM_MESSAGES)


def main() -> int:
    spec = json.loads(sys.argv[1])
    from ..errors import V4Error

    try:
        res = run(spec)
    except V4Error as e:                        # e.g. the profile's device is not on this machine: one line
        res = {"error": str(e)}
    except (MemoryError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not is_out_of_memory(e):
            raise                               # any other failure: the parent reports it, never as memory
        res = {"error": f"out of memory (limit {spec.get('mem_limit_gib')} GiB): {msg[:160]}", "oom": True,
               "peak_rss_mib": _status_mib("VmHWM")}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
