"""`python -m runtime.train.spec_bench`: MTP speculative decoding on the shipped default model, batch 1, CPU.

Continues 8 held-out prompts (64 tokens of runtime/default_model/heldout.txt each) by 48 greedy tokens, plain
and with `speculative="mtp"`, interleaved in one process; prints the draft acceptance (kept / drafted),
whether the greedy tokens are identical, and the decode-time ratio plain / speculative (`Generation.
decode_seconds`: after the prompt's prefill, which both run alike), then the end-to-end ratio (each whole
`generate` call, the prefill included; the speculative prefill also feeds the MTP block). One line.
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
    a = ap.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
