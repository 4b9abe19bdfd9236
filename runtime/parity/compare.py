"""`compare()`: a reference and candidates on the same checkpoint and prompts, tap by tap and end to end.

Rows are computed per candidate for every tap the reference exposes (in model order), then the end-to-end
row; each row gets its bound from the tolerance rules and a verdict. Localisation walks the float taps in model
order and blames the first failing tap whose error grew sharply (>= `GROWTH` x) over the largest error upstream
of it: the op that introduced the difference, not the last layer where it shows. With two or more candidates,
each one's error is also expressed as a ratio to the first candidate's (three-way mode). With `repeat` >= 2 a
candidate runs again and its own run-to-run spread is reported apart from the cross-backend difference.
"""

from __future__ import annotations

import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from ..taps import model_order
from .harness import SideRun, run_side
from .metrics import amax, e2e_metrics, float_metrics, index_metrics
from .tolerances import Tolerances, load_tolerances

GROWTH = 4.0
INDEX_KINDS = ("indexer.topk", "moe.route")
DEFAULT_PROMPTS = [
    "DeepSeek-V4 keeps a sliding window of raw keys and compresses everything older into pooled entries; "
    "the lightning indexer picks which of them each query reads. ",
    "One model graph, many backends: the same layers run on a CPU, a GPU or an NPU, and a parity report shows "
    "in numbers where their results part ways, tap by tap, layer by layer, step by step through the decode. ",
]


def tap_kind(name: str) -> tuple[int | None, str]:
    m = re.match(r"L(\d+)\.(.+)$", name)
    return (int(m[1]), m[2]) if m else (None, name)


@dataclass
class Side:
    label: str
    runtime: object
    emulated: bool
    spec: str | None                  # how the CLI names it (profile name or YAML path); None: built in Python

    def describe(self) -> dict:
        rt = self.runtime
        return {"label": self.label, "profile": rt.profile.name, "spec": self.spec, "backend": rt.dispatch.backend,
                "device": rt.dispatch.device, "emulated": rt.dispatch.emulated, "numerics": rt.dispatch.numerics,
                "weight_format": rt.profile.weight_format, "dispatch": rt.dispatch.as_dict()}


@dataclass
class ParityResult:
    report: dict
    prompts: list[list[int]]
    runs: dict[str, SideRun] = field(repr=False)

    @property
    def passed(self) -> bool:
        return all(c["verdict"] == "pass" for c in self.report["results"])

    def write(self, out: "str | Path", command: list[str] | None = None) -> Path:
        from .report import write_report

        return write_report(self, Path(out), command)


def _load_side(spec, checkpoint, emulate: bool, allow_fallback: bool) -> Side:
    from ..api import Runtime
    from ..profile import Profile

    rt = spec if isinstance(spec, Runtime) else Runtime.load(spec, checkpoint=checkpoint, emulate=emulate,
                                                              allow_fallback=allow_fallback, progress=False)
    replaced = [r.op for r in rt.dispatch.rows if r.impl.startswith("replaced:")]
    cli = None if isinstance(spec, Runtime) else (spec.source if isinstance(spec, Profile) else str(spec))
    label = (f"{rt.profile.name}{' (emulated)' if rt.dispatch.emulated else ''}"
             f"{' [replaced: ' + ', '.join(replaced) + ']' if replaced else ''}")
    return Side(label, rt, rt.dispatch.emulated, cli if cli and cli != "<object>" else None)


# The rounding unit of each compute dtype: the error a single rounding step makes, the floor of "upstream".
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


def _rows(ref: SideRun, cand: SideRun, tol: Tolerances, dtype: str, backend: str,
          exposed: frozenset[str] | None = None, weights: str = "") -> list[dict]:
    """`exposed`: the taps the candidate can produce at all (an exported graph exposes only a few); None = all."""
    rows, upstream = [], UNIT_ROUNDOFF.get(dtype, 2.0 ** -24)
    for name in sorted(ref.tap_order, key=model_order):
        layer, kind = tap_kind(name)
        row = {"tap": name, "layer": layer, "kind": kind}
        if exposed is not None and name not in exposed:
            row.update(type="not_exposed", verdict="n/a", reason="the candidate runs a graph that does not expose it")
            rows.append(row)
            continue
        if name not in cand.taps:
            row.update(type="missing", verdict="fail", reason="the candidate did not produce this tap")
            rows.append(row)
            continue
        if kind in INDEX_KINDS:
            m = index_metrics(ref.taps[name], cand.taps[name])
            bound, rule = tol.bound(kind, dtype, backend, "jaccard_min", weights)
            ok = "error" not in m and bound is not None and m["jaccard"] >= bound
            row.update(type="index", metrics=m, bound={"jaccard_min": bound, "rule": rule})
        else:
            m = float_metrics(ref.taps[name], cand.taps[name])
            bound, rule = tol.bound(kind, dtype, backend, "rel_rms_max", weights)
            ok = "error" not in m and not (m["nan"] or m["inf"]) and bound is not None and m["rel_rms"] <= bound
            if "error" not in m:
                row["growth"] = m["rel_rms"] / upstream
                upstream = max(upstream, m["rel_rms"])
            row.update(type="float", metrics=m, bound={"rel_rms_max": bound, "rule": rule})
        row["verdict"] = "pass" if ok else "fail"
        if bound is None:                  # fail closed: a row no rule bounds is not a pass
            row["reason"] = "no tolerance rule gives this row a bound"
        rows.append(row)
    return rows


