"""Model state: what each sequence keeps between forward calls, prefill and decode alike (spec §8, §10, §11).

Per sequence and layer:
- `kv`: one growing [W + entries, D] buffer: rows [0, W) are the ring of the last `W` raw KV rows (token p in
  slot p % W), rows W + w are the compressed entries (ratio > 0), entry w summarising tokens [w*m, (w+1)*m).
  Attention reads this buffer in place (a decode step gathers from it without copying the cache);
- `comp_buf`: the compressor's pending per-token projections (values and gate scores, `ape` included) for
  the open window and, for CSA, also the last complete window (the overlap half of the next entry);
- `index_keys` / `index_buf`: the same two for the lightning indexer's own compressor (CSA only).
Every sequence has its own position, so a batch may hold sequences of different lengths; `reset(i)`
clears one sequence for reuse (stale compressor state from an earlier prompt is a known official-code
pitfall, spec §18 item 17).
"""

from __future__ import annotations

import array

import torch

# The fused CPU decode step (backends/cpu_decode.py) reads a sequence's layer state without Python per layer:
# every Rows / Pending keeps its counters, its buffers' addresses and its capacity in one int64 array `_c`
# (the attributes below are views of it), which the native step reads and advances in place; it keeps per
# sequence only the addresses of those arrays, valid until a LayerState's buffer objects are replaced, which
# bumps `_STAMP` (a copied Rows / Pending gets its own array: `__setstate__`).
_STAMP = [0]


def layout_stamp() -> int:
    """Changes whenever any LayerState's buffer objects (or a sequence's LayerStates) are replaced."""
    return _STAMP[0]


