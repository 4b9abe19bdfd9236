"""Running the exported ONNX graphs (export/onnx.py) with ONNX Runtime, behind the same interface as the torch
model: `forward(ids, seqs)`, `new_state(batch)`, `cfg`, `device`.

A fresh batch of equal-length prompts (>= 2 tokens) runs the prefill graph once; one-token steps run the decode
graph on the whole batch, each sequence at its own position; anything else (a continued multi-token chunk, a
one-token prompt) runs decode steps token by token. The state of each sequence is the decode graph's state as
numpy arrays; compressed-entry caches grow (doubling) before a position would outrun them. Execution providers
are the profile's; the session's actual providers are checked after creation, so a provider that did not load
is an error, never a silent CPU run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import InputError, V4Error
from .model.state import StateBatch
from .taps import recording, tap

MIN_CAPACITY = 1024


class OnnxSequence:
    def __init__(self, cfg, names):
        self.cfg, self.names = cfg, names
        self.reset()

    def reset(self) -> None:
        self.pos, self.mtp_pos, self.arrays = 0, 0, None

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values()) if self.arrays else 0

    def ensure(self, tokens: int, empty) -> None:
        """Arrays for an empty or continued sequence, with compressed caches for at least `tokens` tokens."""
        cap = max(MIN_CAPACITY, tokens)
        if self.arrays is None:
            self.arrays = empty(cap)
            return
        for n, a in self.arrays.items():
            if n.endswith((".comp", ".ikeys")):
                m = 4 if n.endswith(".ikeys") else self.cfg.ratio(int(n[1:n.index(".")]))
                need = -(-tokens // m) + 1
                if a.shape[1] < need:
                    grown = np.zeros((1, max(need, 2 * a.shape[1]), a.shape[2]), np.float32)
                    grown[:, :a.shape[1]] = a
                    self.arrays[n] = grown


class OnnxState(StateBatch):
    def __init__(self, cfg, names, batch_size: int):
        super().__init__([OnnxSequence(cfg, names) for _ in range(batch_size)])


class OnnxModel:
    def __init__(self, folder: Path, cfg, providers: list[str], threads: int):
        import onnxruntime as ort

        from export.onnx import check_external_data

        self.folder, self.cfg, self.device = folder, cfg, torch.device("cpu")
        self.manifest = json.loads((folder / "export.json").read_text())
        self.names, self.index_taps = self.manifest["state"], self.manifest["index_taps"]
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")   # no int8 activations
        self.sessions = {}
        for kind, name in self.manifest["graphs"].items():
            check_external_data(folder, name)
            s = ort.InferenceSession(str(folder / name), so, providers=providers)
            if s.get_providers()[: len(providers)] != providers:
                raise V4Error(f"ONNX Runtime did not start {providers} for {name} (got {s.get_providers()}); "
                              "install the provider's runtime or use profile onnx-cpu")
            self.sessions[kind] = s
        self.providers = self.sessions["decode"].get_providers()
        self.tap_names = frozenset({"final.logits", *self.index_taps})     # what the graphs expose to parity

    def placement(self) -> dict[str, dict[str, int]]:
        """Which execution provider ran how many nodes of each graph: one profiled run on an empty state
        (ONNX Runtime's profiler records each node's provider). The CPU provider's share is the fallback."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "placement")
        out = {}
        for kind, name in self.manifest["graphs"].items():
            s = ort.InferenceSession(str(self.folder / name), so, providers=self.providers)
            feeds = {"ids": np.full((1, 2 if kind == "prefill" else 1), 2, np.int64)}
            if kind == "decode":
                feeds.update({"pos": np.zeros(1, np.int64), **self._empty(MIN_CAPACITY)})
            s.run(None, feeds)
            events = json.loads(Path(s.end_profiling()).read_text())
            counts: dict[str, int] = {}
            for e in events:
                if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                    p = e.get("args", {}).get("provider", "?")
                    counts[p] = counts.get(p, 0) + 1
            out[kind] = counts
        return out

    def new_state(self, batch_size: int, context: int = 0) -> OnnxState:
        # `context` is a hint the torch model preallocates with; these arrays grow by doubling on their own.
        return OnnxState(self.cfg, self.names, batch_size)

    def _empty(self, cap: int) -> dict[str, np.ndarray]:
        from export.steps import state_shapes

        return {n: np.zeros(shape, np.float32) for n, shape in state_shapes(self.cfg, 1, cap).items()}

    def _prefill(self, ids: np.ndarray, seqs) -> np.ndarray:
        S = ids.shape[1]
        out = self.sessions["prefill"].run(None, {"ids": ids})
        logits, state, taps = out[0], out[1:1 + len(self.names)], out[1 + len(self.names):]
        for b, s in enumerate(seqs):
            s.ensure(S + 1, self._empty)
            for n, a in zip(self.names, state):
                row = a[b:b + 1]
                if n.endswith((".comp", ".ikeys")):                  # into the capacity the decode graph reads
                    s.arrays[n][:, :row.shape[1]] = row
                else:
                    s.arrays[n] = np.ascontiguousarray(row)
            s.pos = S
        k = min(self.cfg.index_topk, S // 4)                          # the columns the reference keeps
        for name, t in zip(self.index_taps, taps if recording() else ()):
            tap(name, torch.from_numpy(np.ascontiguousarray(t[..., :k])).reshape(t.shape[0] * t.shape[1], k))
        return logits

    def _decode(self, ids: np.ndarray, seqs) -> np.ndarray:
        for s in seqs:
            s.ensure(s.pos + 2, self._empty)
        feeds = {"ids": ids, "pos": np.array([s.pos for s in seqs], np.int64)}
        for n in self.names:
            parts = [s.arrays[n] for s in seqs]
            if len(parts) == 1:                 # one sequence: feed its arrays as they are, no copy
                feeds[n] = parts[0]
                continue
            width = max(p.shape[1] for p in parts)
            feeds[n] = np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0))) for p in parts])
        out = self.sessions["decode"].run(None, feeds)
        for b, s in enumerate(seqs):
            for n, a in zip(self.names, out[1:]):
                s.arrays[n] = np.ascontiguousarray(a[b:b + 1])
            s.pos += 1
        return out[0]

    def forward(self, ids: torch.Tensor, seqs, return_hidden: bool = False) -> torch.Tensor:
        if return_hidden:
            raise InputError("the ONNX export has no MTP block and no hidden-state output; use a torch profile")
        x = ids.cpu().numpy().astype(np.int64)
        S = x.shape[1]
        if S >= self.manifest["prefill_min_tokens"] and all(s.pos == 0 for s in seqs):
            logits = self._prefill(x, seqs)
        else:
            logits = np.concatenate([self._decode(x[:, t:t + 1], seqs) for t in range(S)], axis=1)
        out = torch.from_numpy(logits)
        tap("final.logits", out)
        return out

    def forward_mtp(self, *args, **kw):
        raise InputError("the ONNX export has no MTP block; use a torch profile for mtp_logits")
