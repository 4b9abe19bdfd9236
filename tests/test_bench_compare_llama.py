"""`python -m runtime.bench --compare llama.cpp` without a real llama.cpp: the one-line note when it is absent,
and the parsing of dsv4_bench's output through a fake `dsv4_bench` (a shell script printing what the real one
prints). Nothing is timed."""

from __future__ import annotations

import stat

import pytest

from runtime.bench import compare_llama as cl
from runtime.bench.__main__ import parse
from runtime.errors import V4Error

FAKE = "pp512 t/s 3370.5\npp2048 t/s 2910.0\ntg@1024 ms 1.40\ntg@4096 ms 1.75\n"


def test_absent_llama_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_DIR", str(tmp_path / "nowhere"))
    tools, note = cl.find_llama()
    assert tools is None and "\n" not in note and "build.sh" in note and "skipped" in note
    table = cl.format_compare({"pp512": 4000.0, "tg@1024": 1.5}, None, 2, None, note)
    assert note in table.splitlines() and "llama.cpp native" not in table


def _fake_llama(tmp_path, monkeypatch, output=FAKE):
    d = tmp_path / "llama"
    (d / "build" / "bin").mkdir(parents=True)
    exe = d / "build" / "bin" / "dsv4_bench"
    exe.write_text(f"#!/bin/sh\necho \"$@\" > {d}/args.txt\nprintf '{output}'\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    peers = tmp_path / "peers"
    peers.mkdir()
    (peers / "convert.sh").write_text("#!/bin/sh\nexit 1\n")
    monkeypatch.setenv("LLAMA_DIR", str(d))
    monkeypatch.setenv("LLAMA_PEERS", str(peers))
    return d


def test_fake_dsv4_bench_output_is_parsed_and_compared(tmp_path, monkeypatch):
    d = _fake_llama(tmp_path, monkeypatch)
    tools, note = cl.find_llama()
    assert note == "" and tools["bench"] == d / "build" / "bin" / "dsv4_bench"
    got, note = cl.run_llama(tools, tmp_path / "m.gguf", threads=2, reps=3, steps=16)
    assert note == "" and got == {"pp512": 3370.5, "pp2048": 2910.0, "tg@1024": 1.40, "tg@4096": 1.75}
    args = (d / "args.txt").read_text().split()
    assert args[args.index("--threads") + 1] == "2"          # the same threads as ours
    assert args[args.index("--pp") + 1] == "512,2048" and args[args.index("--tg") + 1] == "1024,4096"
    ours = {"pp512": 4044.0, "pp2048": 3492.0, "tg@1024": 1.68, "tg@4096": 2.45}
    counts = {"fused": {"per_step": 54, "per_block": {"csa": 8, "swa": 4}, "outside_blocks": 34},
              "unfused": {"per_step": 1512, "per_block": {"csa": 355, "swa": 234}, "outside_blocks": 34}}
    table = cl.format_compare(ours, got, 2, counts).splitlines()
    ratio = next(ln for ln in table if ln.startswith("ratio")).split()
    assert ratio[-4:] == ["1.20x", "1.20x", "1.20x", "1.40x"]     # 4044/3370.5, 3492/2910, 1.68/1.4, 2.45/1.75
    assert any("decode <= 1.25x" in ln and "NOT met" in ln and "worst 1.40x" in ln for ln in table)
    assert any("fused: 54" in ln and "csa 8" in ln for ln in table)
    assert any("unfused: 1512" in ln for ln in table)


def test_bad_dsv4_bench_output_is_one_line(tmp_path, monkeypatch):
    _fake_llama(tmp_path, monkeypatch, output="error: failed to load model\\n")
    tools, _ = cl.find_llama()
    with pytest.raises(V4Error, match="printed no results"):
        cl.run_llama(tools, tmp_path / "m.gguf", threads=1, reps=1, steps=1)


def test_dsv4_bench_abort_takes_llama_bench_without_repacking(tmp_path, monkeypatch):
    """dsv4_bench aborting on a GGML_ASSERT (llama.cpp's repacked weights on some CPUs) -> llama-bench --repack 0,
    its JSON parsed (decode tok/s -> ms per token at each depth), and a note that says so."""
    d = _fake_llama(tmp_path, monkeypatch)
    (d / "build" / "bin" / "dsv4_bench").write_text(
        "#!/bin/sh\necho 'ggml-backend.cpp:1294: GGML_ASSERT(*cur_backend_id != -1) failed' >&2\n"
        "echo '30 ../sysdeps/unix/sysv/linux/wait4.c: No such file or directory.' >&2\nexit 134\n")
    bench = d / "build" / "bin" / "llama-bench"
    pp = '[{"n_prompt": 512, "n_gen": 0, "n_depth": 0, "avg_ts": 3200.0}, ' \
         '{"n_prompt": 2048, "n_gen": 0, "n_depth": 0, "avg_ts": 2750.0}]'
    tg = '[{"n_prompt": 0, "n_gen": 16, "n_depth": 1024, "avg_ts": 625.0}, ' \
         '{"n_prompt": 0, "n_gen": 16, "n_depth": 4096, "avg_ts": 500.0}]'
    bench.write_text(f"#!/bin/sh\necho \"$@\" >> {d}/lb_args.txt\n"
                     f"case \"$*\" in *-d*) echo '{tg}';; *) echo '{pp}';; esac\n")
    bench.chmod(bench.stat().st_mode | stat.S_IEXEC)
    tools, _ = cl.find_llama()
    got, note = cl.run_llama(tools, tmp_path / "m.gguf", threads=2, reps=3, steps=16)
    assert got == {"pp512": 3200.0, "pp2048": 2750.0, "tg@1024": 1.6, "tg@4096": 2.0}
    assert "GGML_ASSERT" in note and "--repack 0" in note and "\n" not in note
    calls = (d / "lb_args.txt").read_text().splitlines()
    assert all("--repack 0" in c and "-t 2" in c for c in calls) and any("-d 1024,4096" in c for c in calls)
    table = cl.format_compare({"pp512": 4000.0, "tg@1024": 1.5}, got, 2, None, note)
    assert note in table.splitlines() and any(ln.startswith("ratio") for ln in table.splitlines())


def test_dsv4_bench_other_failure_is_one_line(tmp_path, monkeypatch):
    d = _fake_llama(tmp_path, monkeypatch)
    (d / "build" / "bin" / "dsv4_bench").write_text("#!/bin/sh\necho 'error: out of memory' >&2\nexit 1\n")
    tools, _ = cl.find_llama()
    with pytest.raises(V4Error, match="dsv4_bench failed: error: out of memory"):
        cl.run_llama(tools, tmp_path / "m.gguf", threads=1, reps=1, steps=1)


def test_compare_argument_checks():
    args, compare, _ = parse(["--compare", "llama.cpp"])
    assert compare == ["llama.cpp"]
    with pytest.raises(V4Error, match="alone"):
        parse(["--compare", "llama.cpp,dense"])
    with pytest.raises(V4Error, match="llama.cpp"):
        parse(["--compare", "vllm"])