def _blame(rows: list[dict]) -> dict:
    floats = [r for r in rows if r["type"] == "float" and "growth" in r]
    top = max(floats, key=lambda r: r["growth"], default=None)
    first = next((r for r in rows if r["verdict"] == "fail" and r.get("growth", 0.0) >= GROWTH), None)
    return {"tap": first["tap"] if first else None, "growth": first["growth"] if first else None,
            "largest_growth_tap": top["tap"] if top else None, "largest_growth": top["growth"] if top else None,
            "rule": f"first failing float tap whose rel_rms is >= {GROWTH:g}x the largest upstream rel_rms "
                    "(or the compute dtype's unit roundoff, before the first tap)"}


def _e2e_row(ref: SideRun, cand: SideRun, tol: Tolerances, dtype: str, backend: str, weights: str = "") -> dict:
    m = e2e_metrics(ref.step_logits, cand.step_logits, ref.greedy, cand.greedy)
    kl_max, r1 = tol.bound("e2e", dtype, backend, "kl_max", weights)
    top1_min, r2 = tol.bound("e2e", dtype, backend, "top1_min", weights)
    ok = kl_max is not None and top1_min is not None and m["kl_mean"] <= kl_max and m["top1_agreement"] >= top1_min
    return {"metrics": m, "bound": {"kl_max": kl_max, "top1_min": top1_min, "rules": [r1, r2]},
            "verdict": "pass" if ok else "fail"}


def _repeatability(a: SideRun, b: SideRun) -> dict:
    spread = {n: amax((a.taps[n].double() - b.taps[n].double()).abs())
              for n in a.taps if n in b.taps and a.taps[n].shape == b.taps[n].shape}
    logits = max((amax((x.double() - y.double()).abs()) for x, y in zip(a.step_logits, b.step_logits)),
                 default=0.0)
    worst = max(spread, key=spread.get, default=None)
    return {"runs": 2, "deterministic": logits == 0 and all(v == 0 for v in spread.values()),
            "max_abs_step_logits": logits, "worst_tap": worst, "worst_tap_max_abs": spread.get(worst, 0.0),
            "per_tap_max_abs": spread}


def _three_way(results: list[dict]) -> dict | None:
    if len(results) < 2:
        return None
    base = results[0]
    out = {"baseline": base["candidate"], "others": []}
    b_err = {r["tap"]: r["metrics"]["rel_rms"] for r in base["taps"] if r["type"] == "float" and "rel_rms" in r.get("metrics", {})}
    for other in results[1:]:
        ratios = {r["tap"]: r["metrics"]["rel_rms"] / b_err[r["tap"]] for r in other["taps"]
                  if r["tap"] in b_err and b_err[r["tap"]] > 0 and "rel_rms" in r.get("metrics", {})}
        kl_b, kl_o = base["e2e"]["metrics"]["kl_mean"], other["e2e"]["metrics"]["kl_mean"]
        out["others"].append({"candidate": other["candidate"], "median_rel_rms_ratio": statistics.median(ratios.values())
                              if ratios else None, "final_logits_ratio": ratios.get("final.logits"),
                              "kl_ratio": kl_o / kl_b if kl_b > 0 else None, "per_tap_ratio": ratios})
    return out


def load_prompts(path: "str | Path", tokenizer) -> list[list[int]]:
    """A .txt file (one prompt per non-empty line) or a .json list of strings or of token-id lists."""
    from ..yaml_io import read_json, read_text, require_text

    path = Path(path)
    if path.suffix == ".json":
        raw = read_json(path, InputError, "prompts file")
        if not isinstance(raw, list) or not raw or not all(isinstance(p, (str, list)) for p in raw):
            raise InputError(f"{path}: expected a non-empty JSON list of strings or of token-id lists")
        for i, p in enumerate(raw):
            bad = next((t for t in p if not isinstance(t, int) or isinstance(t, bool)), None) \
                if isinstance(p, list) else None
            if bad is not None:
                raise InputError(f"{path}: prompt {i} has a token id {bad!r} that is not an integer")
            if isinstance(p, str):
                require_text(p, InputError, f"{path}: prompt {i}")
        return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in raw]
    lines = [ln for ln in read_text(path, InputError, "prompts file").splitlines() if ln.strip()]
    if not lines:
        raise InputError(f"{path}: no prompts (one per non-empty line)")
    return [tokenizer.encode(ln) for ln in lines]


