"""Running the exported ONNX graph (export/onnx.py) with ONNX Runtime, behind the same interface as the torch
model: `forward(ids, seqs)`, `new_state(batch)`, `cfg`, `device`. The graph's format (manifest, state names and
shapes, fed cache rows) is export/format.py's.

Every call runs the `step` graph (export/step_graph.py): multi-token calls (a fresh prompt, a continued chunk,
sequences at different positions) in chunks of at most `chunk` tokens (the backend's prefill chunk), so prefill cost per token and its workspace
stay bounded by the chunk, not the prompt; one-token calls (decode) with S = 1. The state of each sequence is
numpy arrays: the rings, and compressed-entry caches with room for max(MIN_CAPACITY, context) tokens that grow (doubling) before
a position would outrun them (`new_state(batch, context=N)` reserves N tokens up front). A call feeds each cache
with its live rows only (a view for one sequence, no copy) and writes back just the entries the graph returns,
so a step's work follows the sequence's length, not the capacity. Execution providers are the profile's; the
session's actual providers are checked after creation, so a provider that did not load is an error, never a
silent CPU run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from export.format import (INDEXER_RATIO, cache_ratio, check_external_data, fed_rows, is_cache, read_manifest,
                           state_shapes)
from runtime.errors import InputError, V4Error
from runtime.model.state import StateBatch
from runtime.taps import recording, tap

MIN_CAPACITY = 1024


class OnnxSequence:
    def __init__(self, cfg, names, context: int = 0):
        self.cfg, self.names, self.context = cfg, names, context
        self.reset()

    def reset(self) -> None:
        self.pos, self.mtp_pos, self.arrays = 0, 0, None

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values()) if self.arrays else 0

    def ensure(self, rows: dict[str, int], empty) -> None:
        """Arrays for an empty or continued sequence, each compressed cache with at least rows[name] rows."""
        if self.arrays is None:
            self.arrays = empty(max(MIN_CAPACITY, self.context))
        for n, need in rows.items():
            a = self.arrays[n]
            if a.shape[1] < need:
                grown = np.zeros((1, max(need, 2 * a.shape[1]), a.shape[2]), np.float32)
                grown[:, :a.shape[1]] = a
                self.arrays[n] = grown


class OnnxState(StateBatch):
    def __init__(self, cfg, names, batch_size: int, context: int = 0):
        super().__init__([OnnxSequence(cfg, names, context) for _ in range(batch_size)])


class OnnxModel:
    def __init__(self, folder: Path, cfg, providers: list[str], threads: int, chunk: int):
        import onnxruntime as ort

        self.folder, self.cfg, self.device = folder, cfg, torch.device("cpu")
        self.manifest = read_manifest(folder)
        self.names, self.index_taps = self.manifest["state"], self.manifest["index_taps"]
        self.caches = {n: cache_ratio(cfg, n) for n in self.names if is_cache(n)}     # cache -> its ratio
        self.chunk = chunk                 # tokens per step-graph call
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")   # no int8 activations
        self.sessions = {}
        for kind, name in self.manifest["graphs"].items():
            check_external_data(folder, name)
            try:
                s = ort.InferenceSession(str(folder / name), so, providers=providers)
            except (RuntimeError, ValueError) as e:      # onnxruntime's Fail / InvalidGraph / InvalidProtobuf
                first = (str(e).strip().splitlines() or ["no detail"])[0][:200]
                raise V4Error(f"{folder / name}: ONNX Runtime cannot load the graph ({first}); re-export it "
                              "(python -m export.onnx --checkpoint CKPT --out DIR)") from None
            if s.get_providers()[: len(providers)] != providers:
                raise V4Error(f"ONNX Runtime did not start {providers} for {name} (got {s.get_providers()}); "
                              "install the provider's runtime or use profile onnx-cpu")
            self.sessions[kind] = s
        self.providers = self.sessions["step"].get_providers()
        self.tap_names = frozenset({"final.logits", *self.index_taps})     # what the graphs expose to parity

    def placement(self) -> dict[str, dict[str, int]]:
        """Which execution provider ran how many nodes of each graph: one profiled run on a fresh sequence
        (ONNX Runtime's profiler records each node's provider). The CPU provider's share is the fallback."""
        import onnxruntime as ort

        out = {}
        for kind, name in self.manifest["graphs"].items():
            # the profiler's dump goes to a temporary folder, removed with it: nothing is left behind
            with tempfile.TemporaryDirectory(prefix="dsv4rt-placement-") as tmp:
                so = ort.SessionOptions()
                so.enable_profiling = True
                so.profile_file_prefix = str(Path(tmp) / "placement")
                s = ort.InferenceSession(str(self.folder / name), so, providers=self.providers)
                seqs = self.new_state(1).seqs
                s.run(None, self._feeds(np.full((1, 2), 2, np.int64), seqs))
                events = json.loads(Path(s.end_profiling()).read_text())
                del s
            counts: dict[str, int] = {}
            for e in events:
                if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                    p = e.get("args", {}).get("provider", "?")
                    counts[p] = counts.get(p, 0) + 1
            out[kind] = counts
        return out

    def new_state(self, batch_size: int, context: int = 0) -> OnnxState:
        # `context`: tokens each sequence's caches are allocated for up front (they still grow past it)
        return OnnxState(self.cfg, self.names, batch_size, context)

    def _empty(self, cap: int) -> dict[str, np.ndarray]:
        return {n: np.zeros(shape, np.float32) for n, shape in state_shapes(self.cfg, 1, cap).items()}

    def _feeds(self, ids: np.ndarray, seqs) -> dict[str, np.ndarray]:
        """The graph inputs for ids [B, S] continuing `seqs`: each cache's live rows. One sequence: views of its
        arrays, no copy. Several: one zero-padded copy as wide as the furthest sequence's rows (the rows past a
        shorter one's own are never read), so no sequence's arrays grow with its neighbours'."""
        S = ids.shape[1]
        own = [{n: fed_rows(s.pos, S, m) for n, m in self.caches.items()} for s in seqs]
        for s, rows in zip(seqs, own):
            s.ensure(rows, self._empty)
        feeds = {"ids": ids, "start": np.array([s.pos for s in seqs], np.int64)}
        for n in self.names:
            if n not in self.caches:
                parts = [s.arrays[n] for s in seqs]
                feeds[n] = parts[0] if len(parts) == 1 else np.concatenate(parts)
            elif len(seqs) == 1:
                feeds[n] = seqs[0].arrays[n][:, :own[0][n]]
            else:
                feeds[n] = np.zeros((len(seqs), max(r[n] for r in own), seqs[0].arrays[n].shape[2]), np.float32)
                for b, (s, rows) in enumerate(zip(seqs, own)):
                    feeds[n][b, :rows[n]] = s.arrays[n][0, :rows[n]]
        return feeds

    def _run(self, ids: np.ndarray, seqs, taps: dict | None) -> np.ndarray:
        """One step-graph call on ids [B, S]; the state written back into the sequences' arrays."""
        out = self.sessions["step"].run(None, self._feeds(ids, seqs))
        n_state = len(self.names)
        for n, a in zip(self.names, out[1:1 + n_state]):
            for b, s in enumerate(seqs):
                if n in self.caches:               # this call's entries, in place at their rows
                    r0 = s.pos // self.caches[n]
                    s.arrays[n][0, r0:r0 + a.shape[1]] = a[b]
                else:
                    s.arrays[n] = a[b:b + 1]
        if taps is not None:
            for name, t in zip(self.index_taps, out[1 + n_state:]):
                taps.setdefault(name, []).append(t)
        for s in seqs:
            s.pos += ids.shape[1]
        return out[0]

    def forward(self, ids: torch.Tensor, seqs, return_hidden: bool = False) -> torch.Tensor:
        if return_hidden:
            raise InputError("the ONNX export has no MTP block and no hidden-state output; use a torch profile")
        x = ids.cpu().numpy().astype(np.int64)
        S, p0 = x.shape[1], [s.pos for s in seqs]
        taps = {} if recording() and S > 1 else None
        logits = np.concatenate([self._run(x[:, i:i + self.chunk], seqs, taps) for i in range(0, S, self.chunk)],
                                axis=1)
        for name, parts in (taps or {}).items():
            # per sequence, the columns the reference keeps for this call: min(topk, entries closed by its end)
            width = max(t.shape[2] for t in parts)
            sel = np.concatenate([np.pad(t, ((0, 0), (0, 0), (0, width - t.shape[2])), constant_values=-1)
                                  for t in parts], axis=1)
            for b in range(len(seqs)):
                k = min(self.cfg.index_topk, (p0[b] + S) // INDEXER_RATIO)
                tap(name, torch.from_numpy(np.ascontiguousarray(sel[b, :, :k])))
        out = torch.from_numpy(logits)
        tap("final.logits", out)
        return out

    def forward_mtp(self, *args, **kw):
        raise InputError("the ONNX export has no MTP block; use a torch profile for mtp_logits")
