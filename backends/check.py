"""The op check: every registered implementation of every op, on every backend here, against the reference.

In the spirit of ggml's test-backend-ops: for each target (a backend on a device this machine has), each
implementation registered for its backend (runtime.dispatch.impl) runs the shared shape cases
(backends/op_cases.py: decode and prefill, batch 1 and ragged) in each dtype, and its output is compared with
the op's float32 reference (runtime/ops/specs.py) on the same inputs. The error is the largest
|got - reference| over the largest |reference| of each output (float outputs), or the share of entries that
differ (index outputs); the tolerance per op x dtype, with per-implementation overrides, is data
(backends/op_tolerances.yaml, about 3x what was measured). A user on a new chip runs

    python -m backends.check                          # cpu, and cuda / ascend where the device is there
    python -m backends.check --load tests.twins.backends   # also the CPU twins of a CUDA GPU and an Ascend NPU

and reads one row per (op, backend, implementation, dtype): the largest error over the cases, the tolerance,
and pass, FAIL, or skip with the reason. Exit status 1 when a row fails.

Targets: `cpu`, `cuda` and `ascend` are built in (a device that is not there is one skipped row saying why);
`add_target` registers more (the test suite registers the CPU twins, tests/twins/backends.py). A target whose
implementations are the reference itself on the same CPU (`<backend>.torch` on a twin) is skipped: comparing a
function with itself proves nothing; on a real device the same rows run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import torch
import yaml

from runtime.dispatch import Context, Impl, implementations
from runtime.errors import V4Error
from runtime.ops.specs import BY_NAME, TABLE_OPS

from . import op_cases

TOLERANCES = Path(__file__).with_name("op_tolerances.yaml")


@dataclass(frozen=True)
class Target:
    """A backend on a device: whose implementations run, where, with which capabilities."""
    name: str                               # the table's backend column: cpu, cuda, cuda-twin, ...
    backend: str                            # the backend whose registered implementations run
    device: str                             # torch device of their inputs
    capabilities: frozenset[str] = frozenset()
    profile: str = "cpu"                    # the profile whose kernel limits / weight format `prepare` reads
    twin: bool = False                      # a CPU twin standing in for the device (not the device)
    setup: Callable[[], ContextManager] = contextlib.nullcontext   # installs what the target needs while it runs
    unavailable: str = ""                   # why this target cannot run here ("" = it can)


@dataclass(frozen=True)
class Result:
    op: str
    target: str
    impl: str
    dtype: str
    case: str
    err: float | None
    tol: float | None
    status: str                             # pass | FAIL | skip
    reason: str = ""


_TARGETS: dict[str, Callable[[], Target]] = {}


def add_target(name: str, make: Callable[[], Target]) -> None:
    """Register a target (made lazily, when the check runs): an out-of-tree device, or a test's twin."""
    _TARGETS[name] = make


def _probed(name: str, profile: str) -> Target:
    from backends import get_backend

    backend = get_backend(name)
    try:
        info = backend.probe()
    except V4Error as e:
        return Target(name, name, "cpu", profile=profile, unavailable=str(e).splitlines()[0])
    return Target(name, name, info.device, backend.capabilities(info), profile)


add_target("cpu", lambda: _probed("cpu", "cpu"))
add_target("cuda", lambda: _probed("cuda", "nvidia-h100"))
add_target("ascend", lambda: _probed("ascend", "ascend-910b"))


def targets() -> list[Target]:
    return [make() for make in _TARGETS.values()]


@dataclass
class Tolerances:
    """op -> {dtype: tol, impl id: {dtype: tol | skip reason}}: per op x dtype, overrides per implementation."""
    table: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path = TOLERANCES) -> "Tolerances":
        return cls(yaml.safe_load(path.read_text()))

    def get(self, op: str, impl_id: str, dtype: str) -> "float | str":
        entry = self.table.get(op, {})
        specific = entry.get(impl_id, {})
        value = specific.get(dtype, entry.get(dtype))
        if value is None:
            raise KeyError(f"backends/op_tolerances.yaml has no tolerance for {op} / {impl_id} / {dtype}")
        return value if isinstance(value, str) else float(value)


def _flat(out) -> list[torch.Tensor]:
    return [t for o in out for t in _flat(o)] if isinstance(out, (tuple, list)) else [out]


def error(got, want) -> float:
    """max |got - want| / max |want| per float output, share of differing entries per index output; the max."""
    worst = 0.0
    g, w = _flat(got), _flat(want)
    if len(g) != len(w):
        return math.inf
    for a, b in zip(g, w):
        a = a.detach().cpu()
        if a.shape != b.shape:
            return math.inf
        if not b.is_floating_point():
            worst = max(worst, float((a.long() != b).float().mean()) if b.numel() else 0.0)
            continue
        if a.dtype != torch.float32:          # every implementation returns float32, like the reference
            return math.inf
        if not bool((torch.isfinite(a) == torch.isfinite(b)).all()):
            return math.inf
        ok = torch.isfinite(b)
        scale = float(b[ok].abs().max()) if bool(ok.any()) else 0.0
        worst = max(worst, float((a[ok] - b[ok]).abs().max()) / max(scale, 1e-30) if bool(ok.any()) else 0.0)
    return worst


def _runnable(target: Target, imp: Impl) -> tuple[Callable | None, str]:
    """The callable to check (through the implementation's `prepare`, as dispatch would), or why not."""
    if target.unavailable:
        return None, target.unavailable
    missing = sorted(imp.requires - target.capabilities)
    if missing:
        return None, f"needs {', '.join(missing)} (not on this device)"
    if target.twin and imp.fn is BY_NAME[imp.op].reference:
        return None, "plain torch is the reference itself on a CPU twin (it runs on a real device)"
    if imp.prepare is None:
        return imp.fn, ""
    from runtime.profile import load_profile

    prof = load_profile(target.profile)
    fn, note = imp.prepare(Context(prof, target.backend, target.device, target.capabilities, prof.numerics,
                                   prof.weight_format))
    return fn, note


