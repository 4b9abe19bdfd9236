"""The model configuration, read from an official DeepSeek-V4 HF root `config.json`.

`ModelConfig.from_hf(dict)` accepts the file exactly as DeepSeek ships it (spec §2.1). Required keys that are
missing are reported together in one error; optional keys fall back to the documented defaults below; keys
this runtime does not use (e.g. `dspark_*` of later releases, `transformers_version`) are kept in
`ignored_keys` so callers can show them.

Documented defaults for optional keys (the values of the shipped configs / official `ModelArgs`):
rms_norm_eps 1e-6, hc_eps 1e-6, hc_sinkhorn_iters 20, hc_mult 4, num_nextn_predict_layers 1,
swiglu_limit 10.0, bos 0, eos 1, no rope_scaling (no YaRN), `expert_dtype` None = detect from the checkpoint
(FP4 when routed-expert weights are stored as packed int8), no `quantization_config` = bf16 linears.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

REQUIRED = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
    "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts",
    "num_experts_per_tok", "moe_intermediate_size", "routed_scaling_factor", "num_hash_layers",
    "sliding_window", "compress_ratios", "compress_rope_theta", "rope_theta", "index_n_heads",
    "index_head_dim", "index_topk",
)

# Keys read with a default; the value is the default.
OPTIONAL = {
    "n_shared_experts": 1, "scoring_func": "sqrtsoftplus", "norm_topk_prob": True, "swiglu_limit": 10.0,
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6,
    "num_nextn_predict_layers": 1, "max_position_embeddings": 1048576, "bos_token_id": 0,
    "eos_token_id": 1, "rope_scaling": None, "quantization_config": None, "expert_dtype": None,
    "tie_word_embeddings": False, "num_key_value_heads": 1, "hidden_act": "silu", "topk_method": "noaux_tc",
}

# Keys of the shipped configs that carry no model math for this runtime; accepted silently.
METADATA = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "auto_map",
            "attention_bias", "attention_dropout", "initializer_range", "use_cache", "pad_token_id"}


@dataclass(frozen=True)
class Yarn:
    """YaRN frequency interpolation of the compressed layers' RoPE (applied without mscale, spec §7.2)."""

    factor: float
    original_max_position: int
    beta_fast: float
    beta_slow: float


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    rope_dim: int                   # RoPE acts on the trailing `rope_dim` dims of each head
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    n_routed_experts: int
    n_shared_experts: int
    experts_per_token: int
    moe_inter_dim: int
    route_scale: float
    num_hash_layers: int
    swiglu_limit: float
    window: int
    compress_ratios: tuple[int, ...]  # one per layer, then one per MTP block
    compress_rope_theta: float
    rope_theta: float
    yarn: Yarn | None
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    norm_eps: float
    num_mtp: int
    max_position: int
    bos_token_id: int
    eos_token_id: int
    fp8_linears: bool               # quantization_config says FP8 e4m3 with 128x128 ue8m0 block scales
    expert_dtype: str | None        # "fp4", "fp8" or None (detect from the checkpoint)
    ignored_keys: tuple[str, ...] = field(default=(), compare=False)

    # ---- derived ----
    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    def ratio(self, layer: int) -> int:
        """Compression ratio of layer `layer` (layer ids >= num_layers are MTP blocks)."""
        return self.compress_ratios[layer]

    def is_csa(self, layer: int) -> bool:
        # The official code gives ratio 4 the overlapping compressor and the lightning indexer;
        # every other positive ratio is heavily compressed (HCA): no overlap, no indexer.
        return self.compress_ratios[layer] == 4

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    def layer_kind(self, layer: int) -> str:
        r = self.compress_ratios[layer]
        return "swa" if r == 0 else ("csa" if r == 4 else f"hca{r}")

    # ---- construction ----
    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config") -> "ModelConfig":
        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        missing = [k for k in REQUIRED if k not in cfg]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}; "
                              "use the config.json shipped with the checkpoint")
        get = {**OPTIONAL, **cfg}.__getitem__
        known = set(REQUIRED) | set(OPTIONAL) | METADATA
        ignored = tuple(sorted(k for k in cfg if k not in known))

        n_layers, n_mtp = int(get("num_hidden_layers")), int(get("num_nextn_predict_layers"))
        ratios = list(get("compress_ratios"))
        if len(ratios) < n_layers + n_mtp:
            # Configs without MTP entries: the MTP block is sliding-window only in every release.
            if len(ratios) == n_layers:
                ratios = ratios + [0] * n_mtp
            else:
                raise ConfigError(f"{source}: compress_ratios has {len(ratios)} entries, need "
                                  f"num_hidden_layers + num_nextn_predict_layers = {n_layers + n_mtp}")
        ratios = tuple(int(r) for r in ratios[: n_layers + n_mtp])  # -0731 ships extra trailing entries

        yarn = None
        rs = get("rope_scaling")
        if rs:
            kind = rs.get("type", rs.get("rope_type"))
            if kind != "yarn":
                raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported; V4 uses 'yarn'")
            try:
                yarn = Yarn(float(rs["factor"]), int(rs["original_max_position_embeddings"]),
                            float(rs.get("beta_fast", 32)), float(rs.get("beta_slow", 1)))
            except KeyError as e:
                raise ConfigError(f"{source}: rope_scaling lacks {e.args[0]!r}") from None

        q = get("quantization_config")
        fp8 = bool(q) and q.get("quant_method", "fp8") == "fp8"
        if q and fp8:
            if q.get("fmt", "e4m3") != "e4m3" or list(q.get("weight_block_size", [128, 128])) != [128, 128]:
                raise ConfigError(f"{source}: quantization_config {q} is not the e4m3 128x128 block format")
        elif q:
            raise ConfigError(f"{source}: quant_method {q.get('quant_method')!r} is not supported; expected 'fp8'")

        try:
            c = cls(
                vocab_size=int(get("vocab_size")), hidden_size=int(get("hidden_size")), num_layers=n_layers,
                num_heads=int(get("num_attention_heads")), head_dim=int(get("head_dim")),
                rope_dim=int(get("qk_rope_head_dim")), q_lora_rank=int(get("q_lora_rank")),
                o_groups=int(get("o_groups")), o_lora_rank=int(get("o_lora_rank")),
                n_routed_experts=int(get("n_routed_experts")), n_shared_experts=int(get("n_shared_experts")),
                experts_per_token=int(get("num_experts_per_tok")),
                moe_inter_dim=int(get("moe_intermediate_size")),
                route_scale=float(get("routed_scaling_factor")), num_hash_layers=int(get("num_hash_layers")),
                swiglu_limit=float(get("swiglu_limit")), window=int(get("sliding_window")),
                compress_ratios=ratios, compress_rope_theta=float(get("compress_rope_theta")),
                rope_theta=float(get("rope_theta")), yarn=yarn, index_n_heads=int(get("index_n_heads")),
                index_head_dim=int(get("index_head_dim")), index_topk=int(get("index_topk")),
                hc_mult=int(get("hc_mult")), hc_sinkhorn_iters=int(get("hc_sinkhorn_iters")),
                hc_eps=float(get("hc_eps")), norm_eps=float(get("rms_norm_eps")), num_mtp=n_mtp,
                max_position=int(get("max_position_embeddings")), bos_token_id=int(get("bos_token_id")),
                eos_token_id=int(get("eos_token_id")), fp8_linears=fp8,
                expert_dtype=get("expert_dtype"), ignored_keys=ignored,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: a value has the wrong type ({e})") from None
        c._validate(source, cfg)
        return c

    def _validate(self, source: str, raw: dict) -> None:
        def bad(msg):
            raise ConfigError(f"{source}: {msg}")

        if raw.get("tie_word_embeddings"):
            bad("tie_word_embeddings=true is not a V4 model (embed and head are separate tensors)")
        if raw.get("num_key_value_heads", 1) != 1:
            bad("num_key_value_heads must be 1 (V4 shares one K=V head)")
        if raw.get("scoring_func", "sqrtsoftplus") != "sqrtsoftplus":
            bad(f"scoring_func {raw['scoring_func']!r} is not supported; V4 uses 'sqrtsoftplus'")
        for name in ("hidden_size", "num_layers", "num_heads", "head_dim", "q_lora_rank", "o_groups",
                     "o_lora_rank", "n_routed_experts", "experts_per_token", "moe_inter_dim", "window",
                     "index_n_heads", "index_head_dim", "index_topk", "hc_mult", "vocab_size"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.rope_dim % 2 or not 0 < self.rope_dim < self.head_dim:
            bad(f"qk_rope_head_dim {self.rope_dim} must be even and below head_dim {self.head_dim}")
        if self.rope_dim >= self.index_head_dim:
            bad(f"qk_rope_head_dim {self.rope_dim} must be below index_head_dim {self.index_head_dim}")
        if self.num_heads % self.o_groups:
            bad(f"num_attention_heads {self.num_heads} is not divisible by o_groups {self.o_groups}")
        if self.experts_per_token > self.n_routed_experts:
            bad(f"num_experts_per_tok {self.experts_per_token} exceeds n_routed_experts {self.n_routed_experts}")
        if self.n_shared_experts not in (0, 1):
            bad(f"n_shared_experts must be 0 or 1, got {self.n_shared_experts}")
        for i, r in enumerate(self.compress_ratios):
            if r < 0 or r == 1:
                bad(f"compress_ratios[{i}] = {r}; ratios are 0 (window only) or >= 2")
        if self.expert_dtype not in (None, "fp4", "fp8", "bf16"):
            bad(f"expert_dtype {self.expert_dtype!r} is not one of fp4, fp8, bf16")
        if self.index_head_dim & (self.index_head_dim - 1):
            bad(f"index_head_dim {self.index_head_dim} must be a power of two (Hadamard rotation)")
        if not (math.isfinite(self.route_scale) and self.route_scale > 0):
            bad(f"routed_scaling_factor must be positive, got {self.route_scale}")

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_hf(raw, source=str(path))

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        from .presets import preset

        return cls.from_hf(preset(name), source=f"preset {name!r}")
