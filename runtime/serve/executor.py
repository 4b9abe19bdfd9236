"""The model side of the engine: sequence states, the prefix cache and the forwards (one device or lockstep).

`Executor` runs what the engine's scheduler decides: `admit` (fresh state, prefix-cache restore), `prefill`
(one cache block of a prompt), `decode` (one batched forward of many sequences), `free`. The scheduler
(engine.py) never touches the model or the cache directly, so the same scheduler drives several devices.

Multi-device (`python -m runtime.serve --tp/--ep` under torchrun): rank 0 serves HTTP and schedules; its
`LeadExecutor` broadcasts every call as a small int64 command before running it, and every other rank runs
`follow`, which replays the commands on its own shards (`Executor` on a runtime loaded with the same layout)
with its own prefix cache. The model's collectives (TP all-reduce, vocab all-gather, EP all-reduce) then pair
up because every rank runs the same forwards in the same order. Sampling happens on rank 0 only: the tokens
it chose travel in the next `decode` command (as `broadcast_tokens` does for `generate`). The prefix cache
needs no traffic: its decisions depend only on the prompts and on state sizes, which are the same on every
rank (the KV head, compressor and indexer keys are replicated under TP / EP), so every rank's cache holds the
same blocks; a follower checks that its hit equals rank 0's and stops with one line otherwise.
While idle, rank 0 sends a heartbeat every HEARTBEAT_S so that followers waiting for the next command never
reach the collective timeout; a rank that dies or hangs makes the next collective fail within the profile's
`collective_timeout_s` (CollectiveError, one line) on every other rank. No pickle: commands are int64 tensors.
"""

from __future__ import annotations

import array
import time
from types import SimpleNamespace

import torch

from ..errors import V4Error

HEARTBEAT_S = 1.0
HEADER = 80                   # int64 slots per command broadcast; a longer payload follows in a second one
NOOP, ADMIT, PREFILL, DECODE, FREE, STOP = range(6)


