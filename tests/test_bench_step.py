"""`python -m runtime.bench.step`: one line per batch size on the shipped default (the fused step's native call
timed inside it), the native entry point put back afterwards, and one-line refusals of bad values. Speeds are
printed, not asserted."""

from __future__ import annotations

import os
import re

import pytest

from backends import cpu_decode, cpu_native
from runtime.bench import step


# the bench sets torch's thread count for its process: conftest's one_thread puts it back
pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_line_per_batch(capsys):
    if cpu_native._compiler() is None or os.environ.get("DSV4RT_NO_NATIVE"):
        pytest.skip("no native decode library by design here (no C++ compiler, or DSV4RT_NO_NATIVE set)")
    lib = cpu_decode.library()
    assert lib is not None, f"no native decode library although a compiler is present: {cpu_decode._state.get('why')}"
    before = lib.dsv4d_run
    assert step.main(["--batch", "1", "3", "--steps", "4", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [int(re.match(r"B=(\d+) +step +[\d.]+ ms  per row +[\d.]+ ms  native call +([\d.]+) ms \(1 thread",
                         ln).group(1)) for ln in lines] == [1, 3]
    assert lib.dsv4d_run is before            # the timing wrapper is gone
    assert all(float(re.search(r"native call +([\d.]+)", ln).group(1)) > 0 for ln in lines)


@pytest.mark.parametrize("args", [["--batch", "0"], ["--steps", "0"], ["--threads", "0"]])
def test_bad_values_are_one_line(args, capsys):
    assert step.main(args) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_an_unknown_bench_model_is_one_line(capsys):
    assert step.main(["--model", "v5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model 'v5'" in err[0]
