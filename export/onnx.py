"""`python -m export.onnx`: export a V4 checkpoint as one ONNX graph, `step`, with custom nodes.

    python -m export.onnx --checkpoint DIR --profile cpu --out OUT [--weights fp8]
    python -m export.onnx --checkpoint DIR --target ascend-edge --seq 128 --capacity 4096 --opset 15 --out OUT

Bad input prints one line and exits with status 2 (nothing is written); Ctrl-C exits with status 130.

    from export.onnx import export_model; export_model(checkpoint, "cpu", out)

Writes into OUT (and nowhere else): `step.onnx` (ids [B, S >= 1] continuing each sequence from start [B], with
the state before them -> logits, the state after them and each CSA layer's indexer top-k; export/step_graph.py: it
serves prefill, chunked prefill, ragged chunks and decode), its weights as external data next to it
(`step.weights`, a path relative to OUT), `export.json` (the manifest: state layout, opset, the checkpoint's
fingerprint, the profile), `CUSTOM_OPS.md` (the custom nodes' reference page) and the checkpoint's config.json
(and tokenizer.json when there is one). Opset 23; the V4 kernels are `com.deepseek.v4` nodes with model-local
function bodies (export/custom_ops.py). `onnx.checker` with full_check passes. Weights (`--weights`):
`float32`, or `fp8` = as shipped, FP8 linears as e4m3 codes and FP4 experts repacked losslessly to int8, each
through a blocked DequantizeLinear (export/weight_storage.py); the graph computes in float32 either way.
The format (versions, state names and shapes, manifest, external-data check) is export/format.py's, which the
runner (backends/onnx_runner.py) reads too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from runtime.cli import ArgumentParser

from .format import (FORMAT_VERSION, GRAPH_REVISION, OPSET, ExportError, cache_ratio, fed_rows, index_tap_names,
                     is_cache, output_names, state_names, state_shapes)
from .trace import checkpoint_values, save_graph, trace_graph

WEIGHT_STORAGE = ("float32", "fp8")


def _dims(cfg, names):
    from torch.export import Dim

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


def export_model(checkpoint, profile: str = "cpu", out="onnx-out", progress: bool = True,
                 weights: str = "float32") -> Path:
    """Export the step graph of `checkpoint` under `profile` into the folder `out`; `weights`:
    "float32", or "fp8" (FP8 linears and FP4 experts stored as shipped, dequantised in the graph)."""
    from runtime.checkpoint.fingerprint import checkpoint_fingerprint

    from .step_graph import Step

    out = Path(out)
    if weights not in WEIGHT_STORAGE:
        raise ExportError(f"unknown weight storage {weights!r}; choose one of: {', '.join(WEIGHT_STORAGE)}")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    checkpoint = Path(checkpoint)
    prof, cfg, tensors = checkpoint_values(checkpoint, profile)     # float32 initializers: the graph's own copy
    names = state_names(cfg)
    storage = _storage(checkpoint, weights)
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    B, state_dims = _dims(cfg, names)
    start = torch.tensor([0, 1100])               # example values only: sizes must not coincide (duck shaping)
    say(f"exporting the step graph of {checkpoint} ({cfg.num_layers} layers) ...")
    ids = torch.randint(2, min(cfg.vocab_size, 258), (2, 300))
    shapes = state_shapes(cfg, 2, 0)
    state = [torch.zeros((2, fed_rows(1100, ids.shape[1], cache_ratio(cfg, n)), shapes[n][2])) if is_cache(n)
             else torch.zeros(shapes[n]) for n in names]
    graph = trace_graph(Step(cfg, tensors).eval(), (ids, start, *state),
                        {"ids": {0: B, 1: torch.export.Dim("S", min=1, max=1 << 24)}, "start": {0: B},
                         "state_in": state_dims}, ["ids", "start", *names], ["logits", *output_names(cfg)])
    save_graph(storage(graph), out, "step")
    manifest = {"format_version": FORMAT_VERSION, "graph_revision": GRAPH_REVISION, "opset": OPSET,
                "profile": prof.name,
                "checkpoint": str(checkpoint), "fingerprint": checkpoint_fingerprint(Path(checkpoint)),
                "weights": weights, "state": names, "index_taps": index_tap_names(cfg),
                "graphs": {"step": "step.onnx"}}
    (out / "export.json").write_text(json.dumps(manifest, indent=1))
    from .op_docs import render

    (out / "CUSTOM_OPS.md").write_text(render())
    for extra in ("config.json", "tokenizer.json"):
        if (Path(checkpoint) / extra).is_file():
            shutil.copy(Path(checkpoint) / extra, out / extra)
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
