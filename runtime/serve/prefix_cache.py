"""Exact prefix caching for V4's hybrid state (issue 16 item 5).

A sequence's state per layer is the sliding-window ring, the compressed entries, the compressors' pending
rows and (CSA) the indexer keys. Compressed entries and indexer keys depend only on the prefix; the ring and
the pending rows only on the last tokens before a boundary. So the cache keeps, per block of `block` tokens
(a multiple of 128, so every compression ratio closes its windows on the boundary):
- the entries and indexer keys the block appended (every block), and
- a checkpoint of the ring and both compressors' pending rows after the block, at every
  `checkpoint_every`-th block and at the last whole block of each prompt (a request boundary).
A hit restores the longest cached chain of blocks that ends in a checkpoint: entries concatenated, ring and
pending rows copied from that checkpoint, never from another request's live state (the stale-ring bug of
ROCm/ATOM #1417). Because the engine prefills every prompt in chunks that are exactly these blocks, the
restored state is the one a cold prefill reaches, bit for bit, and so are the logits after it.

Keys chain a hash over the block's token ids and its parent's key, so a block is found only under the same
whole prefix. Entries live in one LRU under a byte budget; a lookup touches its chain leaf first, so the
chain's root is the most recent and leaves are evicted before the prefixes they extend.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..model.state import Rows, SequenceState

ROOT = b"dsv4rt-prefix"


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


@dataclass
class Checkpoint:
    windows: list          # per layer: ring [W, D] copy
    comp: list             # per layer: Pending copy or None
    index: list            # per layer: Pending copy or None

    def nbytes(self) -> int:
        n = sum(_nbytes(w) for w in self.windows)
        for p in self.comp + self.index:
            if p is not None:
                n += _nbytes(p.kv, p.score)
        return n


@dataclass
class Block:
    key: bytes
    entries: list          # per layer: compressed entries this block appended [n, D] (or None: no compressor)
    keys: list             # per layer: indexer keys this block appended (or None)
    ckpt: Checkpoint | None
    nbytes: int


class PrefixCache:
    def __init__(self, num_layers: int, block: int = 128, checkpoint_every: int = 4, budget_bytes: int = 256 << 20):
        if block <= 0 or block % 128:
            raise ValueError(f"prefix-cache block must be a positive multiple of 128, got {block}")
        self.L, self.block, self.every, self.budget = num_layers, block, max(1, checkpoint_every), budget_bytes
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()
        self.queries = self.hits = self.hit_tokens = self.evictions = 0

    # ---------------------------------------------------------------- keys
    def keys(self, ids: list[int], n_blocks: int) -> list[bytes]:
        out, key = [], ROOT
        arr = np.asarray(ids[: n_blocks * self.block], dtype=np.int64)
        for b in range(n_blocks):
            key = hashlib.blake2b(key + arr[b * self.block:(b + 1) * self.block].tobytes(), digest_size=16).digest()
            out.append(key)
        return out

    # ---------------------------------------------------------------- lookup / restore
    def lookup(self, ids: list[int]) -> tuple[int, list[Block]]:
        """(tokens covered, the chain of blocks) of the longest usable hit for a prompt. At least one token is
        always left to prefill (its logits choose the first output token)."""
        usable = (len(ids) - 1) // self.block
        with self.lock:
            self.queries += 1
            chain: list[Block] = []
            for key in self.keys(ids, usable):
                blk = self.blocks.get(key)
                if blk is None:
                    break
                chain.append(blk)
            while chain and chain[-1].ckpt is None:        # a hit must end where a ring was checkpointed
                chain.pop()
            for blk in reversed(chain):                       # leaf first: the root ends most recent
                self.blocks.move_to_end(blk.key)
            if chain:
                self.hits += 1
                self.hit_tokens += len(chain) * self.block
        return len(chain) * self.block, chain

    def restore(self, chain: list[Block], seq: SequenceState) -> None:
        """Rebuild fresh sequence state `seq` at the end of `chain` (copies; the cache keeps its own)."""
        ck = chain[-1].ckpt
        for i in range(self.L):
            st = seq.layers[i]
            parts = [ck.windows[i]] + [b.entries[i] for b in chain if b.entries[i] is not None]
            st.kv = Rows.from_tensor(torch.cat(parts), st.kv._buf.shape[0])
            if st.index_keys is not None:
                ks = [b.keys[i] for b in chain if b.keys[i] is not None]
                if ks:
                    st.index_keys = Rows.from_tensor(torch.cat(ks), st.index_keys._buf.shape[0])
            if st.comp_buf is not None:
                st.comp_buf = ck.comp[i].copy()
            if st.index_buf is not None:
                st.index_buf = ck.index[i].copy()
        seq.pos = len(chain) * self.block

    # ---------------------------------------------------------------- store
    @staticmethod
    def mark(seq: SequenceState, num_layers: int) -> list[tuple[int, int]]:
        """Row counts (compressed entries incl. ring, indexer keys) per layer, taken before a block runs."""
        return [(seq.layers[i].kv.n, seq.layers[i].index_keys.n if seq.layers[i].index_keys is not None else 0)
                for i in range(num_layers)]

    def store(self, key: bytes, seq: SequenceState, before: list[tuple[int, int]], checkpoint: bool) -> None:
        """Record the block that just ran on `seq` (its rows past `before`) under `key`."""
        with self.lock:
            blk = self.blocks.get(key)
            if blk is not None and (blk.ckpt is not None or not checkpoint):
                self.blocks.move_to_end(key)
                return
        entries, keys = [], []
        for i in range(self.L):
            st, (kv_n, ik_n) = seq.layers[i], before[i]
            entries.append(st.kv.view()[kv_n:].clone() if st.comp_buf is not None else None)
            keys.append(st.index_keys.view()[ik_n:].clone() if st.index_keys is not None else None)
        ck = None
        if checkpoint:
            L = range(self.L)
            ck = Checkpoint([seq.layers[i].window.clone() for i in L],
                            [seq.layers[i].comp_buf.copy() if seq.layers[i].comp_buf is not None else None for i in L],
                            [seq.layers[i].index_buf.copy() if seq.layers[i].index_buf is not None else None for i in L])
        size = sum(_nbytes(t) for t in entries + keys) + (ck.nbytes() if ck else 0)
        with self.lock:
            old = self.blocks.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            self.blocks[key] = Block(key, entries, keys, ck, size)
            self.bytes += size
            while self.bytes > self.budget and self.blocks:
                _, ev = self.blocks.popitem(last=False)
                self.bytes -= ev.nbytes
                self.evictions += 1

    def wants_checkpoint(self, block_index: int, prompt_len: int) -> bool:
        """Checkpoint after block `block_index` (0-based)? Every `every`-th block, and the prompt's last whole
        block (where a follow-up request that extends this prompt will resume)."""
        end = (block_index + 1) * self.block
        return (block_index + 1) % self.every == 0 or end + self.block > prompt_len

