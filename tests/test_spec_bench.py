"""`python -m runtime.train.spec_bench`: the speculative bench's line on the shipped default (greedy tokens
identical to plain decoding, the acceptance counted), its `--depth` projection on a generated deeper checkpoint,
its `--parts` decomposition (each part's native call found and timed inside its forward, the ceiling the
printed parts give), and its one-line refusals of a bad depth or acceptance and of a checkpoint without an
MTP block. Speeds are printed, not asserted."""

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
    m = re.match(r"layers 2: plain step \d+ us, speculative iteration \d+ us \([\d.]+ steps; random weights kept "
                 r"\d+/\d+\); at acceptance 0.771: [\d.]+x \(1 thread\(s\)\); native calls inside them \(median\): "
                 r"step (\d+) us, iteration (\d+) us \(([\d.]+) steps\)$", line)
    assert m, line
    # the native medians were found inside the loops (nonzero) and the printed ratio follows from them
    ns, ni = int(m.group(1)), int(m.group(2))
    assert 0 < ns and 0 < ni and abs(float(m.group(3)) - ni / ns) <= 0.01 + 0.5 * ni / ns ** 2, line
    cfg = json.loads((tmp_path / "spec-depth-2" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and len(cfg["compress_ratios"]) == 3    # 2 layers + the MTP block's


def test_parts_time_each_part_and_its_native_call(capsys):
    assert spec_bench.main(["--parts", "--acceptance", "0.5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2, lines
    num = r"(\d+) us"
    got = []
    for line, what in zip(lines, ("through forward", "native call")):
        m = re.match(rf"{what} *: plain step +{num}; verify \(2 tokens\) +{num} = ([\d.]+) steps; draft \(MTP "
                     rf"block \+ head\) +{num} = ([\d.]+) steps; ceiling at acceptance 0.5: ([\d.]+)x "
                     r"\(1 thread\(s\)\)$", line)
        assert m, line
        s, v, d = int(m.group(1)), int(m.group(2)), int(m.group(4))
        assert min(s, v, d) > 0
        # the printed ratios and ceiling follow from the printed parts (rounded to whole microseconds)
        assert abs(float(m.group(3)) - v / s) < 0.02 and abs(float(m.group(5)) - d / s) < 0.03
        assert abs(float(m.group(6)) - 1.5 * s / (v + d)) < 0.03
        got.append((s, v, d))
    # each native call ran inside its forward (a missing one would print nan and fail the match above)
    assert all(n <= f for n, f in zip(got[1], got[0])), got


COUNTS = "error: --threads and --prompts take values >= 1, --new >= 2 (the first token, then decode steps)"


@pytest.mark.parametrize("argv,msg", [(["--depth", "0"], "error: --depth takes layer counts >= 1"),
                                      (["--threads", "0"], COUNTS), (["--parts", "--threads", "-1"], COUNTS),
                                      (["--prompts", "0"], COUNTS), (["--depth", "2", "--new", "1"], COUNTS),
                                      (["--parts", "--acceptance", "1.5"],
                                       "error: --acceptance takes a value in [0, 1]")])
def test_bad_arguments_are_one_line(capsys, argv, msg):
    assert spec_bench.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [msg]


def test_a_checkpoint_without_mtp_is_one_line(tmp_path, capsys):
    from runtime import default_model
    from runtime.checkpoint.make import write_checkpoint

    here = default_model.HELDOUT.parent
    base = json.loads((here / "config.json").read_text())
    write_checkpoint(tmp_path, {**base, "num_nextn_predict_layers": 0, "compress_ratios": base["compress_ratios"][:-1]},
                     seed=1, shards=1)
    (tmp_path / "tokenizer.json").write_bytes((here / "tokenizer.json").read_bytes())
    for argv in (["--parts"], ["--prompts", "1", "--new", "2"]):
        assert spec_bench.main(argv + ["--checkpoint", str(tmp_path)]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: checkpoint {tmp_path} has no MTP block (num_nextn_predict_layers 0): nothing drafts; pass one "
            "that has"]
