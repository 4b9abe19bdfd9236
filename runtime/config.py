"""The model configuration, read from an official DeepSeek-V4 HF root `config.json`.

`ModelConfig.from_hf(dict)` accepts the file exactly as DeepSeek ships it (spec §2.1). Required keys that are
missing are reported together in one error; optional keys fall back to the documented defaults below; keys
this runtime does not use (e.g. `dspark_*` of later releases, `transformers_version`) are kept in
`ignored_keys` so callers can show them.

Documented defaults for optional keys (the values of the shipped configs / official `ModelArgs`):
rms_norm_eps 1e-6, hc_eps 1e-6, hc_sinkhorn_iters 20, hc_mult 4, num_nextn_predict_layers 1,
swiglu_limit 10.0, bos 0, eos 1, no rope_scaling (no YaRN), `expert_dtype` None = detect from the checkpoint
(FP4 when routed-expert weights are stored as packed int8), no `quantization_config` = bf16 linears.

Every value is type-checked (an integer key holding "abc" or true, a list key holding 5, an object key holding a
string) and every key that selects math the runtime does not implement (`UNSUPPORTED`: `hidden_act: "gelu"`,
`norm_topk_prob: false`, ...) is refused with its one supported value: a `ConfigError` naming the file and the
key, never another exception and never a graph that silently computes something else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .yaml_io import read_json

REQUIRED = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
    "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts",
    "num_experts_per_tok", "moe_intermediate_size", "routed_scaling_factor", "num_hash_layers",
    "sliding_window", "compress_ratios", "compress_rope_theta", "rope_theta", "index_n_heads",
    "index_head_dim", "index_topk",
)

# Keys read with a default; the value is the default.
OPTIONAL = {
    "n_shared_experts": 1, "swiglu_limit": 10.0, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6, "num_nextn_predict_layers": 1, "max_position_embeddings": 1048576, "bos_token_id": 0,
    "eos_token_id": 1, "rope_scaling": None, "quantization_config": None, "expert_dtype": None,
}

# Keys whose value selects math: the runtime computes exactly one value of each (the V4 one, also the default
# when the key is absent). Any other value is refused, naming the key and the value computed, instead of running
# a graph that silently ignores it. n_group / topk_group / first_k_dense_replace / moe_layer_freq are
# DeepSeek-V3-family routing and layer keys that V4 configs do not carry.
UNSUPPORTED = {
    "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": True, "hidden_act": "silu",
    "attention_bias": False, "tie_word_embeddings": False, "num_key_value_heads": 1, "n_group": 1,
    "topk_group": 1, "first_k_dense_replace": 0, "moe_layer_freq": 1,
}
_WHY = {"tie_word_embeddings": "V4 has separate embed and head tensors",
        "num_key_value_heads": "V4 shares one K=V head", "norm_topk_prob": "V4 renormalises the top-k weights",
        "attention_bias": "V4 projections have no bias"}

# Keys of the shipped configs that carry no model math for this runtime (inference runs without dropout and
# computes in the profile's dtypes); accepted with any value.
METADATA = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "auto_map",
            "attention_dropout", "initializer_range", "use_cache", "pad_token_id"}

# rope_scaling keys the YaRN implementation reads (spec section 7.2: applied without mscale).
_YARN_KEYS = ("type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse_unsupported(cfg: dict, source: str) -> None:
    for key, only in UNSUPPORTED.items():
        if key in cfg and not (cfg[key] == only and type(cfg[key]) is type(only)):
            why = f" ({_WHY[key]})" if key in _WHY else ""
            raise ConfigError(f"{source}: key '{key}' is {_show(cfg[key])}, which this runtime does not compute; "
                              f"it supports only {json_literal(only)}{why}")


def json_literal(value) -> str:
    """A value as config.json spells it (true / false / "silu" / 1)."""
    return {True: "true", False: "false"}[value] if isinstance(value, bool) else \
        (f'"{value}"' if isinstance(value, str) else str(value))


class _Values:
    """Typed reads of config keys (default: OPTIONAL), each error naming the file, the key and what is allowed."""

    def __init__(self, cfg: dict, source: str):
        self.cfg, self.source = cfg, source

    def bad(self, key: str, msg: str):
        raise ConfigError(f"{self.source}: key '{key}' {msg}")

    def get(self, key: str):
        return self.cfg[key] if key in self.cfg else OPTIONAL.get(key)

    def int(self, key: str, lo: int | None = None, hi: int | None = None, value=None) -> int:
        v = self.get(key) if value is None else value
        if isinstance(v, bool) or not isinstance(v, int):
            self.bad(key, f"has the wrong type: must be an integer, got {_show(v)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            allowed = f"between {lo} and {hi}" if hi is not None else ("positive" if lo == 1 else f">= {lo}")
            self.bad(key, f"must be {allowed}, got {v}")
        return v

    def float(self, key: str, value=None) -> float:
        """A finite, positive number (every float key of the config is a scale, theta, eps or limit)."""
        v = self.get(key) if value is None else value
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.bad(key, f"has the wrong type: must be a number, got {_show(v)}")
        try:
            f = float(v)
        except OverflowError:
            f = math.inf
        if not (math.isfinite(f) and f > 0):
            self.bad(key, f"must be a positive finite number, got {_show(v)}")
        return f

    def list(self, key: str) -> list:
        v = self.get(key)
        if not isinstance(v, list):
            self.bad(key, f"has the wrong type: must be a list, got {_show(v)}")
        return v

    def choice(self, key: str, allowed: tuple):
        v = self.get(key)
        if not any(v == a and type(v) is type(a) for a in allowed):
            self.bad(key, f"is {_show(v)}; allowed: {', '.join('null' if a is None else json_literal(a) for a in allowed)}")
        return v


def _yarn(v: _Values) -> "Yarn | None":
    rs = v.get("rope_scaling")
    if rs is None:
        return None
    if not isinstance(rs, dict):
        v.bad("rope_scaling", f"has the wrong type: must be an object such as {{\"type\": \"yarn\", \"factor\": 16, "
                              f"...}} or null, got {_show(rs)}")
    kind = rs.get("type", rs.get("rope_type"))
    if kind != "yarn":
        v.bad("rope_scaling", f"type {_show(kind)} is not supported; V4 uses \"yarn\"")
    extra = sorted(str(k) for k in rs if k not in _YARN_KEYS)
    if extra:
        v.bad(f"rope_scaling.{extra[0]}", "is not computed by this runtime (V4 applies YaRN without mscale); "
                                          f"allowed keys: {', '.join(_YARN_KEYS)}")
    for k in ("factor", "original_max_position_embeddings"):
        if k not in rs:
            v.bad("rope_scaling", f"lacks {k!r}")
    return Yarn(v.float("rope_scaling.factor", rs["factor"]),
                v.int("rope_scaling.original_max_position_embeddings", 1, value=rs["original_max_position_embeddings"]),
                v.float("rope_scaling.beta_fast", rs.get("beta_fast", 32)),
                v.float("rope_scaling.beta_slow", rs.get("beta_slow", 1)))


# quantization_config entries this runtime reads, with the one value each it implements.
_FP8 = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "activation_scheme": "dynamic"}


def _fp8_linears(v: _Values) -> bool:
    """True for DeepSeek's FP8 e4m3 linears with 128x128 ue8m0 block scales; False (bf16) without a config."""
    q = v.get("quantization_config")
    if q is None:
        return False
    if not isinstance(q, dict):
        v.bad("quantization_config", f"has the wrong type: must be an object or null, got {_show(q)}")
    for k, only in _FP8.items():
        if k in q and q[k] != only:
            v.bad(f"quantization_config.{k}", f"is {_show(q[k])}; this runtime implements only {json_literal(only)} "
                                              "(the e4m3 128x128 block format)")
    block = q.get("weight_block_size", [128, 128])
    if block != [128, 128] or any(isinstance(b, bool) for b in block):
        v.bad("quantization_config.weight_block_size", f"is {_show(block)}; this runtime implements only [128, 128]")
    return True


