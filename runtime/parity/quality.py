"""Quality per profile on real text: held-out perplexity and next-token top-1 for the reference and each
candidate (`python -m runtime.parity --text FILE`, the bench's `quality` section).

The text is tokenised by the checkpoint's tokenizer, BOS-prefixed and cut into consecutive windows of
`window` tokens (at most `max_tokens` scored); each window is one teacher-forced forward on each side, so
every side scores the same positions with the same context. Per side: perplexity exp(mean NLL) and top-1
accuracy against the text's own next tokens; per candidate also the perplexity change relative to the
reference, the mean KL(reference || candidate) of the next-token distributions and their top-1 agreement.
On a model that has learned the text these say what a deployment's numerics cost in quality; on random
weights they say nothing (the distributions are flat), which is why the shipped default is a trained model.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import InputError

WINDOW, MAX_TOKENS = 256, 4096


def text_windows(tokenizer, bos: int, text: str, window: int = WINDOW, max_tokens: int = MAX_TOKENS) -> torch.Tensor:
    """[n, window + 1] token ids: consecutive windows (inputs and the next-token targets) of BOS + text."""
    ids = [bos, *tokenizer.encode(text)]
    ids = ids[:max_tokens + 1]
    n = (len(ids) - 1) // window
    if n < 1:
        raise InputError(f"the text gives {len(ids) - 1} tokens, fewer than one window of {window}; "
                         "give a longer text or a smaller window")
    return torch.tensor([ids[i * window:i * window + window + 1] for i in range(n)])


def read_text_file(path: "str | Path") -> str:
    from ..yaml_io import read_text, require_text

    text = read_text(Path(path), InputError, "--text file")
    return require_text(text, InputError, f"--text {path}")


def side_logits(rt, windows: torch.Tensor) -> list[torch.Tensor]:
    """Teacher-forced next-token logits [window, V] float32 of each window, one forward each (fresh state)."""
    return [rt.forward(w[None, :-1])[0].float() for w in windows]


def scores(logits: list[torch.Tensor], windows: torch.Tensor) -> dict:
    nll, correct, n = 0.0, 0, 0
    for lg, w in zip(logits, windows):
        tgt = w[1:]
        nll += torch.nn.functional.cross_entropy(lg.double(), tgt, reduction="sum").item()
        correct += int((lg.argmax(-1) == tgt).sum())
        n += tgt.numel()
    return {"ppl": math.exp(nll / n), "top1": correct / n, "tokens": n}


def agreement(ref: list[torch.Tensor], cand: list[torch.Tensor]) -> dict:
    """Mean KL(ref || cand) in nats over all positions and the fraction of positions with the same argmax."""
    a, b = torch.cat(ref).double(), torch.cat(cand).double()
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    return {"kl": (la.exp() * (la - lb)).sum(-1).mean().item(),
            "top1_agreement": (a.argmax(-1) == b.argmax(-1)).double().mean().item()}


def measure_quality(reference, candidates, text: str, window: int = WINDOW, max_tokens: int = MAX_TOKENS) -> dict:
    """`reference`, `candidates`: loaded Runtimes (same checkpoint) -> {"tokens", "window", "rows": [...]},
    the first row the reference's."""
    windows = text_windows(reference.tokenizer, reference.config.bos_token_id, text, window, max_tokens)
    ref_logits = side_logits(reference, windows)
    ref = scores(ref_logits, windows)
    rows = [{"label": _label(reference), **ref}]
    for c in candidates:
        if c.config.vocab_size != reference.config.vocab_size:
            raise InputError(f"candidate {_label(c)} has another vocabulary than the reference; load one checkpoint")
        lg = side_logits(c, windows)
        s = scores(lg, windows)
        rows.append({"label": _label(c), **s, "ppl_delta": s["ppl"] / ref["ppl"] - 1, **agreement(ref_logits, lg)})
    return {"tokens": ref["tokens"], "window": window, "rows": rows}


def _label(rt) -> str:
    return f"{rt.profile.name}{' (emulated)' if rt.dispatch.emulated else ''}"


def format_quality(q: dict) -> str:
    lines = [f"quality on {q['tokens']} tokens of text (windows of {q['window']}):",
             "| side | perplexity | top-1 | perplexity change | KL to reference (nats) | top-1 agreement |",
             "|---|---|---|---|---|---|"]
    for r in q["rows"]:
        extra = (f"{100 * r['ppl_delta']:+.2f}% | {r['kl']:.3g} | {r['top1_agreement']:.3f}" if "kl" in r
                 else "reference | - | -")
        lines.append(f"| {r['label']} | {r['ppl']:.3f} | {r['top1']:.3f} | {extra} |")
    return "\n".join(lines)
