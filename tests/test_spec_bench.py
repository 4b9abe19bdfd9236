"""`python -m runtime.train.spec_bench`: the speculative bench's line on the shipped default (greedy tokens
identical to plain decoding, the acceptance counted), its `--depth` projection on a generated deeper checkpoint,
and its one-line refusal of a bad depth. Speeds are printed, not asserted."""

from __future__ import annotations

import json
import re

import pytest

from runtime.train import spec_bench


# the bench sets torch's thread count for its process: conftest's one_thread puts it back
pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_bench_line_on_the_default_model(capsys):
    assert spec_bench.main(["--prompts", "1", "--new", "8"]) == 0
    line = capsys.readouterr().out.strip()
    m = re.match(r"acceptance ([\d.]+) \((\d+)/(\d+)\); greedy identical: True; speculative speedup", line)
    assert m, line
    kept, drafted = int(m.group(2)), int(m.group(3))
    assert 0 < drafted <= 8 and 0 <= kept <= drafted and abs(float(m.group(1)) - kept / drafted) < 1e-3


def test_depth_projects_on_a_generated_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DSV4RT_HOME", str(tmp_path))
    assert spec_bench.main(["--depth", "2", "--new", "4"]) == 0
    line = capsys.readouterr().out.strip()
    assert re.match(r"layers 2: plain step \d+ us, speculative iteration \d+ us \([\d.]+ steps; random weights kept "
                    r"\d+/\d+\); at acceptance 0.771: [\d.]+x \(1 thread\(s\)\)$", line), line
    cfg = json.loads((tmp_path / "spec-depth-2" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and len(cfg["compress_ratios"]) == 3    # 2 layers + the MTP block's


def test_a_bad_depth_is_one_line(capsys):
    assert spec_bench.main(["--depth", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --depth takes layer counts >= 1 and --acceptance a value in [0, 1]"]
