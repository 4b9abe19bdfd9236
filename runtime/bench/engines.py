"""The engines a benchmark scenario can time, behind one small interface:
`new_state()`, `prefill(ids [1, N], state)`, `step(token, state)`, `state_bytes(state)`, and for the torch
engines `fill(state, N)` (a state as if N tokens had been consumed, random values: decode cost depends on
shapes only, and a dense prefill past 16K tokens would take hours).
"""

from __future__ import annotations

import dataclasses
import json

import torch

from ..model.state import ModelState
from ..model.v4 import Transformer

DENSE_PREFILL_CHUNK = 512           # dense windows are as long as the context: keep [chunk, W] index lists small


class TorchEngine:
    """This runtime's torch model (`ours`), or the same weights with dense attention (`dense`)."""

    def __init__(self, rt, dense_context: int | None = None, chunk: int = 4096):
        self.rt, self.model, self.chunk = rt, rt.model, chunk
        if dense_context is not None:
            # Every layer a sliding window covering the whole context, no compressors / indexer: full causal
            # attention over raw KV with the same weights (window layers' RoPE: rope_theta, no YaRN).
            cfg = dataclasses.replace(rt.config, window=dense_context,
                                      compress_ratios=(0,) * len(rt.config.compress_ratios))
            self.model = Transformer(cfg, rt.weights.tensors, rt.weights.quantized, rt.dispatch.ops)
            self.chunk = min(chunk, DENSE_PREFILL_CHUNK)

    def new_state(self):
        return ModelState(self.model.cfg, 1, self.model.device)

    def prefill(self, ids: torch.Tensor, state) -> torch.Tensor:
        with torch.inference_mode():
            for i in range(0, ids.shape[1], self.chunk):
                logits = self.model.forward(ids[:, i:i + self.chunk], state.seqs)
        return logits[:, -1]

    def step(self, token: int, state) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.forward(torch.tensor([[token]]), state.seqs)[:, -1]

    def state_bytes(self, state) -> int:
        return state.nbytes()

    def fill(self, state, n: int, seed: int = 0) -> None:
        g, cfg = torch.Generator().manual_seed(seed), self.model.cfg
        for s in state.seqs:
            for layer, st in enumerate(s.layers[:cfg.num_layers]):
                st.window.copy_(torch.randn(st.window.shape, generator=g))
                m = cfg.ratio(layer)
                if m:
                    st.kv.append(torch.randn(n // m, cfg.head_dim, generator=g))
                    pend = n % m + (m if cfg.is_csa(layer) and n >= m else 0)
                    st.comp_buf.kv = torch.randn(pend, st.comp_buf.kv.shape[1], generator=g)
                    st.comp_buf.score = torch.randn(pend, st.comp_buf.kv.shape[1], generator=g)
                    st.comp_buf.start = n - pend
                if st.index_keys is not None:
                    st.index_keys.append(torch.randn(n // 4, cfg.index_head_dim, generator=g))
                    pend = n % 4 + (4 if n >= 4 else 0)
                    st.index_buf.kv = torch.randn(pend, st.index_buf.kv.shape[1], generator=g)
                    st.index_buf.score = torch.randn(pend, st.index_buf.kv.shape[1], generator=g)
                    st.index_buf.start = n - pend
            s.pos = n


class OnnxEngine(TorchEngine):
    """The exported step graph on ONNX Runtime (profile onnx-cpu): the prompt in --chunk calls, as for ours
    (the runner splits each into its own graph-sized chunks), so no engine keeps a whole prompt's logits."""

    def __init__(self, rt, chunk: int = 4096):
        self.rt, self.model, self.chunk = rt, rt.model, chunk

    def new_state(self):
        return self.model.new_state(1)

    def fill(self, state, n: int, seed: int = 0) -> None:
        raise NotImplementedError


def _tensor_bytes(obj, seen: set) -> int:
    """Bytes of every tensor reachable from a transformers cache object (its layers' lists / dicts)."""
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("transformers"):
        return sum(_tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


class HFEngine:
    """transformers' DeepseekV4ForCausalLM, float32, on the same checkpoint; its own cache, one-call prefill."""

    def __init__(self, checkpoint):
        from ..checkpoint import load_checkpoint
        from .hf_reference import load_hf_model

        ck = load_checkpoint(checkpoint, progress=False)
        raw = json.loads((ck.path / "config.json").read_text())
        self.hf = load_hf_model(raw, ck.tensors, ck.config.num_layers, ck.config.n_routed_experts)
        ck.tensors.clear()

    def new_state(self):
        return {"cache": None}

    def prefill(self, ids: torch.Tensor, state) -> torch.Tensor:
        with torch.inference_mode():
            out = self.hf(input_ids=ids, use_cache=True)
        state["cache"] = out.past_key_values
        return out.logits[:, -1]

    def step(self, token: int, state) -> torch.Tensor:
        with torch.inference_mode():
            out = self.hf(input_ids=torch.tensor([[token]]), past_key_values=state["cache"], use_cache=True)
        state["cache"] = out.past_key_values
        return out.logits[:, -1]

    def state_bytes(self, state) -> int:
        return _tensor_bytes(state["cache"], set())
