"""`python -m runtime.train.evaluate --checkpoint DIR`: held-out quality of a trained checkpoint through the
runtime itself (the shipped files, as `Runtime.load` reads them), and MTP draft acceptance.

Reports per numerics mode ("exact": float32 compute on the shipped FP8 / FP4 / bf16 weights; "official":
DeepSeek's bf16 / FP8-activation inference numerics) the held-out perplexity and next-token top-1 on the
deterministic held-out split of `runtime.train.data`, and the greedy MTP acceptance rate (kept / drafted)
of `generate(..., speculative="mtp")` continuing held-out prompts. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch


def heldout_quality(rt, windows: torch.Tensor) -> dict:
    nll, correct, n = 0.0, 0, 0
    for w in windows:
        logits = rt.forward(w[None, :-2])[0]
        tgt = w[1:-1]
        nll += torch.nn.functional.cross_entropy(logits, tgt, reduction="sum").item()
        correct += int((logits.argmax(-1) == tgt).sum())
        n += tgt.numel()
    return {"ppl": math.exp(nll / n), "top1": correct / n, "tokens": n}


def acceptance(rt, windows: torch.Tensor, prompt: int, new: int) -> dict:
    kept = drafted = 0
    for w in windows:
        rt.generate([w[:prompt].tolist()], max_new_tokens=new, stop_at_eos=False, speculative="mtp")
        kept, drafted = kept + rt.last_acceptance[0], drafted + rt.last_acceptance[1]
    return {"acceptance": kept / max(drafted, 1), "drafted": drafted}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.train.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--heldout", type=float, default=0.05)
    ap.add_argument("--numerics", nargs="+", default=["exact", "official"])
    ap.add_argument("--spec-prompts", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    from ..api import Runtime
    from ..errors import V4Error
    from . import data

    torch.set_num_threads(a.threads)
    try:
        report = {}
        for mode in a.numerics:
            rt = Runtime.load("cpu", checkpoint=a.checkpoint, numerics=mode, emulate=True, progress=False)
            if rt.tokenizer.name != "tokenizer.json":
                raise V4Error(f"{a.checkpoint}: no tokenizer.json; evaluate a checkpoint from runtime.train")
            _, held = data.split_texts(None, a.heldout)
            stream = data.token_stream(rt.tokenizer.tok, held, rt.config.bos_token_id, rt.config.eos_token_id)
            windows = data.eval_windows(stream, a.seq, a.windows)
            report[mode] = heldout_quality(rt, windows)
            if mode == "exact" and a.spec_prompts:
                report[mode].update(acceptance(rt, windows[:a.spec_prompts], 64, 32))
    except V4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
