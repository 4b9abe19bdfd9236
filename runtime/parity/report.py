"""Parity reports: `report.json` (schema-versioned, report.schema.json), `report.md`, `report.html` (inline SVG
plots, readable offline), and a repro bundle for every failing row.

A repro bundle (`repro/<candidate>/<tap>/`) holds the prompts as token ids (`prompts.json`), the tap's tensor on
both sides (`reference.safetensors`, `candidate.safetensors`), and `repro.json` with the metrics and the command
that reruns the comparison on exactly those inputs. Nothing is pickled.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint.fingerprint import checkpoint_fingerprint
from .html import render_html, render_markdown
from .tolerances import DEFAULT as DEFAULT_TOLERANCES

SCHEMA_VERSION = 1
SCHEMA = Path(__file__).with_name("report.schema.json")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)      # metadata only: torch-npu is never imported (it can break torch)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    cann_home = os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH")
    cann = None
    if cann_home:
        cfg = Path(cann_home) / "version.cfg"
        cann = cfg.read_text().strip().splitlines()[0] if cfg.is_file() else cann_home
    return {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "versions": {d: _version(d) for d in ("torch", "numpy", "safetensors", "onnxruntime", "torch-npu",
                                                  "transformers")},
            "cuda": torch.version.cuda, "cann": cann}


def _finite(obj):
    """JSON has no inf / nan: non-finite numbers become null (a row with them has already failed)."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _rerun_command(report: dict, cand: dict, prompts_file: Path, out: Path) -> str | None:
    """The CLI command comparing exactly these inputs again, or None when a side was built in Python (a
    Runtime passed to compare(), e.g. from `with_ops`): the CLI cannot rebuild it."""
    ref, c, inputs = report["reference"], cand, report["inputs"]
    if ref["spec"] is None or c["spec"] is None:
        return None
    args = ["python", "-m", "runtime.parity", "--reference", ref["spec"], "--candidate", c["spec"]]
    if c["emulated"]:
        args.append("--emulate")
    if inputs["allow_fallback"]:
        args.append("--allow-fallback")
    if Path(report["tolerances"]["source"]).resolve() != DEFAULT_TOLERANCES.resolve():
        args += ["--tolerances", report["tolerances"]["source"]]
    args += ["--checkpoint", report["checkpoint"]["path"], "--prompts", str(prompts_file),
             "--decode-steps", str(inputs["decode_steps"]), "--seed", str(inputs["seed"]), "--out", str(out)]
    return shlex.join(args)


def _write_repro(result, out: Path) -> list[str]:
    report, written = result.report, []
    ref_run = result.runs[report["reference"]["label"]]
    for cand_desc, res in zip(report["candidates"], report["results"]):
        run = result.runs[res["candidate"]]
        for name in res["failed"]:
            d = out / "repro" / _slug(res["candidate"]) / _slug(name)
            d.mkdir(parents=True, exist_ok=True)
            (d / "prompts.json").write_text(json.dumps(result.prompts))
            if name == "e2e":
                ref_t = {f"prompt{i}.logits": t.contiguous() for i, t in enumerate(ref_run.step_logits)}
                cand_t = {f"prompt{i}.logits": t.contiguous() for i, t in enumerate(run.step_logits)}
                metrics = res["e2e"]["metrics"]
            else:
                ref_t = {name: ref_run.taps[name].contiguous()}
                cand_t = {name: run.taps[name].contiguous()} if name in run.taps else {}
                metrics = next(r.get("metrics") for r in res["taps"] if r["tap"] == name)
            save_file(ref_t, str(d / "reference.safetensors"))
            save_file(cand_t, str(d / "candidate.safetensors"))
            (d / "repro.json").write_text(json.dumps({
                "tap": name, "candidate": res["candidate"], "reference": report["reference"]["label"],
                "metrics": metrics, "command": _rerun_command(report, cand_desc, d / "prompts.json", d / "rerun"),
                "note": "command is null when a side was built in Python (Runtime.with_ops or a loaded Runtime): "
                        "rerun parity.compare() with it on prompts.json"},
                indent=2))
            written.append(str(d.relative_to(out)))
    return written


def write_report(result, out: Path, command: list[str] | None = None) -> Path:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    report = result.report
    ck = Path(report["checkpoint"]["path"])
    report.update(schema_version=SCHEMA_VERSION, tool="dsv4rt parity",
                  created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command=command, environment=environment())
    report["checkpoint"]["fingerprint"] = checkpoint_fingerprint(ck) if ck.is_dir() else None
    report["verdict"] = "pass" if result.passed else "fail"
    report["repro_bundles"] = _write_repro(result, out)
    report = result.report = _finite(report)
    (out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    (out / "report.md").write_text(render_markdown(report))
    (out / "report.html").write_text(render_html(report))
    return out
