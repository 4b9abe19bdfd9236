"""The continuous-batching engine: one loop, many sequences, one batched decode forward per step.

Each step: cancelled sequences are dropped (their state freed); waiting sequences join while fewer than
`max_num_seqs` run and the memory plan says their state fits; sequences still prefilling advance by whole
cache blocks under a token budget (`prefill_tokens` per step, at least one block); then every decoding
sequence feeds its last token through ONE forward (ragged positions: each sequence continues at its own
position). Prefill chunks are the prefix cache's blocks at absolute positions [k*block, (k+1)*block), one
sequence per forward, so a prompt's prefill is the same computation whoever else is running and whether or
not a prefix came from the cache. The model runs the table's ops padded to a fixed row count
(`invariant.py`), so a decode row's bits do not depend on the batch either.

The scheduler never touches the model or the cache itself: an `Executor` (executor.py) runs admit / prefill /
decode / free, on this device or, under torchrun, on every rank in lockstep. `speculative="mtp"` replaces the
decode forward by speculate.py's batched draft-and-verify step.

A sequence talks to its HTTP handler through an `Output` (output.py), called on the engine thread:
`constrain(logits)` (grammar masks; `constrained` False: none, the batch's greedy argmax serves it),
`token(id, logprobs) -> stop?` and `finish(reason)`. A failure in one sequence's token choice or output
finishes it alone with reason "error" (`seq.error`); only a failed forward fails every running sequence.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..errors import InputError, V4Error
from ..sampling import SamplingParams, sample
from .executor import Executor
from .metrics import Metrics, observe_n
from .invariant import serving_runtime  # noqa: F401  (re-exported: the CLI, the bench and tests import it here)
from .prefix_cache import PrefixCache


class QueueFull(V4Error):
    """The engine's queue is full (HTTP 503 with Retry-After)."""


class NoMemory(V4Error):
    """The request's state does not fit the memory plan (HTTP 503)."""


class EngineStopped(V4Error):
    """The engine stopped for good (a peer rank of a multi-device server was lost): HTTP 503."""


@dataclass
class GenParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None          # None: off; k >= 0: the chosen token's logprob and the top k
    stop_token_ids: frozenset = frozenset()
    ignore_eos: bool = False


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: GenParams
    output: object
    id: int = field(default_factory=lambda: next(_ids))
    state: object = None
    done_tokens: int = 0                  # prompt tokens consumed into the state
    cached_tokens: int = 0
    out: list[int] = field(default_factory=list)
    status: str = "waiting"               # waiting | prefill | decode | done
    cancelled: bool = False
    gen: torch.Generator | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_last: float = 0.0
    finish_reason: str | None = None
    hid: torch.Tensor | None = None       # speculative: final streams awaiting the MTP block [1, n, hc, d]
    nexts: list | None = None             # speculative: the token after each of them (the last one unfed)
    greedy: bool = False                  # temperature 0 and no grammar (set by submit): the batch's argmax
    error: str | None = None              # why it finished with reason "error"


