"""Bad input gets a one-line error naming the problem (and exit status 2 from the CLIs)."""

import json
import shutil
import subprocess
import sys

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
