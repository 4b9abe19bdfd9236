"""The memory plan of a loaded runtime: the planner's arithmetic (`runtime.plan`) applied to what this build
actually holds (`runtime.plan.sizes`), printed at load and enforced before a batch or context is allocated.

Weights are counted from the loaded storage (`runtime.weights.Weights.held_bytes`), split on the CPU into
resident memory and pages of the memory-mapped checkpoint files (which the OS pages in when read and may drop
again under pressure: a checkpoint larger than RAM still runs, paying disk reads for the experts a token
routes to that are not cached -- `paging_warning` says when and what that is expected to cost); per-sequence state uses the planner's
per-layer formulas in the layout this build stores (the torch runtime keeps every KV row, compressed entry and
indexer key in float32 whatever the profile's cache dtype, which a deployment kernel would use instead), MTP
block included; activations are one prefill chunk's (`runtime.plan.sizes.activation_bytes`). A batch or context
that would not fit the profile's `memory_gib` (less 10% headroom) is refused with one line naming the
largest that fits, instead of running into an out-of-memory kill.
"""

from __future__ import annotations

from ..errors import InputError
from .sizes import HEADROOM, activation_bytes, gib, state_plan

# The prefill chunk (tokens per forward call of a prompt): the one runtime setting, a backend's default
# (backends.base.Backend.prefill_chunk) and what a loaded runtime's activations are sized for.
PREFILL_CHUNK = 4096
STATE_LAYOUT = "float32"          # what runtime.model.state stores
DISK_GBPS = 2.0                   # assumed read bandwidth of the checkpoint's disk (NVMe) for the paging estimate


def host_ram() -> tuple[int, int]:
    """(total, available) bytes of this host's RAM from /proc/meminfo ((0, 0) where there is none)."""
    try:
        info = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/meminfo")}
    except (OSError, ValueError, IndexError):
        return 0, 0
    return info.get("MemTotal", 0), info.get("MemAvailable", 0)


class MemoryPlan:
    def __init__(self, cfg, profile, weights: int, layout: str = STATE_LAYOUT, mapped: int = 0,
                 active: float | None = None, chunk: int = PREFILL_CHUNK):
        self.cfg, self.profile, self.weights, self.chunk = cfg, profile, weights, chunk
        self.mapped, self.active = mapped, active     # of `weights`: bytes mapped from the checkpoint files; read per token
        self.budget = profile.memory_gib.value * 2 ** 30 * HEADROOM
        self.state = state_plan(cfg, profile, include_mtp=True, layout=layout)
        self.layout = layout

    def state_bytes(self, lengths: list[int]) -> float:
        """Planned state of sequences at these lengths (tokens each)."""
        return sum(self.state.fixed + self.state.per_token * n for n in lengths)

    def needed(self, lengths: list[int]) -> float:
        # The workspace is sized for one full prefill chunk whatever the request (reserved, as a server would):
        # then "the longest context that fits" does not depend on how a request is cut.
        # Memory-mapped weights are file pages the OS can drop and re-read: not part of the resident budget.
        return self.weights - self.mapped + self.state_bytes(lengths) + activation_bytes(self.cfg, self.profile, self.chunk,
                                                                           max(lengths))

    def max_context(self, batch: int) -> int:
        """The longest context every one of `batch` sequences may reach (capped at the model's positions)."""
        lo, hi = 0, self.cfg.max_position
        while lo < hi:                    # activations grow with the context too: search, don't solve
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.needed([mid] * batch) <= self.budget else (lo, mid - 1)
        return lo

    def check(self, lengths: list[int]) -> None:
        """Raise InputError if sequences reaching these lengths would not fit the budget."""
        need = self.needed(lengths)
        if need > self.budget:
            B = len(lengths)
            raise InputError(
                f"batch {B} at context {max(lengths):,} needs {gib(need, 3)} (weights {gib(self.weights, 3)}, state "
                f"{gib(self.state_bytes(lengths), 3)}) but profile {self.profile.name} allows {gib(self.budget, 3)} "
                f"({self.profile.memory_gib.value:g} GiB less 10% headroom); the longest context that fits at "
                f"batch {B} is {self.max_context(B):,}: shorten the prompt or max_new_tokens, lower the batch, "
                "or use a profile with more memory")

    def paging_warning(self, ram: tuple[int, int] | None = None) -> str | None:
        """One line when the memory-mapped weights will not all stay in this host's page cache, with the expected
        cost per decoded token (None when they fit, or nothing is mapped)."""
        if not self.mapped:
            return None
        total, _ = host_ram() if ram is None else ram
        room = 0.9 * total - (self.weights - self.mapped)            # RAM left for the page cache
        if total == 0 or self.mapped <= room:
            return None
        miss = 1.0 - max(room, 0.0) / self.mapped                    # share of mapped reads not cached
        per_token = (self.active or self.mapped) * miss
        return (f"warning: {gib(self.mapped, 1)} of weights are memory-mapped but only ~{gib(max(room, 0), 1)} of "
                f"RAM is left to cache them: about {100 * miss:.0f}% of the ~{gib(self.active or 0, 2)} a token reads "
                f"will come from disk, ~{per_token / (DISK_GBPS * 1e9):.1f} s per decoded token at "
                f"{DISK_GBPS:g} GB/s (prefill reuses what it pages in)")

    def format(self, batch: int = 1) -> str:
        held = f"weights {gib(self.weights, 3)}"
        if self.mapped:
            held += (f" ({gib(self.weights - self.mapped, 3)} resident, {gib(self.mapped, 3)} memory-mapped from the "
                     "checkpoint: paged in by the OS when read)")
        warn = self.paging_warning()
        return (f"memory plan ({self.profile.name}, {self.profile.memory_gib.value:g} GiB less 10% headroom): "
                f"{held}; state per sequence {self.state.fixed / 2 ** 20:,.2f} MiB + "
                f"{self.state.per_token:,.1f} B/token ({self.layout} rows); max context at batch {batch}: "
                f"{self.max_context(batch):,}" + (f"\n{warn}" if warn else ""))
