"""`python -m runtime.bench`: run the benchmark scenarios, print a table, write JSON.

    python -m runtime.bench                                   # ours (cpu profile): 1K/4K/16K/64K
    python -m runtime.bench --compare transformers            # side by side on the tiny-hf checkpoint
    python -m runtime.bench --compare dense --contexts 1024,65536
    python -m runtime.bench --onnx --contexts 1024,4096       # the ONNX Runtime path next to torch
    python -m runtime.bench --bandwidth                       # memory bandwidth + a >= 200 MB decode
    python -m runtime.bench --quick                           # a smoke run (seconds)
    python -m runtime.bench --compare llama.cpp --threads 2   # next to llama.cpp (bench/compare_llama.py)
    python -m runtime.bench serve                             # serving: decode tok/s by concurrency, cached TTFT

Each scenario is a child process (its own peak RSS). Prefill: chunks of --chunk tokens, --repeats runs at
contexts up to 4096 and one run beyond (median, min, max). Decode: --decode-steps single-token steps at the
context the prefill reached (median, p10, p90). The ONNX path prefills through its step graph in 256-token
chunks. The dense baseline prefills up to 16K tokens and beyond that
decodes from a randomly filled state of the same shape (a dense 64K prefill takes hours on a CPU).
transformers runs with an address-space limit of --hf-mem-limit GiB so a context it cannot hold ends in an
error row rather than the OOM killer. Errors in the arguments print one line and exit with status 2 (an
unwritable --json is found before any run); Ctrl-C exits with status 130.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from ..cli import ArgumentParser
from ..errors import V4Error
from ..profile import load_profile
from .bandwidth import measure_bandwidth
from .models import bench_checkpoint
from .report import evaluate_targets, format_table


def _machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}


def _run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "runtime.bench.child", json.dumps(spec)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s", "oom": False}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        # SIGKILL may be the kernel's OOM killer or anything else: not counted as out of memory (only the
        # child's own allocation failure under its address-space limit is, child.is_out_of_memory)
        why = "killed by SIGKILL (out of memory or another cause)" if r.returncode in (-9, 137) else tail[:200]
        return {**spec, "error": why, "oom": False}
    return {**spec, **json.loads(lines[-1])}


def _summary(res: dict) -> dict:
    """Medians and spreads of one result's raw timings."""
    out = {}
    if res.get("prefill_s"):
        t = res["prefill_s"]
        out.update(prefill_tok_s=res["context"] / statistics.median(t), prefill_min_s=min(t), prefill_max_s=max(t))
    if res.get("decode_step_ms"):
        d = sorted(res["decode_step_ms"])
        out.update(decode_ms=statistics.median(d), decode_p10_ms=d[len(d) // 10], decode_p90_ms=d[(9 * len(d)) // 10])
    return out


def parse(argv):
    ap = ArgumentParser(prog="python -m runtime.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu", help="profile of this runtime's engine (default cpu)")
    ap.add_argument("--model", default=None,
                    help="tiny (default: the random 5-layer preset), tiny-hf (default with --compare transformers), "
                         "tiny-r128 (default with --compare llama.cpp), bw-200mb (the bandwidth scenario)")
    ap.add_argument("--checkpoint", default=None, help="an official-layout checkpoint folder instead of --model")
    ap.add_argument("--contexts", default=None, help="comma-separated prompt lengths (default 1024,4096,16384,65536; "
                    "4096,8192,16384 with --compare transformers)")
    ap.add_argument("--compare", default="", help="comma-separated: transformers, dense; or llama.cpp alone")
    ap.add_argument("--onnx", action="store_true", help="also time the ONNX Runtime path (profile onnx-cpu)")
    ap.add_argument("--bandwidth", action="store_true", help="measure memory bandwidth and a >= 200 MB decode")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=4096, help="prefill chunk in tokens")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--hf-mem-limit", type=float, default=16.0, help="address-space limit (GiB) for transformers")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per scenario")
    ap.add_argument("--json", default="bench.json", help="where to write the results (default bench.json)")
    ap.add_argument("--quick", action="store_true", help="smoke run: contexts 300,600, 4 decode steps, 1 repeat")
    args = ap.parse_args(argv)
    compare = [c for c in args.compare.split(",") if c]
    bad = [c for c in compare if c not in ("transformers", "dense", "llama.cpp")]
    if bad:
        raise V4Error(f"unknown --compare engine(s) {', '.join(bad)}; choose transformers, dense, llama.cpp")
    if "llama.cpp" in compare and len(compare) > 1:
        raise V4Error("--compare llama.cpp runs its own scenarios; give it alone")
    default = "4096,8192,16384" if "transformers" in compare else "1024,4096,16384,65536"
    try:
        contexts = [int(c) for c in (args.contexts or ("300,600" if args.quick else default)).split(",")]
    except ValueError:
        raise V4Error(f"--contexts must be comma-separated integers, got {args.contexts!r}") from None
    if any(c < 8 for c in contexts) or args.decode_steps < 1 or args.repeats < 1 or args.chunk < 1 \
            or (args.threads is not None and args.threads < 1):
        raise V4Error("contexts must be >= 8 tokens; --decode-steps, --repeats, --chunk and --threads must be "
                      "positive")
    if args.quick:
        args.decode_steps, args.repeats = 4, 1
    return args, compare, contexts


