"""Hardware profiles: one YAML file per deployment target in `hardware_profiles/` (package data), validated into a frozen
`Profile`.

A profile says which backend runs the model, what the device is (memory and bandwidth with their source and
confidence), which dtypes and weight format the deployment uses, the chip's capabilities (facts such as
"has FP8 GEMMs"), kernel limits, graph mode and which implementation it prefers per op. Loading uses
`yaml.safe_load`; unknown keys, wrong types and impossible values are errors naming the file, the key and
what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import hardware_profiles
from backends import names as backend_names

from .errors import V4Error
from .ops.numerics import ACT_QUANT, FLOAT_DTYPES, INDEXER_DTYPES, KV_DTYPES, NumericsSpec
from .weight_transforms import W8A8_DEFAULT, WEIGHT_FORMATS
from .yaml_io import read_yaml

PROFILE_DIR = Path(hardware_profiles.__file__).resolve().parent      # package data: ships in the wheel
CAPABILITIES = ("fp32", "bf16", "fp16", "fp8_gemm", "int8_w8a8", "mxfp4", "fused_sparse_attention",
                "fused_indexer", "fused_moe_gating", "fused_compressor", "fused_mhc", "fused_rope_interleave",
                "fused_clipped_swiglu", "graph_capture", "triton", "scaled_mm_blockwise",
                "native_kernels")
CONFIDENCE = ("high", "medium", "low")
GRAPH_MODES = ("eager", "cudagraph", "aclgraph")
# Which capability each choice needs on the chip (checked at validation: "FP8 on a chip without FP8").
_NEEDS = {("weight_format", "fp8_block"): "fp8_gemm", ("weight_format", "w8a8_int8"): "int8_w8a8",
          ("weight_format", "bf16"): "bf16", ("compute_dtype", "bfloat16"): "bf16",
          ("kv_dtype", "bfloat16"): "bf16", ("indexer_dtype", "bfloat16"): "bf16",
          ("act_quant", "fp8_block128"): "fp8_gemm", ("act_quant", "int8_per_token"): "int8_w8a8",
          ("weight_format", "fp16"): "fp16", ("compute_dtype", "float16"): "fp16",
          ("kv_dtype", "fp8_e4m3"): "fp8_gemm"}


class ProfileError(V4Error):
    """A hardware profile file is invalid."""


@dataclass(frozen=True)
class Measure:
    value: float
    source: str
    confidence: str


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    backend: str
    device_family: str
    memory_gib: Measure
    bandwidth_gbps: Measure
    compute_dtype: str
    kv_dtype: str
    indexer_dtype: str
    weight_format: str
    act_quant: str
    capabilities: frozenset[str]
    graph_mode: str = "eager"
    int8_linears: tuple[str, ...] = W8A8_DEFAULT
    kernel_limits: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    prefer: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    # Multi-device runs: how long a collective (or joining the process group) may wait for a peer before
    # every rank stops with an error (a dead or hung rank must never hang the others).
    collective_timeout_s: float = 300.0
    source: str = "<object>"

    @property
    def numerics(self) -> NumericsSpec:
        return NumericsSpec(self.compute_dtype, self.act_quant, self.kv_dtype, self.indexer_dtype)

    def supports(self, cap: str) -> bool:
        return cap in self.capabilities


_REQUIRED = ("name", "backend", "device_family", "memory_gib", "bandwidth_gbps", "compute_dtype", "kv_dtype",
             "indexer_dtype", "weight_format", "act_quant", "capabilities")
_CHOICES = {"backend": backend_names(), "compute_dtype": tuple(FLOAT_DTYPES), "kv_dtype": KV_DTYPES,
            "indexer_dtype": INDEXER_DTYPES, "weight_format": WEIGHT_FORMATS, "act_quant": ACT_QUANT,
            "graph_mode": GRAPH_MODES}


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _positive(v: Any) -> float | None:
    """`v` as a positive finite float, or None (bools, strings, NaN, infinity, 10**400 are not numbers here)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) and f > 0 else None


def _measure(raw: Any, key: str, bad) -> Measure:
    if not isinstance(raw, dict) or set(raw) != {"value", "source", "confidence"}:
        bad(key, "must be a mapping with exactly value, source, confidence")
    v = raw["value"]
    if _positive(v) is None:
        bad(f"{key}.value", f"must be a positive number, got {_show(v)}")
    if raw["confidence"] not in CONFIDENCE:
        bad(f"{key}.confidence", f"must be one of {', '.join(CONFIDENCE)}, got {_show(raw['confidence'])}")
    if not isinstance(raw["source"], str) or not raw["source"].strip():
        bad(f"{key}.source", "must name where the number comes from")
    return Measure(_positive(v), raw["source"], raw["confidence"])


