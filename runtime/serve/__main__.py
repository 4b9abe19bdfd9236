"""`python -m runtime.serve --profile P [--checkpoint DIR] [--host 127.0.0.1] [--port 8000]` (also `dsv4-serve`).

HTTP comes up first and answers 503 (/health included) while the checkpoint loads in a background thread.

Multi-device: `torchrun --nproc-per-node 2 -m runtime.serve --tp 2` (or --ep, or both): every rank loads its
shard of the layout; rank 0 serves HTTP and schedules, the others replay its steps (executor.py). Followers
ignore SIGINT / SIGTERM and leave when rank 0 stops (Ctrl-C or SIGTERM to rank 0 stops every rank, status
0); a rank that dies or hangs stops the others with one line and status 1 within the profile's
collective_timeout_s (in-flight requests get a 503 naming the lost rank).
"""

from __future__ import annotations

import argparse
import sys
import threading

from ..errors import V4Error


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv4-serve", description="OpenAI-compatible server for a DeepSeek-V4 model")
    p.add_argument("--profile", default="cpu", help="hardware profile (default: cpu)")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the shipped trained model, runtime/default_model)")
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
    p.add_argument("--speculative", default=None, choices=["mtp"],
                   help="speculative decoding with the MTP block (one device; turns the prefix cache off)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (multi-device; launch with torchrun)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel degree (default: launched processes / tp)")
    return p


