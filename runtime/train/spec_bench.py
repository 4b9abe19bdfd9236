"""`python -m runtime.train.spec_bench`: MTP speculative decoding on the shipped default model, batch 1, CPU.

Continues 8 held-out prompts (64 tokens of runtime/default_model/heldout.txt each) by 48 greedy tokens, plain
and with `speculative="mtp"`, interleaved in one process after one untimed call of each (its one-time setup had
counted in the first plain call: end to end read 1.05x where decode read 0.95x); prints the draft acceptance (kept / drafted),
whether the greedy tokens are identical, and the decode-time ratio plain / speculative (`Generation.
decode_seconds`: after the prompt's prefill, which both run alike), then the end-to-end ratio (each whole
`generate` call, the prefill included; the speculative prefill also feeds the MTP block). One line.

`--depth L [L ...]`: where speculation would pay on deeper models of the same widths, which no trained weights
exist for. Random checkpoints of the default's config with L layers (its layer kinds repeated; cached under
DSV4RT_HOME) keep no draft, so one speculative token there costs one iteration (draft + 2-row verify); each line
prints the plain step's and the iteration's cost and the speedup they give at the trained default's acceptance
(a kept draft's 2-position MTP catch-up is not in it: ~10 us more, so the figure is an upper bound).
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.train.spec_bench", description=__doc__)
    ap.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the shipped model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--depth", type=int, nargs="+", default=None, metavar="L",
                    help="project the speedup on random checkpoints of the default's shape with L layers")
    ap.add_argument("--acceptance", type=float, default=0.771,
                    help="draft acceptance the --depth projection assumes (default: this bench's figure on the "
                         "shipped model, 165/214)")
    a = ap.parse_args(argv)
    if a.depth is not None:
        if any(L < 1 for L in a.depth) or not 0 <= a.acceptance <= 1:
            print("error: --depth takes layer counts >= 1 and --acceptance a value in [0, 1]", file=sys.stderr)
            return 2
        return _depths(a)
    import torch

    from .. import default_model
    from ..api import Runtime
    from ..errors import V4Error
    from ..parity.quality import text_windows

    torch.set_num_threads(a.threads)
    try:
        rt = Runtime.load("cpu", checkpoint=a.checkpoint, progress=False)
        w = text_windows(rt.tokenizer, rt.config.bos_token_id, default_model.HELDOUT.read_text(encoding="utf-8"),
                         64, 64 * a.prompts)
    except V4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kept = drafted = 0
    plain = spec = plain_dec = spec_dec = 0.0
    same = True
    for mode in (None, "mtp"):               # untimed: the first call of each builds its plans and buffers
        rt.generate([w[0][:64].tolist()], max_new_tokens=4, stop_at_eos=False, speculative=mode)
    for row in w:
        p = row[:64].tolist()
        t = time.perf_counter()
        g = rt.generate([p], max_new_tokens=a.new, stop_at_eos=False)
        plain += time.perf_counter() - t
        t = time.perf_counter()
        s = rt.generate([p], max_new_tokens=a.new, stop_at_eos=False, speculative="mtp")
        spec += time.perf_counter() - t
        plain_dec, spec_dec = plain_dec + g.decode_seconds, spec_dec + s.decode_seconds
        kept, drafted = kept + rt.last_acceptance[0], drafted + rt.last_acceptance[1]
        same = same and g.tokens == s.tokens
    print(f"acceptance {kept / max(drafted, 1):.3f} ({kept}/{drafted}); greedy identical: {same}; "
          f"speculative speedup {plain_dec / spec_dec:.2f}x decode, {plain / spec:.2f}x end to end "
          f"(batch 1, {a.threads} thread(s))")
    return 0


def _depths(a) -> int:
    import json
    import statistics

    import torch

    from .. import default_model
    from ..api import Runtime
    from ..cache import cache_dir
    from ..checkpoint.make import write_checkpoint

    torch.set_num_threads(a.threads)
    here = default_model.HELDOUT.parent
    base = json.loads((here / "config.json").read_text())
    acc = a.acceptance
    body, mtp = base["compress_ratios"][:-1], base["compress_ratios"][-1:]
    for L in a.depth:
        cfg = {**base, "num_hidden_layers": L, "compress_ratios": [body[i % len(body)] for i in range(L)] + mtp}
        out = cache_dir() / f"spec-depth-{L}"
        if not (out / "model.safetensors.index.json").exists():
            write_checkpoint(out, cfg, seed=1, shards=1)
            (out / "tokenizer.json").write_bytes((here / "tokenizer.json").read_bytes())
        rt = Runtime.load("cpu", checkpoint=str(out), progress=False)
        p = [base["bos_token_id"]] + [5 + (7 * j) % 300 for j in range(63)]
        cost = {None: [], "mtp": []}
        for _ in range(3):
            for mode in cost:
                g = rt.generate([p], max_new_tokens=a.new, stop_at_eos=False, speculative=mode)
                cost[mode].append(g.decode_seconds / len(g.tokens[0]))
        kept, drafted = rt.last_acceptance
        step, it = statistics.median(cost[None]), statistics.median(cost["mtp"]) * (1 + kept / max(drafted, 1))
        print(f"layers {L}: plain step {step * 1e6:.0f} us, speculative iteration {it * 1e6:.0f} us "
              f"({it / step:.2f} steps; random weights kept {kept}/{drafted}); at acceptance {acc}: "
              f"{(1 + acc) * step / it:.2f}x ({a.threads} thread(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
