"""Dispatch: which implementation runs each op, resolved once at load into a table you can print.

The registry is keyed by (op, implementation id); the float32 reference (`reference`) is always present and
is the oracle of every other implementation. A backend registers its implementations with the capabilities
they need. `resolve()` walks the profile's preference list per op (default: the backend's own
implementations, then the reference on CPU only) and records why each choice was made. Strict by default: a
profile whose backend has no usable implementation for an op fails to load with one line; with
`allow_fallback` the reference is used and the row says `fallback`. The numerics ops (`round_act`,
`quant_act`, `kv_qat`, `indexer_qat`) come from the profile's numerics.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

from .errors import V4Error
from .ops import OpTable, reference_ops
from .ops.numerics import NumericsSpec

# numerics op -> the NumericsSpec field that selects it
NUMERICS_OPS = {"round_act": "compute", "quant_act": "act_quant", "kv_qat": "kv", "indexer_qat": "indexer",
                "head_norm": "points", "inner_round": "points"}


class DispatchError(V4Error):
    """A profile asks for an implementation this machine or build does not have."""


@dataclass(frozen=True)
class Impl:
    op: str
    id: str
    backend: str
    fn: Callable
    requires: frozenset[str]


_REGISTRY: dict[str, dict[str, Impl]] = {}


def register(op: str, impl_id: str, backend: str, requires=()):
    """Decorator: register `fn` as implementation `impl_id` of `op` for `backend`."""
    def deco(fn):
        _REGISTRY.setdefault(op, {})[impl_id] = Impl(op, impl_id, backend, fn, frozenset(requires))
        return fn
    return deco


def implementations(op: str) -> dict[str, Impl]:
    return dict(_REGISTRY.get(op, {}))


@dataclass(frozen=True)
class Resolution:
    op: str
    impl: str
    where: str
    reason: str


@dataclass(frozen=True)
class DispatchTable:
    profile: str
    backend: str
    device: str
    emulated: bool
    numerics: str
    rows: tuple[Resolution, ...]
    ops: OpTable
    compute_dtype: str = "float32"           # the activation dtype the numerics round to

    def format(self) -> str:
        head = (f"dispatch for profile {self.profile} on {self.backend} ({self.device})"
                f"{' - EMULATED on CPU' if self.emulated else ''}; numerics {self.numerics}")
        w = max(len(r.op) for r in self.rows)
        wi = max(len(r.impl) for r in self.rows)
        return "\n".join([head] + [f"  {r.op:<{w}}  {r.impl:<{wi}}  {r.where:<6}  {r.reason}" for r in self.rows])

    def as_dict(self) -> dict:
        return {"profile": self.profile, "backend": self.backend, "device": self.device, "emulated": self.emulated,
                "numerics": self.numerics, "compute_dtype": self.compute_dtype, "ops": [r.__dict__ for r in self.rows]}


def resolve(profile, backend: str, device: str, caps: frozenset[str], numerics: NumericsSpec, emulate: bool,
            allow_fallback: bool) -> DispatchTable:
    ref = reference_ops(numerics)
    chosen, rows = {}, []
    for f in fields(OpTable):
        op = f.name
        if op == "numerics":
            continue
        if op in NUMERICS_OPS:
            chosen[op] = getattr(ref, op)
            rows.append(Resolution(op, f"numerics:{getattr(numerics, NUMERICS_OPS[op])}",
                                   "cpu" if emulate else backend, "profile numerics"))
            continue
        impls = implementations(op)
        wanted = list(profile.prefer.get(op, ())) or [i.id for i in impls.values() if i.backend == backend]
        pick, why_not = None, []
        if not emulate:
            for impl_id in wanted:
                impl = impls.get(impl_id)
                if impl is None:
                    why_not.append(f"{impl_id} is not in this build")
                elif impl.backend != backend:
                    why_not.append(f"{impl_id} is for backend {impl.backend}")
                elif not impl.requires <= caps:
                    why_not.append(f"{impl_id} needs {', '.join(sorted(impl.requires - caps))}")
                else:
                    pick = impl
                    break
        if pick is not None:
            chosen[op] = pick.fn
            rows.append(Resolution(op, pick.id, backend, "preferred by profile" if profile.prefer.get(op)
                                   else f"{backend} implementation"))
            continue
        if emulate:
            reason = "emulation: reference op under the profile's numerics"
        elif backend == "cpu" and not why_not:
            reason = "cpu backend: the float32 reference"
        else:
            detail = "; ".join(why_not) or f"no {backend} implementation in this build"
            if not allow_fallback:
                raise DispatchError(f"profile {profile.name}: op {op} has no usable {backend} implementation "
                                    f"({detail}); add --allow-fallback to run the CPU reference, or --emulate")
            reason = f"fallback ({detail})"
        chosen[op] = fn = getattr(ref, op)
        rows.append(Resolution(op, f"reference:{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}", "cpu", reason))
    ops = OpTable(numerics=numerics.name, **chosen)
    return DispatchTable(profile.name, backend, device, emulate, numerics.name, tuple(rows), ops, numerics.compute)
