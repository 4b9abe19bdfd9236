"""`python -m runtime.parity`: compare candidates with a reference and write report.json / .md / .html.

    python -m runtime.parity --reference cpu --candidate cpu-bf16 --candidate ascend-910b --emulate --out parity-out
    python -m runtime.parity --candidate nvidia-h100 --prompts prompts.txt --decode-steps 64 --out DIR

Exit status: 0 when every row passes, 1 when a row fails (the reports and repro bundles are written), 2 on
bad input (one line naming the problem).
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m runtime.parity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default="cpu", help="reference profile (default: cpu, the float32 reference)")
    ap.add_argument("--candidate", action="append", required=True,
                    help="candidate profile (name or YAML path); repeat for several (three-way with two)")
    ap.add_argument("--emulate", action="store_true", help="run the candidates' numerics on the CPU reference")
    ap.add_argument("--allow-fallback", action="store_true", help="let candidates fall back to reference ops")
    ap.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the generated tiny model)")
    ap.add_argument("--prompts", default=None, help="a .txt file (one prompt per line) or a .json list")
    ap.add_argument("--decode-steps", type=int, default=32, help="teacher-forced decode steps per prompt")
    ap.add_argument("--repeat", type=int, default=2, help="runs per candidate (2: also report run-to-run spread)")
    ap.add_argument("--tolerances", default=None, help="tolerance rules YAML (default: the shipped one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output folder for the reports")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..errors import V4Error
    from .compare import compare, load_prompts

    try:
        prompts = None
        if args.prompts:
            from ..api import Runtime

            prompts = load_prompts(args.prompts, Runtime.load(args.reference, checkpoint=args.checkpoint,
                                                              progress=False).tokenizer)
        result = compare(args.reference, args.candidate, checkpoint=args.checkpoint, prompts=prompts,
                         decode_steps=args.decode_steps, emulate=args.emulate, repeat=args.repeat,
                         tolerances=args.tolerances, allow_fallback=args.allow_fallback, seed=args.seed)
        out = result.write(args.out, command=["python", "-m", "runtime.parity", *(argv if argv is not None else sys.argv[1:])])
    except V4Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileExistsError, NotADirectoryError, PermissionError) as e:
        print(f"error: cannot write the report to {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    for r in result.report["results"]:
        e = r["e2e"]["metrics"]
        print(f"{r['candidate']}: {r['verdict'].upper()}  mean KL {e['kl_mean']:.3g}, top-1 {e['top1_agreement']:.3f}, "
              f"op to blame: {r['blame']['tap'] or 'none'}" + (f", failed: {', '.join(r['failed'][:6])}"
                                                              if r["failed"] else ""))
    print(f"reports: {out / 'report.html'}, {out / 'report.md'}, {out / 'report.json'}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
