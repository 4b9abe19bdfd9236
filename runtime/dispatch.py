"""Dispatch: which implementation runs each op, resolved once at load into a table you can print.

The ops and their float32 references are declared once (runtime/ops/specs.py); the rows of a table are the
spec's table ops, in its order. The registry is keyed by (op, implementation id); the reference is always
present and is the oracle of every other implementation. A backend registers each implementation with one call,
`impl(op, impl_id, backend, fn, requires=..., prepare=...)`, naming the capabilities it needs, and optionally a `prepare` hook run at resolve time (a shape or storage check, a one-time
self-test against the reference on the device, binding the profile's kernel limits) that either returns the
callable to run or refuses with the reason. `resolve()` walks the profile's preference list per op (default:
the backend's own implementations in registration order, then the reference on CPU only) and records, per
row, what runs, why, and every candidate it passed over with the reason (`why_not`), so a generic
`<backend>.torch` row still says which fused kernel was rejected and why.

Capabilities come from one place: what the device probe reports intersected with what the profile declares
(`effective_capabilities`); the profile's `kernel_limits` are handed to the `prepare` hooks. Strict by
default: a profile whose backend has no usable implementation for an op fails to load with one line; with
`allow_fallback` the reference is used and the row says `fallback`. The numerics ops (`round_act`,
`quant_act`, `kv_qat`, `indexer_qat`) come from the profile's numerics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

from .errors import V4Error
from .ops import OpTable, reference_ops
from .ops.numerics import NumericsSpec
from .ops.specs import NUMERICS_OPS, SPECS, TABLE_OPS   # noqa: F401  (NUMERICS_OPS: op -> NumericsSpec field)


class DispatchError(V4Error):
    """A profile asks for an implementation this machine or build does not have."""


@dataclass(frozen=True)
class Context:
    """What a `prepare` hook may read at resolve time."""
    profile: object                  # runtime.profile.Profile
    backend: str
    device: str                      # torch device string the implementation computes on
    capabilities: frozenset[str]     # probe facts ∩ the profile's declared capabilities
    numerics: NumericsSpec
    weight_format: str               # the weight format this load stores its linears in

    @property
    def kernel_limits(self) -> Mapping[str, int]:
        return self.profile.kernel_limits


# prepare(ctx) -> (callable to run, note for the row) or (None, why it is refused)
Prepare = Callable[[Context], "tuple[Callable | None, str]"]


@dataclass(frozen=True)
class Impl:
    op: str
    id: str
    backend: str
    fn: Callable
    requires: frozenset[str]
    prepare: Prepare | None = None


_REGISTRY: dict[str, dict[str, Impl]] = {}


def impl(op: str, impl_id: str, backend: str, fn: Callable, *, requires=(), prepare: Prepare | None = None):
    """Register `fn` as implementation `impl_id` of table op `op` for `backend`; returns `fn`.

    `requires`: the capabilities it needs (probe facts ∩ profile); `prepare(ctx)`: run at resolve time, returns
    the callable to run (or None) and a note for the row. A backend's implementations are preferred in the order
    they are registered. An op that is not a table op of runtime/ops/specs.py is refused (a typo would otherwise
    register an implementation nothing ever calls)."""
    if op not in TABLE_OPS:
        what = "is set by the profile's numerics" if op in NUMERICS_OPS else "is not an op"
        raise DispatchError(f"implementation {impl_id}: {op!r} {what}; table ops: {', '.join(TABLE_OPS)}")
    _REGISTRY.setdefault(op, {})[impl_id] = Impl(op, impl_id, backend, fn, frozenset(requires), prepare)
    return fn


def implementations(op: str) -> dict[str, Impl]:
    return dict(_REGISTRY.get(op, {}))


def table_ops() -> tuple[str, ...]:
    """The op names a dispatch table resolves (and a profile's `prefer:` may name)."""
    return TABLE_OPS


def effective_capabilities(profile, probed: frozenset[str]) -> frozenset[str]:
    """The one source of capabilities: what the device probe reports AND the profile declares."""
    return frozenset(probed) & frozenset(profile.capabilities)


@dataclass(frozen=True)
class Resolution:
    op: str
    impl: str
    where: str
    reason: str
    why_not: tuple[str, ...] = ()    # "<impl id> <why it was not chosen>" for each candidate passed over


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
    capabilities: frozenset[str] = frozenset()
    kernel_limits: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def format(self) -> str:
        head = (f"dispatch for profile {self.profile} on {self.backend} ({self.device})"
                f"{' - EMULATED on CPU' if self.emulated else ''}; numerics {self.numerics}")
        lines = [head]
        if not self.emulated and self.capabilities:
            lines.append(f"capabilities (probe ∩ profile): {', '.join(sorted(self.capabilities))}")
        if not self.emulated and self.kernel_limits:
            lines.append("kernel limits: " + ", ".join(f"{k}={v}" for k, v in sorted(self.kernel_limits.items())))
        w = max(len(r.op) for r in self.rows)
        wi = max(len(r.impl) for r in self.rows)
        for r in self.rows:
            lines.append(f"  {r.op:<{w}}  {r.impl:<{wi}}  {r.where:<6}  {r.reason}")
            lines += [f"  {'':<{w}}    rejected {n}" for n in r.why_not]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"profile": self.profile, "backend": self.backend, "device": self.device, "emulated": self.emulated,
                "numerics": self.numerics, "compute_dtype": self.compute_dtype,
                "capabilities": sorted(self.capabilities), "kernel_limits": dict(self.kernel_limits),
                "ops": [{**r.__dict__, "why_not": list(r.why_not)} for r in self.rows]}


