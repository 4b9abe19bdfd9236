"""`python -m runtime.parity`: compare candidates with a reference and write report.json / .md / .html.

    python -m runtime.parity --reference cpu --candidate cpu-bf16 --candidate ascend-910b --emulate --out parity-out
    python -m runtime.parity --candidate nvidia-h100 --prompts prompts.txt --decode-steps 64 --out DIR
    python -m runtime.parity --candidate ascend-910b --emulate --text held.txt --out DIR   # + quality on text

`--text FILE` adds held-out quality per side (runtime/parity/quality.py): perplexity and next-token top-1 of
the reference and each candidate on the file's text, the candidates' perplexity change, KL and top-1
agreement (printed, and under "quality" in report.json / report.md). The shipped default model's held-out
sample is runtime/default_model/heldout.txt.

Exit status: 0 when every row passes; 1 when a row fails (the reports and repro bundles are written); 2 on bad
input (one line naming the problem and the fix); 3 when the harness itself crashed (a bug in dsv4rt: the
traceback, then one line; no verdict was reached); 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys

from ..cli import ArgumentParser


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="python -m runtime.parity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default="cpu", help="reference profile (default: cpu, the float32 reference)")
    ap.add_argument("--candidate", action="append", required=True,
                    help="candidate profile (name or YAML path); repeat for several (three-way with two)")
    ap.add_argument("--emulate", action="store_true", help="run the candidates' numerics on the CPU reference")
    ap.add_argument("--allow-fallback", action="store_true", help="let candidates fall back to reference ops")
    ap.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the shipped trained model, runtime/default_model)")
    ap.add_argument("--prompts", default=None, help="a .txt file (one prompt per line) or a .json list")
    ap.add_argument("--decode-steps", type=int, default=32, help="teacher-forced decode steps per prompt")
    ap.add_argument("--repeat", type=int, default=2,
                    help="runs per candidate: 1, or 2 (default: a second run reports the run-to-run spread)")
    ap.add_argument("--tolerances", default=None, help="tolerance rules YAML (default: the shipped one)")
    ap.add_argument("--text", default=None, help="a UTF-8 text file: report perplexity / top-1 per side on it")
    ap.add_argument("--text-tokens", type=int, default=4096, help="tokens of --text scored (default 4096)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output folder for the reports")
    return ap


EXIT_PASS, EXIT_FAIL, EXIT_CRASH = 0, 1, 3      # 2: bad input, 130: interrupted (runtime/cli.py)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..cli import run_cli

    return run_cli(lambda: _run(args, argv), crash_status=EXIT_CRASH)


def _run(args, argv) -> int:
    from ..cli import writable_folder
    from ..errors import InputError, V4Error
    from .compare import compare, load_prompts

    if args.repeat not in (1, 2):
        # compare() runs one extra run for the spread whatever N >= 2 says: refuse N > 2 rather than run 2
        raise InputError(f"--repeat {args.repeat}: choose 1 (one run) or 2 (a second run for the run-to-run spread)")
    out = writable_folder(args.out, "--out")          # checked before the runs, not after them
    text = None
    if args.text is not None:
        from .quality import read_text_file

        if args.text_tokens < 1:
            raise InputError(f"--text-tokens must be a positive integer, got {args.text_tokens}")
        text = read_text_file(args.text)
    prompts = None
    if args.prompts:
        from ..api import Runtime

        prompts = load_prompts(args.prompts, Runtime.load(args.reference, checkpoint=args.checkpoint,
                                                          progress=False).tokenizer)
    result = compare(args.reference, args.candidate, checkpoint=args.checkpoint, prompts=prompts,
                     decode_steps=args.decode_steps, emulate=args.emulate, repeat=args.repeat,
                     tolerances=args.tolerances, allow_fallback=args.allow_fallback, seed=args.seed)
    for r in result.report["results"]:
        e = r["e2e"]["metrics"]
        print(f"{r['candidate']}: {r['verdict'].upper()}  mean KL {e['kl_mean']:.3g}, top-1 {e['top1_agreement']:.3f}, "
              f"op to blame: {r['blame']['tap'] or 'none'}" + (f", failed: {', '.join(r['failed'][:6])}"
                                                              if r["failed"] else ""), flush=True)
    quality = None
    if text is not None:
        from ..api import Runtime
        from .quality import format_quality, measure_quality

        sides = [Runtime.load(s, checkpoint=args.checkpoint, emulate=e, allow_fallback=args.allow_fallback,
                              progress=False) for s, e in [(args.reference, False)]
                 + [(c, args.emulate) for c in args.candidate]]
        quality = measure_quality(sides[0], sides[1:], text, max_tokens=args.text_tokens)
        result.report["quality"] = quality
        print(format_quality(quality), flush=True)
    try:
        out = result.write(out, command=["python", "-m", "runtime.parity",
                                         *(argv if argv is not None else sys.argv[1:])])
    except OSError as e:
        raise V4Error(f"cannot write the report to {args.out}: {e.strerror or e} (the verdicts are printed above)") \
            from None
    if quality is not None:
        from .quality import format_quality

        with open(out / "report.md", "a", encoding="utf-8") as f:
            f.write("\n## Quality on text\n\n" + format_quality(quality) + "\n")
    print(f"reports: {out / 'report.html'}, {out / 'report.md'}, {out / 'report.json'}")
    return EXIT_PASS if result.passed else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
