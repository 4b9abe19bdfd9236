"""`python -m runtime.train`: train a small V4 on the Python standard library's source, export it.

    python -m runtime.train --out runs/v4-stdlib                       # tokenizer, training, QAT, export
    python -m runtime.train --out runs/v4-stdlib                       # again: resumes from its checkpoint
    python -m runtime.train --out runs/v4-stdlib --export-only         # export the last checkpoint as it is
    python -m runtime.train --out runs/t --steps 20 --seq 64 --max-bytes 200000      # a quick look

The shipped default (runtime/default_model) was trained by the README's command (`--preset tiny-lm`).

Writes OUT/tokenizer.json, OUT/tokens-*.safetensors (the encoded split), OUT/train_state.{safetensors,json}
(resumable), OUT/model/ (the official layout: config.json, index, FP8 / FP4 / bf16 tensors, tokenizer.json)
OUT/model/heldout.txt (a sample of the held-out split) and OUT/metrics.jsonl (held-out perplexity and
next-token top-1, float32 and fake-quantised). The model has the preset's shape (default tiny; every V4 layer
kind) with the tokenizer's vocabulary. Bad arguments print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys


HELDOUT_CHARS = 24_000


def build_parser() -> argparse.ArgumentParser:
    from .loop import TrainArgs

    d = TrainArgs()
    ap = argparse.ArgumentParser(prog="python -m runtime.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="run folder (created; resumed when it holds a checkpoint)")
    ap.add_argument("--preset", default="tiny", help="model shape preset (vocab_size set from the tokenizer)")
    ap.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (special tokens included)")
    ap.add_argument("--max-bytes", type=int, default=None, help="cap on training text (characters); default all")
    ap.add_argument("--heldout", type=float, default=0.05, help="fraction of files held out (by path hash)")
    for name in ("steps", "qat_steps", "batch", "seq", "warmup", "seed", "eval_every", "eval_windows", "save_every"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "weight_decay", "mtp_weight", "indexer_weight", "clip"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--export-only", action="store_true",
                    help="train no further: evaluate and export the run's last checkpoint (OUT/model)")
    return ap


def run(argv=None) -> dict:
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer
    from tqdm import tqdm

    from ..config import ModelConfig
    from ..errors import InputError
    from ..presets import preset
    from . import data
    from .loop import TrainArgs, Trainer
    from .tokenizer import train_tokenizer

    a = build_parser().parse_args(argv)
    targs = TrainArgs(**{k: getattr(a, k) for k in vars(TrainArgs())})
    if targs.steps < 1 or targs.batch < 1 or targs.seq < 8 or not 0 <= targs.qat_steps <= targs.steps:
        raise InputError("need --steps >= 1, --batch >= 1, --seq >= 8 and 0 <= --qat-steps <= --steps")
    if not 0 < a.heldout < 1:
        raise InputError(f"--heldout must be in (0, 1), got {a.heldout}")
    if a.threads is not None and a.threads < 1:
        raise InputError(f"--threads must be >= 1 (default: torch's), got {a.threads}")
    from ..cli import writable_folder

    out = writable_folder(a.out, "--out")              # a file there, or no permission: one line, not a traceback
    if a.threads:
        torch.set_num_threads(a.threads)
    out.mkdir(parents=True, exist_ok=True)
    train_texts, held_texts = data.split_texts(a.max_bytes, a.heldout)
    if not train_texts or not held_texts:
        raise InputError("the standard library split is empty; raise --max-bytes or --heldout")
    tok_path = out / "tokenizer.json"
    tok = Tokenizer.from_file(str(tok_path)) if tok_path.is_file() else train_tokenizer(train_texts, a.vocab_size, tok_path)
    hf = preset(a.preset)
    hf["vocab_size"] = tok.get_vocab_size()
    cfg = ModelConfig.from_hf(hf, source=f"preset {a.preset!r}")
    cache = out / f"tokens-{a.max_bytes or 'all'}-{a.heldout}.safetensors"    # the encoded split, for resuming
    if cache.is_file():
        streams = load_file(str(cache))
    else:
        streams = {"train": data.token_stream(tok, train_texts, cfg.bos_token_id, cfg.eos_token_id),
                   "heldout": data.token_stream(tok, held_texts, cfg.bos_token_id, cfg.eos_token_id)}
        save_file(streams, str(cache))
    train = streams["train"]
    held = data.eval_windows(streams["heldout"], targs.seq, targs.eval_windows)
    if train.numel() < targs.seq + 3:
        raise InputError(f"only {train.numel()} training tokens for --seq {targs.seq}; raise --max-bytes")
    tr = Trainer(cfg, hf, targs, out)
    resumed = tr.load()
    if a.export_only and not resumed:
        raise InputError(f"--export-only: {out} holds no checkpoint (train_state.safetensors); train first")
    stream = data.batches(train, targs.batch, targs.seq, tr.gen)
    metrics = open(out / "metrics.jsonl", "a")
    bar = tqdm(total=targs.steps, initial=tr.step, disable=a.no_progress, desc="train", dynamic_ncols=True)
    last = {}
    try:
        while tr.step < targs.steps and not a.export_only:
            last = tr.train_step(next(stream))
            bar.update(1)
            bar.set_postfix(lm=f"{last['lm']:.3f}", mtp=f"{last['mtp']:.3f}", kl=f"{last['kl']:.3f}",
                            qat=int(last["qat"]))
            if tr.step % targs.eval_every == 0 or tr.step == targs.steps:
                ev = {"step": tr.step, **last, "heldout": tr.evaluate(held)}
                metrics.write(json.dumps(ev) + "\n")
                metrics.flush()
            if tr.step % targs.save_every == 0 or tr.step == targs.steps:
                tr.save()
    finally:
        bar.close()
    final = {"float32": tr.evaluate(held), "shipped": tr.evaluate(held, qat=True), "resumed": resumed,
             "step": tr.step, "train": last}
    metrics.write(json.dumps({"final": final}) + "\n")
    metrics.close()
    folder = tr.export(out / "model", tok_path)
    # a sample of the held-out split (files never trained on) for the quality measurements of the shipped model
    (folder / "heldout.txt").write_text("".join(held_texts)[:HELDOUT_CHARS], encoding="utf-8")
    size = sum(p.stat().st_size for p in folder.iterdir())
    final["model_bytes"] = size
    return final


def main(argv=None) -> int:
    from ..errors import V4Error

    try:
        final = run(argv)
    except V4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(json.dumps(final))
    return 0


if __name__ == "__main__":
    sys.exit(main())
