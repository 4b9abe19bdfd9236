"""Runs several command lines of the project's CLIs in one process, for tests/test_bad_input_matrix.py; not a
test module.

    python tests/cli_batch.py CASES.json RESULTS.json

CASES.json is a list of {"module", "argv", "env"}; each runs as `python -m MODULE ARGV...` would (`runpy`, as
`__main__`, with sys.argv set, `env` applied for the case and restored after it), its stdout and stderr
captured, its exit status taken from SystemExit, and an escaping exception printed as Python prints it
("Traceback ...", status 1). One process pays torch's import once for the whole batch.
"""

from __future__ import annotations

import io
import json
import os
import runpy
import sys
import traceback
import warnings

# runpy warns when a CLI module was already imported by an earlier case (runtime.api imports runtime.plan):
# harmless here, as in a real `python -m`, where the module also exists twice (as __main__ and by name)
warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package", category=RuntimeWarning)


def run_one(module: str, argv: list[str], env: dict) -> dict:
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if v is not None})
    for k in [k for k, v in env.items() if v is None]:
        os.environ.pop(k, None)
    out, err, saved_argv = io.StringIO(), io.StringIO(), sys.argv
    sys.stdout, sys.stderr, sys.argv = out, err, [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=err)
    except BaseException:                          # what the interpreter would print for an uncaught exception
        traceback.print_exc(file=err)
        status = 1
    finally:
        sys.stdout, sys.stderr, sys.argv = sys.__stdout__, sys.__stderr__, saved_argv
        os.environ.clear()
        os.environ.update(saved)
    return {"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main() -> int:
    cases_file, results_file = sys.argv[1:3]
    with open(cases_file, encoding="utf-8") as f:
        cases = json.load(f)
    results = [run_one(c["module"], c["argv"], c.get("env", {})) for c in cases]
    with open(results_file, "w", encoding="utf-8") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
