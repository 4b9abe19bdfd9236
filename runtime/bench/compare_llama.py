"""`python -m runtime.bench --compare llama.cpp`: this runtime next to llama.cpp's native GGUF, same checkpoint.

Builds nothing: it uses a llama.cpp build and converter where the peer scripts put them (../shared/peers/
llamacpp/: `build.sh` builds into $LLAMA_DIR, default /tmp/llamacpp, including `dsv4_bench`; `convert.sh` runs
llama.cpp's own converter). Without them it prints one line saying so and the runtime's figures alone.
The checkpoint (default the bench model `tiny-r128`: the tiny preset with ratio 16 -> 128 and indexer head dim
32 -> 128, what llama.cpp's deepseek4 accepts) is converted once to `$LLAMA_DIR/gguf/<name>_native.gguf`
(upstream's Q8_0 linears + MXFP4 experts; redone when the checkpoint is newer). Both engines run with the same
threads: prefill tok/s at 512 and 2048 tokens, decode ms/token at 1K and 4K context (llama.cpp: dsv4_bench,
KV f16, flash attention auto = llama.cpp's defaults; the runtime: bench child processes). Then ATen ops per
decode step and per block, fused (`decode_block` = cpu.native_fused) and unfused (the reference per-op path).
"""

from __future__ import annotations

import os
import statistics
import subprocess
from pathlib import Path

from ..errors import V4Error

PREFILL, DECODE = (512, 2048), (1024, 4096)
ROOT = Path(__file__).resolve().parents[2]


def llama_dir() -> Path:
    return Path(os.environ.get("LLAMA_DIR", "/tmp/llamacpp"))


def peer_dir() -> Path | None:
    """The peer scripts (convert.sh, dsv4_convert.py): $LLAMA_PEERS, else ../shared/peers/llamacpp."""
    for cand in (os.environ.get("LLAMA_PEERS"), ROOT.parent / "shared" / "peers" / "llamacpp",
                 ROOT / "shared" / "peers" / "llamacpp", Path("/work/shared/peers/llamacpp")):
        if cand and (Path(cand) / "convert.sh").is_file():
            return Path(cand)
    return None


def find_llama() -> tuple[dict | None, str]:
    """-> ({"bench": dsv4_bench, "convert": convert.sh, "dir": LLAMA_DIR}, "") or (None, one-line note)."""
    d = llama_dir()
    bench = d / "build" / "bin" / "dsv4_bench"
    peers = peer_dir()
    if not bench.is_file():
        return None, (f"note: llama.cpp not found ({bench} missing; build it with bash "
                      f"../shared/peers/llamacpp/build.sh, or set LLAMA_DIR): llama.cpp columns skipped")
    if peers is None:
        return None, ("note: llama.cpp's converter scripts not found (../shared/peers/llamacpp/convert.sh; set "
                      "LLAMA_PEERS): llama.cpp columns skipped")
    return {"bench": bench, "convert": peers / "convert.sh", "dir": d}, ""


def parse_dsv4_bench(text: str) -> dict:
    """dsv4_bench's lines "pp512 t/s 1234.5" / "tg@1024 ms 1.23" -> {"pp512": tok/s, "tg@1024": ms}."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and (parts[0].startswith("pp") or parts[0].startswith("tg@")):
            try:
                out[parts[0]] = float(parts[2])
            except ValueError:
                continue
    if not out:
        raise V4Error(f"dsv4_bench printed no results (got {text.strip()[:120]!r}); rebuild it with "
                      "bash ../shared/peers/llamacpp/build.sh")
    return out


def gguf_for(tools: dict, ckpt: Path) -> Path:
    out = tools["dir"] / "gguf" / f"{ckpt.resolve().name}_native.gguf"
    newest = max(p.stat().st_mtime for p in ckpt.iterdir())
    if not out.is_file() or out.stat().st_mtime < newest:
        r = subprocess.run(["bash", str(tools["convert"]), str(ckpt), str(out), "native"], capture_output=True,
                           text=True, env={**os.environ, "LLAMA_DIR": str(tools["dir"])})
        if r.returncode != 0 or not out.is_file():
            tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise V4Error(f"llama.cpp's converter failed on {ckpt}: {tail[:200]}")
    return out


def parse_llama_bench(text: str) -> dict:
    """llama-bench's `-o json` records -> {"pp512": tok/s, "tg@1024": ms per token} (decode at depth n_depth)."""
    import json

    try:
        rows = json.loads(text)
    except ValueError:
        raise V4Error(f"llama-bench printed no JSON results (got {text.strip()[:120]!r})") from None
    out = {}
    for r in rows:
        if r.get("n_gen", 0) == 0 and r.get("n_prompt"):
            out[f"pp{r['n_prompt']}"] = float(r["avg_ts"])
        elif r.get("n_gen"):
            out[f"tg@{r.get('n_depth', 0)}"] = 1000.0 / float(r["avg_ts"])
    return out


