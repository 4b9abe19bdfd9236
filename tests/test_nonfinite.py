"""Non-finite logits are an error naming the step and the first layer tap where NaN / Inf appeared (runtime/
nonfinite.py), on tiny checkpoints with one NaN in one layer's weight. Failed before: the NaNs came back as
logits, and generate sampled garbage tokens from them."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from runtime.api import Runtime
from runtime.errors import V4Error
from runtime.nonfinite import NonFiniteError

ROOT = Path(__file__).resolve().parent.parent


def _with_nan(src: Path, dst: Path, name: str) -> Path:
    shutil.copytree(src, dst)
    shard = dst / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(str(shard), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = float("nan")
    save_file(tensors, str(shard), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def nan_q_norm(tiny_ckpt, tmp_path_factory):
    """Layer 2's query norm holds a NaN: every token's layer-2 queries are NaN (layers 0-1 are clean)."""
    return _with_nan(tiny_ckpt, tmp_path_factory.mktemp("nan") / "q_norm", "layers.2.attn.q_norm.weight")


def test_forward_and_prefill_name_the_first_non_finite_tap(nan_q_norm):
    rt = Runtime.load("cpu", checkpoint=nan_q_norm, progress=False)
    with pytest.raises(NonFiniteError) as e:
        rt.forward([[5, 6, 7, 8], [9, 10, 11, 12]])
    msg = str(e.value)
    assert isinstance(e.value, V4Error) and "\n" not in msg
    assert "at forward (row 0, position 0)" in msg and "first non-finite tap L2.attn.q;" in msg
    with pytest.raises(NonFiniteError, match=r"at prefill of prompt 0: first non-finite tap L2\.attn\.q;"):
        rt.generate("Hello", max_new_tokens=4)


def test_decode_step_names_the_step_and_the_compressor_tap(tiny_ckpt, tmp_path):
    """Layer 2 is an HCA layer (ratio 128): its compressor's NaN weight is harmless until the first 128-token
    window closes, which a 118-token prompt reaches at the 10th decode step (118 + 10 = 128 tokens)."""
    ck = _with_nan(tiny_ckpt, tmp_path / "hca", "layers.2.attn.compressor.wkv.weight")
    rt = Runtime.load("cpu", checkpoint=ck, progress=False)
    assert torch.isfinite(rt.forward([list(range(2, 120))])).all()             # 118 tokens: no window closed
    with pytest.raises(NonFiniteError, match=r"at decode step 10 of prompt 1: first non-finite tap L2\.hca\."
                                             r"compressed;"):
        rt.generate([[5, 6, 7], list(range(2, 120))], max_new_tokens=30, stop_at_eos=False)


def test_cli_prints_one_line(nan_q_norm):
    r = subprocess.run([sys.executable, "-m", "runtime.run", "--backend", "cpu", "--checkpoint", str(nan_q_norm),
                        "--prompt", "Hello", "--max-new-tokens", "2", "--quiet"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "first non-finite tap L2.attn.q" in r.stderr