class _Counted:
    """`_c`-backed state (see above): a copy (copy / deepcopy) re-reads its own buffers' addresses."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._c = array.array("q", self._c)
        self._sync()


def _field(i: int, doc: str):
    return property(lambda self: self._c[i], lambda self, v: self._c.__setitem__(i, v), doc=doc)


def _synced(key: str):
    """A buffer attribute kept in `__dict__[key]` whose assignment refreshes `_c` (`_sync`)."""
    def put(self, t: torch.Tensor) -> None:
        self.__dict__[key] = t
        self._sync()

    return property(lambda self: self.__dict__[key], put)


class Rows(_Counted):
    """An append-only [n, dim] float32 buffer with amortised growth (no re-materialisation per step).
    `_c` = [n, buffer address, capacity rows]."""

    n = _field(0, "leading rows in use (a ring region counts from the start)")

    def __init__(self, dim: int, device="cpu", capacity: int = 16, n: int = 0):
        self._c = array.array("q", (n, 0, 0))
        self._buf = torch.zeros(max(capacity, n, 1), dim, device=device)

    _buf = _synced("_b")

    def _sync(self) -> None:
        self._c[1], self._c[2] = self._b.data_ptr(), self._b.shape[0]

    def append(self, rows: torch.Tensor) -> None:
        need = self.n + rows.shape[0]
        if need > self._buf.shape[0]:
            grown = self._buf.new_empty(max(need, 2 * self._buf.shape[0]), self._buf.shape[1])
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown
        self._buf[self.n:need] = rows
        self.n = need

    def view(self) -> torch.Tensor:
        return self._buf[: self.n]

    def reserve(self, extra: int) -> None:
        """Room for `extra` more rows without regrowth (the fused decode step writes its row in place)."""
        need = self.n + extra
        if need > self._buf.shape[0]:
            grown = self._buf.new_empty(max(need, 2 * self._buf.shape[0]), self._buf.shape[1])
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown

    def head(self, rows: int) -> torch.Tensor:
        """The first `rows` rows of the live buffer (writable view; re-fetch after an append)."""
        return self._buf[:rows]

    def nbytes(self) -> int:
        return self.n * self._buf.shape[1] * self._buf.element_size()

    @classmethod
    def from_tensor(cls, rows: torch.Tensor, capacity: int = 0) -> "Rows":
        """A buffer holding a copy of `rows` [n, dim] (room for `capacity` rows): rebuilds a cached state."""
        out = cls(rows.shape[1], rows.device, max(capacity, rows.shape[0]), n=rows.shape[0])
        out._buf[: rows.shape[0]] = rows
        return out


class Pending(_Counted):
    """Compressor input rows not yet pooled: values and scores for positions [start, start + n).
    `_c` = [n, start, retain (-1: None), values address, scores address, capacity rows].

    The rows live in preallocated storage (`capacity` rows: 2 windows for an overlapping compressor, one
    otherwise, all a decode step ever holds), so a decode step writes its row in place and the fused step
    (backends/cpu_decode.py) pools and shifts there: no cat / clone per step. `kv` / `score` are views of
    the live rows; assigning them copies into the storage (growing it if a prefill chunk needs more).
    """

    n = _field(0, "pending rows")
    start = _field(1, "the position of the first pending row")

    def __init__(self, width: int, device="cpu", capacity: int = 0):
        self._c = array.array("q", (0, 0, -1, 0, 0, 0))
        self._kv = torch.empty(capacity, width, device=device)
        self._score = torch.empty(capacity, width, device=device)

    # Set by `mark` for a speculative verify step: the compressor then drops no row at or after this
    # position, so `settle` can cut the rows back to what any accepted prefix needs (None = normal).
    @property
    def retain(self) -> int | None:
        v = self._c[2]
        return None if v < 0 else v

    @retain.setter
    def retain(self, v: int | None) -> None:
        self._c[2] = -1 if v is None else v

    _kv, _score = _synced("_kvt"), _synced("_sct")

    def _sync(self) -> None:
        kv, sc = self.__dict__.get("_kvt"), self.__dict__.get("_sct")
        c = self._c
        c[3] = kv.data_ptr() if kv is not None else 0
        c[4] = sc.data_ptr() if sc is not None else 0
        c[5] = min(t.shape[0] for t in (kv, sc) if t is not None) if kv is not None or sc is not None else 0

    @property
    def kv(self) -> torch.Tensor:
        return self._kv[:self.n]

    @kv.setter
    def kv(self, rows: torch.Tensor) -> None:
        self._kv = self._store(self._kv, rows)

    @property
    def score(self) -> torch.Tensor:
        return self._score[:self.n]

    @score.setter
    def score(self, rows: torch.Tensor) -> None:
        self._score = self._store(self._score, rows)

    def _store(self, buf: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if buf.shape[0] < rows.shape[0]:
            buf = buf.new_empty(rows.shape[0], buf.shape[1])
        elif rows.numel() and rows.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr():
            rows = rows.clone()                          # a view of the storage itself (settle's cut)
        buf[:rows.shape[0]] = rows
        self.n = rows.shape[0]
        return buf

    def reserve(self, rows: int) -> None:
        """Storage for at least `rows` rows, the live ones kept (a decode step writes row n in place)."""
        if self._kv.shape[0] < rows:
            for name in ("_kv", "_score"):
                old = getattr(self, name)
                new = old.new_empty(rows, old.shape[1])
                new[:self.n] = old[:self.n]
                setattr(self, name, new)

    def copy(self) -> "Pending":
        """An independent copy (values, scores, start): a prefix-cache checkpoint of the compressor."""
        out = Pending(self._kv.shape[1], self._kv.device, self._kv.shape[0])
        out.kv, out.score, out.start = self.kv, self.score, self.start
        return out


class LayerState:
    def __setattr__(self, name, value) -> None:
        _STAMP[0] += 1                   # its buffer objects change: the fused step's cached addresses are stale
        object.__setattr__(self, name, value)

    def __init__(self, head_dim: int, window: int, ratio: int, csa: bool, comp_width: int,
                 index_dim: int, index_width: int, device, context: int = 0):
        # `context`: tokens to reserve room for up front (no regrowth below it); 0 = grow on demand.
        self.W = window
        self.kv = Rows(head_dim, device, window + (context // ratio if ratio else 0), n=window)
        self.comp_buf = Pending(comp_width, device, (2 if csa else 1) * ratio) if ratio else None
        self.index_keys = Rows(index_dim, device, context // 4) if csa else None
        self.index_buf = Pending(index_width, device, 8) if csa else None

    @property
    def window(self) -> torch.Tensor:
        """The ring of raw KV rows [W, D] (a view into `kv`)."""
        return self.kv.head(self.W)

    @property
    def n_comp(self) -> int:
        return self.kv.n - self.W

    def nbytes(self) -> int:
        total = 0
        for rows in (self.kv, self.index_keys):
            total += rows.nbytes() if rows is not None else 0
        for p in (self.comp_buf, self.index_buf):
            total += (p.kv.numel() + p.score.numel()) * 4 if p is not None else 0
        return total


class SequenceState:
    def __init__(self, cfg, device="cpu", context: int = 0):
        self.cfg, self.device, self.context = cfg, device, context
        self.reset()

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def reset(self) -> None:
        cfg = self.cfg
        self.pos = 0          # tokens consumed by the main model
        self.mtp_pos = 0      # tokens consumed by the MTP block(s)
        self.marked = None    # the Mark of a speculative step in progress (`mark` .. `settle`)
        self.layers = []
        for layer in range(cfg.num_layers + cfg.num_mtp):
            ratio, csa = cfg.ratio(layer), cfg.is_csa(layer)
            coff = 2 if csa else 1
            self.layers.append(LayerState(cfg.head_dim, cfg.window, ratio, csa, coff * cfg.head_dim,
                                          cfg.index_head_dim, coff * cfg.index_head_dim, self.device,
                                          self.context))


class StateBatch:
    """A batch of independent sequence states (any model's: each has `pos`, `reset()` and `nbytes()`);
    `rt.forward(ids, state=...)` continues them."""

    def __init__(self, seqs: list):
        self.seqs = seqs

    @property
    def batch_size(self) -> int:
        return len(self.seqs)

    @property
    def positions(self) -> list[int]:
        return [s.pos for s in self.seqs]

    def reset(self, i: int | None = None) -> None:
        for s in (self.seqs if i is None else [self.seqs[i]]):
            s.reset()

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.seqs)


class ModelState(StateBatch):
    """The torch model's state of a batch of sequences (`Transformer.new_state`), for prefill and decode alike."""

    def __init__(self, cfg, batch_size: int, device="cpu", context: int = 0):
        super().__init__([SequenceState(cfg, device, context) for _ in range(batch_size)])


# ---------------------------------------------------------------- speculative steps: mark / settle
# A verify step feeds S tokens (the decided one plus drafts) and may keep only a prefix of them. What such
# a forward changes in a sequence's main-model layers: the ring slots of its S positions, the compressed
# entries and indexer keys whose windows close inside the chunk (appended rows), the compressors' pending
# rows, and `pos`. `mark` only notes the step; the forward that runs then saves what it overwrites, in its own
# way (`Mark.rings` / `Mark.undo`), and `settle(keep)` undoes exactly the rejected positions. Nothing of a
# rejected position survives; the MTP block's layers are never touched.
# - The per-op path (`arm`, called by Transformer.forward before its blocks): the ring rows it will overwrite
#   are copied and the compressors keep every pending row (`Pending.retain`); settle puts back the ring rows,
#   cuts the appended rows to the windows the kept prefix closes and the pending rows to exactly the ones a
#   sequence at that position holds.
# - A fused path that runs the chunk's rows as one-token steps in place (backends/cpu_decode_rows.py) copies
#   the ring rows and the pending rows its rows overwrite and hands settle its own `restore` (the counters
#   are then those of a sequence at the kept position, the rule below); its rows are bit-identical to
#   one-token steps (`Mark.exact_rows`), so a verify step may keep the decided token's row instead of feeding
#   it again.


class Mark:
    def __init__(self, pos: int, S: int):
        self.pos, self.S = pos, S
        self.rings: list | None = None     # the per-op path's saved ring rows (`arm`)
        self.undo = None                   # a fused path's record, given to `restore(seq, mark, keep)`
        self.restore = None

    @property
    def exact_rows(self) -> bool:
        """Whether the marked forward ran its rows exactly as one-token steps (a fused path)."""
        return self.restore is not None


def _pending_start(end: int, m: int, overlap: bool) -> int:
    """The first position a compressor's pending rows hold once `end` tokens are in (see Compressor.advance):
    the open window, and for an overlapping compressor also the last closed one."""
    closed = end // m
    return closed * m - (m if overlap and closed > 0 else 0)


def mark(seq: SequenceState, S: int) -> Mark:
    """Prepare `seq` for a forward of S tokens that `settle` may partly undo."""
    m = Mark(seq.pos, S)
    seq.marked = m
    return m


def arm(seq: SequenceState) -> None:
    """The per-op path's preparation of a marked sequence (before its forward changes anything)."""
    m = seq.marked
    if m is None or m.rings is not None or m.restore is not None:
        return
    cfg, rings = seq.cfg, []
    for layer in seq.layers[:cfg.num_layers]:
        slots = (seq.pos + torch.arange(min(m.S, layer.W), device=layer.kv.view().device)) % layer.W
        rings.append((slots, layer.window[slots].clone()))
        for buf in (layer.comp_buf, layer.index_buf):
            if buf is not None:
                buf.retain = buf.start
    m.rings = rings


def settle(seq: SequenceState, m: Mark, keep: int) -> None:
    """Keep the first `keep` of the S tokens fed since `mark(seq, S)`; drop every trace of the others."""
    cfg = seq.cfg
    if seq.pos != m.pos + m.S or not 0 <= keep <= m.S or seq.marked is not m:
        raise ValueError(f"settle: sequence at {seq.pos}, marked at {m.pos} for {m.S} tokens, keep {keep}")
    seq.marked = None
    new = m.pos + keep
    if m.restore is not None:
        m.restore(seq, m, keep)
        seq.pos = new
        return
    if m.rings is None:
        raise ValueError("settle: the marked forward saved nothing to undo (was it a forward of the marked chunk?)")
    for i, (layer, (slots, rows)) in enumerate(zip(seq.layers[:cfg.num_layers], m.rings)):
        if keep < slots.shape[0]:
            layer.window[slots[keep:]] = rows[keep:]
        ratio = cfg.ratio(i)
        if ratio:
            layer.kv.n = layer.W + new // ratio
            _cut(layer.comp_buf, new, ratio, cfg.is_csa(i))
        if layer.index_buf is not None:
            layer.index_keys.n = new // 4
            _cut(layer.index_buf, new, 4, True)
    seq.pos = new


def _cut(buf: Pending, end: int, m: int, overlap: bool) -> None:
    start = _pending_start(end, m, overlap)
    if start < buf.start:
        raise ValueError(f"settle: pending rows start at {buf.start}, need {start} (was the state marked?)")
    lo, hi = start - buf.start, end - buf.start
    buf.kv, buf.score, buf.start, buf.retain = buf.kv[lo:hi].clone(), buf.score[lo:hi].clone(), start, None
