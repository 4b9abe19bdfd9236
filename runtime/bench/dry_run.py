"""`python -m runtime.bench.dry_run`: a real-scale dry run on a sparse (shape-true, zero-valued) checkpoint.

    python -m runtime.bench.dry_run --preset flash [--out /tmp/v4-flash-dry] [--profile cpu] [--max-anon-gib 8]

Writes (or reuses) `make --preset flash --sparse` at --out, then in a child process: `Runtime.load(profile,
checkpoint=...)`, a prefill of 8 tokens and 2 single-token decode steps, timing each. The parent samples the
child's anonymous resident memory (`RssAnon`: what the process itself allocated, not the page cache behind its
memory maps) every 50 ms and stops it when it passes --max-anon-gib, so a loader that cannot hold the model
ends in a result line, not in the out-of-memory killer. The outputs are meaningless (every weight is zero);
what is measured is whether the real shapes load and run, how much memory the load holds and how long it takes.
One JSON line goes to stdout (and --json FILE), a readable summary to stderr. Errors in the arguments: one line,
exit 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from ..errors import V4Error

PREFILL_TOKENS = 8
DECODE_STEPS = 2
POLL_S = 0.05


def _status_kib(pid: int | str, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _child(spec: dict) -> dict:
    """Runs in the child: load, prefill, decode; returns the timings and this process's memory."""
    import torch

    from ..api import Runtime

    out = {"anon_start_gib": _status_kib("self", "RssAnon") / 2 ** 20}
    t = time.perf_counter()
    rt = Runtime.load(spec["profile"], checkpoint=spec["checkpoint"], progress=False)
    out["load_s"] = time.perf_counter() - t
    out["anon_after_load_gib"] = _status_kib("self", "RssAnon") / 2 ** 20
    out["memory_plan"] = rt.memory.format()
    # the plan against what the load holds: resident = held - mapped (the anonymous part the plan budgets)
    g = 2 ** 30
    out.update(plan_weights_gib=rt.memory.weights / g, plan_mapped_gib=rt.memory.mapped / g,
               held_gib=rt.weights.held_bytes() / g, mapped_gib=rt.weights.mapped_bytes() / g,
               stored_gib=rt.weights.stored_bytes / g)
    out["plan_resident_gib"] = out["plan_weights_gib"] - out["plan_mapped_gib"]
    out["load_anon_growth_gib"] = out["anon_after_load_gib"] - out["anon_start_gib"]
    out["linear_impl"] = next(r.impl for r in rt.dispatch.rows if r.op == "linear")
    out["experts_impl"] = next(r.impl for r in rt.dispatch.rows if r.op == "routed_experts")
    from backends.cpu_native import isa

    out["native_isa"] = isa()
    state = rt.new_state(batch_size=1)
    ids = torch.arange(2, 2 + PREFILL_TOKENS)[None]
    t = time.perf_counter()
    logits = rt.forward(ids, state=state)
    out["prefill_s"] = time.perf_counter() - t
    out["decode_s"] = []
    for _ in range(DECODE_STEPS):
        nxt = logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        logits = rt.forward(nxt, state=state)
        out["decode_s"].append(time.perf_counter() - t)
    out["finite"] = bool(torch.isfinite(logits).all())
    out["anon_end_gib"] = _status_kib("self", "RssAnon") / 2 ** 20
    return out


def run(checkpoint: Path, profile: str, max_anon_gib: float, timeout_s: float) -> dict:
    """Run the dry run in a child process under the anonymous-memory watchdog. -> result dict."""
    spec = {"checkpoint": str(checkpoint), "profile": profile}
    cmd = [sys.executable, "-m", "runtime.bench.dry_run", "--child", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, start, stopped = 0, time.monotonic(), None
    while proc.poll() is None:
        anon = _status_kib(proc.pid, "RssAnon")
        peak = max(peak, anon or 0)
        elapsed = time.monotonic() - start
        if anon is not None and anon > max_anon_gib * 2 ** 20:
            stopped = f"stopped: anonymous memory passed {max_anon_gib:g} GiB after {elapsed:.1f} s"
        elif elapsed > timeout_s:
            stopped = f"stopped: no result after {timeout_s:.0f} s"
        if stopped:
            proc.kill()
            break
        time.sleep(POLL_S)
    stdout, stderr = proc.communicate()
    res = {**spec, "peak_anon_gib": peak / 2 ** 20, "max_anon_gib": max_anon_gib}
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if stopped:
        res["error"] = stopped
    elif proc.returncode != 0 or not lines:
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        res["error"] = "killed (out of memory?)" if proc.returncode in (-9, 137) else tail[:300]
    else:
        res.update(json.loads(lines[-1]))
    return res


def _summary(res: dict) -> str:
    head = f"dry run of {res['checkpoint']} on profile {res['profile']}: "
    if "error" in res:
        return head + f"{res['error']} (peak anonymous memory {res['peak_anon_gib']:.2f} GiB)"
    dec = ", ".join(f"{d:.2f}" for d in res["decode_s"])
    return (head + f"load {res['load_s']:.1f} s, prefill of {PREFILL_TOKENS} tokens {res['prefill_s']:.2f} s, "
            f"{DECODE_STEPS} decode steps {dec} s; anonymous memory after load {res['anon_after_load_gib']:.2f} "
            f"GiB, peak {res['peak_anon_gib']:.2f} GiB; linear {res['linear_impl']}, experts "
            f"{res['experts_impl']} (native ISA {res['native_isa']}); logits finite: {res['finite']}\n"
            f"  plan: weights {res['plan_weights_gib']:.2f} GiB of which mapped {res['plan_mapped_gib']:.2f} -> resident "
            f"{res['plan_resident_gib']:.2f} GiB; load holds {res['held_gib']:.2f} GiB of which mapped "
            f"{res['mapped_gib']:.2f}, anonymous memory grew {res['load_anon_growth_gib']:.2f} GiB over the load\n"
            f"  {res['memory_plan']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.bench.dry_run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="flash", help="flash (default), pro, or tiny")
    ap.add_argument("--out", default=None, help="sparse checkpoint folder (default /tmp/dsv4rt-dry-<preset>)")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--max-anon-gib", type=float, default=8.0,
                    help="stop the run when its anonymous resident memory passes this (default 8, the issue-15 target)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds (default 3600)")
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    try:
        if args.max_anon_gib <= 0 or args.timeout <= 0:
            raise V4Error("--max-anon-gib and --timeout must be positive")
        from ..presets import preset
        from .. import profile as _profile

        _profile.load_profile(args.profile)                          # a bad profile name: one line, now
        from ..cli import writable_file, writable_folder

        json_out = writable_file(args.json, "--json") if args.json else None     # before the run, not after
        out = writable_folder(args.out or f"/tmp/dsv4rt-dry-{args.preset}", "--out")
        if not (out / "model.safetensors.index.json").is_file():
            from ..checkpoint.sparse import write_sparse_checkpoint

            write_sparse_checkpoint(out, preset(args.preset))
    except V4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = run(out, args.profile, args.max_anon_gib, args.timeout)
    print(_summary(res), file=sys.stderr)
    print(json.dumps(res))
    if json_out:
        json_out.write_text(json.dumps(res, indent=2))
    return 0 if "error" not in res else 1


if __name__ == "__main__":
    sys.exit(main())
