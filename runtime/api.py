"""The Python API: `Runtime.load(...)`, `forward`, `new_state`, `generate`.

    from runtime import Runtime
    rt = Runtime.load("cpu")                          # the shipped default model, exact float32
    logits = rt.forward([[0, 72, 105]])               # [B, S, vocab] float32, fresh sequences
    state = rt.new_state(batch_size=1)
    rt.forward(ids_chunk, state=state)                # continue sequences chunk by chunk
    rt.generate("Hello", max_new_tokens=16, temperature=0.8, top_p=0.9, seed=1)
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from backends import get_backend, names as backend_names

from .checkpoint.builtin import default_checkpoint
from .checkpoint import CheckpointReader
from .dispatch import DispatchTable, Resolution, resolve
from .errors import InputError, V4Error
from .model.state import StateBatch
from .nonfinite import finite, raise_non_finite
from .model.v4 import Transformer
from .ops.numerics import MODES
from .profile import Profile, capabilities_needed, load_profile
from .sampling import Generation, SamplingParams, sample
from .tokenizer import load_tokenizer
from .plan import PREFILL_CHUNK, MemoryPlan, weight_bytes
from .weights import Weights


def _numerics(prof: Profile, numerics: str | None):
    """(NumericsSpec, weight format): the profile's, or those of a `numerics` override."""
    if numerics is None:
        return prof.numerics, prof.weight_format
    if numerics not in MODES:
        raise V4Error(f"unknown numerics {numerics!r}; choose one of: {', '.join(MODES)}")
    return MODES[numerics], "fp8_block" if numerics == "official" else "float32"


