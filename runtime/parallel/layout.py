"""Parallel layouts: how a model is split over `tp x ep` ranks, and which layouts a model admits.

A layout is a 2-D mesh of `world = tp * ep` ranks; rank r has coordinates (ep_rank, tp_rank) = divmod(r, tp).

- Tensor parallel (`tp`) splits the attention's query heads (spec §15): `wq_b` rows, `attn_sink`, the `wo_a`
  output groups and the matching input columns of `wo_b` (row-parallel: each rank's partial product is summed
  over the TP group), and the lightning indexer's heads (`wq_b` rows, `weights_proj` rows; partial scores are
  summed over the TP group before top-k). The single shared KV head (`wkv`, `kv_norm`), the compressors,
  `wq_a`, norms, mHC and the MoE gate are replicated: with one KV head there is nothing to split.
- Expert parallel (`ep`) gives each EP rank whole routed experts, a contiguous block of E/ep ids; shared
  experts are replicated. TP partners (same ep_rank) hold the same experts and compute the same sums.
- The embedding and the output head are vocab-parallel over all `world` ranks (contiguous row blocks).

A layout that does not divide the model is refused with the valid choices listed (before anything loads).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import V4Error


class LayoutError(V4Error):
    """A parallel layout does not fit the model or the launched process group."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_tp(cfg) -> list[int]:
    """TP degrees that split the query heads, the output groups and the indexer heads evenly."""
    return [t for t in _divisors(cfg.num_heads)
            if cfg.o_groups % t == 0 and cfg.index_n_heads % t == 0]


def valid_ep(cfg) -> list[int]:
    return _divisors(cfg.n_routed_experts)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    ep: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.ep

    def __str__(self) -> str:
        return f"TP {self.tp} x EP {self.ep} ({self.world} rank{'s' if self.world > 1 else ''})"

    def check(self, cfg, world: int | None = None) -> "Layout":
        """Raise LayoutError (one line, valid choices listed) unless this layout divides `cfg` and, when
        given, matches the launched world size."""
        for name, v in (("tp", self.tp), ("ep", self.ep)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LayoutError(f"--{name} must be a positive integer, got {v!r}")
        if self.tp not in valid_tp(cfg):
            raise LayoutError(f"TP {self.tp} does not divide the model ({cfg.num_heads} query heads, {cfg.o_groups} "
                              f"output groups, {cfg.index_n_heads} indexer heads); valid --tp: "
                              f"{', '.join(map(str, valid_tp(cfg)))}")
        if self.ep not in valid_ep(cfg):
            raise LayoutError(f"EP {self.ep} does not divide the model's {cfg.n_routed_experts} routed experts; "
                              f"valid --ep: {', '.join(map(str, valid_ep(cfg)))}")
        if self.world > cfg.vocab_size:
            raise LayoutError(f"{self.world} ranks exceed the vocabulary of {cfg.vocab_size} rows; use fewer ranks")
        if world is not None and world != self.world:
            fits = [f"--tp {t} --ep {world // t}" for t in valid_tp(cfg) if world % t == 0 and world // t in valid_ep(cfg)]
            raise LayoutError(f"layout {self} needs {self.world} processes but {world} were launched; "
                              f"for {world}: {'; '.join(fits) or 'no layout divides this model, launch another count'}")
        return self

    # ---- who owns what ----
    def coords(self, rank: int) -> tuple[int, int]:
        """(ep_rank, tp_rank) of a global rank."""
        return divmod(rank, self.tp)

    def experts(self, rank: int, n_experts: int) -> range:
        """The routed expert ids rank `rank` holds (whole experts, a contiguous block)."""
        per = n_experts // self.ep
        e = self.coords(rank)[0]
        return range(e * per, (e + 1) * per)

    def vocab(self, rank: int, vocab: int) -> tuple[int, int]:
        """[lo, hi) rows of the embedding / head rank `rank` holds (equal blocks, the last may be short)."""
        chunk = -(-vocab // self.world)
        return min(vocab, rank * chunk), min(vocab, (rank + 1) * chunk)

    def tp_groups(self) -> list[list[int]]:
        return [[e * self.tp + t for t in range(self.tp)] for e in range(self.ep)]

    def ep_groups(self) -> list[list[int]]:
        return [[e * self.tp + t for e in range(self.ep)] for t in range(self.tp)]


def parse_layout(value) -> Layout:
    """A Layout from a Layout, a mapping {"tp": .., "ep": ..}, or a (tp, ep) pair."""
    if isinstance(value, Layout):
        return value
    if isinstance(value, dict):
        unknown = set(value) - {"tp", "ep"}
        if unknown:
            raise LayoutError(f"parallel layout keys are tp and ep, got {', '.join(sorted(unknown))}")
        return Layout(value.get("tp", 1), value.get("ep", 1))
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return Layout(*value)
    raise LayoutError(f"parallel must be a Layout, {{'tp': N, 'ep': M}} or (tp, ep), got {value!r}")
