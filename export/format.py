"""The exported graphs' format, shared by the exporter (export/onnx.py, export/edge.py) and the runner
(backends/onnx_runner.py): the format version and graph revision, the state's tensor names and shapes, the rows of
a compressed cache a step feeds, the manifest `export.json` (read and checked here) and the external-data check.

FORMAT_VERSION 2: the step graph replaced version 1's prefill + decode pair (whole-state decode, one-call prefill).
GRAPH_REVISION counts same-format changes to how the graph computes (a faster formulation): exports of an older
revision still run; the runtime's cached automatic export is rebuilt.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from runtime.errors import CheckpointError, V4Error
from runtime.yaml_io import read_json

FORMAT_VERSION = 2
GRAPH_REVISION = 3          # 2: IndexerTopK scores its queries in 4 slices (cache-sized score blocks); 3: in 8
OPSET = 23


class ExportError(V4Error):
    """The export cannot be made (bad input or a profile this exporter does not handle), or an export folder is
    not one this runtime reads."""


INDEXER_RATIO = 4           # the lightning indexer's compression ratio (its keys: one per 4 tokens)


def state_names(cfg) -> list[str]:
    """The decode state's tensors, in graph input / output order."""
    names = []
    for i in range(cfg.num_layers):
        names.append(f"L{i}.win")
        if cfg.ratio(i):
            names += [f"L{i}.comp", f"L{i}.ckv", f"L{i}.csc"]
            if cfg.is_csa(i):
                names += [f"L{i}.ikeys", f"L{i}.ikv", f"L{i}.isc"]
    return names


def index_tap_names(cfg) -> list[str]:
    """Extra outputs: each CSA layer's indexer top-k (for parity): [B, S, min(topk, ceil(S / 4))] from the edge
    prefill graph, [B, S, min(topk, indexer rows fed)] from the step graph."""
    return [f"L{i}.indexer.topk" for i in range(cfg.num_layers) if cfg.is_csa(i)]


def state_shapes(cfg, batch: int, capacity: int) -> dict[str, tuple]:
    """Shapes of an empty decode state for `capacity` tokens (the runner allocates these)."""
    out = {}
    for i in range(cfg.num_layers):
        m = cfg.ratio(i)
        out[f"L{i}.win"] = (batch, cfg.window, cfg.head_dim)
        if m:
            csa = cfg.is_csa(i)
            coff = 2 if csa else 1
            out[f"L{i}.comp"] = (batch, -(-capacity // m), cfg.head_dim)
            out[f"L{i}.ckv"] = out[f"L{i}.csc"] = (batch, coff * m, coff * cfg.head_dim)
            if csa:
                out[f"L{i}.ikeys"] = (batch, -(-capacity // INDEXER_RATIO), cfg.index_head_dim)
                out[f"L{i}.ikv"] = out[f"L{i}.isc"] = (batch, 2 * INDEXER_RATIO, 2 * cfg.index_head_dim)
    return out


def windows(S: int, m: int) -> int:
    """Compression windows S consecutive tokens can touch, wherever they start (an upper bound)."""
    return (S + 2 * m - 2) // m


def fed_rows(start: int, S: int, m: int) -> int:
    """Rows of a ratio-m cache the Step graph needs for a sequence at `start` taking S tokens."""
    return start // m + windows(S, m)


def is_cache(name: str) -> bool:
    return name.endswith((".comp", ".ikeys"))


def cache_ratio(cfg, name: str) -> int:
    return INDEXER_RATIO if name.endswith(".ikeys") else cfg.ratio(int(name[1:name.index(".")]))


def output_names(cfg) -> list[str]:
    """The Step graph's outputs after the logits: the state after the chunk, then the index taps."""
    return [f"{n}.new" if is_cache(n) else f"{n}.out" for n in state_names(cfg)] + index_tap_names(cfg)


def _bad_graph_name(name) -> bool:
    """A graph path that is not a relative path inside the export folder (absolute, `..`, empty, NUL)."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        return True
    p = PurePosixPath(name)
    return p.is_absolute() or any(part in ("..", "") for part in name.split("/")) or p.suffix != ".onnx"


def read_manifest(folder: Path, format_version: int = FORMAT_VERSION) -> dict:
    """export.json of an export folder, checked: its format, the state and tap names (lists of strings) and the
    graphs (relative `.onnx` paths inside the folder). Anything else is a one-line error naming the key."""
    path = folder / "export.json"
    m = read_json(path, CheckpointError, "ONNX export manifest")
    fix = "re-export it (python -m export.onnx --checkpoint CKPT --out DIR)"
    if not isinstance(m, dict):
        raise CheckpointError(f"{path}: not an export manifest (a JSON object); {fix}")
    if m.get("format_version") != format_version:
        raise CheckpointError(f"{folder} holds an ONNX export of format {str(m.get('format_version'))[:20]}; this "
                              f"runtime reads format {format_version}: {fix}")
    for key in ("state", "index_taps"):
        if not isinstance(m.get(key), list) or not all(isinstance(n, str) and n for n in m[key]):
            raise CheckpointError(f"{path}: key '{key}' must be a list of tensor names; {fix}")
    graphs = m.get("graphs")
    if not isinstance(graphs, dict) or "step" not in graphs:
        raise CheckpointError(f"{path}: key 'graphs' must be an object naming the 'step' graph; {fix}")
    for kind, name in graphs.items():
        if _bad_graph_name(name):
            raise CheckpointError(f"{path}: graph '{kind}' is {str(name)[:80]!r}, not a relative .onnx path inside "
                                  f"the export folder (no absolute path, no '..'); refusing it")
        if not (folder / name).is_file():
            raise CheckpointError(f"{path}: graph '{kind}' names {name}, which is not in {folder}; {fix}")
    return m


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
