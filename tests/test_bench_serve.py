"""`python -m runtime.bench serve`: a short run's JSON (every level measured, its ratio to concurrency 1 and its
multiply-add rate following from the figures it reports) and the one-line refusals of bad arguments, an
unwritable --out among them before any run. Speeds are printed, not asserted."""

from __future__ import annotations

import json

import pytest

from runtime.api import Runtime
from runtime.bench import serve
from runtime.plan.sizes import macs_per_token


def test_a_short_run_writes_consistent_figures(tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert serve.main(["--no-plain", "--no-ttft", "--concurrency", "1,2", "--tokens", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = res["decode"]
    assert [r["concurrency"] for r in rows] == [1, 2] and res["ttft"] is None
    cfg = Runtime.load("cpu", progress=False).config          # the bench's model: the shipped default
    base = rows[0]["invariant_tok_s"]
    for r in rows:
        assert r["invariant_tok_s"] > 0 and "plain_tok_s" not in r
        assert r["speedup_vs_1"] == pytest.approx(r["invariant_tok_s"] / base)
        # the multiply-adds per token at the level's mean position (prompts of 24 + i tokens, then 4 decoded)
        mean = sum(24 + i for i in range(r["concurrency"])) / r["concurrency"] + 2
        assert r["macs_per_token"] == macs_per_token(cfg, round(mean))["total"]
        assert r["gmac_s"] == pytest.approx(r["invariant_tok_s"] * r["macs_per_token"] / 1e9)
    assert "roofline:" in capsys.readouterr().out


NEED = "bench serve: need --shared < --context, --tokens >= 2, concurrency >= 1"


@pytest.mark.parametrize("argv,msg", [
    (["--concurrency", "1,x"], "bench serve: --concurrency must be comma-separated integers, got '1,x'"),
    (["--concurrency", "0"], NEED), (["--tokens", "1"], NEED), (["--context", "100", "--shared", "200"], NEED),
])
def test_bad_arguments_are_one_line(capsys, argv, msg):
    assert serve.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [msg]


def test_an_unwritable_out_is_refused_before_any_run(tmp_path, capsys):
    out = tmp_path / "missing" / "serve.json"
    assert serve.main(["--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"bench serve: --out {out}: folder {out.parent} does not exist; create it or name another file"]
