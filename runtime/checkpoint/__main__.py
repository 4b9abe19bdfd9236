"""`python -m runtime.checkpoint make|check`: write a small official-layout checkpoint, or validate one.

    python -m runtime.checkpoint make --preset tiny --out checkpoints/tiny [--seed 0]
    python -m runtime.checkpoint check checkpoints/tiny

Bad input (a checkpoint that is missing, truncated, corrupt or does not match its config; an --out that names a
file) prints one line and exits with status 2; Ctrl-C exits with status 130.
"""

from __future__ import annotations

import argparse
import sys

from ..cli import ArgumentParser
from ..errors import V4Error


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m runtime.checkpoint", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="write a random model in the official layout")
    mk.add_argument("--preset", default="tiny", help="model preset (default: tiny; flash/pro are far too large)")
    mk.add_argument("--out", required=True, help="folder to write")
    mk.add_argument("--seed", type=int, default=0)
    ck = sub.add_parser("check", help="validate a checkpoint folder against its config.json")
    ck.add_argument("path")
    args = ap.parse_args(argv)
    from ..cli import run_cli

    return run_cli(lambda: _run(args))


def _run(args) -> int:
    if args.cmd == "make":
        from ..cli import writable_folder
        from .make import make_preset

        if args.preset != "tiny":
            raise V4Error(f"preset {args.preset!r} is a full-size model; only 'tiny' can be generated here")
        out = make_preset(writable_folder(args.out, "--out"), args.preset, seed=args.seed, progress=True)
        print(f"checkpoint written to {out}")
    else:
        from .loader import load_checkpoint

        ck = load_checkpoint(args.path)
        print(f"{args.path}: OK, {len(ck.tensors)} tensors, experts {ck.expert_format}, "
              f"{ck.config.num_layers} layers ({', '.join(ck.config.layer_kind(i) for i in range(ck.config.num_layers))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
