"""`python -m runtime.plan`: a memory plan from first principles (issue 6, first part: the arithmetic).

    python -m runtime.plan --model flash --profile nvidia-h200 --context 1048576 [--batch 1] [--devices 8]

- weights: every tensor of the official inventory as the profile's backend holds it. CPU: the checkpoint's
  own bytes (FP8 linears + ue8m0 128x128 scales, FP4 experts + per-32 scales as shipped, bf16). A device: the
  profile's weight format as runtime.weights.device stores it -- FP8 linears + float32 block scales, but the FP4
  experts as bf16 / fp16 stacks (no FP4 GEMM on a device yet: 4x their stored bytes), W8A8 int8 + one fp32
  scale per output channel for the profile's `int8_linears`, the head, the MoE gate and the compressors'
  projections in float32, bf16 / fp16 / float32 for the rest;
- per sequence, growing with the context: compressed KV entries (CSA 1 per 4 tokens, HCA 1 per 128) and CSA
  indexer keys, in the profile's KV / indexer dtypes (fp8_e4m3 = DeepSeek's / vLLM's 584-byte entry: 448 FP8
  non-RoPE dims + 64 bf16 RoPE dims + one ue8m0 scale per 64 + 1 pad; int8 / FP8 indexer key = 128 + a 4-byte
  scale; FP4 key = 64 + one scale byte per 32);
- per sequence, fixed: the 128-token window of every layer (KV dtype) and the compressors' fp32 state
  (values + gate scores of the last 2 x ratio tokens for CSA, ratio tokens for HCA; spec §11).
Also: the same context's cache in a V3.2-style layout (DeepSeek-V3.2-Exp: 61 layers of MLA latents + indexer
keys, no compression), for the model card's "V4-Pro needs ~10% of V3.2's KV cache at 1M tokens".
- activations / workspace: the live tensors of one forward chunk (`activation_bytes`: the residual streams,
  the attention and MoE intermediates and the largest attention / indexer score block), for a prefill chunk of
  `--chunk` tokens (default PREFILL_CHUNK, 4096) at the given context; the device budget keeps 10% headroom besides.
`MemoryPlan` is the same arithmetic for a loaded runtime: it is printed at load and refuses (one line, before
any allocation) a batch or context whose state would not fit the profile's memory next to the weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import ArgumentParser
from ..config import ModelConfig
from ..profile import load_profile
from .deployment import plan
from .memory import PREFILL_CHUNK
from .sizes import gib


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m runtime.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="flash", help="flash, pro, tiny, or a config.json path")
    ap.add_argument("--profile", default="nvidia-h200")
    ap.add_argument("--context", type=int, required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=PREFILL_CHUNK, help="prefill chunk (tokens) the activations are sized for")
    ap.add_argument("--layouts", action="store_true",
                    help="propose TP x EP x nodes layouts that fit, with per-rank memory (runtime.parallel)")
    ap.add_argument("--per-node", type=int, default=8, help="devices per node, for --layouts")
    args = ap.parse_args(argv)
    from ..cli import run_cli

    return run_cli(lambda: _report(args))


def _report(args) -> int:
    cfg = ModelConfig.preset(args.model) if args.model in ("flash", "pro", "tiny") else \
        ModelConfig.from_file(Path(args.model))
    prof = load_profile(args.profile)
    p = plan(cfg, prof, args.context, args.batch, args.devices, args.chunk)
    if args.layouts:
        from .layouts import format_layouts

        print(format_layouts(args.model, cfg, prof, args.context, args.batch, args.per_node))
        return 0
    print(f"{args.model} on {args.devices} x {prof.name} ({prof.memory_gib.value:g} GiB each, 10% headroom), "
          f"context {args.context:,}, batch {args.batch}")
    print(f"  weights ({prof.weight_format})        {gib(p['weights'])}")
    print(f"  state per sequence           {gib(p['state_per_sequence'])}  "
          f"({p['state_per_token']:,.1f} B/token + {p['state_fixed'] / 2 ** 20:,.1f} MiB fixed)")
    print(f"  a V3.2-style cache (MLA 512+64 + indexer key per token and layer, same dtypes): "
          f"{gib(p['v32_style_state'])}; V4 needs {100 * p['vs_v32']:.1f}% of it")
    print(f"  total                        {gib(p['total'])} of {gib(p['budget'])}: "
          f"{'fits' if p['fits'] else 'does NOT fit'}; needs {p['devices_needed']} device(s)")
    print(f"  max context at batch {args.batch}: {p['max_context']:,}; max batch at this context: {p['max_batch']:,}")
    print(f"  activations / workspace ({min(args.chunk, args.context):,}-token prefill chunk): "
          f"{gib(p['activations'])} (included in the total)")
    print(f"  weights read per decoded token (batch 1): {gib(p['active_weights'])} -> at the profile's "
          f"{prof.bandwidth_gbps.value:g} GB/s, >= {p['active_weights'] / prof.bandwidth_gbps.value / 1e6:.1f} ms "
          "per step (bandwidth bound)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
