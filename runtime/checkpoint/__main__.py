"""`python -m runtime.checkpoint make|check`: write a small official-layout checkpoint, or validate one.

    python -m runtime.checkpoint make --preset tiny --out checkpoints/tiny [--seed 0]
    python -m runtime.checkpoint make --preset flash --sparse --out /tmp/v4-flash-dry   # or pro: headers only
    python -m runtime.checkpoint check checkpoints/tiny

`--sparse` writes the preset's full official inventory and shard layout with real headers and the data as
holes (a few MiB on disk whatever the model; every value reads as zero), for dry runs at the real scale.
`check` validates the config, every shard's header (names, shapes, dtypes against config.json, the shard the
index names) and each shard's length against its header, without reading tensor data; `--decode` also
decodes every tensor (as a load does).

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
    mk.add_argument("--sparse", action="store_true",
                    help="the official inventory with real headers and data holes (any preset; V4-Flash: 149 GB "
                         "apparent, ~13 MiB on disk)")
    ck = sub.add_parser("check", help="validate a checkpoint folder against its config.json")
    ck.add_argument("path")
    ck.add_argument("--decode", action="store_true", help="also decode every tensor (reads all the data)")
    args = ap.parse_args(argv)
    from ..cli import run_cli

    return run_cli(lambda: _run(args))


def _run(args) -> int:
    if args.cmd == "make":
        from ..cli import writable_folder
        from .make import make_preset

        if args.sparse:
            from ..presets import preset
            from .sparse import disk_usage, write_sparse_checkpoint

            out = write_sparse_checkpoint(writable_folder(args.out, "--out"), preset(args.preset), progress=True)
            print(f"sparse checkpoint written to {out} ({disk_usage(out) / 2 ** 20:,.1f} MiB on disk; "
                  "data are holes that read as zeros)")
            return 0
        if args.preset != "tiny":
            raise V4Error(f"preset {args.preset!r} is a full-size model; only 'tiny' can be generated with "
                          "weights (add --sparse for a shape-true dry-run checkpoint)")
        out = make_preset(writable_folder(args.out, "--out"), args.preset, seed=args.seed, progress=True)
        print(f"checkpoint written to {out}")
    else:
        print(_check(args.path, args.decode))
    return 0


def _check(path: str, decode: bool) -> str:
    """Validate a checkpoint folder; one line describing it."""
    from ..config import ModelConfig
    from .loader import checkpoint_folder, inventory, load_checkpoint
    from .sparse import check_extents

    folder = checkpoint_folder(path)
    cfg = ModelConfig.from_file(folder / "config.json")
    files, found, expert_format, _ = inventory(folder, cfg)
    stored = check_extents(folder, files)
    if decode:
        load_checkpoint(folder)
    kinds = ", ".join(cfg.layer_kind(i) for i in range(cfg.num_layers))
    return (f"{path}: OK, {len(found)} tensors in {len(files)} shards, {stored / 2 ** 30:,.2f} GiB stored, "
            f"experts {expert_format}, {cfg.num_layers} layers ({kinds}); "
            f"{'every tensor decoded' if decode else 'headers checked, data not read'}")


if __name__ == "__main__":
    sys.exit(main())