def layout(a):
    """{"tp", "ep"} from the flags and torchrun's WORLD_SIZE, or None for a one-device server."""
    import os

    raw = os.environ.get("WORLD_SIZE", "0").strip() or "0"
    if not raw.isdigit():
        raise V4Error(f"WORLD_SIZE={raw!r} in the environment is not a process count; launch with torchrun")
    world = int(raw)
    if a.tp is None and a.ep is None and world <= 1:
        return None
    tp = a.tp or 1
    return {"tp": tp, "ep": a.ep or (world // tp if world and world % tp == 0 else 1)}


def check_args(a) -> None:
    for name in ("max_num_seqs", "max_queue", "prefill_tokens", "cache_checkpoint_every", "tp", "ep", "threads"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise V4Error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if a.cache_block < 128 or a.cache_block % 128:
        raise V4Error(f"--cache-block must be a positive multiple of 128, got {a.cache_block}")
    if not 0 < a.port < 65536:
        raise V4Error(f"--port must be in 1..65535, got {a.port}")
    if not a.max_body_mb > 0 or not a.cache_mb >= 0:     # (written so that NaN fails too)
        raise V4Error(f"--max-body-mb must be > 0 and --cache-mb >= 0 (0 = no prefix cache), got {a.max_body_mb} "
                      f"and {a.cache_mb}")
    for flag, v in (("--api-key", a.api_key), ("--model-name", a.model_name)):
        if v is not None and not v.strip():
            raise V4Error(f"{flag} is empty; give a value or leave the flag out")


def _spec_args(a) -> None:
    if a.speculative is None:
        return
    if layout(a) is not None:
        raise V4Error("--speculative mtp runs on one device; drop it or --tp/--ep")
    if a.cache_mb > 0:
        print("dsv4-serve: --speculative mtp: prefix cache off (it does not hold the MTP block's state yet)",
              file=sys.stderr, flush=True)
        a.cache_mb = 0


def load(a):
    """(serving runtime, prefix cache or None) for these arguments; joins the process group when multi-device."""
    from .. import Runtime
    from .engine import serving_runtime
    from .prefix_cache import PrefixCache

    rt = serving_runtime(Runtime.load(a.profile, a.checkpoint, progress=False, parallel=layout(a)),
                         max(64, a.max_num_seqs * (2 if a.speculative else 1)))
    cache = None
    if a.cache_mb > 0:
        cache = PrefixCache(rt.config.num_layers, a.cache_block, a.cache_checkpoint_every, int(a.cache_mb * 2 ** 20))
    return rt, cache


def distributed(rt) -> bool:
    return rt.parallel is not None and rt.parallel.distributed


def load_into(S, a, on_fatal=None) -> None:
    """Load the runtime and start the engine (background thread of the server)."""
    from .engine import Engine
    from .executor import LeadExecutor
    from .grammar import Grammars

    try:
        rt, cache = load(a)
        lead = LeadExecutor(rt, cache, a.cache_block) if distributed(rt) else None
        engine = Engine(rt, a.max_num_seqs, a.max_queue, a.prefill_tokens, cache, a.cache_block, executor=lead,
                        speculative=a.speculative)
        engine.on_fatal = on_fatal and (lambda msg: on_fatal(msg, 1))
        S.grammars = Grammars(rt.tokenizer, rt.config.vocab_size)
        S.tokenizer = rt.tokenizer
        S.runtime = rt
        S.engine = engine.start()
        print(f"dsv4-serve: ready ({rt.describe()})", file=sys.stderr, flush=True)
    except V4Error as e:
        S.load_error = f"loading failed: {e}"
        print(f"dsv4-serve: {S.load_error}", file=sys.stderr, flush=True)
        if on_fatal is not None:                   # multi-device: the other ranks failed too; stop
            on_fatal(S.load_error, getattr(e, "exit_status", 2))


def _refuse_exported(a) -> None:
    from backends import get_backend, names

    from ..profile import load_profile

    # `--profile cuda` (a backend name) means that backend's default profile, as in runtime.run
    prof = load_profile(get_backend(a.profile).default_profile if a.profile in names() else a.profile)
    if prof.backend == "onnx":
        raise V4Error(f"profile {prof.name} runs the exported ONNX graphs, which the server cannot batch (they have "
                      "no per-sequence state slots for ragged decode steps); serve a torch profile (cpu, cuda, "
                      "ascend) of the same checkpoint, or run the graphs with python -m runtime.run")


def args_of(argv=None):
    a = parser().parse_args(argv)
    check_args(a)
    _spec_args(a)
    _refuse_exported(a)
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    return a


def build(argv=None, on_fatal=None, a=None):
    """(ServerState, app, args) with the model loading in the background."""
    from pathlib import Path

    from .app import ServerState, create_app

    a = a or args_of(argv)
    name = a.model_name or f"deepseek-v4-{Path(a.checkpoint).name if a.checkpoint else 'tiny'}"
    S = ServerState(name, a.api_key, int(a.max_body_mb * 2 ** 20))
    threading.Thread(target=load_into, args=(S, a, on_fatal), daemon=True, name="dsv4-load").start()
    return S, create_app(S), a


def follower(a) -> int:
    """A rank other than 0: load this rank's shard, replay rank 0's steps until it stops."""
    import signal

    from .executor import Executor, follow

    for sig in (signal.SIGINT, signal.SIGTERM):      # rank 0 decides when every rank stops
        signal.signal(sig, signal.SIG_IGN)
    rt, cache = load(a)
    follow(Executor(rt, cache, a.cache_block), rt.parallel)
    rt.parallel.close()
    return 0


def _server_class():
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that SIGINT / SIGTERM end `run()` without being re-raised afterwards (uvicorn
        re-raises them, which would kill the process before the engine and the other ranks are stopped)."""

        @contextlib.contextmanager
        def capture_signals(self):
            sigs = (signal.SIGINT, signal.SIGTERM)
            prev = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, h in prev.items():
                    signal.signal(s, h)

    return Server


def main(argv=None) -> int:
    import os

    from ..cli import one_line

    try:
        a = args_of(argv)
        multi = layout(a) is not None
    except V4Error as e:
        print(f"dsv4-serve: {e}", file=sys.stderr)
        return 2
    rank = os.environ.get("RANK", "0").strip()
    if multi and rank.isdigit() and int(rank) != 0:
        try:
            return follower(a)
        except V4Error as e:
            print(f"dsv4-serve: rank {rank}: error: {one_line(e)}", file=sys.stderr, flush=True)
            os._exit(getattr(e, "exit_status", 2))    # a broken process group could hang a normal exit
    import uvicorn

    _Server = _server_class()
    fatal: list[str] = []
    server = None

    def on_fatal(msg: str, status: int) -> None:     # multi-device: a lost rank (or a failed load) stops it
        fatal.append((msg, status))
        if server is not None:
            server.should_exit = True

    S, app, a = build(on_fatal=on_fatal, a=a)          # a failed load stops the server (status 2)
    server = _Server(uvicorn.Config(app, host=a.host, port=a.port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    if fatal:
        server.should_exit = True
    server.run()
    if S.engine is not None:
        S.engine.stop()
        if S.engine.fatal and not fatal:
            fatal.append((S.engine.error, 1))
    if fatal:
        print(f"dsv4-serve: error: {fatal[0][0]}", file=sys.stderr, flush=True)
        os._exit(fatal[0][1])                      # the process group may be broken: leave at once
    if S.runtime is not None and distributed(S.runtime):
        S.runtime.parallel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