def _llama_bench_no_repack(tools: dict, gguf: Path, threads: int, reps: int, steps: int) -> dict:
    """llama.cpp's own llama-bench with weight repacking off (its defaults otherwise: KV f16, flash attention
    auto): prefill at PREFILL tokens, decode of `steps` tokens at depths DECODE."""
    exe = tools["dir"] / "build" / "bin" / "llama-bench"
    base = [str(exe), "-m", str(gguf), "-t", str(threads), "-r", str(reps), "--repack", "0", "-o", "json"]
    out = {}
    for args in (["-p", ",".join(map(str, PREFILL)), "-n", "0"],
                 ["-p", "0", "-n", str(steps), "-d", ",".join(map(str, DECODE))]):
        r = subprocess.run(base + args, capture_output=True, text=True)
        if r.returncode != 0:
            raise V4Error(f"llama-bench --repack 0 failed too: {_abort_line(r.stderr)}")
        out.update(parse_llama_bench(r.stdout))
    return out


def _abort_line(stderr: str) -> str:
    """The line that says why llama.cpp stopped (its GGML_ASSERT), not the last line of its gdb backtrace."""
    lines = stderr.strip().splitlines() or ["no output"]
    return next((ln for ln in lines if "GGML_ASSERT" in ln or "error" in ln.lower()), lines[-1])[:200]


def run_llama(tools: dict, gguf: Path, threads: int, reps: int, steps: int) -> tuple[dict, str]:
    """-> (results, note). dsv4_bench first; where llama.cpp aborts building its graph with repacked weights
    (seen on an Intel Xeon host with AVX-512: GGML_ASSERT(*cur_backend_id != -1) in the scheduler), the same
    figures from llama-bench with `--repack 0`, and a note saying so."""
    cmd = [str(tools["bench"]), str(gguf), "--threads", str(threads), "--kv", "f16", "--fa", "auto",
           "--reps", str(reps), "--steps", str(steps), "--pp", ",".join(map(str, PREFILL)),
           "--tg", ",".join(map(str, DECODE))]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode == 0:
        return parse_dsv4_bench(r.stdout), ""
    why = _abort_line(r.stderr)
    if "GGML_ASSERT" in why and (tools["dir"] / "build" / "bin" / "llama-bench").is_file():
        return (_llama_bench_no_repack(tools, gguf, threads, reps, steps),
                f"note: dsv4_bench aborted ({why}); llama.cpp columns from llama-bench --repack 0 (weights not "
                "repacked for this CPU: llama.cpp may be faster where repacking works)")
    raise V4Error(f"dsv4_bench failed: {why}")


def op_counts(ckpt: Path, profile: str, context: int = 300, steps: int = 4) -> dict:
    """ATen ops per decode step and per block kind, fused and unfused (in this process)."""
    from collections import defaultdict

    from ..api import Runtime
    from .decode_ops import profile_decode, unfused

    out = {}
    for name in ("fused", "unfused"):
        rt = Runtime.load(profile, checkpoint=ckpt, progress=False)
        if name == "unfused":
            unfused(rt)
        res = profile_decode(rt, context, steps)
        kinds = defaultdict(float)
        for (kind, _), (n, _) in res["by_class"].items():
            kinds[kind] += n / steps
        per_block = {k: v / sum(1 for i in range(rt.config.num_layers) if rt.config.layer_kind(i) == k)
                     for k, v in kinds.items() if k != "other"}
        out[name] = {"per_step": res["aten_per_step"], "per_block": per_block, "outside_blocks": kinds["other"]}
    return out


