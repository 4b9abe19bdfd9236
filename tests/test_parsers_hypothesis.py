"""Property tests for every parser of user files: config.json, hardware-profile YAML, tolerance YAML, the
safetensors index and shard headers, prompts files and the ONNX export manifest. Arbitrary JSON, YAML or bytes
give either a valid object or the project's error (a `V4Error` subclass with a one-line message), never
another exception. Inputs are random structures, and mutations of the real files (one key's value replaced
by arbitrary data, keys deleted), which reach the deeper checks a random structure never gets past."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.checkpoint.loader import inventory
from runtime.config import ModelConfig
from runtime.errors import CheckpointError, ConfigError, InputError, V4Error
from export.format import read_manifest
from runtime.parity.compare import load_prompts
from runtime.parity.tolerances import ToleranceError, load_tolerances
from runtime.presets import preset
from runtime.profile import PROFILE_DIR, Profile, ProfileError, load_profile, parse_profile
from runtime.tokenizer import ByteTokenizer

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.just(10 ** 400) | \
    st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
raw_bytes = st.binary(max_size=300)


def _one_line(e: V4Error) -> None:
    assert "\n" not in str(e) and str(e)


def _mutated(base: dict, draw_value, keys) -> st.SearchStrategy:
    """`base` with some keys' values replaced by arbitrary data and some keys deleted."""
    return st.tuples(st.dictionaries(st.sampled_from(keys), draw_value, max_size=3),
                     st.sets(st.sampled_from(keys), max_size=2)).map(
        lambda t: {k: v for k, v in {**base, **t[0]}.items() if k not in t[1]})


def _write(folder: Path, name: str, data) -> Path:
    path = folder / name
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return path


# ------------------------------------------------------------------ config.json
TINY = preset("tiny")


@SETTINGS
@given(cfg=json_values | _mutated(TINY, json_values, sorted(TINY) + ["n_group", "attention_bias", "hidden_act"]))
def test_config_dict(cfg):
    try:
        c = ModelConfig.from_hf(cfg, source="c.json")
    except ConfigError as e:
        _one_line(e)
    else:
        assert isinstance(c, ModelConfig) and len(c.compress_ratios) == c.num_layers + c.num_mtp


@SETTINGS
@given(data=raw_bytes | json_values.map(lambda v: json.dumps(v).encode()))
def test_config_file(data):
    with tempfile.TemporaryDirectory() as d:
        try:
            ModelConfig.from_file(_write(Path(d), "config.json", data))
        except ConfigError as e:
            _one_line(e)


# ------------------------------------------------------------------ hardware profile YAML
CPU = yaml.safe_load((PROFILE_DIR / "cpu.yaml").read_text())
yaml_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.just(10 ** 400) |
                           st.floats() | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4), max_leaves=12)
yaml_texts = yaml_values.map(lambda v: yaml.safe_dump(v).encode()) | raw_bytes | \
    st.text(alphabet="{}[]:-,&*!|>'\"%@` \n\tab1.", max_size=80).map(str.encode)


measures = st.fixed_dictionaries({"value": scalars, "source": st.sampled_from(["s", "", 3]),
                                   "confidence": st.sampled_from(["low", "high", "sure", None])})


@SETTINGS
@given(raw=yaml_values | _mutated(CPU, yaml_values | measures, sorted(CPU) + [
    "kernel_limits", "prefer", "collective_timeout_s", "int8_linears"]))
def test_profile_mapping(raw):
    try:
        p = parse_profile(raw, "p.yaml")
    except ProfileError as e:
        _one_line(e)
    else:
        assert isinstance(p, Profile) and p.memory_gib.value > 0


@SETTINGS
@given(data=yaml_texts)
def test_profile_file(data):
    with tempfile.TemporaryDirectory() as d:
        try:
            load_profile(_write(Path(d), "p.yaml", data))
        except ProfileError as e:
            _one_line(e)


# ------------------------------------------------------------------ tolerance YAML
@SETTINGS
@given(data=yaml_texts | st.lists(st.dictionaries(st.sampled_from(["kind", "dtype", "backend", "kl_max", "top1_min",
                                                                   "other"]), yaml_values, max_size=3),
                                  max_size=3).map(lambda rules: yaml.safe_dump({"rules": rules}).encode()))
def test_tolerance_file(data):
    with tempfile.TemporaryDirectory() as d:
        try:
            t = load_tolerances(_write(Path(d), "t.yaml", data))
        except ToleranceError as e:
            _one_line(e)
        else:
            assert all(isinstance(r, dict) for r in t.rules)