class Engine:
    def __init__(self, rt, max_num_seqs: int = 32, max_queue: int = 256, prefill_tokens: int = 512,
                 cache: PrefixCache | None = None, block: int = 128, metrics: Metrics | None = None,
                 executor: Executor | None = None, speculative: str | None = None, draft=None):
        self.rt, self.model, self.cfg = rt, rt.model, rt.config
        self.max_num_seqs, self.max_queue = max_num_seqs, max_queue
        self.block = cache.block if cache is not None else block
        self.prefill_tokens = max(prefill_tokens, self.block)
        self.cache, self.metrics = cache, metrics or Metrics()
        self.metrics.state_bytes.set_function(self.state_bytes)   # computed when scraped, not every step
        self.spec = 0                          # tokens a step may feed past the last emitted one
        if speculative is not None:
            from .speculate import check
            check(rt, speculative, cache, executor)
            self.spec = 1
        self.draft = draft                     # speculative: a draft function instead of the MTP block
        # the model side: this process's device, or rank 0 of a lockstep multi-device server (executor.py)
        self.exec = executor or Executor(rt, cache, self.block, mtp=speculative is not None)
        rows = max_num_seqs * (1 + self.spec)
        if rows > getattr(rt, "decode_rows", rows):
            raise InputError(f"{max_num_seqs} sequences per step feed {rows} rows, more than the {rt.decode_rows} "
                             "the runtime's batch-invariant layout was built for; pass the same bound to "
                             "serving_runtime(rt, decode_rows)")
        self.fatal = False                    # a lost peer rank: the engine has stopped for good
        self.on_fatal = None                  # callback(message) when that happens (the CLI stops the server)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.cv = threading.Condition()
        self.stopped = False
        self.steps = 0
        self._cancels = 0                     # cancel() calls since the last _reap (under cv)
        self._counts = None                   # (running, waiting) as the gauges last showed them
        self.error: str | None = None
        self.thread = threading.Thread(target=self._loop, name="dsv4-engine", daemon=True)

    # ------------------------------------------------------------------ public (any thread)
    def start(self) -> "Engine":
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify_all()
        self.thread.join(timeout=10)
        if not self.thread.is_alive() and not self.fatal:
            try:
                self.exec.close()               # followers of a multi-device server leave their loop
            except V4Error as e:                # a peer rank already gone
                self.error, self.fatal = e.args[0] if e.args else str(e), True

    def submit(self, seq: Sequence) -> Sequence:
        """Queue a sequence; raises InputError (too long), NoMemory, QueueFull or EngineStopped."""
        if self.fatal:
            raise EngineStopped(f"the engine stopped: {self.error}")
        need = len(seq.prompt) + seq.params.max_tokens + self.spec
        if need > self.cfg.max_position:
            raise InputError(f"prompt ({len(seq.prompt)} tokens) + max_tokens ({seq.params.max_tokens}) exceeds the "
                             f"model's {self.cfg.max_position}-token context; shorten the prompt or max_tokens")
        try:
            self.rt.memory.check([need])
        except InputError as e:
            raise NoMemory(f"request state does not fit the memory plan: {e}") from None
        p = seq.params
        # the batch argmax is `_pick`'s choice for a row no grammar masks (an output without `constrained`: none)
        seq.greedy = p.temperature == 0 and not getattr(seq.output, "constrained", False)
        if p.temperature > 0:
            seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            seq.gen = torch.Generator().manual_seed(seed)
        with self.cv:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests); retry shortly")
            self.waiting.append(seq)
            self.cv.notify_all()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Cancel (client gone, stop string seen elsewhere): its state is freed at the start of the next step."""
        with self.cv:
            seq.cancelled = True
            self._cancels += 1
            self.cv.notify_all()

    def state_bytes(self) -> int:
        # read at each /metrics scrape (the gauge's function) from the HTTP thread: a snapshot of the list,
        # and a state freed meanwhile counts 0
        return sum(st.nbytes() for st in [s.state for s in list(self.running)] if st is not None)

    def idle(self) -> bool:
        with self.cv:
            return not self.running and not self.waiting

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        with torch.inference_mode():          # once for the thread, not per step (~2 us of a step's host time)
            self._run()

    def _run(self) -> None:
        while True:
            try:
                if self.running and not self.stopped:
                    # busy (the common case, one step after the other): no lock needed to know it, and the
                    # loop's lock and checks cost ~2 us a step with caches cold after the native call
                    self.step()
                    continue
                with self.cv:
                    if not self.stopped and not self.running and not self.waiting:
                        self.cv.wait(timeout=0.25)
                    if self.stopped:
                        return
                    busy = bool(self.running or self.waiting)
                if not busy:
                    self.exec.idle()            # multi-device: the followers' heartbeat (outside the lock)
                    continue
                self.step()
            except Exception as e:
                self.error = e.args[0] if isinstance(e, V4Error) and e.args else f"{type(e).__name__}: {e}"
                if self.rt.parallel is not None and self.rt.parallel.distributed:
                    self._die()                # the ranks may no longer run the same steps: stop for good
                    return
                for s in list(self.running):    # a bug: fail the sequences in flight, keep serving
                    s.error = s.error or self.error
                    self._finish(s, "error")
                self.running.clear()

    def _die(self) -> None:
        self.fatal = True
        with self.cv:
            gone, self.waiting = list(self.waiting), deque()
        for s in list(self.running) + gone:
            s.state = None                     # no FREE command: the peers are gone or out of step
            s.error = self.error
            self._finish(s, "error")
        self.running.clear()
        if self.on_fatal is not None:
            self.on_fatal(self.error)

    def step(self) -> None:
        self.steps += 1
        self._reap()
        self._admit()
        budget = self.prefill_tokens
        for seq in [s for s in self.running if s.status == "prefill"]:
            while budget > 0 and seq.status == "prefill" and not seq.cancelled:
                budget -= self._prefill_chunk(seq)
        dec = [s for s in self.running if s.status == "decode" and not s.cancelled]
        if dec and self.spec:
            from .speculate import decode_step
            decode_step(self, dec)
        elif dec:
            self._decode(dec)
        self.running = [s for s in self.running if s.status != "done"]
        m = self.metrics
        counts = (len(self.running), len(self.waiting))
        if counts != self._counts:            # the gauges change only when sequences come or go
            self._counts = counts
            m.running.set(counts[0])
            m.waiting.set(counts[1])
        if self.cache is not None:
            m.cache_bytes.set(self.cache.bytes)

    def _reap(self) -> None:
        if not self._cancels:                 # nothing cancelled since the last reap (the common step)
            return
        with self.cv:
            self._cancels = 0
            gone = [s for s in self.waiting if s.cancelled]
            for s in gone:
                self.waiting.remove(s)
        dead = gone + [s for s in self.running if s.cancelled]
        for s in dead:
            self._finish(s, "cancelled")
        if dead:                              # (a step's finished sequences leave at its end)
            self.running = [s for s in self.running if s.status != "done"]

    def _admit(self) -> None:
        if not self.waiting:                  # read without the lock: a sequence queued meanwhile joins next step
            return
        while True:
            with self.cv:
                if not self.waiting or len(self.running) >= self.max_num_seqs:
                    return
                seq = self.waiting[0]
                lengths = [len(s.prompt) + s.params.max_tokens for s in self.running + [seq]]
                try:
                    self.rt.memory.check(lengths)
                except InputError:
                    if self.running:           # wait for memory to free up
                        return
                self.waiting.popleft()
            hit = self.exec.admit(seq)
            if self.cache is not None:
                self.metrics.cache_queries.inc()
                if hit:
                    self.metrics.cache_hits.inc()
                    self.metrics.cached_tokens.inc(hit)
            seq.status = "prefill"
            self.running.append(seq)

    # ------------------------------------------------------------------ prefill / decode
    def _prefill_chunk(self, seq: Sequence) -> int:
        n, last = self.exec.prefill(seq)
        self.metrics.prompt_tokens.inc(n)
        if last is not None:
            seq.status = "decode"
            try:
                self._emit(seq, last)
            except Exception as e:            # this sequence's own token choice / output: it alone fails
                self.fail(seq, e)
            seq.nexts = seq.out[-1:]
        return n

    def _decode(self, seqs: list[Sequence]) -> None:
        logits = self.exec.decode(seqs, [s.out[-1] for s in seqs])
        # greedy rows without a grammar: one argmax over the whole batch, not one sampling call per sequence:
        # the fused step's own (`argmax_rows`, found while the logits were in cache) or numpy's (a tenth of
        # torch's cost on a [16, V] batch); both the first maximum, a NaN first, as `sample`'s torch argmax
        top = getattr(logits, "argmax_rows", None)
        if top is None:
            top = logits.numpy().argmax(-1).tolist()
        # the step's tokens share one timestamp, so their inter-token latencies come in a few equal values:
        # the histogram takes each value once with its count (per-token observes were ~30% of a 16-row
        # step's host time)
        now, itl = time.perf_counter(), {}
        eos, last = self.cfg.eos_token_id, self.cfg.max_position - 1 - self.spec
        for i, s in enumerate(seqs):
            p = s.params
            try:                              # (Python 3.11's try costs nothing when nothing raises)
                if not s.greedy:
                    self._take(s, self._pick(s, logits[i]), logits, i, now, itl)
                elif p.logprobs is not None or not s.out:
                    self._take(s, top[i], logits, i, now, itl)
                else:
                    # _take for the common row (greedy, no logprobs, not the first token), inline: a 16-row step
                    # ran _take's general path for a third of its host time after the native call
                    tok = top[i]
                    d = now - s.t_last
                    itl[d] = itl.get(d, 0) + 1
                    s.t_last = now
                    s.out.append(tok)
                    stop = s.output.token(tok, None)
                    if (tok == eos and not p.ignore_eos) or tok in p.stop_token_ids or stop:
                        self._finish(s, "stop")
                    elif len(s.out) >= p.max_tokens or s.state.pos >= last:
                        self._finish(s, "length")
            except Exception as e:            # one row's sampling / grammar / output failed: that row alone
                self.fail(s, e)
        m = self.metrics
        for d, n in itl.items():
            observe_n(m.itl, d, n)
        m.generation_tokens.inc(len(seqs))

    def _emit(self, seq: Sequence, row: torch.Tensor) -> None:
        """Choose seq's next token from its logits row [V], hand it to its output, finish if it stopped."""
        self._take(seq, self._pick(seq, row), row)

    def _pick(self, seq: Sequence, row: torch.Tensor) -> int:
        """seq's next token from its logits row [V] (grammar masks, then its sampling parameters)."""
        p = seq.params
        row = seq.output.constrain(row.clone()) if hasattr(seq.output, "constrain") else row
        return int(sample(row[None], SamplingParams(p.temperature, p.top_p, None, p.max_tokens), seq.gen)[0])

    def _take(self, seq: Sequence, tok: int, raw: torch.Tensor, row: int | None = None, now: float | None = None,
              itl: dict | None = None) -> None:
        """Emit token `tok` chosen from logits `raw` [V] (or, with `row`, raw[row] of a batch's [n, V]; its
        logprobs come from them); finish if it stopped. A batch's tokens pass the step's time `now` and a
        dict `itl` collecting their inter-token latencies (and count themselves: the caller adds them to the
        metrics); alone, a token records its own."""
        p = seq.params
        lp = None
        if p.logprobs is not None:
            logp = torch.log_softmax(raw if row is None else raw[row], -1)
            top = torch.topk(logp, p.logprobs) if p.logprobs else None
            lp = (float(logp[tok]), [] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))
        if now is None:
            now = time.perf_counter()
        if not seq.out:
            self.metrics.ttft.observe(now - seq.t_submit)
        elif itl is None:
            self.metrics.itl.observe(now - seq.t_last)
        else:
            d = now - seq.t_last
            itl[d] = itl.get(d, 0) + 1
        seq.t_last = now
        seq.out.append(tok)
        if itl is None:
            self.metrics.generation_tokens.inc()
        eos = tok == self.cfg.eos_token_id and not p.ignore_eos
        stop = seq.output.token(tok, lp)
        if eos or tok in p.stop_token_ids or stop:
            self._finish(seq, "stop")
        elif len(seq.out) >= p.max_tokens or seq.state.pos + 1 + self.spec >= self.cfg.max_position:
            self._finish(seq, "length")

    def fail(self, seq: Sequence, e: Exception) -> None:
        """Finish `seq` alone with reason "error" after `e` (raised by its own token choice or output)."""
        if seq.status == "done":           # it raised while its state was freed (a multi-device FREE command):
            raise e                        # the executor's failure, for the loop's handler, not this row's
        seq.error = e.args[0] if isinstance(e, V4Error) and e.args else f"{type(e).__name__}: {e}"
        self._finish(seq, "error")

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.status == "done":
            return
        seq.status, seq.finish_reason = "done", reason
        self.metrics.requests.labels(reason).inc()
        if seq.state is not None:
            self.exec.free(seq)                    # the state is freed here (on every rank)
        try:
            seq.output.finish(reason)
        except Exception as e:                     # a handler's bug must not stop the loop; the request fails
            seq.finish_reason, seq.error = "error", f"{type(e).__name__}: {e}"
