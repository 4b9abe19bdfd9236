"""`python -m runtime.run`: generate text from a prompt, streaming tokens, ending with speed figures.

    python -m runtime.run --backend cpu --prompt "Hello"             # the tiny default checkpoint
    python -m runtime.run --checkpoint DIR --prompt "..." --temperature 0.8 --top-p 0.9 --seed 1
    python -m runtime.run --profile ascend-910b --emulate --show-dispatch      # 910B W8A8 numerics on CPU

    torchrun --nproc-per-node 4 -m runtime.run --profile cpu --tp 2 --ep 2 --prompt "Hello"   # 4 ranks, gloo

Errors in the input (checkpoint, backend, prompt, sampling values, a layout that does not divide the model)
print one line and exit with status 2; a multi-device run whose peer rank died or hung prints one line and
exits with status 1 within the profile's collective_timeout_s; Ctrl-C prints one line and exits with status
130. Only rank 0 prints.
"""

from __future__ import annotations

import argparse
import sys

from .cli import ArgumentParser


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="python -m runtime.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    from backends import names

    ap.add_argument("--backend", default="cpu", choices=names(),
                    help="backend; alone it picks the backend's default profile (Backend.default_profile: cpu, "
                         "nvidia-h100, ascend-910b, onnx-cpu)")
    ap.add_argument("--profile", default=None,
                    help="hardware profile: a name from hardware_profiles/ or a path to a YAML file")
    ap.add_argument("--emulate", action="store_true",
                    help="run the profile's numerics (dtypes, weight format, quantisation) on the CPU reference")
    ap.add_argument("--allow-fallback", action="store_true",
                    help="use the CPU reference where the profile's backend lacks an implementation (recorded)")
    ap.add_argument("--show-dispatch", action="store_true", help="print the resolved op dispatch table")
    ap.add_argument("--checkpoint", default=None,
                    help="official-layout checkpoint folder (default: the embedded trained model, runtime/default_model)")
    ap.add_argument("--prompt", default="Hello, DeepSeek-V4!", help="text prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible runs)")
    ap.add_argument("--numerics", default=None, choices=["exact", "official"],
                    help="override the profile's numerics: exact float32, or DeepSeek's bf16/FP8/FP4 numerics")
    ap.add_argument("--speculative", default=None, choices=["mtp"],
                    help="speculative decoding: draft with the MTP block, verify in the main model")
    ap.add_argument("--no-eos-stop", action="store_true", help="keep generating past the EOS token")
    ap.add_argument("--quiet", action="store_true", help="print only the generated text")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: torch's choice, one per physical core)")
    ap.add_argument("--tp", type=int, default=None,
                    help="tensor-parallel degree over query heads (multi-device; launch with torchrun)")
    ap.add_argument("--ep", type=int, default=None,
                    help="expert-parallel degree over routed experts (default: launched processes / tp)")
    return ap


def _layout(args):
    """{"tp", "ep"} from the flags and the launcher's WORLD_SIZE, or None for a plain one-device run."""
    import os

    from .errors import InputError

    for flag, value in (("--tp", args.tp), ("--ep", args.ep)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be a positive integer (1 = no split), got {value}")
    raw = os.environ.get("WORLD_SIZE", "0").strip() or "0"
    if not raw.isdigit():
        raise InputError(f"WORLD_SIZE={raw!r} in the environment is not a process count; launch with torchrun")
    world = int(raw)
    if args.tp is None and args.ep is None and not world:
        return None
    tp = args.tp or 1
    ep = args.ep or (world // tp if world and world % tp == 0 else 1)
    return {"tp": tp, "ep": ep}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .cli import run_cli

    return run_cli(lambda: _run(args))


def _run(args) -> int:
    from .api import Runtime
    from .errors import InputError
    from .sampling import SamplingParams
    from .yaml_io import require_text

    # Validate the input before loading anything.
    prompt = require_text(args.prompt, InputError, "--prompt")
    SamplingParams(args.temperature, args.top_p, args.seed, args.max_new_tokens)
    layout = _layout(args)
    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be a positive integer, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    rt = Runtime.load(args.profile or args.backend, checkpoint=args.checkpoint, numerics=args.numerics,
                      emulate=args.emulate, allow_fallback=args.allow_fallback, parallel=layout)
    lead = rt.parallel is None or rt.parallel.rank == 0          # only rank 0 prints
    if not args.quiet and lead:
        print(f"# {rt.describe()}", file=sys.stderr)
        print(f"# {rt.memory.format()}", file=sys.stderr)
    if args.show_dispatch and lead:
        if rt.parallel is not None and rt.parallel.distributed:
            print(f"# {rt.parallel.describe()}", file=sys.stderr)
        print("\n".join("# " + line for line in rt.dispatch.format().splitlines()), file=sys.stderr)
        for line in rt.placement():               # where things run beyond the table: the ONNX graph's nodes, the decode runner
            print(f"# {line}", file=sys.stderr)
    ids = rt.encode(prompt)
    text_of = rt.tokenizer.stream_decoder()

    def on_token(row: int, tok: int) -> None:
        # A random tiny model emits arbitrary bytes: keep terminal control characters out.
        sys.stdout.write("".join(ch if ch.isprintable() or ch in "\n\t" else "\ufffd" for ch in text_of(tok)))
        sys.stdout.flush()

    if lead:
        sys.stdout.write(prompt)
    g = rt.generate([ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, seed=args.seed, stop_at_eos=not args.no_eos_stop,
                    on_token=on_token if lead else None, speculative=args.speculative)
    if lead:
        sys.stdout.write("\n")
    if rt.parallel is not None:
        rt.parallel.close()                                   # every rank done: free the process group
    if not args.quiet and lead:
        n = len(g.tokens[0])
        total = g.prefill_seconds + g.decode_seconds
        print(f"# {g.prompt_tokens} prompt tokens in {g.prefill_seconds:.3f} s "
              f"({g.prompt_tokens / g.prefill_seconds:.1f} tokens/s prefill); {n} new tokens, "
              f"decode {g.decode_tokens_per_second:.1f} tokens/s; {n / total:.1f} tokens/s overall",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