# ------------------------------------------------------------------ safetensors index and shard headers
CFG = ModelConfig.preset("tiny")
header_values = st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "x"]),
                                st.sampled_from(["F32", "BF16", "I8", "F8_E4M3", "F8_E8M0", "U64", "Q"]) |
                                st.lists(st.integers(-2, 2 ** 40), max_size=3) | json_values, max_size=3)
headers = st.dictionaries(st.sampled_from(["embed.weight", "head.weight", "__metadata__", "norm.weight"]),
                          header_values | json_values, max_size=3)


def _shard(header, payload: bytes, length_delta: int) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", max(0, len(h) + length_delta)) + h + payload


_SIZES = {"F32": 4, "BF16": 2, "I8": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I64": 8, "U64": 8, "BOOL": 1, "F64": 8}


@st.composite
def consistent_shards(draw):
    """Well-formed safetensors files (consistent offsets) with tiny-model tensor names, odd dtypes and shapes:
    they get past the header checks into the inventory's name / shape / dtype comparison."""
    names = draw(st.lists(st.sampled_from(["embed.weight", "head.weight", "norm.weight", "hc_head_fn", "x"]),
                          unique=True, max_size=3))
    header, offset = {}, 0
    for n in names:
        dtype = draw(st.sampled_from(sorted(_SIZES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = _SIZES[dtype]
        for k in shape:
            size *= k
        header[n] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4) | st.integers(),
                                                      max_size=2))
    return _shard(header, b"\0" * offset, 0)


@SETTINGS
@given(index=raw_bytes | json_values.map(lambda v: json.dumps(v).encode()) |
       st.dictionaries(st.text(max_size=6), st.sampled_from(["s.safetensors", "s.safetensors", "../s", "", ".",
                                                             "a\x00b"]) |
                       json_values, max_size=3).map(lambda wm: json.dumps({"weight_map": wm}).encode()),
       shard=raw_bytes | consistent_shards() | st.builds(_shard, headers, st.binary(max_size=64),
                                                         st.sampled_from([0, 0, 0, -1, 1, 2 ** 60])))
def test_index_and_shard_headers(index, shard):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        _write(folder, "model.safetensors.index.json", index)
        _write(folder, "s.safetensors", shard)
        try:
            inventory(folder, CFG)
        except CheckpointError as e:
            _one_line(e)


@SETTINGS
@given(shard=raw_bytes | consistent_shards() |
       st.builds(_shard, headers, st.binary(max_size=64), st.sampled_from([0, -1, 3, 2 ** 60])))
def test_single_file_checkpoint_headers(shard):
    with tempfile.TemporaryDirectory() as d:
        _write(Path(d), "model.safetensors", shard)
        try:
            inventory(Path(d), CFG)
        except CheckpointError as e:
            _one_line(e)


# ------------------------------------------------------------------ prompts files
@SETTINGS
@given(data=raw_bytes | json_values.map(lambda v: json.dumps(v).encode()) |
       st.lists(st.text(max_size=10) | st.lists(st.integers(-5, 400), max_size=4), max_size=4).map(
           lambda v: json.dumps(v).encode()),
       suffix=st.sampled_from([".txt", ".json"]))
def test_prompts_file(data, suffix):
    with tempfile.TemporaryDirectory() as d:
        try:
            prompts = load_prompts(_write(Path(d), "p" + suffix, data), ByteTokenizer(320))
        except InputError as e:
            _one_line(e)
        else:
            assert prompts and all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompts)


# ------------------------------------------------------------------ the ONNX export manifest
GOOD = {"format_version": 2, "state": ["a"], "index_taps": [], "graphs": {"step": "step.onnx"}}


@SETTINGS
@given(manifest=raw_bytes | json_values.map(lambda v: json.dumps(v).encode()) |
       _mutated(GOOD, json_values | st.sampled_from(["../x.onnx", "/abs.onnx", "step.onnx", "sub/step.onnx"]) |
                st.dictionaries(st.sampled_from(["step", "prefill"]),
                                st.sampled_from(["step.onnx", "..", "a/../b.onnx", "c:\\x.onnx"]) | json_values,
                                max_size=2), sorted(GOOD)).map(lambda v: json.dumps(v).encode()))
def test_export_manifest(manifest):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "step.onnx").write_bytes(b"")
        _write(folder, "export.json", manifest)
        try:
            m = read_manifest(folder, 2)
        except CheckpointError as e:
            _one_line(e)
        else:
            assert all((folder / n).resolve().parent == folder.resolve() or folder.resolve() in
                       (folder / n).resolve().parents for n in m["graphs"].values())