def compare(reference="cpu", candidates=("cpu-bf16",), checkpoint=None, prompts=None, decode_steps: int = 32,
            emulate: bool = True, repeat: int = 2, tolerances=None, allow_fallback: bool = False, seed: int = 0,
            progress: bool | None = None) -> ParityResult:
    """Compare `candidates` (profile names / paths / Profiles, or loaded Runtimes) with `reference` on the same
    checkpoint. `prompts`: texts or token-id lists (default: two built-in prompts); `emulate`: load profile
    candidates as CPU emulations. Returns a ParityResult (`.report` dict, `.passed`, `.write(out)`)."""
    from tqdm import tqdm

    if not candidates:
        raise InputError("give at least one candidate")
    if not isinstance(decode_steps, int) or decode_steps < 1:
        raise InputError(f"decode_steps must be a positive integer, got {decode_steps!r}")
    if not isinstance(repeat, int) or repeat < 1:
        raise InputError(f"repeat must be a positive integer, got {repeat!r}")
    torch.manual_seed(seed)
    tol = tolerances if isinstance(tolerances, Tolerances) else load_tolerances(tolerances)
    ref = _load_side(reference, checkpoint, False, allow_fallback)
    if checkpoint is None:             # a loaded reference: the candidates load the same checkpoint
        checkpoint = ref.runtime.checkpoint
    cands = [_load_side(c, checkpoint, emulate, allow_fallback) for c in candidates]
    seen = {ref.label}
    for c in cands:                               # labels key the runs: keep them unique
        base, k = c.label, 2
        while c.label in seen:
            c.label, k = f"{base} #{k}", k + 1
        seen.add(c.label)
    for c in cands:
        if c.runtime.config.vocab_size != ref.runtime.config.vocab_size:
            raise InputError(f"candidate {c.label} has another vocabulary than the reference; load the same checkpoint")
    ids = [ref.runtime.encode(p) if isinstance(p, str) else list(p) for p in (prompts or DEFAULT_PROMPTS)]
    for p in ids:
        ref.runtime._check_ids([p])
        ref.runtime._check_length(len(p) + decode_steps)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=len(ids) * (1 + len(cands) * 2 * repeat), desc="parity", unit="prompt", disable=not show,
               file=sys.stderr)
    runs = {ref.label: run_side(ref.runtime, ref.label, ids, decode_steps, None, bar)}
    results = []
    for c in cands:
        bar.set_description(f"parity: {c.label}")
        run = run_side(c.runtime, c.label, ids, decode_steps, runs[ref.label].greedy, bar)
        runs[c.label] = run
        dtype, backend = c.runtime.dispatch.compute_dtype, c.runtime.dispatch.backend
        weights = c.runtime.profile.weight_format
        taps = _rows(runs[ref.label], run, tol, dtype, backend, getattr(c.runtime.model, "tap_names", None), weights)
        e2e = _e2e_row(runs[ref.label], run, tol, dtype, backend, weights)
        rep = _repeatability(run, run_side(c.runtime, c.label, ids, decode_steps, runs[ref.label].greedy, bar)) \
            if repeat >= 2 else None
        failed = [r["tap"] for r in taps if r["verdict"] == "fail"] + (["e2e"] if e2e["verdict"] == "fail" else [])
        results.append({"candidate": c.label, "compute_dtype": dtype, "backend": backend, "taps": taps, "e2e": e2e,
                        "blame": _blame(taps), "repeatability": rep, "failed": failed,
                        "verdict": "fail" if failed else "pass", "seconds": run.seconds})
    bar.close()
    report = {"reference": ref.describe(), "candidates": [c.describe() for c in cands], "results": results,
              "three_way": _three_way(results), "tolerances": {"source": tol.source, "rules": list(tol.rules)},
              "inputs": {"prompts": len(ids), "prompt_tokens": [len(p) for p in ids], "decode_steps": decode_steps,
                         "seed": seed, "repeat": repeat, "allow_fallback": allow_fallback},
              "checkpoint": {"path": str(ref.runtime.checkpoint)}}
    return ParityResult(report, ids, runs)
