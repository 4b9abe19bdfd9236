"""Tolerances as data: rules from a YAML file (`yaml.safe_load`), first match wins (see tolerances.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from ..errors import V4Error
from ..yaml_io import read_yaml

DEFAULT = Path(__file__).with_name("tolerances.yaml")
BOUNDS = ("rel_rms_max", "jaccard_min", "kl_max", "top1_min")
MATCH = ("kind", "dtype", "weights", "backend")


class ToleranceError(V4Error):
    """A tolerance file is invalid."""


@dataclass(frozen=True)
class Tolerances:
    rules: tuple[dict, ...]
    source: str

    def bound(self, kind: str, dtype: str, backend: str, name: str, weights: str = ""):
        """The first rule matching (kind, dtype, weights, backend) that sets `name`: (value, rule index) or
        (None, None). `weights` is the candidate's weight format (bf16, w8a8_int8, fp8_block, ...); a rule
        without a `weights` pattern matches any."""
        keys = (("kind", kind), ("dtype", dtype), ("weights", weights), ("backend", backend))
        for i, r in enumerate(self.rules):
            if all(fnmatch(v, r.get(k, "*")) for k, v in keys) and name in r:
                return r[name], i
        return None, None


def load_tolerances(path: "str | Path | None" = None) -> Tolerances:
    path = Path(path) if path is not None else DEFAULT
    raw = read_yaml(path, ToleranceError, "tolerance file")
    if not isinstance(raw, dict) or set(raw) != {"rules"} or not isinstance(raw["rules"], list):
        raise ToleranceError(f"{path}: expected a mapping with one key 'rules' holding a list")
    for i, r in enumerate(raw["rules"]):
        if not isinstance(r, dict):
            raise ToleranceError(f"{path}: rule {i} must be a mapping")
        for k, v in r.items():
            if k in MATCH:
                if not isinstance(v, str):
                    raise ToleranceError(f"{path}: rule {i} key '{k}' must be a string pattern")
            elif k in BOUNDS:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                    raise ToleranceError(f"{path}: rule {i} key '{k}' must be a non-negative number, got {v!r}")
            else:
                raise ToleranceError(f"{path}: rule {i} key '{k}' is unknown; allowed: {', '.join(MATCH + BOUNDS)}")
    return Tolerances(tuple(raw["rules"]), str(path))