@functools.lru_cache(maxsize=64)
def _reference(op: str, case: str, dtype: str, backend: str) -> tuple[list, list]:
    """The case's calls on the CPU and the reference's outputs for them (shared by the implementations)."""
    calls = op_cases.build(op, case, dtype, backend)
    ref = BY_NAME[op].reference
    return calls, [ref(*args, **kw) for args, kw in calls]


def check_one(target: Target, imp: Impl, dtype: str, tolerances: Tolerances,
              cases=tuple(op_cases.CASES)) -> list[Result]:
    """One implementation in one dtype over the cases (run inside `target.setup()`)."""
    def row(case, status, reason="", err=None, tol=None):
        return Result(imp.op, target.name, imp.id, dtype, case, err, tol, status, reason)

    try:                                   # a new op or implementation must bring its cases and tolerances
        tol = tolerances.get(imp.op, imp.id, dtype)
        if isinstance(tol, str):           # checked elsewhere, or not on this target: the string says which
            return [row("*", "skip", tol)]
        _reference(imp.op, next(iter(cases)), dtype, target.backend)
    except KeyError as e:
        return [row("*", "FAIL", str(e).strip("'\""))]
    fn, note = _runnable(target, imp)
    if fn is None:
        return [row("*", "skip", note)]
    out = []
    for case in cases:
        calls, wants = _reference(imp.op, case, dtype, target.backend)
        if target.device != "cpu":
            calls = op_cases.build(imp.op, case, dtype, target.backend, target.device)
        err = 0.0
        try:
            for (args, kw), want in zip(calls, wants):
                err = max(err, error(fn(*args, **kw), want))
        except Exception as e:             # a kernel that raises fails its row, with the first line of why
            first = (str(e).splitlines() or [type(e).__name__])[0]
            out.append(row(case, "FAIL", f"raised {type(e).__name__}: {first}"))
            continue
        out.append(row(case, "pass" if err <= tol else "FAIL", "", err, tol))
    return out


def plan(ops=TABLE_OPS, only=None) -> Iterator[tuple[Target, Impl | None, str]]:
    """(target, implementation, dtype) for every registered implementation on every target; an unavailable
    target appears once, with no implementation."""
    import backends.ascend  # noqa: F401  (each backend module registers its implementations)
    import backends.cpu  # noqa: F401
    import backends.cuda  # noqa: F401

    for t in targets():
        if only and t.name not in only:
            continue
        if t.unavailable:
            yield t, None, "-"
            continue
        for op in ops:
            for imp in implementations(op).values():
                if imp.backend == t.backend:
                    for dtype in op_cases.dtypes(op, t.backend):
                        yield t, imp, dtype


def run(ops=TABLE_OPS, only=None, tolerances: Tolerances | None = None) -> list[Result]:
    tolerances = tolerances or Tolerances.load()
    results = []
    for t, imp, dtype in plan(ops, only):
        if imp is None:
            results.append(Result("*", t.name, "*", "-", "*", None, None, "skip", t.unavailable))
            continue
        with t.setup():
            results += check_one(t, imp, dtype, tolerances)
    return results


def summarize(results: list[Result]) -> list[Result]:
    """One row per (op, target, impl, dtype): the largest error over the cases, FAIL if any case failed."""
    rows: dict[tuple, list[Result]] = {}
    for r in results:
        rows.setdefault((r.op, r.target, r.impl, r.dtype), []).append(r)
    out = []
    for key, rs in rows.items():
        errs = [r.err for r in rs if r.err is not None]
        fails = [r for r in rs if r.status == "FAIL"]
        status = "FAIL" if fails else ("skip" if all(r.status == "skip" for r in rs) else "pass")
        reason = "; ".join(f"{r.case}: {r.reason or 'over tolerance'}" for r in fails) or rs[0].reason
        out.append(Result(*key, "*", max(errs) if errs else None, rs[0].tol, status, reason))
    return out


def format_table(rows: list[Result]) -> str:
    def num(v):
        return "-" if v is None else ("inf" if math.isinf(v) else f"{v:.1e}")

    head = ("op", "backend", "impl", "dtype", "max err", "tol", "result")
    cells = [head] + [(r.op, r.target, r.impl, r.dtype, num(r.err), num(r.tol),
                       r.status + (f" ({r.reason})" if r.reason and r.status != "pass" else "")) for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(6)]
    return "\n".join("  ".join(c[i].ljust(w[i]) for i in range(6)) + "  " + c[6] for c in cells)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backends.check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", action="append", default=[], metavar="MODULE",
                    help="import MODULE and call its add_check_targets() (e.g. tests.twins.backends)")
    ap.add_argument("--op", action="append", choices=TABLE_OPS, help="only this op (repeatable)")
    ap.add_argument("--target", action="append", help="only this target (repeatable)")
    args = ap.parse_args(argv)
    for name in args.load:
        try:
            importlib.import_module(name).add_check_targets()
        except (ImportError, AttributeError) as e:
            print(f"--load {name}: {e}; give a module with add_check_targets() (run from the repository root "
                  "for tests.twins.backends)", file=sys.stderr)
            return 2
    rows = summarize(run(tuple(args.op or TABLE_OPS), args.target))
    print(format_table(rows))
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    # run the imported module's main: targets that --load modules add go to `backends.check`'s registry, which
    # is not this `__main__` copy of the module
    from backends.check import main as _main

    sys.exit(_main())