def capabilities_needed(weight_format: str, numerics: NumericsSpec) -> frozenset[str]:
    """What a weight format and numerics need on the device (checked against the probed device at load)."""
    chosen = {"weight_format": weight_format, "compute_dtype": numerics.compute, "kv_dtype": numerics.kv,
              "indexer_dtype": numerics.indexer, "act_quant": numerics.act_quant}
    return frozenset(cap for (k, v), cap in _NEEDS.items() if chosen[k] == v)


def parse_profile(raw: Any, source: str) -> Profile:
    def bad(key: str, msg: str):
        raise ProfileError(f"{source}: key '{key}' {msg}")

    if not isinstance(raw, dict):
        raise ProfileError(f"{source}: a profile must be a YAML mapping, got {type(raw).__name__}")
    known = {f.name for f in fields(Profile)} - {"source"}
    for k in raw:
        if k not in known:
            bad(str(k)[:40], f"is not a profile key; allowed: {', '.join(sorted(known))}")
    for k in _REQUIRED:
        if k not in raw:
            bad(k, "is missing")
    for k in ("name", "backend", "device_family", "description", "graph_mode", *_CHOICES):
        if k in raw and not isinstance(raw[k], str):
            bad(k, f"must be a string, got {type(raw[k]).__name__}")
    for k, allowed in _CHOICES.items():
        if k in raw and raw[k] not in allowed:
            bad(k, f"is {raw[k]!r}; allowed: {', '.join(allowed)}")
    caps = raw["capabilities"]
    if not isinstance(caps, list) or any(c not in CAPABILITIES for c in caps):
        bad("capabilities", f"must be a list drawn from: {', '.join(CAPABILITIES)}")
    for (k, value), cap in _NEEDS.items():
        if raw.get(k) == value and cap not in caps:
            bad(k, f"is {value!r} but the chip lacks capability '{cap}'; choose a format the chip supports")
    limits = raw.get("kernel_limits", {})
    if not isinstance(limits, dict) or any(not isinstance(k, str) or not isinstance(v, int) or isinstance(v, bool)
                                           or v <= 0 for k, v in limits.items()):
        bad("kernel_limits", "must map names to positive integers")
    prefer = raw.get("prefer", {})
    if not isinstance(prefer, dict) or any(not isinstance(k, str) or not isinstance(v, list)
                                           or not all(isinstance(i, str) for i in v) for k, v in prefer.items()):
        bad("prefer", "must map op names to lists of implementation ids")
    timeout = raw.get("collective_timeout_s", 300.0)
    if _positive(timeout) is None:
        bad("collective_timeout_s", f"must be a positive number of seconds, got {_show(timeout)}")
    lin = raw.get("int8_linears", list(W8A8_DEFAULT))
    if not isinstance(lin, list) or not all(isinstance(i, str) for i in lin):
        bad("int8_linears", "must be a list of linear name fragments")
    return Profile(
        name=raw["name"], description=raw.get("description", ""), backend=raw["backend"],
        device_family=raw["device_family"], memory_gib=_measure(raw["memory_gib"], "memory_gib", bad),
        bandwidth_gbps=_measure(raw["bandwidth_gbps"], "bandwidth_gbps", bad),
        compute_dtype=raw["compute_dtype"], kv_dtype=raw["kv_dtype"], indexer_dtype=raw["indexer_dtype"],
        weight_format=raw["weight_format"], act_quant=raw["act_quant"], capabilities=frozenset(caps),
        graph_mode=raw.get("graph_mode", "eager"), int8_linears=tuple(lin),
        kernel_limits=MappingProxyType(dict(limits)),
        prefer=MappingProxyType({k: tuple(v) for k, v in prefer.items()}),
        collective_timeout_s=_positive(timeout), source=source)


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(spec: "str | Path | Profile") -> Profile:
    """A shipped profile name, a path to a YAML file, or a Profile object."""
    if isinstance(spec, Profile):
        return spec
    path = Path(spec)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILE_DIR / f"{spec}.yaml"
        if not path.is_file():
            raise ProfileError(f"unknown profile {str(spec)!r}; shipped: {', '.join(shipped_profiles())} "
                               "(or pass a path to a .yaml file)")
    return parse_profile(read_yaml(path, ProfileError, "profile file"), str(path))