class Runtime:
    def __init__(self, model: Transformer, tokenizer, checkpoint: Path, profile, dispatch: DispatchTable,
                 weights: "Weights | None" = None, device_backend=None, prefill_chunk: int = PREFILL_CHUNK,
                 decode_runner=None):
        self.model, self.config, self.tokenizer = model, model.cfg, tokenizer
        self.parallel = getattr(model, "parallel", None)   # runtime.parallel context (None: exported graph)
        # The backend's storage of the checkpoint (runtime.weights.Weights): what `with_ops` rebuilds from, and
        # the one weight source of bench (`weights.values()` where a float32 state dict is needed).
        self.weights = weights
        self.checkpoint, self.profile, self.dispatch = checkpoint, profile, dispatch
        self.backend, self.numerics = dispatch.backend, dispatch.numerics
        self.device_backend = device_backend           # the backends.base.Backend object this runtime runs on
        self.prefill_chunk = prefill_chunk             # tokens per forward call of a prompt (the backend's)
        self.decode_runner = decode_runner             # generate's decode steps (None: eager model.forward)
        if weights is not None:
            self.memory = MemoryPlan(model.cfg, profile, weights.held_bytes(), mapped=weights.mapped_bytes(),
                                     active=weight_bytes(model.cfg, profile, active=True), chunk=prefill_chunk)
        else:
            self.memory = MemoryPlan(model.cfg, profile, weight_bytes(model.cfg, profile), chunk=prefill_chunk)
        # printed by the CLI, enforced below

    @classmethod
    def load(cls, profile: "str | Path | Profile" = "cpu", checkpoint: str | Path | None = None,
             numerics: str | None = None, emulate: bool = False, allow_fallback: bool = False,
             progress: bool | None = None, parallel=None) -> "Runtime":
        """Load a checkpoint (default: the trained model shipped in runtime/default_model) for a hardware profile.

        `profile`: a shipped profile name (see hardware_profiles/), a backend name (its default profile), a
        path to a YAML file, or a Profile. `emulate=True` runs the profile's numerics (dtypes, weight format,
        quantisation) on the CPU reference instead of its device. `numerics` overrides the profile's
        numerics: "exact" (float32 ground truth) or "official" (DeepSeek's bf16/FP8/FP4 inference numerics).
        Dispatch is resolved once here (`rt.dispatch`, printable); a missing implementation is an error
        unless `allow_fallback`. `parallel` ({"tp": N, "ep": M}, a `runtime.parallel.Layout`): run sharded over
        N x M ranks of a torchrun-launched process group (checked against the model before anything loads).
        """
        # 1. the profile and its numerics; 2. the backend: probe, capability check, dispatch table
        if not isinstance(profile, (str, Path, Profile)):
            raise InputError(f"profile must be a profile name, a path to a YAML file or a Profile, got "
                             f"{type(profile).__name__}")
        if checkpoint is not None and not isinstance(checkpoint, (str, Path)):
            raise InputError(f"checkpoint must be a folder path (str or Path), got {type(checkpoint).__name__}")
        _flags(emulate=emulate, allow_fallback=allow_fallback)
        if progress is not None:
            _flags(progress=progress)
        if isinstance(profile, str) and profile in backend_names():
            profile = get_backend(profile).default_profile
        prof = load_profile(profile)
        spec, weight_format = _numerics(prof, numerics)
        backend = get_backend("cpu" if emulate else prof.backend)
        info, caps = backend.open(prof, weight_format, capabilities_needed(weight_format, spec))
        table = resolve(prof, info.backend, info.device, caps, spec, emulate, allow_fallback)
        path = Path(checkpoint) if checkpoint is not None else default_checkpoint()
        chunk = backend.prefill_chunk
        # 3. a backend that runs a whole exported graph builds its model itself
        if backend.build_model is not None:
            show = sys.stderr.isatty() if progress is None else progress
            model = backend.build_model(path, prof, show, torch.get_num_threads(), chunk)
            return cls(model, load_tokenizer(model.folder, model.cfg), path, prof, table, None, backend, chunk)
        # 4. the process group of a multi-device run (refuses a layout that does not divide the model), then this
        # rank's reader; 5. the backend streams the tensors into its own storage one at a time (runtime.weights:
        # no float32 copy of the model is made on any backend); 6. the model over those weights and the table
        par = None
        if parallel is not None:
            from .parallel import setup
            from .parallel.tp_ops import parallel_dispatch

            par, reader = setup(parallel, prof, path, backend)
            reader.progress = progress
            table = parallel_dispatch(table, par)
        else:
            reader = CheckpointReader(path, progress)
        weights = backend.load_weights(reader, weight_format, spec.compute, par.device if par else info.device,
                                       prof.int8_linears)
        model = Transformer(reader.cfg, weights.tensors, weights.quantized, table.ops, par)
        return cls(model, load_tokenizer(path, reader.cfg), path, prof, table, weights, backend, chunk,
                   backend.decode_runner(model, prof, table))

    def placement(self) -> list[str]:
        """Where the model's work runs beyond the dispatch table (an exported graph: nodes per provider)."""
        if self.device_backend is None:
            return []
        lines = self.device_backend.placement(self.model)
        return lines + (self.decode_runner.describe() if self.decode_runner is not None else [])

    def with_ops(self, **replace: Callable) -> "Runtime":
        """This runtime with some ops of its table replaced (same weights, nothing copied): for experiments
        such as "what if this op were exact?", and for planting a known bug in a parity test. The dispatch
        table records each replacement."""
        if self.weights is None:
            raise InputError(f"with_ops needs a torch model; profile {self.profile.name} runs an exported graph")
        unknown = sorted(set(replace) - {r.op for r in self.dispatch.rows})
        if unknown:
            raise InputError(f"unknown op(s) {', '.join(unknown)}; ops: {', '.join(r.op for r in self.dispatch.rows)}")
        rows = tuple(Resolution(r.op, f"replaced:{getattr(replace[r.op], '__name__', 'callable')}", r.where,
                                "replaced with Runtime.with_ops") if r.op in replace else r for r in self.dispatch.rows)
        table = dataclasses.replace(self.dispatch, rows=rows, ops=dataclasses.replace(self.dispatch.ops, **replace))
        model = Transformer(self.config, self.weights.tensors, self.weights.quantized, table.ops, self.parallel)
        runner = self.device_backend.decode_runner(model, self.profile, table) if self.device_backend else None
        return Runtime(model, self.tokenizer, self.checkpoint, self.profile, table, self.weights, self.device_backend,
                       self.prefill_chunk, runner)

    # ------------------------------------------------------------------ forward
    def new_state(self, batch_size: int = 1, context: int = 0) -> StateBatch:
        """State for `batch_size` sequences; `context` (tokens) reserves their caches up front, after checking
        that many tokens per sequence fit the profile's memory (0: grow on demand)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(context, int) or context < 0:
            raise InputError(f"context must be a non-negative integer, got {context!r}")
        self.memory.check([max(context, 1)] * batch_size)
        return self.model.new_state(batch_size, context)

    def _check_ids(self, input_ids) -> torch.Tensor:
        try:
            ids = torch.as_tensor(input_ids)
        except (TypeError, ValueError):
            raise InputError("input_ids must be a [batch, seq] array of integers of equal length per row") from None
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise InputError(f"input_ids must have shape [batch, seq] with seq >= 1, got {list(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise InputError(f"input_ids must be integers, got {ids.dtype}")
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bad.any():
            raise InputError(f"token id {int(ids[bad][0])} is out of range [0, {self.config.vocab_size}); "
                             "check the tokenizer matches the checkpoint")
        return ids.to(torch.int64)

    def forward(self, input_ids, state: StateBatch | None = None) -> torch.Tensor:
        """Logits [B, S, vocab] float32. Without `state`: fresh sequences. With it: continue them."""
        ids = self._check_ids(input_ids)
        if state is None:
            state = self.new_state(ids.shape[0])
        if not isinstance(state, StateBatch):
            raise InputError(f"state must be a StateBatch from Runtime.new_state, got {type(state).__name__}")
        if state.batch_size != ids.shape[0]:
            raise InputError(f"state holds {state.batch_size} sequences but input_ids has {ids.shape[0]} rows")
        self._check_length(max(state.positions) + ids.shape[1])
        self.memory.check([p + ids.shape[1] for p in state.positions])
        start = list(state.positions)
        with torch.inference_mode():
            logits = self.model.forward(ids, state.seqs).float().cpu()
        if not finite(logits):
            row, pos = (int(i) for i in (~torch.isfinite(logits)).any(-1).nonzero()[0])
            raise_non_finite(self.model, f"forward (row {row}, position {start[row] + pos})", ids, chunked=False,
                             note="" if not any(start) else " (located on fresh sequences: this call "
                             "continued a state, whose history the re-run does not have)")
        return logits

    def mtp_logits(self, input_ids) -> torch.Tensor:
        """MTP draft logits for fresh sequences: [B, S-1, vocab], row t predicting token t+2 from the main
        model's final streams at t and the embedding of token t+1."""
        ids = self._check_ids(input_ids)
        if ids.shape[1] < 2:
            raise InputError("mtp_logits needs at least 2 tokens per row")
        state = self.new_state(ids.shape[0])
        with torch.inference_mode():
            _, X = self.model.forward(ids, state.seqs, return_hidden=True)
            return self.model.forward_mtp(X[:, :-1], ids[:, 1:], state.seqs).float().cpu()

    def _check_length(self, total: int) -> None:
        limit = self.config.max_position
        if total > limit:
            raise InputError(f"sequence of {total} tokens exceeds the model's {limit}-token context; "
                             "shorten the prompt or max_new_tokens")

    # ------------------------------------------------------------------ generation
    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"encode takes a string, got {type(text).__name__}")
        return self.tokenizer.encode(text)

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop_at_eos: bool = True, on_token: Callable[[int, int], None] | None = None,
                 speculative: str | None = None) -> Generation:
        """Greedy (temperature 0) or sampled generation for one or several prompts (text or token ids; ids may
        also come as a torch / numpy array, read as its lists).

        Prompts may differ in length: each is prefilled on its own, then all decode together, each at its
        own position. `on_token(row, token_id)` is called for every new token as soon as it is chosen.
        `speculative="mtp"`: draft with the MTP block and verify in the main model (runtime.speculative):
        the same tokens as plain decoding when greedy, the same distribution when sampling.
        """
        import time

        params = SamplingParams(temperature, top_p, seed, max_new_tokens, stop_at_eos)
        if on_token is not None and not callable(on_token):
            raise InputError(f"on_token must be a function (row, token_id), got {type(on_token).__name__}")
        if isinstance(prompts, (torch.Tensor, np.ndarray)):    # token ids as an array: the same as its lists
            prompts = prompts.tolist()
        scalar = (int, float, bytes, dict, type(None))         # what cannot be a prompt or a list of them
        if isinstance(prompts, scalar) or (not isinstance(prompts, str)
                                           and any(isinstance(p, scalar[1:]) for p in prompts)):
            raise InputError("prompts must be a string, a list of strings or a list of token-id lists, got "
                             f"{type(prompts).__name__}" + ("" if isinstance(prompts, scalar) else " holding " +
                                                            ", ".join(sorted({type(p).__name__ for p in prompts}))))
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        rows = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        if not rows or any(len(r) == 0 for r in rows):
            raise InputError("every prompt needs at least one token")
        for r in rows:
            self._check_ids([r])
            self._check_length(len(r) + max_new_tokens)
        self.memory.check([len(r) + max_new_tokens for r in rows])
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        if speculative is not None:
            return self._generate_speculative(speculative, rows, params, gen, on_token)
        state = self.new_state(len(rows), context=max(map(len, rows)) + max_new_tokens)   # checked above
        out: list[list[int]] = [[] for _ in rows]
        t0 = time.perf_counter()
        with torch.inference_mode():
            # Sampling runs on the CPU (its generator is a CPU one): one [B, V] copy per step.
            last = []
            for b, r in enumerate(rows):
                last.append(self._prefill(r, state.seqs[b]))
                if not finite(last[-1]):
                    raise_non_finite(self.model, f"prefill of prompt {b}", torch.tensor([r]))
            last = torch.cat(last)                                                              # [B, V]
            t1 = time.perf_counter()
            # the backend's decode runner (CUDA graphs) where it has one; None: the model's eager forward
            session = None
            if self.decode_runner is not None and max_new_tokens > 1:
                session = self.decode_runner.session(state.seqs, max(map(len, rows)) + max_new_tokens)
            if session is None and params.temperature == 0 and not getattr(self.parallel, "distributed", False):
                steps = self._decode_greedy(last, rows, state, out, on_token, params)
            else:
                steps = self._decode(last, rows, state, out, on_token, params, gen, session)
            if session is not None:
                session.close()
            t2 = time.perf_counter()
        texts = [self.tokenizer.decode(o) for o in out]
        return Generation(out, texts, sum(map(len, rows)), t1 - t0, t2 - t1, steps)

    def _decode(self, last, rows, state, out, on_token, params: SamplingParams, gen, session) -> int:
        """generate's decode loop from the prompts' last logits [B, V] (sampling, a decode runner's session,
        several ranks) -> the tokens fed through decode steps (all rows)."""
        active, steps, limit = list(range(len(rows))), 0, params.max_new_tokens
        while active and limit:
            nxt = sample(last, params, gen)
            if self.parallel is not None:
                nxt = self.parallel.broadcast_tokens(nxt)      # every rank feeds rank 0's tokens
            still = []
            for j, b in enumerate(active):
                tok = int(nxt[j])
                out[b].append(tok)
                if on_token:
                    on_token(b, tok)
                if not (params.stop_at_eos and tok == self.config.eos_token_id) and len(out[b]) < limit:
                    still.append((j, b))
            if not still:
                break
            keep = torch.tensor([j for j, _ in still])
            active = [b for _, b in still]
            if session is not None:
                last = session.step(nxt[keep], active)
            else:
                last = self.model.forward(nxt[keep][:, None], [state.seqs[b] for b in active])[:, -1].float().cpu()
            steps += len(active)
            if not finite(last):
                self._decode_non_finite(last, active, rows, out)
        return steps

    def _decode_greedy(self, last, rows, state, out, on_token, params: SamplingParams) -> int:
        """generate's greedy decode loop on one process (the tokens, callbacks and stops of `_decode`), lean:
        right after a native step the caches hold its weights, not torch's dispatch code, so each small torch
        call then costs several times its warm cost (`_decode`'s few ops: ~80 us a step at 1 thread beside a
        ~190 us native step). Where the backend has `decode_block.greedy_steps` (the CPU's fused step,
        backends/cpu_decode_greedy.py) a step is one native call in reused buffers that also returns the
        argmaxes and the first non-finite row; else (or where it refuses a step) Transformer.forward runs with
        a reused ids buffer, and the tokens are the fused step's `argmax_rows` or numpy's argmax (both torch's
        first-maximum rule, a NaN first), the check one numpy sum (non-finite iff a logit is, or the sum
        overflowed: the exact check then decides) -> the tokens fed through decode steps (all rows)."""
        limit, eos = params.max_new_tokens, self.config.eos_token_id if params.stop_at_eos else None
        top, active, steps = last.argmax(-1).tolist(), list(range(len(rows))), 0
        make = getattr(getattr(getattr(self.model, "ops", None), "decode_block", None), "greedy_steps", None)
        fast = ids = None
        while limit:
            still = []
            for j, b in enumerate(active):
                tok = top[j]
                out[b].append(tok)
                if on_token:
                    on_token(b, tok)
                if tok != eos and len(out[b]) < limit:
                    still.append(j)
            if not still:
                break
            if ids is None or len(still) < len(active):     # a row stopped: buffers for the rows left
                active, top = [active[j] for j in still], [top[j] for j in still]
                seqs = [state.seqs[b] for b in active]
                fast = make(self.model, seqs) if make is not None else None
                ids = torch.empty(len(active), 1, dtype=torch.int64)
                idn = ids.numpy()
            steps += len(active)
            r = fast.step(top) if fast is not None else None
            if r is not None:
                top, bad = r
                if bad >= 0:
                    self._decode_non_finite(fast.logits, active, rows, out)
                continue
            idn[:, 0] = top
            logits = self.model.forward(ids, seqs)                             # [n, 1, V] (any model)
            top = getattr(logits, "argmax_rows", None)
            logits = logits[:, -1]
            if logits.dtype != torch.float32 or not logits.is_cpu:
                logits = logits.float().cpu()
            ln = logits.numpy()
            top = ln.argmax(-1).tolist() if top is None else top
            if not math.isfinite(ln.sum()) and not finite(logits):
                self._decode_non_finite(logits, active, rows, out)
        return steps

    def _decode_non_finite(self, last, active, rows, out) -> None:
        """Raise the error naming the first active row whose decode logits [n, V] hold a NaN / Inf."""
        j = int((~torch.isfinite(last)).any(-1).nonzero()[0])
        b = active[j]
        raise_non_finite(self.model, f"decode step {len(out[b])} of prompt {b}", torch.tensor([rows[b]]), out[b])

    def _generate_speculative(self, method, rows, params, gen, on_token) -> Generation:
        from . import speculative

        if method != "mtp":
            raise InputError(f"unknown speculative method {method!r}; the one supported is 'mtp'")
        if not self.config.num_mtp or self.weights is None or getattr(self.parallel, "distributed", False):
            raise InputError("speculative='mtp' needs a single-device torch model with an MTP block "
                             f"(this one: {self.config.num_mtp} MTP blocks, profile {self.profile.name}); "
                             "drop --speculative")
        for r in rows:                      # the verify step may feed one draft past the last new token
            self._check_length(len(r) + params.max_new_tokens + 1)
        return speculative.generate(self, rows, params, gen, on_token)

    def _prefill(self, row: list[int], seq) -> torch.Tensor:
        """Prefill one prompt in chunks of `prefill_chunk` tokens (bounded activations; the same math as one
        call: every chunk continues the sequence's state) -> the last position's logits [1, V]."""
        step = self.prefill_chunk
        for i in range(0, len(row), step):
            logits = self.model.forward(torch.tensor([row[i:i + step]]), [seq])
        return logits[:, -1].float().cpu()

    def describe(self) -> str:
        c = self.config
        kinds = ", ".join(c.layer_kind(i) for i in range(c.num_layers))
        emu = " (emulated on cpu)" if self.dispatch.emulated else ""
        text = (f"{self.checkpoint} | profile {self.profile.name}{emu} | backend {self.backend} | "
                f"weights {self.profile.weight_format} | numerics {self.numerics} | "
                f"{c.num_layers} layers [{kinds}] | d={c.hidden_size} | vocab {c.vocab_size} | "
                f"tokenizer {self.tokenizer.name}")
        if c.ignored_keys:
            text += f" | config keys not used: {', '.join(c.ignored_keys)}"
        return text


def _flags(**flags) -> None:
    """Each keyword a bool, or the one-line error naming it (a string such as "no" would read as true)."""
    for name, v in flags.items():
        if not isinstance(v, bool):
            raise InputError(f"{name} must be True or False, got {v!r}")
