"""`python -m export.onnx`: export a V4 checkpoint as one ONNX graph, `step`, with custom nodes.

    python -m export.onnx --checkpoint DIR --profile cpu --out OUT [--weights fp8]
    python -m export.onnx --checkpoint DIR --target ascend-edge --seq 128 --capacity 4096 --opset 15 --out OUT

Bad input prints one line and exits with status 2 (nothing is written); Ctrl-C exits with status 130.

    from export.onnx import export_model; export_model(checkpoint, "cpu", out)

Writes into OUT (and nowhere else): `step.onnx` (ids [B, S >= 1] continuing each sequence from start [B], with
the state before them -> logits, the state after them and each CSA layer's indexer top-k; export/chunk.py: it
serves prefill, chunked prefill, ragged chunks and decode), its weights as external data next to it
(`step.weights`, a path relative to OUT), `export.json` (the manifest: state layout, opset, the checkpoint's
fingerprint, the profile), `CUSTOM_OPS.md` (the custom nodes' reference page) and the checkpoint's config.json
(and tokenizer.json when there is one). Opset 23; the V4 kernels are `com.deepseek.v4` nodes with model-local
function bodies (export/custom_ops.py). `onnx.checker` with full_check passes. Weights (`--weights`):
`float32`, or `fp8` = as shipped, FP8 linears as e4m3 codes and FP4 experts repacked losslessly to int8, each
through a blocked DequantizeLinear (export/weight_storage.py); the graph computes in float32 either way.
FORMAT_VERSION 2: the step graph replaced version 1's prefill + decode pair (whole-state decode, one-call prefill).
GRAPH_REVISION counts same-format changes to how the graph computes (a faster formulation): exports of an older
revision still run; the runtime's cached automatic export is rebuilt.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from runtime.cli import ArgumentParser
from runtime.errors import V4Error

FORMAT_VERSION = 2
GRAPH_REVISION = 3          # 2: IndexerTopK scores its queries in 4 slices (cache-sized score blocks); 3: in 8
OPSET = 23
EXPORTABLE_WEIGHT_FORMATS = ("float32",)
WEIGHT_STORAGE = ("float32", "fp8")


class ExportError(V4Error):
    """The export cannot be made (bad input or a profile this exporter does not handle)."""


def _dims(cfg, names):
    from torch.export import Dim

    from .chunk import cache_ratio, is_cache

    B = Dim("B", min=1, max=4096)
    caps: dict[int, object] = {}

    def state_dims(n: str) -> dict:
        d = {0: B}
        if is_cache(n):
            m = cache_ratio(cfg, n)
            caps.setdefault(m, Dim(f"N{m}", min=1, max=1 << 24))      # one capacity per compression ratio
            d[1] = caps[m]
        return d

    return B, tuple(state_dims(n) for n in names)


def _export(module, args, dynamic_shapes, input_names, output_names, opset: int = OPSET):
    import torch.fx.experimental._config as fx_config

    from . import custom_ops

    # Size-oblivious reasoning keeps the graphs generic in B, S and the capacities (no 0/1 specialisation).
    with fx_config.patch(backed_size_oblivious=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, args, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
                                 custom_translation_table=custom_ops.translation_table(), verbose=False,
                                 input_names=input_names, output_names=output_names)
    return custom_ops.attach_functions(prog.model_proto)


def _save(model, out: Path, name: str) -> None:
    import onnx

    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(out / f"{name}.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{name}.weights", size_threshold=1024)


def export_model(checkpoint, profile: str = "cpu", out="onnx-out", progress: bool = True,
                 weights: str = "float32") -> Path:
    """Export the step graph of `checkpoint` under `profile` into the folder `out`; `weights`:
    "float32", or "fp8" (FP8 linears and FP4 experts stored as shipped, dequantised in the graph)."""
    from runtime.api import Runtime
    from runtime.parity.report import checkpoint_fingerprint

    from .chunk import Step, cache_ratio, fed_rows, is_cache, output_names
    from .steps import index_tap_names, state_names, state_shapes

    out = Path(out)
    if weights not in WEIGHT_STORAGE:
        raise ExportError(f"unknown weight storage {weights!r}; choose one of: {', '.join(WEIGHT_STORAGE)}")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    rt = Runtime.load(profile, checkpoint=checkpoint, emulate=True, progress=False)
    if rt.profile.weight_format not in EXPORTABLE_WEIGHT_FORMATS:
        raise ExportError(f"profile {rt.profile.name} stores weights as {rt.profile.weight_format}; this build exports "
                          f"{', '.join(EXPORTABLE_WEIGHT_FORMATS)} weights only (use --profile cpu)")
    cfg, tensors = rt.config, rt.weights.values()     # float32 initializers: the graph's own copy
    names = state_names(cfg)
    storage = _storage(rt.checkpoint, weights)
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    B, state_dims = _dims(cfg, names)
    start = torch.tensor([0, 1100])               # example values only: sizes must not coincide (duck shaping)
    say(f"exporting the step graph of {rt.checkpoint} ({cfg.num_layers} layers) ...")
    ids = torch.randint(2, min(cfg.vocab_size, 258), (2, 300))
    shapes = state_shapes(cfg, 2, 0)
    state = [torch.zeros((2, fed_rows(1100, ids.shape[1], cache_ratio(cfg, n)), shapes[n][2])) if is_cache(n)
             else torch.zeros(shapes[n]) for n in names]
    graph = _export(Step(cfg, tensors).eval(), (ids, start, *state),
                    {"ids": {0: B, 1: torch.export.Dim("S", min=1, max=1 << 24)}, "start": {0: B},
                     "state_in": state_dims}, ["ids", "start", *names], ["logits", *output_names(cfg)])
    _save(storage(graph), out, "step")
    manifest = {"format_version": FORMAT_VERSION, "graph_revision": GRAPH_REVISION, "opset": OPSET,
                "profile": rt.profile.name,
                "checkpoint": str(rt.checkpoint), "fingerprint": checkpoint_fingerprint(Path(rt.checkpoint)),
                "weights": weights, "state": names, "index_taps": index_tap_names(cfg),
                "graphs": {"step": "step.onnx"}}
    (out / "export.json").write_text(json.dumps(manifest, indent=1))
    from .op_docs import render

    (out / "CUSTOM_OPS.md").write_text(render())
    for extra in ("config.json", "tokenizer.json"):
        if (Path(rt.checkpoint) / extra).is_file():
            shutil.copy(Path(rt.checkpoint) / extra, out / extra)
    say(f"  done in {time.perf_counter() - t0:.0f} s -> {out}")
    return out


def _storage(checkpoint, weights: str):
    """The pass that gives a graph its weight storage (identity for float32)."""
    if weights == "float32":
        return lambda model: model
    from runtime.checkpoint import load_checkpoint

    from .weight_storage import store_quantized

    ck = load_checkpoint(checkpoint, progress=False)
    if not ck.quantized:
        raise ExportError(f"{checkpoint} has no FP8 / FP4 weights to store as such; use --weights float32")

    def apply(model):
        store_quantized(model, ck.tensors, ck.quantized, ck.expert_format)
        return model
    return apply


def check_external_data(folder: Path, name: str) -> None:
    """Refuse a graph whose external-data paths leave its folder (a tampered or hand-edited export). ONNX Runtime
    resolves a tensor's `location` against the folder of the `.onnx` file itself (not the export folder), so
    that is where each location is resolved here: it must be relative, stay inside the graph's folder (and so
    inside `folder`) and name an existing file."""
    import onnx
    from google.protobuf.message import DecodeError
    from onnx.external_data_helper import _get_all_tensors

    graph = folder / name
    try:
        m = onnx.load(str(graph), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as e:
        raise ExportError(f"{graph}: not a readable ONNX graph ({' '.join(str(e).split())[:160]}); re-export the "
                          "model") from None
    base = graph.parent.resolve()
    for t in _get_all_tensors(m):
        for entry in t.external_data:
            if entry.key == "location":
                loc = entry.value
                target = (base / loc).resolve() if loc and "\0" not in loc else None
                if target is None or Path(loc).is_absolute() or base not in target.parents:
                    raise ExportError(f"{graph}: tensor {t.name} points at {loc!r} outside the export "
                                      "folder; refusing it (re-export the model)")
                if not target.is_file():
                    raise ExportError(f"{graph}: tensor {t.name} stores its data in {loc!r}, which is not in "
                                      f"{graph.parent} (where ONNX Runtime looks for it); copy the whole export "
                                      "folder or re-export the model")


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m export.onnx", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="official-layout checkpoint folder (make the tiny one: python -m runtime.checkpoint make "
                         "--out DIR); required, so nothing is generated or cached outside --out")
    ap.add_argument("--profile", default="cpu", help="hardware profile whose weight format to export (cpu)")
    ap.add_argument("--weights", default="float32", choices=WEIGHT_STORAGE,
                    help="weight storage: float32, or fp8 (FP8 linears + FP4 experts as int8, dequantised in-graph)")
    ap.add_argument("--target", default="onnxruntime", choices=["onnxruntime", "ascend-edge"],
                    help="onnxruntime: dynamic shapes, custom nodes with bodies (opset 23); ascend-edge: static "
                         "shapes, bodies inlined, standard ops only, --opset (default 15) for ATC")
    ap.add_argument("--batch", type=int, default=1, help="ascend-edge: static batch")
    ap.add_argument("--seq", type=int, default=128, help="ascend-edge: static prefill length")
    ap.add_argument("--capacity", type=int, default=4096, help="ascend-edge: tokens the decode state holds")
    ap.add_argument("--opset", type=int, default=15, help="ascend-edge: target opset (11-18; ATC takes 11-15)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="ascend-edge: graph dtype")
    ap.add_argument("--out", required=True, help="output folder (nothing is written outside it)")
    args = ap.parse_args(argv)
    from runtime.cli import run_cli

    return run_cli(lambda: _run(args))


def _run(args) -> int:
    from runtime.cli import writable_folder

    writable_folder(args.out, "--out")
    try:
        if args.target == "ascend-edge":
            from .edge import export_edge

            export_edge(args.checkpoint, args.out, args.batch, args.seq, args.capacity, args.opset, dtype=args.dtype)
        else:
            export_model(args.checkpoint, args.profile, args.out, weights=args.weights)
    except ModuleNotFoundError as e:
        raise ExportError(f"{e.name} is not installed; pip install '.[onnx]'") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