def main(argv=None) -> int:
    from ..cli import run_cli

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:                    # the serving engine's scenarios (runtime/bench/serve.py)
        from .serve import main as serve_main

        return run_cli(lambda: serve_main(argv[1:]))
    return run_cli(lambda: _bench(argv))


def _bench(argv) -> int:
    from ..cli import writable_file
    from ..config import ModelConfig

    args, compare, contexts = parse(argv)
    json_out = writable_file(args.json, "--json")          # checked before hours of runs, not after them
    model = args.model or ("tiny-hf" if "transformers" in compare else "tiny-r128" if "llama.cpp" in compare
                           else "tiny")
    ck = Path(args.checkpoint) if args.checkpoint else bench_checkpoint(model)
    if not (ck / "config.json").is_file():
        raise V4Error(f"{ck} is not a checkpoint folder (no config.json)")
    load_profile(args.profile)                      # an unknown or invalid profile: one line, exit 2
    if "llama.cpp" in compare:                      # prefill 512 / 2048, decode 1K / 4K, next to llama.cpp
        from .compare_llama import run_compare

        return run_compare(args, ck, _run_child, json_out)
    bw_ck = bench_checkpoint("bw-200mb") if args.bandwidth else None
    vocab = min(ModelConfig.from_file(ck / "config.json").vocab_size, 258)
    base = {"checkpoint": str(ck), "decode_steps": args.decode_steps, "chunk": args.chunk, "threads": args.threads,
            "vocab": vocab, "fill": "prefill"}
    specs = []
    for n in contexts:
        reps = args.repeats if n <= 4096 else 1
        specs.append({**base, "engine": "ours", "profile": args.profile, "context": n, "repeats": reps})
        if args.onnx:                   # the ONNX runner prefills in fixed chunks: any context
            specs.append({**base, "engine": "onnx", "profile": "onnx-cpu", "context": n, "repeats": reps})
        if "dense" in compare:
            specs.append({**base, "engine": "dense", "profile": args.profile, "context": n, "repeats": reps,
                          "fill": "prefill" if n <= 16384 else "random"})
        if "transformers" in compare:
            specs.append({**base, "engine": "transformers", "profile": "cpu", "context": n, "repeats": 1,
                          "mem_limit_gib": args.hf_mem_limit})
    report = {"machine": _machine(), "args": vars(args), "results": []}
    if args.bandwidth:
        print("measuring memory bandwidth ...", file=sys.stderr)
        # a CUDA profile's decode reads HBM: measure that (the fraction of HBM bandwidth at batch 1)
        dev = "cuda" if load_profile(args.profile).backend == "cuda" and torch.cuda.is_available() else "cpu"
        report["bandwidth"] = measure_bandwidth(device=dev)
        specs.append({**base, "engine": "ours", "profile": args.profile, "context": 512, "repeats": 1,
                      "checkpoint": str(bw_ck), "scenario": "bandwidth"})
    for i, spec in enumerate(specs, 1):
        print(f"[{i}/{len(specs)}] {spec['engine']} @ {spec['context']:,} tokens "
              f"({spec.get('scenario', 'prefill + decode')}) ...", file=sys.stderr, flush=True)
        res = _run_child(spec, args.timeout)
        res.update(_summary(res))
        report["results"].append(res)
        if "error" in res:
            print(f"    {res['error']}", file=sys.stderr)
    if args.bandwidth:
        from ..config import ModelConfig
        from ..plan import weight_bytes

        bw = next(r for r in report["results"] if r.get("scenario") == "bandwidth")
        cfg = ModelConfig.from_file(Path(bw["checkpoint"]) / "config.json")
        active = weight_bytes(cfg, load_profile(args.profile), active=True)
        if "decode_ms" in bw:
            got = active / (bw["decode_ms"] / 1e3) / 1e9
            report["bandwidth"].update(active_weight_bytes=active, decode_ms=bw["decode_ms"], decode_gbps=got,
                                       fraction_of_read=got / report["bandwidth"]["read_gbps"])
    report["targets"] = evaluate_targets(report)
    print(format_table(report), flush=True)
    try:
        json_out.write_text(json.dumps(report, indent=2))
    except OSError as e:
        raise V4Error(f"cannot write --json {json_out}: {e.strerror or e} (the table above has the results)") from None
    print(f"wrote {json_out}")
    return 1 if all("error" in r for r in report["results"]) else 0     # nothing measured: a failed run


if __name__ == "__main__":
    sys.exit(main())