class Executor:
    """One device (or one rank's shard): `seq` objects carry .id, .prompt, .state, .done_tokens, .cached_tokens."""

    def __init__(self, rt, cache=None, block: int = 128, mtp: bool = False):
        self.model, self.cfg, self.cache = rt.model, rt.config, cache
        self.block = cache.block if cache is not None else block
        self.mtp = mtp                        # speculative: prefill the MTP block too (seq.hid: its carry)
        self._steady = None                   # the backend's steady batch of the last decode (see decode)

    def admit(self, seq) -> int:
        """Fresh state for `seq`, restored from the prefix cache where possible -> cached prompt tokens."""
        seq.state = self.model.new_state(1, 0).seqs[0]
        hit = 0
        if self.cache is not None:
            hit, chain = self.cache.lookup(seq.prompt)
            if hit:
                self.cache.restore(chain, seq.state)
        seq.done_tokens = seq.cached_tokens = hit
        return hit

    def prefill(self, seq):
        """Prefill the next block of seq's prompt -> (tokens fed, last logits [V] float32 if the prompt is done)."""
        start, B, cache = seq.done_tokens, self.block, self.cache
        end = min((start // B + 1) * B, len(seq.prompt))
        whole = end % B == 0
        before = cache.mark(seq.state, self.cfg.num_layers) if cache is not None and whole else None
        chunk = torch.tensor([seq.prompt[start:end]])
        if self.mtp:
            from .speculate import prefill_mtp
            logits = prefill_mtp(self.model, seq, chunk)
        else:
            logits = self.model.forward(chunk, [seq.state])
        seq.done_tokens = end
        if before is not None:
            k = end // B - 1
            cache.store(cache.keys(seq.prompt, k + 1)[k], seq.state, before,
                        cache.wants_checkpoint(k, len(seq.prompt)))
        return end - start, (logits[0, -1].float().cpu() if end == len(seq.prompt) else None)

    def decode(self, seqs, tokens: list[int]) -> torch.Tensor:
        """One forward of every sequence's next token (ragged positions) -> logits [n, V] float32 (valid until
        the next call: the steady batch reuses its buffers)."""
        states = [s.state for s in seqs]
        # the same batch as the last step (most steps): the backend's steady batch where it has one (the fused
        # CPU step: its buffers and the sequences' state addresses built once per batch, no model.forward);
        # rebuilt when a sequence joins or leaves; None from it: this step takes the general path
        sb = self._steady
        if sb is None or not sb.fits(states):
            make = getattr(self.model.ops.decode_block, "step_batch", None)
            sb = self._steady = make(self.model, states) if make is not None else None
        if sb is not None:
            out = sb.run(states, tokens)
            if out is not None:
                return out
        # ids from an int64 array: a third of torch.tensor(list)'s cost; the logits shaped by the model (`last`)
        # and no no-op conversions: a torch call after the fused step's native call costs ~10 us (cold caches)
        ids = torch.frombuffer(array.array("q", tokens), dtype=torch.int64).view(-1, 1)
        out = self.model.forward(ids, states, last=True)
        if out.dtype is not torch.float32:
            out = out.float()
        return out if out.is_cpu else out.cpu()

    def free(self, seq) -> None:
        seq.state = None
        self._steady = None                   # it may hold the state: freed now, not at the next batch

    def idle(self) -> None:
        """Called by the engine loop while nothing runs."""

    def close(self) -> None:
        """The engine stopped."""


class LeadExecutor(Executor):
    """Rank 0 of a multi-device server: every call is broadcast to the followers, then run here."""

    def __init__(self, rt, cache=None, block: int = 128):
        super().__init__(rt, cache, block)
        self.par = rt.parallel
        self.last = time.monotonic()
        self.closed = False

    def _send(self, op: int, payload: list[int]) -> None:
        send(self.par, op, payload)
        self.last = time.monotonic()

    def admit(self, seq) -> int:
        hit = super().admit(seq)
        self._send(ADMIT, [seq.id, hit, *seq.prompt])
        return hit

    def prefill(self, seq):
        self._send(PREFILL, [seq.id])
        return super().prefill(seq)

    def decode(self, seqs, tokens):
        self._send(DECODE, [len(seqs), *(s.id for s in seqs), *tokens])
        return super().decode(seqs, tokens)

    def free(self, seq) -> None:
        if seq.state is not None:
            self._send(FREE, [seq.id])
        super().free(seq)

    def idle(self) -> None:
        if time.monotonic() - self.last >= HEARTBEAT_S:
            self._send(NOOP, [])

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._send(STOP, [])


class ReplicaMismatch(V4Error):
    """A follower's prefix cache disagreed with rank 0's (a bug: the ranks' states differ)."""

    exit_status = 1
    leave_at_once = True


def send(par, op: int, payload: list[int]) -> None:
    import torch.distributed as dist

    head = torch.zeros(HEADER, dtype=torch.int64)
    head[0], head[1] = op, len(payload)
    inline = payload[:HEADER - 2]
    head[2:2 + len(inline)] = torch.tensor(inline, dtype=torch.int64)
    par._call("serve command broadcast", lambda: dist.broadcast(head, src=0, async_op=True))
    if len(payload) > HEADER - 2:
        rest = torch.tensor(payload[HEADER - 2:], dtype=torch.int64)
        par._call("serve command broadcast", lambda: dist.broadcast(rest, src=0, async_op=True))


def receive(par) -> tuple[int, list[int]]:
    import torch.distributed as dist

    head = torch.empty(HEADER, dtype=torch.int64)
    par._call("serve command broadcast (waiting for rank 0)", lambda: dist.broadcast(head, src=0, async_op=True))
    op, n = int(head[0]), int(head[1])
    payload = head[2:2 + min(n, HEADER - 2)].tolist()
    if n > HEADER - 2:
        rest = torch.empty(n - (HEADER - 2), dtype=torch.int64)
        par._call("serve command broadcast (waiting for rank 0)", lambda: dist.broadcast(rest, src=0, async_op=True))
        payload += rest.tolist()
    return op, payload


def follow(ex: Executor, par) -> int:
    """A follower rank's loop: replay rank 0's commands until STOP -> number of commands run."""
    seqs: dict[int, SimpleNamespace] = {}
    n = 0
    with torch.inference_mode():
        while True:
            op, p = receive(par)
            n += 1
            if op == STOP:
                return n
            if op == ADMIT:
                seq = seqs[p[0]] = SimpleNamespace(id=p[0], prompt=p[2:], state=None, done_tokens=0,
                                                   cached_tokens=0)
                hit = ex.admit(seq)
                if hit != p[1]:
                    raise ReplicaMismatch(f"rank {par.rank}: prefix cache hit of {hit} tokens where rank 0 had "
                                          f"{p[1]}; the ranks' states differ: restart with --cache-mb 0 and "
                                          "report this")
            elif op == PREFILL:
                ex.prefill(seqs[p[0]])
            elif op == DECODE:
                k = p[0]
                ex.decode([seqs[i] for i in p[1:1 + k]], p[1 + k:1 + 2 * k])
            elif op == FREE:
                ex.free(seqs.pop(p[0]))
