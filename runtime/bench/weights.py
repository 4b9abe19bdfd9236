"""`python -m runtime.bench.weights`: the weight path's figures (issue 15) -- load time, resident vs stored
bytes, decode tokens/s and the effective bandwidth on the *stored* bytes a token reads.

    python -m runtime.bench.weights                          # tiny and v4-width, new path and the f32 path
    python -m runtime.bench.weights --models tiny --no-f32   # the new path only

Models: `tiny` (the random tiny preset, not the shipped trained default) and `v4-width`: V4-Flash's own layer
widths (d=4096, 64 heads x 512, q_lora 1024, o_groups 8 x 1024, 64 routed experts of 2048, top-6 + 1 shared) in
2 layers (CSA, HCA), no MTP block, vocab 8192: ~2 GB stored, ~15 GB as float32 (the f32 path runs only where that fits in RAM);
`v4-width-16e`: the same with 16 routed experts (~0.6 GB stored, ~4.5 GB float32), for the ratio to the f32
path on a smaller host. Generated once into the cache folder tensor by tensor (only the stored bytes are
ever in memory).
Each measurement is a fresh child process: `RssAnon` / `RssFile` growth over the load (anonymous memory vs
pages of the memory-mapped checkpoint), the load's wall time (the second of two loads: the shards are then in
the page cache), then a 16-token prefill and `--decode-steps` single-token steps (median). `f32` is the former
path, measured for the ratio: every tensor decoded to float32 (`load_checkpoint`) and computed with F.linear.
The machine's read bandwidth is measured in the same child (`runtime.bench.bandwidth`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

V4_WIDTH = {"hidden_size": 4096, "num_hidden_layers": 2, "num_attention_heads": 64, "head_dim": 512,
            "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024,
            "n_routed_experts": 64, "num_experts_per_tok": 6, "n_shared_experts": 1, "moe_intermediate_size": 2048,
            "vocab_size": 8192, "num_hash_layers": 0, "compress_ratios": [4, 128], "num_nextn_predict_layers": 0,
            "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512}


def v4_width_config(experts: int = 64) -> dict:
    from ..presets import preset

    raw = preset("flash")
    raw.update(V4_WIDTH, n_routed_experts=experts)
    return raw


def write_streaming(out: Path, raw: dict, seed: int = 0, shard_bytes: int = 1 << 30) -> Path:
    """An official-layout checkpoint generated tensor by tensor (the generator's own init and encoding), so
    only the stored bytes are held: for models whose float32 form would not fit next to them."""
    from safetensors.torch import save_file
    import torch

    from ..checkpoint.inventory import expected_tensors
    from ..checkpoint.make import CHECKPOINT_FORMAT_VERSION, _encode, _init
    from ..config import ModelConfig

    cfg = ModelConfig.from_hf(raw, source="bench config")
    g = torch.Generator().manual_seed(seed)
    shards, cur, size, weight_map = [], {}, 0, {}

    def flush():
        nonlocal cur, size
        if cur:
            shards.append(cur)
            cur, size = {}, 0

    from .. import number_formats

    def encode(v, kind):                  # the generator's encoding, without decoding the result back
        if kind == "fp8":
            return number_formats.quant_fp8_block(v)
        if kind == "fp4":
            return number_formats.quant_fp4(v)
        return _encode(v, kind)[:2]

    for name, (shape, kind) in expected_tensors(cfg, cfg.expert_dtype or "fp4").items():
        w, s = encode(_init(name, shape, cfg, g), kind)
        cur[name] = w.contiguous()
        if s is not None:
            cur[name.removesuffix(".weight") + ".scale"] = s.contiguous()
        size += sum(t.numel() * t.element_size() for t in (w, s) if t is not None)
        if size >= shard_bytes:
            flush()
    flush()
    total = 0
    for k, part in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total, "generator": "dsv4rt runtime.bench.weights", "seed": seed,
                      "format_version": CHECKPOINT_FORMAT_VERSION},
         "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    return out


def bench_model(name: str) -> Path:
    from ..cache import build_once, cache_dir
    from ..checkpoint.builtin import random_checkpoint

    if name == "tiny":
        return random_checkpoint()
    if name not in ("v4-width", "v4-width-16e"):
        from ..errors import InputError

        raise InputError(f"unknown model {name!r}; choose tiny, v4-width or v4-width-16e")
    raw = v4_width_config(16 if name == "v4-width-16e" else 64)
    key = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:12]
    return build_once(cache_dir() / f"bench-{name}-{key}", "model.safetensors.index.json",
                      lambda tmp: write_streaming(tmp, raw))


def _rss() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("RssAnon", "RssFile")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def child(spec: dict) -> dict:
    import torch

    from ..api import Runtime
    from ..plan import weight_bytes
    from .bandwidth import measure_bandwidth

    torch.manual_seed(0)
    bw = measure_bandwidth(gib=0.5, repeats=3)
    path, engine = spec["checkpoint"], spec["engine"]
    res = {"read_gbps": bw["read_gbps"]}
    if engine == "stored":
        Runtime.load(spec["profile"], checkpoint=path, progress=False)        # warms imports and page cache
        before = _rss()
        t = time.perf_counter()
        rt = Runtime.load(spec["profile"], checkpoint=path, progress=False)
        res["load_s"] = time.perf_counter() - t
        after = _rss()
        model = rt.model
        res.update(stored_bytes=rt.weights.stored_bytes, held_bytes=rt.weights.held_bytes(),
                   mapped_bytes=rt.weights.mapped_bytes(), dispatch_linear=next(
                       r.impl for r in rt.dispatch.rows if r.op == "linear"))
    else:                                                                     # the former float32 path
        from ..checkpoint import load_checkpoint
        from ..model.v4 import Transformer

        rt = Runtime.load(spec["profile"], checkpoint=path, progress=False)  # its dispatch table only
        before = _rss()
        t = time.perf_counter()
        ck = load_checkpoint(path, progress=False)
        tensors = {n: v.clone() if v.dtype == torch.float32 else v for n, v in ck.tensors.items()}  # own copies
        ck.tensors.clear()
        res["load_s"] = time.perf_counter() - t
        after = _rss()
        model = Transformer(rt.config, tensors, frozenset(), rt.dispatch.ops)
        res.update(stored_bytes=rt.weights.stored_bytes, held_bytes=sum(v.numel() * v.element_size()
                                                                       for v in tensors.values()), mapped_bytes=0)
    res.update(anon_growth=after["RssAnon"] - before["RssAnon"], file_growth=after["RssFile"] - before["RssFile"])
    from ..model.state import ModelState

    st = ModelState(model.cfg, 1, model.device)
    with torch.inference_mode():
        t = time.perf_counter()
        logits = model.forward(torch.randint(2, min(model.cfg.vocab_size, 258), (1, 16)), st.seqs)
        res["prefill16_s"] = time.perf_counter() - t
        steps = []
        tok = int(logits[0, -1].argmax())
        for _ in range(spec["decode_steps"]):
            t = time.perf_counter()
            logits = model.forward(torch.tensor([[tok]]), st.seqs)
            steps.append(time.perf_counter() - t)
            tok = int(logits[0, -1].argmax())
    res["decode_first_s"] = steps[0]
    res["decode_s"] = statistics.median(steps[1:] or steps)
    active = weight_bytes(model.cfg, rt.profile, active=True)       # stored bytes one token reads
    res.update(active_stored_bytes=active, decode_tok_s=1 / res["decode_s"],
               effective_gbps=active / res["decode_s"] / 1e9)
    res["fraction_of_read_bw"] = res["effective_gbps"] / bw["read_gbps"]
    return res


def _run(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "runtime.bench.weights", "--child", json.dumps(spec)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        return {**spec, "error": ((r.stderr.strip().splitlines() or ["no output"])[-1])[:200]}
    return {**spec, **json.loads(lines[-1])}


def _f32_fits(path: Path) -> bool:
    from ..plan.memory import host_ram

    stored = json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    return host_ram()[1] > 9 * stored * 1.2            # float32 is ~8x the stored bytes, plus headroom


def format_rows(rows: list[dict]) -> str:
    g = lambda b: f"{b / 2 ** 30:.3f}"  # noqa: E731
    lines = ["model     engine  load_s  stored_GiB  held_GiB  held/stored  anon_GiB  decode_tok/s  eff_GB/s  "
             "of_read_bw  linear"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<9} {r['engine']:<7} error: {r['error']}")
            continue
        lines.append(f"{r['model']:<9} {r['engine']:<7} {r['load_s']:>6.2f}  {g(r['stored_bytes']):>10}  "
                     f"{g(r['held_bytes']):>8}  {r['held_bytes'] / r['stored_bytes']:>11.2f}  "
                     f"{g(r['anon_growth']):>8}  {r['decode_tok_s']:>12.2f}  {r['effective_gbps']:>8.2f}  "
                     f"{r['fraction_of_read_bw']:>10.0%}  {r.get('dispatch_linear', 'f32 F.linear')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.bench.weights", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,v4-width-16e,v4-width")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--decode-steps", type=int, default=6)
    ap.add_argument("--no-f32", action="store_true", help="skip the former float32 path")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", default="bench-weights.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    from ..cli import writable_file
    from ..errors import V4Error

    rows = []
    try:
        json_out = writable_file(args.json, "--json")      # before the runs, so that their results are not lost
        models = {m: bench_model(m) for m in args.models.split(",") if m}
    except V4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, path in models.items():
        for engine in ("stored", "f32"):
            if engine == "f32" and (args.no_f32 or not _f32_fits(path)):
                continue
            print(f"{name} / {engine} ...", file=sys.stderr, flush=True)
            spec = {"model": name, "engine": engine, "checkpoint": str(path), "profile": args.profile,
                    "decode_steps": max(2, args.decode_steps)}
            rows.append(_run(spec, args.timeout))
    print(format_rows(rows))
    json_out.write_text(json.dumps(rows, indent=1))
    return 0 if rows and not all("error" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
