"""One rank of the multi-device tests, launched by torchrun (tests/test_parallel.py); not a test module.

    torchrun --nproc-per-node N tests/parallel_worker.py CHECKPOINT OUT_DIR TP EP

Through the public API inside a process group it initialises itself, it records, for one fixed prompt: the prefill
logits and 32 greedy decode steps' logits (rank 0 writes them, safetensors), the tokens of `rt.generate`
(which broadcasts rank 0's tokens), and per rank the bytes its sharded load read, the shapes it holds, and its
measured weight + state bytes (JSON).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

PROMPT = [0, 72, 101, 108, 108, 111, 44, 32, 86, 52, 33, 10, 87, 104, 97, 116]   # 16 tokens
STEPS = 32


def main() -> int:
    ckpt, out, tp, ep = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    import torch.distributed as dist

    from runtime.api import Runtime
    from runtime.plan.layouts import measured_rank_bytes

    # The API inside a process group the caller initialised (the CLI tests cover the runtime's own init).
    dist.init_process_group("gloo")
    rt = Runtime.load("cpu", checkpoint=ckpt, progress=False, parallel={"tp": tp, "ep": ep})
    par = rt.parallel
    state = rt.new_state(1)
    logits = [rt.forward([PROMPT], state=state)[0]]                                   # [S, V]
    tokens = []
    for _ in range(STEPS):
        tokens.append(int(logits[-1][-1].argmax()))
        logits.append(rt.forward([[tokens[-1]]], state=state)[0])
    weights, state_bytes = measured_rank_bytes(rt, state)
    gen = rt.generate([PROMPT], max_new_tokens=STEPS, stop_at_eos=False).tokens[0]
    mtp = rt.mtp_logits([PROMPT])[0]                                                   # the MTP block, sharded too
    if par.rank == 0:
        save_file({"prefill": logits[0].contiguous(), "decode": torch.cat(logits[1:]).contiguous(), "mtp": mtp,
                   "tokens": torch.tensor(tokens), "generated": torch.tensor(gen)}, str(out / "logits.safetensors"))
    shapes = {n: list(t.shape) for n, t in rt.weights.tensors.items()
              if n.startswith(("layers.1.attn.", "layers.1.ffn.experts.", "embed", "head"))}
    (out / f"rank{par.rank}.json").write_text(json.dumps({
        "rank": par.rank, "bytes_read": par.reader.bytes_read, "weight_bytes": weights,
        "state_bytes": state_bytes, "positions": state.seqs[0].pos, "shapes": shapes,
        "generated": gen}))
    par.close()                          # barrier, free the TP / EP groups
    dist.destroy_process_group()         # the caller's group: the caller frees it
    return 0


if __name__ == "__main__":
    sys.exit(main())
