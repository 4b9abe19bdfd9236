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
(a kept draft's 2-position MTP catch-up is not in it: ~10 us more, so the figure is an upper bound), then the
medians of the native calls inside those loops (`dsv4d_run_greedy`, `dsv4d_spec_step`): the iteration's cost
without the loop's host work.

`--parts`: what one iteration is made of on the shipped model (or `--checkpoint`'s), each part timed alone after
a 64-token prefill of the held-out text (median of 300 calls through `Transformer.forward` / `forward_mtp`, and of
the native call inside each; call i feeds the text's next token, or the next two: a verify's rows are different
tokens, each routed to its own experts, as in a real iteration): a plain one-token step, the 2-token verify step, the MTP draft (its block and the head); then the
speedup an iteration would give at `--acceptance` if it cost nothing but its verify and its draft (no host work
between them, no undo records): an upper bound for this loop on these kernels (each part alone keeps its own
weights in cache; inside an iteration they share it).
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
    ap.add_argument("--parts", action="store_true",
                    help="time a plain step, the verify step and the draft alone; print the loop's ceiling")
    a = ap.parse_args(argv)
    if a.threads < 1 or a.prompts < 1 or a.new < 2:
        print("error: --threads and --prompts take values >= 1, --new >= 2 (the first token, then decode steps)",
              file=sys.stderr)
        return 2
    if not 0 <= a.acceptance <= 1:
        print("error: --acceptance takes a value in [0, 1]", file=sys.stderr)
        return 2
    if a.parts:
        return _parts(a)
    if a.depth is not None:
        if any(L < 1 for L in a.depth):
            print("error: --depth takes layer counts >= 1", file=sys.stderr)
            return 2
        return _depths(a)
    import torch

    torch.set_num_threads(a.threads)
    loaded = _load(a, a.prompts)
    if loaded is None:
        return 2
    rt, w = loaded
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


def _load(a, prompts: int):
    """(runtime, `prompts` held-out windows of 64 tokens) for the bench, or None after a one-line error"""
    from .. import default_model
    from ..api import Runtime
    from ..errors import V4Error
    from ..parity.quality import text_windows

    try:
        rt = Runtime.load("cpu", checkpoint=a.checkpoint, progress=False)
        w = text_windows(rt.tokenizer, rt.config.bos_token_id, default_model.HELDOUT.read_text(encoding="utf-8"),
                         64, 64 * prompts)
    except V4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    if not rt.config.num_mtp:
        print(f"error: checkpoint {a.checkpoint} has no MTP block (num_nextn_predict_layers 0): nothing drafts; "
              "pass one that has", file=sys.stderr)
        return None
    return rt, w


def _parts(a) -> int:
    import statistics

    import torch

    from .. import default_model
    from ..speculative import _prefill

    torch.set_num_threads(a.threads)
    loaded = _load(a, 1)
    if loaded is None:
        return 2
    rt, _ = loaded
    n, model = 300, rt.model
    # the held-out text itself: a 64-token prompt, then call i feeds its tokens i (and i + 1), so that the two
    # rows of a verify are different tokens, as a draft and the token before it are (the same token twice routes
    # both rows to the same experts in the hash-routed layer and likely in the others: a 2-row step then reads
    # no more expert weights than a 1-row one, and the parts read ~0.2 step cheaper than inside the loop)
    ids = torch.tensor(rt.tokenizer.encode(default_model.HELDOUT.read_text(encoding="utf-8")))
    row, text = [rt.config.bos_token_id] + ids[:63].tolist(), ids[63:63 + n + 2]
    from backends import cpu_decode

    lib = cpu_decode.library()
    if lib is None:
        print(f"error: no native decode library ({cpu_decode._state.get('why')}): nothing to time", file=sys.stderr)
        return 2
    native = _Timed(lib)

    def timed(call, entry: str) -> tuple[float, float]:
        """median seconds of `n` calls call(seq, X, i) (i = 0 .. n-1) on a fresh state prefilled with the
        prompt, and of the native `entry` call inside each"""
        st = rt.new_state(1, context=len(row) + 2 * n + 16)
        seq = st.seqs[0]
        _, X = _prefill(model, row, seq)
        ts, ns = [], []
        cpu_decode._state["lib"] = native
        try:
            for i in range(n):
                native.last.clear()
                t = time.perf_counter()
                call(seq, X, i)
                ts.append(time.perf_counter() - t)
                ns.append(native.last.get(entry, float("nan")))
        finally:
            cpu_decode._state["lib"] = lib
        return statistics.median(ts[n // 10:]), statistics.median(ns[n // 10:])   # first calls build plans

    one = [text[i:i + 1][None] for i in range(n + 1)]                   # [1, 1] each
    two = [text[i:i + 2][None] for i in range(n)]                       # [1, 2]: a token and the next
    with torch.inference_mode():
        step = timed(lambda seq, X, i: model.forward(one[i], [seq], last=True), "dsv4d_run")
        verify = timed(lambda seq, X, i: model.forward(two[i], [seq], return_hidden=True), "dsv4d_step_rows")
        draft = timed(lambda seq, X, i: model.forward_mtp(X, one[i + 1], [seq], last=True), "dsv4d_mtp_step")
    acc = a.acceptance
    for i, what in ((0, "through forward"), (1, "native call   ")):
        s, v, d = step[i], verify[i], draft[i]
        print(f"{what}: plain step {s * 1e6:4.0f} us; verify (2 tokens) {v * 1e6:4.0f} us = {v / s:.2f} steps; "
              f"draft (MTP block + head) {d * 1e6:3.0f} us = {d / s:.2f} steps; ceiling at acceptance {acc}: "
              f"{(1 + acc) * s / (v + d):.2f}x ({a.threads} thread(s))")
    return 0


class _Timed:
    """The native library with each entry point's last call timed (`last[name]` seconds), for `_parts`."""

    def __init__(self, lib):
        self.lib, self.last = lib, {}

    def __getattr__(self, name):
        f = getattr(self.lib, name)

        def call(*args):
            t = time.perf_counter()
            r = f(*args)
            self.last[name] = time.perf_counter() - t
            return r
        return call


def _depths(a) -> int:
    import json
    import statistics

    import torch

    from .. import default_model
    from ..api import Runtime
    from backends import cpu_decode

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
        lib = cpu_decode.library()
        calls = _Calls(lib) if lib is not None else None
        for rep in range(3):
            for mode in cost:
                if calls is not None and rep:        # the first round builds plans and buffers: not counted
                    cpu_decode._state["lib"] = calls
                try:
                    g = rt.generate([p], max_new_tokens=a.new, stop_at_eos=False, speculative=mode)
                finally:
                    cpu_decode._state["lib"] = lib if lib is not None else cpu_decode._state.get("lib")
                cost[mode].append(g.decode_seconds / len(g.tokens[0]))
        kept, drafted = rt.last_acceptance
        step, it = statistics.median(cost[None]), statistics.median(cost["mtp"]) * (1 + kept / max(drafted, 1))
        native = ""
        if calls is not None and calls.took.get("dsv4d_run_greedy") and calls.took.get("dsv4d_spec_step"):
            ns, ni = (statistics.median(calls.took[k]) for k in ("dsv4d_run_greedy", "dsv4d_spec_step"))
            native = f"; native calls inside them (median): step {ns * 1e6:.0f} us, iteration {ni * 1e6:.0f} us " \
                     f"({ni / ns:.2f} steps)"
        print(f"layers {L}: plain step {step * 1e6:.0f} us, speculative iteration {it * 1e6:.0f} us "
              f"({it / step:.2f} steps; random weights kept {kept}/{drafted}); at acceptance {acc}: "
              f"{(1 + acc) * step / it:.2f}x ({a.threads} thread(s)){native}")
    return 0


class _Calls(_Timed):
    """The native library with every call's duration kept per entry point (`took[name]`), for `_depths`."""

    def __init__(self, lib):
        super().__init__(lib)
        self.took: dict[str, list[float]] = {}

    def __getattr__(self, name):
        f = getattr(self.lib, name)

        def call(*args):
            t = time.perf_counter()
            r = f(*args)
            self.took.setdefault(name, []).append(time.perf_counter() - t)
            return r
        return call


if __name__ == "__main__":
    sys.exit(main())