@dataclass(frozen=True)
class Yarn:
    """YaRN frequency interpolation of the compressed layers' RoPE (applied without mscale, spec §7.2)."""

    factor: float                   # context extension factor s (rope_scaling.factor)
    original_max_position: int      # the pre-extension context the frequencies were trained for
    beta_fast: float                # above beta_fast rotations over that context: frequencies kept
    beta_slow: float                # below beta_slow rotations: frequencies divided by `factor`; ramp between


@dataclass(frozen=True)
class ModelConfig:
    """One model's shape and constants. Each field names its config.json key when the name differs."""

    vocab_size: int                 # V: rows of embed.weight and head.weight
    hidden_size: int                # d: width of each residual stream
    num_layers: int                 # num_hidden_layers: main-model blocks (MTP blocks not counted)
    num_heads: int                  # num_attention_heads: H query heads (all share one K=V head)
    head_dim: int                   # D: width of a query head and of the shared K=V head
    rope_dim: int                   # qk_rope_head_dim: RoPE acts on the trailing `rope_dim` dims of each head
    q_lora_rank: int                # low-rank query: wq_a [q_lora, d], wq_b [H*D, q_lora]
    o_groups: int                   # G: output groups of the grouped wo_a (H/G heads each)
    o_lora_rank: int                # each group's slice of wo_a's output; wo_b [d, G*o_lora]
    n_routed_experts: int           # E routed experts per MoE layer
    n_shared_experts: int           # 0 or 1 always-on expert added to the routed sum
    experts_per_token: int          # num_experts_per_tok: k experts each token is routed to
    moe_inter_dim: int              # moe_intermediate_size: every expert's SwiGLU width
    route_scale: float              # routed_scaling_factor: the renormalised routing weights are multiplied by it
    num_hash_layers: int            # the first layers route by token id (gate.tid2eid), not by learned scores
    swiglu_limit: float             # clamp of the SwiGLU gate (above) and up projection (both sides)
    window: int                     # sliding_window W: raw KV rows every query sees (its ring in the state)
    compress_ratios: tuple[int, ...]  # one per layer, then one per MTP block: 0 window only, 4 CSA, else HCA
    compress_rope_theta: float      # RoPE base of compressed layers (with YaRN); spec §18.9: trust config.json
    rope_theta: float               # RoPE base of window-only layers (no YaRN)
    yarn: Yarn | None               # rope_scaling: YaRN of the compressed layers' RoPE (None: plain RoPE)
    index_n_heads: int              # lightning indexer heads (CSA layers)
    index_head_dim: int             # indexer query / key width (a power of two: Hadamard rotation)
    index_topk: int                 # compressed entries each query keeps in a CSA layer
    hc_mult: int                    # hc: residual streams of the hyper-connections (mHC)
    hc_sinkhorn_iters: int          # Sinkhorn iterations projecting hc_pre's comb matrix
    hc_eps: float                   # eps added to the pre / head gates, comb's softmax and each Sinkhorn division
    norm_eps: float                 # rms_norm_eps: every RMS norm's eps (also the mHC mixes' rsqrt)
    num_mtp: int                    # num_nextn_predict_layers: MTP draft blocks (layer ids num_layers + i)
    max_position: int               # max_position_embeddings: longest context the model was built for
    bos_token_id: int               # begin-of-sequence token id
    eos_token_id: int               # end-of-sequence token id (generation stops at it)
    fp8_linears: bool               # quantization_config says FP8 e4m3 with 128x128 ue8m0 block scales
    expert_dtype: str | None        # "fp4", "fp8", "bf16" or None (detect from the checkpoint)
    ignored_keys: tuple[str, ...] = field(default=(), compare=False)   # config keys this runtime does not read

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
        _refuse_unsupported(cfg, source)
        v = _Values(cfg, source)
        known = set(REQUIRED) | set(OPTIONAL) | set(UNSUPPORTED) | METADATA
        ignored = tuple(sorted(str(k) for k in cfg if k not in known))

        n_layers = v.int("num_hidden_layers", 1)
        n_mtp = v.int("num_nextn_predict_layers", 0, n_layers)
        ratios = v.list("compress_ratios")
        if len(ratios) < n_layers + n_mtp:
            # Configs without MTP entries: the MTP block is sliding-window only in every release.
            if len(ratios) == n_layers:
                ratios = ratios + [0] * n_mtp
            else:
                raise ConfigError(f"{source}: compress_ratios has {len(ratios)} entries, need "
                                  f"num_hidden_layers + num_nextn_predict_layers = {n_layers + n_mtp}")
        ratios = ratios[: n_layers + n_mtp]                        # -0731 ships extra trailing entries
        for i, r in enumerate(ratios):
            if isinstance(r, bool) or not isinstance(r, int):
                v.bad(f"compress_ratios[{i}]", f"must be an integer, got {_show(r)}")

        c = cls(
            vocab_size=v.int("vocab_size", 1), hidden_size=v.int("hidden_size", 1), num_layers=n_layers,
            num_heads=v.int("num_attention_heads", 1), head_dim=v.int("head_dim", 1),
            rope_dim=v.int("qk_rope_head_dim", 1), q_lora_rank=v.int("q_lora_rank", 1),
            o_groups=v.int("o_groups", 1), o_lora_rank=v.int("o_lora_rank", 1),
            n_routed_experts=v.int("n_routed_experts", 1), n_shared_experts=v.int("n_shared_experts", 0),
            experts_per_token=v.int("num_experts_per_tok", 1), moe_inter_dim=v.int("moe_intermediate_size", 1),
            route_scale=v.float("routed_scaling_factor"), num_hash_layers=v.int("num_hash_layers", 0, n_layers),
            swiglu_limit=v.float("swiglu_limit"), window=v.int("sliding_window", 1), compress_ratios=tuple(ratios),
            compress_rope_theta=v.float("compress_rope_theta"), rope_theta=v.float("rope_theta"),
            yarn=_yarn(v), index_n_heads=v.int("index_n_heads", 1), index_head_dim=v.int("index_head_dim", 1),
            index_topk=v.int("index_topk", 1), hc_mult=v.int("hc_mult", 1),
            hc_sinkhorn_iters=v.int("hc_sinkhorn_iters", 1), hc_eps=v.float("hc_eps"),
            norm_eps=v.float("rms_norm_eps"), num_mtp=n_mtp, max_position=v.int("max_position_embeddings", 1),
            bos_token_id=v.int("bos_token_id", 0), eos_token_id=v.int("eos_token_id", 0),
            fp8_linears=_fp8_linears(v), expert_dtype=v.choice("expert_dtype", (None, "fp4", "fp8", "bf16")),
            ignored_keys=ignored,
        )
        c._validate(source)
        return c

    def _validate(self, source: str) -> None:
        def bad(msg):
            raise ConfigError(f"{source}: {msg}")

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
        if self.index_head_dim & (self.index_head_dim - 1):
            bad(f"index_head_dim {self.index_head_dim} must be a power of two (Hadamard rotation)")
        for name, tid in (("bos_token_id", self.bos_token_id), ("eos_token_id", self.eos_token_id)):
            if tid >= self.vocab_size:
                bad(f"{name} {tid} is outside the vocabulary of {self.vocab_size} tokens")

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        return cls.from_hf(read_json(path, ConfigError, "config file"), source=str(path))

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        from .presets import preset

        return cls.from_hf(preset(name), source=f"preset {name!r}")
