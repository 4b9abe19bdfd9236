"""`python -m runtime.serve --profile P [--checkpoint DIR] [--host 127.0.0.1] [--port 8000]` (also `dsv4-serve`).

HTTP comes up first and answers 503 (/health included) while the checkpoint loads in a background thread.
"""

from __future__ import annotations

import argparse
import sys
import threading

from ..errors import V4Error


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv4-serve", description="OpenAI-compatible server for a DeepSeek-V4 model")
    p.add_argument("--profile", default="cpu", help="hardware profile (default: cpu)")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the tiny generated model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the model id clients pass (default: deepseek-v4-<checkpoint>)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    p.add_argument("--max-num-seqs", type=int, default=32, help="sequences decoded together per step")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503")
    p.add_argument("--prefill-tokens", type=int, default=512, help="prefill token budget per engine step")
    p.add_argument("--cache-block", type=int, default=128, help="prefix-cache block (multiple of 128)")
    p.add_argument("--cache-checkpoint-every", type=int, default=4, help="window checkpoint every K blocks")
    p.add_argument("--cache-mb", type=float, default=512, help="prefix-cache budget in MiB (0 = off)")
    p.add_argument("--max-body-mb", type=float, default=8, help="largest request body accepted")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def check_args(a) -> None:
    for name in ("max_num_seqs", "max_queue", "prefill_tokens", "cache_checkpoint_every"):
        if getattr(a, name) < 1:
            raise V4Error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if a.cache_block < 128 or a.cache_block % 128:
        raise V4Error(f"--cache-block must be a positive multiple of 128, got {a.cache_block}")
    if not 0 < a.port < 65536:
        raise V4Error(f"--port must be in 1..65535, got {a.port}")


def load_into(S, a) -> None:
    """Load the runtime and start the engine (background thread of the server)."""
    from .. import Runtime
    from .engine import Engine, serving_runtime
    from .grammar import Grammars
    from .prefix_cache import PrefixCache

    try:
        rt = serving_runtime(Runtime.load(a.profile, a.checkpoint, progress=False))
        cache = None
        if a.cache_mb > 0:
            cache = PrefixCache(rt.config.num_layers, a.cache_block, a.cache_checkpoint_every,
                                int(a.cache_mb * 2 ** 20))
        engine = Engine(rt, a.max_num_seqs, a.max_queue, a.prefill_tokens, cache, a.cache_block)
        S.grammars = Grammars(rt.tokenizer, rt.config.vocab_size)
        S.tokenizer = rt.tokenizer
        S.runtime = rt
        S.engine = engine.start()
        print(f"dsv4-serve: ready ({rt.describe()})", file=sys.stderr, flush=True)
    except V4Error as e:
        S.load_error = f"loading failed: {e}"
        print(f"dsv4-serve: {S.load_error}", file=sys.stderr, flush=True)


def build(argv=None):
    """(ServerState, app, args) with the model loading in the background."""
    from pathlib import Path

    from .app import ServerState, create_app

    a = parser().parse_args(argv)
    check_args(a)
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    name = a.model_name or f"deepseek-v4-{Path(a.checkpoint).name if a.checkpoint else 'tiny'}"
    S = ServerState(name, a.api_key, int(a.max_body_mb * 2 ** 20))
    threading.Thread(target=load_into, args=(S, a), daemon=True, name="dsv4-load").start()
    return S, create_app(S), a


def main(argv=None) -> int:
    try:
        S, app, a = build(argv)
    except V4Error as e:
        print(f"dsv4-serve: {e}", file=sys.stderr)
        return 2
    import uvicorn

    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", timeout_graceful_shutdown=2)
    if S.engine is not None:
        S.engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