def _default_weight_format(profile, numerics: NumericsSpec) -> str:
    # runtime.api.load: a numerics override stores FP8 blocks ("official") or float32 ("exact")
    if numerics == profile.numerics:
        return profile.weight_format
    return "fp8_block" if numerics.act_quant == "fp8_block128" else "float32"


def _missing_caps(impl: Impl, caps: frozenset[str], probed: frozenset[str], profile) -> str:
    parts = []
    for c in sorted(impl.requires - caps):
        if c not in probed and c not in profile.capabilities:
            parts.append(f"{c} (neither the device probe nor profile {profile.name} has it)")
        elif c not in probed:
            parts.append(f"{c} (profile {profile.name} declares it; the device probe does not report it)")
        else:
            parts.append(f"{c} (the device has it; profile {profile.name} does not declare it)")
    return f"needs {', '.join(parts)}"


def check_prefer(profile) -> None:
    """Refuse `prefer:` entries naming an op the table does not have (one line)."""
    known = table_ops()
    for op in profile.prefer:
        if op not in known:
            what = "is set by the profile's numerics, not by prefer" if op in NUMERICS_OPS else "is not an op"
            raise DispatchError(f"profile {profile.name}: prefer names {op!r}, which {what}; "
                                f"ops: {', '.join(known)}")


def resolve(profile, backend: str, device: str, caps: frozenset[str], numerics: NumericsSpec, emulate: bool,
            allow_fallback: bool, weight_format: str | None = None) -> DispatchTable:
    """`caps`: what the device probe reports (intersected here with the profile's declared capabilities)."""
    check_prefer(profile)
    probed = frozenset(caps)
    caps = effective_capabilities(profile, probed)
    ctx = Context(profile, backend, device, caps, numerics, weight_format or _default_weight_format(profile, numerics))
    ref = reference_ops(numerics)
    chosen, rows = {}, []
    for spec in SPECS:
        op = spec.name
        if spec.is_numerics:
            chosen[op] = getattr(ref, op)
            rows.append(Resolution(op, f"numerics:{getattr(numerics, NUMERICS_OPS[op])}",
                                   "cpu" if emulate else backend, "profile numerics"))
            continue
        impls = implementations(op)
        wanted = list(profile.prefer.get(op, ())) or [i.id for i in impls.values() if i.backend == backend]
        pick, fn, note, why_not = None, None, "", []
        if not emulate:
            for impl_id in wanted:
                impl = impls.get(impl_id)
                if impl is None:
                    why_not.append(f"{impl_id} is not in this build")
                elif impl.backend != backend:
                    why_not.append(f"{impl_id} is for backend {impl.backend}")
                elif not impl.requires <= caps:
                    why_not.append(f"{impl_id} {_missing_caps(impl, caps, probed, profile)}")
                else:
                    fn, note = (impl.fn, "") if impl.prepare is None else impl.prepare(ctx)
                    if fn is None:
                        why_not.append(f"{impl_id}: {note}")
                        continue
                    pick = impl
                    break
        if pick is not None:
            chosen[op] = fn
            if profile.prefer.get(op):
                reason = "preferred by profile"
            elif pick.id == f"{backend}.torch":   # say so: a generic row must not look like a kernel choice
                reason = f"plain torch on the {backend} device" + ("" if why_not else
                                                                  f" (no {backend} kernel adapter in this build)")
            else:
                reason = f"{backend} implementation"
            rows.append(Resolution(op, pick.id, backend, f"{reason}; {note}" if note else reason, tuple(why_not)))
            continue
        if emulate:
            reason = "emulation: reference op under the profile's numerics"
        elif backend == "cpu" and not profile.prefer.get(op):   # the CPU's own baseline; the row says why
            reason = "cpu backend: the float32 reference" + (f" ({'; '.join(why_not)})" if why_not else "")
        else:
            detail = "; ".join(why_not) or f"no {backend} implementation in this build"
            if not allow_fallback:
                raise DispatchError(f"profile {profile.name}: op {op} has no usable {backend} implementation "
                                    f"({detail}); add --allow-fallback to run the CPU reference, or --emulate")
            reason = f"fallback to the CPU reference ({detail})"
        chosen[op] = fn = getattr(ref, op)
        rows.append(Resolution(op, f"reference:{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}", "cpu", reason,
                               tuple(why_not)))
    ops = OpTable(numerics=numerics.name, **chosen)
    return DispatchTable(profile.name, backend, device, emulate, numerics.name, tuple(rows), ops, numerics.compute,
                         caps, MappingProxyType(dict(profile.kernel_limits)))
