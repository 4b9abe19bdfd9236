"""`python -m runtime.bench serve`: the serving engine on the tiny model (in-process, no HTTP).

- aggregate decode tokens/s at concurrency 1, 4, 16, 32 (each sequence: a short prompt, then --tokens greedy
  tokens), with the batch-invariant op layout the server runs and, for comparison, the CPU table as it is
  (not batch-invariant: what exactness costs);
- time to first token of a 16K-token prompt cold, and with a 15.9K-token prefix already in the prefix cache;
- a roofline for the decode rates: the multiply-adds a token costs at the run's mean position
  (runtime.plan.sizes.macs_per_token) times tok/s, against what a large float32 GEMM (torch.mm, MKL) reaches
  on the same threads: a batched step of a model this small does its arithmetic in the last-level cache, so
  the rate at 16 or 32 sequences is bounded by the machine's multiply-add throughput, not by weight reads.
Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import torch

from ..errors import V4Error


class _Out:
    def __init__(self):
        self.times, self.done = [], threading.Event()

    def token(self, t, lp):
        self.times.append(time.perf_counter())      # each token's arrival (the rate counts from them, not polls)
        return False

    def finish(self, reason):
        self.done.set()


def _prompt(i: int, n: int) -> list[int]:
    return [0] + [2 + (i * 31 + j * 7) % 250 for j in range(n - 1)]


def decode_rate(rt, concurrency: int, tokens: int) -> float:
    from ..serve.engine import Engine, GenParams, Sequence

    eng = Engine(rt, max_num_seqs=max(32, concurrency)).start()
    try:
        outs = [_Out() for _ in range(concurrency)]
        for i, o in enumerate(outs):
            eng.submit(Sequence(_prompt(i, 24 + i), GenParams(max_tokens=tokens, ignore_eos=True), o))
        for o in outs:
            o.done.wait()
        # from the moment every sequence has its first token (all prefills done) to the last token: the tokens
        # decoded in that span over its length
        t0 = max(o.times[0] for o in outs)
        t1 = max(o.times[-1] for o in outs)
        n = sum(sum(1 for t in o.times if t > t0) for o in outs)
        if n == 0 or t1 <= t0:
            raise V4Error(f"no decode step after the last prefill at concurrency {concurrency}; "
                          "raise --tokens")
        return n / (t1 - t0)
    finally:
        eng.stop()


def mean_position(concurrency: int, tokens: int) -> float:
    """The mean position of the decode steps `decode_rate` times (prompts of 24 + i tokens, then `tokens`)."""
    return sum(24 + i for i in range(concurrency)) / concurrency + tokens / 2


def gemm_rate(n: int = 1536, reps: int = 6) -> float:
    """Multiply-adds per second of a float32 [n, n] x [n, n] torch.mm on the current threads (best of reps)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return n ** 3 / best


def ttft(rt, context: int, shared: int) -> dict:
    from ..serve.engine import Engine, GenParams, Sequence
    from ..serve.prefix_cache import PrefixCache

    cache = PrefixCache(rt.config.num_layers, 128, 4, 2 << 30)
    eng = Engine(rt, cache=cache, prefill_tokens=1 << 20).start()

    def first(ids):
        o = _Out()
        t = time.perf_counter()
        seq = eng.submit(Sequence(ids, GenParams(max_tokens=1), o))
        o.done.wait()
        return o.times[0] - t, seq.cached_tokens

    try:
        a = _prompt(1, context)
        cold, _ = first(a)
        b = a[:shared] + _prompt(2, context - shared)
        hit, cached = first(b)
    finally:
        eng.stop()
    return {"context": context, "shared": shared, "cold_s": cold, "hit_s": hit, "cached_tokens": cached,
            "hit_over_cold": hit / cold}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.bench serve", description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,4,16,32")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per sequence in the decode runs")
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--shared", type=int, default=15900)
    ap.add_argument("--no-plain", action="store_true", help="skip the non-invariant comparison")
    ap.add_argument("--no-ttft", action="store_true", help="skip the 16K-token time-to-first-token runs")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    try:
        levels = [int(x) for x in a.concurrency.split(",")]
    except ValueError:
        print(f"bench serve: --concurrency must be comma-separated integers, got {a.concurrency!r}", file=sys.stderr)
        return 2
    if a.shared >= a.context or a.tokens < 2 or min(levels) < 1:
        print("bench serve: need --shared < --context, --tokens >= 2, concurrency >= 1", file=sys.stderr)
        return 2
    if a.out:                                # before the runs, so that their results are not lost at the end
        from ..cli import writable_file

        try:
            writable_file(a.out, "--out")
        except V4Error as e:
            print(f"bench serve: {e}", file=sys.stderr)
            return 2
    from ..api import Runtime
    from ..plan.sizes import macs_per_token
    from ..serve.engine import serving_runtime

    plain = Runtime.load("cpu", progress=False)
    inv = serving_runtime(plain, max(64, *levels))
    res = {"threads": torch.get_num_threads(), "decode": [], "ttft": None}
    with torch.inference_mode():
        # one short run first: the first decode step builds the fused kernels' plans (FP8 / FP4 weights
        # widened once), which would otherwise land inside the first level's measurement
        decode_rate(inv, 1, 4)
        for c in levels:
            row = {"concurrency": c, "invariant_tok_s": decode_rate(inv, c, a.tokens)}
            if not a.no_plain:
                row["plain_tok_s"] = decode_rate(plain, c, a.tokens)
            res["decode"].append(row)
            print(json.dumps(row), flush=True)
        base = res["decode"][0]["invariant_tok_s"]
        for row in res["decode"]:
            row["speedup_vs_1"] = row["invariant_tok_s"] / base
            macs = macs_per_token(plain.config, round(mean_position(row["concurrency"], a.tokens)))["total"]
            row["macs_per_token"], row["gmac_s"] = macs, row["invariant_tok_s"] * macs / 1e9
        res["gemm_gmac_s"] = gemm_rate() / 1e9
        if not a.no_ttft:
            res["ttft"] = ttft(inv, a.context, a.shared)
    print(f"{'conc':>5} {'tok/s (invariant)':>18} {'x vs 1':>7} {'GMAC/s':>7} {'tok/s (plain table)':>20}")
    for r in res["decode"]:
        print(f"{r['concurrency']:>5} {r['invariant_tok_s']:>18.1f} {r['speedup_vs_1']:>7.2f} {r['gmac_s']:>7.1f} "
              f"{r.get('plain_tok_s', float('nan')):>20.1f}")
    one = res["decode"][0]
    print(f"roofline: {one['macs_per_token'] / 1e6:.2f} M multiply-adds per token; a float32 torch.mm reaches "
          f"{res['gemm_gmac_s']:.0f} GMAC/s on {res['threads']} thread(s); 8x the "
          f"single-stream rate (the issue's target at 16) would need {8 * one['gmac_s']:.0f} GMAC/s ({800 * one['gmac_s'] / res['gemm_gmac_s']:.0f}% "
          "of it)")
    t = res["ttft"]
    if t is not None:
        print(f"TTFT {t['context']:,}-token prompt: cold {t['cold_s']:.2f} s, with {t['cached_tokens']:,} cached "
              f"{t['hit_s']:.3f} s ({100 * t['hit_over_cold']:.1f}% of cold)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0
