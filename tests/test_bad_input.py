"""Bad input gets a one-line error naming the problem (and exit status 2 from the CLIs): the checkpoint loader,
the runtime's input checks, the cache folder, every CLI's wrapper (Ctrl-C, rank 0, parity's crash status),
the planner, collective errors, ONNX export manifests and external data. The subprocess matrix over every
CLI is tests/test_bad_input_matrix.py."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.api import Runtime
from runtime.checkpoint import load_checkpoint
from runtime.errors import CheckpointError, ConfigError, InputError, V4Error


@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, dst)
    return dst


def _index(path):
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_truncated_shard(ckpt_copy):
    shard = ckpt_copy / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt_copy)
    assert "model-00002-of-00003.safetensors" in one_line(e) and "truncated or corrupt" in one_line(e)


def test_garbage_header(ckpt_copy):
    (ckpt_copy / "model-00001-of-00003.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="model-00001-of-00003.safetensors is truncated or corrupt"):
        load_checkpoint(ckpt_copy)


def _rewrite(ckpt, fname, edit):
    tensors = load_file(str(ckpt / fname))
    edit(tensors)
    save_file(tensors, str(ckpt / fname), metadata={"format": "pt"})


def test_missing_and_misshaped_and_unexpected_reported_together(ckpt_copy):
    wm = _index(ckpt_copy)
    gone, bent = "layers.1.attn.wkv.weight", "layers.1.attn.attn_sink"
    assert wm[gone] == wm[bent]

    def edit(t):
        del t[gone]
        t[bent] = torch.zeros(3)
        t["layers.9.bogus"] = torch.zeros(1)
    _rewrite(ckpt_copy, wm[gone], edit)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt_copy)
    msg = one_line(e)
    assert f"1 missing: {gone}" in msg
    assert "1 unexpected: layers.9.bogus" in msg
    assert f"{bent} [3]/F32 (expected [8]/F32)" in msg


def test_wrong_dtype(ckpt_copy):
    name = "layers.0.attn.wq_a.weight"
    _rewrite(ckpt_copy, _index(ckpt_copy)[name], lambda t: t.__setitem__(name, t[name].float()))
    with pytest.raises(CheckpointError, match=r"layers.0.attn.wq_a.weight \[128, 256\]/F32 \(expected \[128, 256\]/F8_E4M3\)"):
        load_checkpoint(ckpt_copy)


def test_float32_fp8_scales_name_the_base_checkpoint(ckpt_copy):
    """DeepSeek's Base checkpoints keep their FP8 scales in float32 (spec 3.1): one line says that kind of
    checkpoint is not loaded yet, not a "wrong shape/dtype" per scale."""
    name = "layers.0.attn.wq_a.scale"

    def edit(t):
        t[name] = t[name].view(torch.float8_e8m0fnu).float()          # the same powers of two, as float32
    _rewrite(ckpt_copy, _index(ckpt_copy)[name], edit)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt_copy)
    assert f"FP8 scale tensor(s) are float32 (e.g. {name}): a DeepSeek Base checkpoint" in one_line(e)
    assert "use the instruct release" in one_line(e)


def test_config_missing_key(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    del cfg["o_groups"]
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="missing required key.*o_groups"):
        load_checkpoint(ckpt_copy)


def test_missing_shard_and_folder(ckpt_copy, tmp_path):
    (ckpt_copy / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00003-of-00003.safetensors named by the index is missing"):
        load_checkpoint(ckpt_copy)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_index_path_escape_refused(ckpt_copy):
    idx = json.loads((ckpt_copy / "model.safetensors.index.json").read_text())
    idx["weight_map"]["embed.weight"] = "../evil.safetensors"
    (ckpt_copy / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="leaves the checkpoint folder"):
        load_checkpoint(ckpt_copy)


def test_token_ids_and_shapes(tiny_rt):
    with pytest.raises(InputError) as e:
        tiny_rt.forward([[5, 320]])
    assert "token id 320 is out of range [0, 320)" in one_line(e)
    with pytest.raises(InputError, match="out of range"):
        tiny_rt.forward([[-1]])
    with pytest.raises(InputError, match="must be integers"):
        tiny_rt.forward(torch.zeros(1, 3))
    with pytest.raises(InputError, match="shape"):
        tiny_rt.forward(torch.zeros(1, 2, 3, dtype=torch.int64))
    with pytest.raises(InputError, match="state holds 2 sequences"):
        tiny_rt.forward([[3, 4]], state=tiny_rt.new_state(2))


def test_over_long_prompt_and_bad_sampling(tiny_rt):
    too_long = [2] * (tiny_rt.config.max_position + 1)
    with pytest.raises(InputError, match="exceeds the model's 1048576-token context"):
        tiny_rt.generate([too_long], max_new_tokens=1)
    for kw, msg in (({"temperature": -1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
                    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"max_new_tokens": -2}, "max_new_tokens")):
        with pytest.raises(InputError, match=msg):
            tiny_rt.generate("hi", **kw)


@pytest.mark.parametrize("prompts,held", [(123, "int"), (None, "NoneType"), (b"hi", "bytes"),
                                           (["a", None], "list holding NoneType, str"),
                                           ([0, 5.5], "list holding float, int")])
def test_prompts_of_the_wrong_type_are_one_line(tiny_rt, prompts, held):
    with pytest.raises(InputError) as e:
        tiny_rt.generate(prompts, max_new_tokens=1)
    assert one_line(e) == ("prompts must be a string, a list of strings or a list of token-id lists, got " + held)


def test_prompts_as_arrays_are_their_lists(tiny_rt):
    want = tiny_rt.generate([[0, 5, 6]], max_new_tokens=3).tokens
    assert tiny_rt.generate(torch.tensor([[0, 5, 6]]), max_new_tokens=3).tokens == want
    assert tiny_rt.generate(torch.tensor([0, 5, 6]).numpy(), max_new_tokens=3).tokens == want
    with pytest.raises(InputError, match="must be integers"):
        tiny_rt.generate(torch.tensor([[0.5, 1.0]]), max_new_tokens=1)


def test_load_arguments_of_the_wrong_type_are_one_line():
    with pytest.raises(InputError) as e:
        Runtime.load(5)
    assert one_line(e) == "profile must be a profile name, a path to a YAML file or a Profile, got int"
    with pytest.raises(InputError) as e:
        Runtime.load("cpu", checkpoint=5)
    assert one_line(e) == "checkpoint must be a folder path (str or Path), got int"


def test_api_arguments_of_the_wrong_type_are_one_line(tiny_rt):
    for call, msg in ((lambda: Runtime.load("cpu", emulate="yes"), "emulate must be True or False, got 'yes'"),
                      (lambda: Runtime.load("cpu", progress="no"), "progress must be True or False, got 'no'"),
                      (lambda: tiny_rt.generate("x", stop_at_eos="no"), "stop_at_eos must be True or False, got 'no'"),
                      (lambda: tiny_rt.generate("x", on_token=5),
                       "on_token must be a function (row, token_id), got int"),
                      (lambda: tiny_rt.encode(5), "encode takes a string, got int"),
                      (lambda: tiny_rt.forward([[1, 2]], state="s"),
                       "state must be a StateBatch from Runtime.new_state, got str")):
        with pytest.raises(InputError) as e:
            call()
        assert one_line(e) == msg


def test_unknown_backend():
    with pytest.raises(V4Error, match="unknown profile 'tpu'; shipped: ascend-310p, "):
        Runtime.load("tpu")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


def test_cli_errors_exit_2_with_one_line(ckpt_copy, tmp_path):
    shard = ckpt_copy / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    for args in (("runtime.run", "--checkpoint", str(ckpt_copy)),
                 ("runtime.run", "--checkpoint", str(tmp_path / "missing")),
                 ("runtime.run", "--temperature", "-3"),
                 ("runtime.checkpoint", "check", str(ckpt_copy))):
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("#")]
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
        assert "Traceback" not in r.stderr


# ------------------------------------------------------------------ the cache folder (build_once)
def test_failed_build_leaves_no_temporary_folder_and_half_built_is_rebuilt(tmp_path):
    from runtime.cache import build_once

    target = tmp_path / "cache" / "thing"

    def broken(folder):
        (folder / "partial.bin").write_bytes(b"x")
        raise V4Error("the build failed half way")
    with pytest.raises(V4Error, match="half way"):
        build_once(target, "done.txt", broken)
    assert sorted(p.name for p in target.parent.iterdir()) == []          # no .tmp-* left behind
    target.mkdir()                                    # a half-built folder: no done.txt (used to be fatal forever)
    (target / "stale.bin").write_bytes(b"old")

    def good(folder):
        (folder / "done.txt").write_text("ok")
    assert build_once(target, "done.txt", good) == target
    assert sorted(p.name for p in target.iterdir()) == ["done.txt"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["thing"]    # no .tmp-* / .stale-* either
    assert build_once(target, "done.txt", broken) == target               # built: not rebuilt


def test_unwritable_cache_folder_is_one_line(tmp_path, monkeypatch):
    from runtime.checkpoint.builtin import random_checkpoint

    blocker = tmp_path / "home"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("DSV4RT_HOME", str(blocker))
    with pytest.raises(V4Error, match=r"cache folder .*home cannot be written .* set DSV4RT_HOME") as e:
        random_checkpoint()
    one_line(e)


# ------------------------------------------------------------------ every CLI's wrapper
def _cli_mains():
    """(main, argv, the function its body calls first that we make raise) for each CLI."""
    return [("runtime.run", ["--max-new-tokens", "1"], "runtime.api.Runtime.load"),
            ("runtime.checkpoint.__main__", ["check", "x"], "runtime.checkpoint.__main__._check"),
            ("runtime.plan.__main__", ["--context", "10"], "runtime.plan.__main__.plan"),
            ("runtime.parity.__main__", ["--candidate", "cpu-bf16", "--out", "OUT"], "runtime.parity.compare.compare"),
            ("runtime.bench.__main__", ["--quick"], "runtime.bench.__main__.parse"),
            ("export.onnx", ["--checkpoint", "x", "--out", "OUT"], "export.onnx.export_model")]


@pytest.mark.parametrize("module,argv,target", _cli_mains(), ids=[m[0] for m in _cli_mains()])
@pytest.mark.parametrize("raised,status,line", [
    (KeyboardInterrupt(), 130, "interrupted (Ctrl-C)"),
    (V4Error("a bad value; the fix"), 2, "error: a bad value; the fix"),
    (ConfigError("two\nlines"), 2, "error: two lines"),
])
def test_every_cli_maps_interrupts_and_bad_input_to_one_line(module, argv, target, raised, status, line, monkeypatch,
                                                              capsys, tmp_path):
    import importlib

    mod_name, attr = target.rsplit(".", 1)
    if mod_name.endswith(".Runtime"):
        mod_name, attr = mod_name.rsplit(".", 1)[0], "Runtime"
        owner = importlib.import_module(mod_name).Runtime

        def load(*a, **k):
            raise raised
        monkeypatch.setattr(owner, "load", load)
    else:
        def boom(*a, **k):
            raise raised
        monkeypatch.setattr(importlib.import_module(mod_name), attr, boom)
    main = importlib.import_module(module).main
    assert main([a.replace("OUT", str(tmp_path / "out")) for a in argv]) == status
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [line] and "Traceback" not in captured.out


def test_only_rank_0_prints(monkeypatch, capsys):
    from runtime.cli import run_cli

    def bad():
        raise InputError("bad")
    monkeypatch.setenv("RANK", "1")
    assert run_cli(bad) == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert run_cli(bad) == 2 and capsys.readouterr().err == "error: bad\n"


def test_parity_crash_has_its_own_exit_status(monkeypatch, capsys, tmp_path):
    """A crash of the harness (a bug, not a verdict) must not look like failing rows (1) or bad input (2)."""
    import importlib

    import runtime.parity.__main__ as cli

    compare = importlib.import_module("runtime.parity.compare")      # the module (the package exports a function)

    def crash(*a, **k):
        raise ZeroDivisionError("a bug in the harness")
    monkeypatch.setattr(compare, "compare", crash)
    assert cli.main(["--candidate", "cpu-bf16", "--out", str(tmp_path / "o")]) == cli.EXIT_CRASH == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("error: internal error (ZeroDivisionError")
    assert "3 when the harness itself crashed" in cli.build_parser().format_help()


def test_ctrl_c_exits_130_with_one_line(tiny_ckpt):
    """A real SIGINT while runtime.run is generating."""
    import os
    import signal

    p = subprocess.Popen([sys.executable, "-m", "runtime.run", "--checkpoint", str(tiny_ckpt), "--max-new-tokens",
                          "100000", "--no-eos-stop", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert p.stdout.read(5) == b"Hello"                     # the prompt is out: generation has started
        p.send_signal(signal.SIGINT)
        err = p.communicate(timeout=60)[1].decode()
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and err.splitlines() == ["interrupted (Ctrl-C)"], err


# ------------------------------------------------------------------ the planner, the multi-process errors
def test_plan_of_a_window_only_model(capsys, tmp_path):
    """Every layer window-only: no state grows with the context (this was a ZeroDivisionError)."""
    from runtime.config import ModelConfig
    from runtime.plan import plan
    from runtime.plan.__main__ import main
    from runtime.presets import preset
    from runtime.profile import load_profile

    raw = {**preset("tiny"), "compress_ratios": [0] * 6}
    p = plan(ModelConfig.from_hf(raw), load_profile("cpu"), 4096)
    assert p["state_per_token"] == 0 and p["max_context"] == raw["max_position_embeddings"]
    (tmp_path / "c.json").write_text(json.dumps(raw))
    assert main(["--model", str(tmp_path / "c.json"), "--profile", "cpu", "--context", "4096"]) == 0
    assert "max context at batch 1: 1,048,576" in capsys.readouterr().out


class _Work:
    """What torch.distributed returns for async_op=True: here one whose wait fails like gloo's on a lost peer."""

    def __init__(self, error=None):
        self.error = error

    def wait(self):
        if self.error:
            raise self.error
        return True