def format_compare(ours: dict, llama: dict | None, threads: int, counts: dict | None, note: str = "") -> str:
    cols = [f"pp{n}" for n in PREFILL] + [f"tg@{n}" for n in DECODE]
    head = f"{'engine':<52} {'thr':>3} " + " ".join(f"{c + (' tok/s' if c.startswith('pp') else ' ms'):>13}"
                                                      for c in cols)
    lines = [head]

    def row(name, r):
        vals = " ".join(f"{r[c]:13.{0 if c.startswith('pp') else 2}f}" if c in r else f"{'-':>13}" for c in cols)
        lines.append(f"{name:<52} {threads:>3} {vals}")
    if llama is not None:
        row("llama.cpp native GGUF (Q8_0 + MXFP4), KV f16, FA auto", llama)
    row("dsv4rt cpu (fused decode_block)", ours)
    if llama is not None:
        ratio = {c: (ours[c] / llama[c]) for c in cols if c in ours and c in llama}
        lines.append(f"{'ratio dsv4rt / llama.cpp':<52} {'':>3} " + " ".join(
            f"{ratio[c]:12.2f}x" if c in ratio else f"{'-':>13}" for c in cols))
        dec = [ratio[c] for c in cols if c.startswith("tg") and c in ratio]      # ours ms / theirs
        pre = [ratio[c] for c in cols if c.startswith("pp") and c in ratio]      # ours tok/s / theirs
        if dec and pre:
            lines.append(f"targets: decode <= 1.25x llama.cpp's ms/token ({'met' if max(dec) <= 1.25 else 'NOT met'}"
                         f", worst {max(dec):.2f}x); prefill >= 1.2x its tok/s ({'met' if min(pre) >= 1.2 else 'NOT met'}"
                         f", worst {min(pre):.2f}x)")
    if note:
        lines.append(note)
    if counts:
        for name, c in counts.items():
            blocks = ", ".join(f"{k} {v:.0f}" for k, v in sorted(c["per_block"].items()))
            lines.append(f"ATen ops per decode step, {name}: {c['per_step']:.0f} (per block: {blocks}; "
                         f"outside the blocks {c['outside_blocks']:.0f})")
    return "\n".join(lines)


def ours_row(results: list[dict]) -> dict:
    """Bench child results (runtime.bench.child) -> {"pp512": tok/s, "tg@1024": ms}."""
    out = {}
    for r in results:
        if "error" in r:
            continue
        if r.get("mode") == "prefill" and r.get("prefill_s"):
            out[f"pp{r['context']}"] = r["context"] / statistics.median(r["prefill_s"])
        if r.get("mode") == "decode" and r.get("decode_step_ms"):
            out[f"tg@{r['context']}"] = statistics.median(r["decode_step_ms"])
    return out


def run_compare(args, ck: Path, run_child, json_out) -> int:
    """The `--compare llama.cpp` scenario set (runtime/bench/__main__.py hands over its parsed arguments)."""
    import json

    import torch

    threads = args.threads or torch.get_num_threads()
    base = {"checkpoint": str(ck), "chunk": args.chunk, "threads": threads, "vocab": 258, "fill": "prefill",
            "engine": "ours", "profile": args.profile}
    specs = [{**base, "mode": "prefill", "context": n, "repeats": args.repeats, "decode_steps": 1} for n in PREFILL]
    specs += [{**base, "mode": "decode", "context": n, "repeats": 1, "decode_steps": args.decode_steps} for n in DECODE]
    results = []
    for i, spec in enumerate(specs, 1):
        print(f"[{i}/{len(specs)}] ours: {spec['mode']} @ {spec['context']:,} tokens ...", flush=True,
              file=__import__("sys").stderr)
        results.append(run_child(spec, args.timeout))
    tools, note = find_llama()
    llama = None
    if tools is not None:
        llama, note = run_llama(tools, gguf_for(tools, ck), threads, args.repeats, args.decode_steps)
    counts = op_counts(ck, args.profile)
    ours = ours_row(results)
    print(format_compare(ours, llama, threads, counts, note), flush=True)
    json_out.write_text(json.dumps({"args": vars(args), "ours": ours, "llama.cpp": llama, "note": note,
                                    "aten_ops": counts, "results": results}, indent=2, default=str))
    print(f"wrote {json_out}")
    return 0 if ours else 1