def test_only_distributed_errors_are_a_lost_peer():
    import torch.distributed as dist

    from runtime.parallel.comm import CollectiveError, Parallel

    par = Parallel()
    with pytest.raises(CollectiveError, match=r"rank 0: collective x failed after a peer rank stopped or hung "
                                              r"\(Read error: Connection reset by peer\)"):
        par._call("x", lambda: _Work(RuntimeError("[../gloo/pair.cc:537] Read error: Connection reset by peer")))
    with pytest.raises(CollectiveError, match="Socket Timeout"):
        par._call("x", lambda: (_ for _ in ()).throw(dist.DistNetworkError("Socket Timeout")))
    # an error issuing the collective (a wrong shape / dtype) is a bug here, not a lost peer: it propagates
    with pytest.raises(ValueError, match="Tensors must be the same size"):
        par._call("x", lambda: (_ for _ in ()).throw(ValueError("Tensors must be the same size")))
    with pytest.raises(RuntimeError, match="expected a contiguous tensor"):
        par._call("x", lambda: (_ for _ in ()).throw(RuntimeError("expected a contiguous tensor")))
    assert par._call("x", lambda: _Work()) is True


# ------------------------------------------------------------------ ONNX exports: the manifest, external data
def _graph_with_external_data(folder: Path, name: str) -> Path:
    """A one-node graph (Identity of a 300-float initializer) saved as `folder/name` with its weights as external
    data in `w.bin` next to it, as export/onnx.py saves the step graph."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(300, dtype=np.float32), "w")
    g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [300])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(m, str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    return path


def _set_location(path: Path, loc: str) -> None:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    next(e for e in m.graph.initializer[0].external_data if e.key == "location").value = loc
    onnx.save(m, str(path))


def test_external_data_is_resolved_against_the_graph_folder(tmp_path):
    """ONNX Runtime reads `location` relative to the .onnx file's folder. A graph in a subfolder whose location
    is spelled relative to the export folder used to pass the check and then fail (or read another file) in
    ONNX Runtime."""
    import numpy as np
    import onnxruntime as ort

    from export.format import ExportError, check_external_data

    graph = _graph_with_external_data(tmp_path, "sub/g.onnx")
    check_external_data(tmp_path, "sub/g.onnx")
    y = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(None, {})[0]
    assert np.array_equal(y, np.arange(300, dtype=np.float32))          # ORT found w.bin next to the graph
    _set_location(graph, "sub/w.bin")            # exists relative to the export folder, not to the graph
    with pytest.raises(ExportError, match=r"stores its data in 'sub/w.bin', which is not in .*sub \(where ONNX"):
        check_external_data(tmp_path, "sub/g.onnx")
    with pytest.raises(Exception):               # and ORT indeed cannot load it
        ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    (tmp_path / "w.bin").write_bytes((tmp_path / "sub" / "w.bin").read_bytes())
    for loc in ("../w.bin", str(tmp_path / "w.bin"), "../../etc/passwd"):
        _set_location(graph, loc)
        with pytest.raises(ExportError, match="outside the export folder"):
            check_external_data(tmp_path, "sub/g.onnx")
    (tmp_path / "sub" / "g.onnx").write_bytes(b"\x12\xff not protobuf")
    with pytest.raises(ExportError, match="not a readable ONNX graph"):
        check_external_data(tmp_path, "sub/g.onnx")


@pytest.mark.parametrize("graphs,msg", [
    ({"step": "../step.onnx"}, "not a relative .onnx path inside the export folder"),
    ({"step": "/tmp/step.onnx"}, "not a relative .onnx path inside the export folder"),
    ({"step": "a//step.onnx"}, "not a relative .onnx path"),
    ({"step": "step.weights"}, "not a relative .onnx path"),
    ({"step": 5}, "not a relative .onnx path"),
    ({"prefill": "step.onnx"}, "naming the 'step' graph"),
    ([], "naming the 'step' graph"),
    ({"step": "missing.onnx"}, "names missing.onnx, which is not in"),
])
def test_export_manifest_graph_names_are_checked(tmp_path, graphs, msg):
    from export.format import read_manifest

    (tmp_path / "step.onnx").write_bytes(b"")
    good = {"format_version": 2, "state": ["a"], "index_taps": ["t"], "graphs": {"step": "step.onnx"}}
    (tmp_path / "export.json").write_text(json.dumps(good))
    assert read_manifest(tmp_path, 2) == good
    (tmp_path / "export.json").write_text(json.dumps({**good, "graphs": graphs}))
    with pytest.raises(CheckpointError, match=msg):
        read_manifest(tmp_path, 2)
    (tmp_path / "export.json").write_text(json.dumps({**good, "state": "a"}))
    with pytest.raises(CheckpointError, match="key 'state' must be a list of tensor names"):
        read_manifest(tmp_path, 2)
