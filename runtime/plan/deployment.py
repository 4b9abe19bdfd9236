"""One deployment's memory plan from first principles: a model on D devices of a profile at a context and batch
(weights, state, one prefill chunk's workspace, the V3.2-style comparison, what fits). The figures are
runtime.plan.sizes'; `python -m runtime.plan` prints them.
"""

from __future__ import annotations

import math

from ..config import ModelConfig
from ..errors import InputError
from .sizes import HEADROOM, activation_bytes, state_plan, v32_per_token, weight_bytes
from .memory import PREFILL_CHUNK


def plan(cfg: ModelConfig, profile, context: int, batch: int = 1, devices: int = 1, chunk: int = PREFILL_CHUNK) -> dict:
    if context < 1 or batch < 1 or devices < 1 or chunk < 1:
        raise InputError("context, batch, devices and chunk must be positive integers")
    if context > cfg.max_position:
        raise InputError(f"context {context} exceeds the model's {cfg.max_position} positions")
    w = weight_bytes(cfg, profile)
    st = state_plan(cfg, profile)
    per_seq = st.fixed + st.per_token * context
    act = activation_bytes(cfg, profile, min(chunk, context), context)
    total = w + batch * per_seq + act
    budget = devices * profile.memory_gib.value * 2 ** 30 * HEADROOM
    spare = budget - w
    v32 = v32_per_token(profile) * context
    spare -= act
    if spare <= batch * st.fixed:
        max_context = 0
    elif st.per_token == 0:          # every layer window-only: the state stops growing past the window
        max_context = cfg.max_position
    else:
        max_context = min(cfg.max_position, int((spare / batch - st.fixed) // st.per_token))
    return {"weights": w, "activations": act, "active_weights": weight_bytes(cfg, profile, active=True),
            "state_per_sequence": per_seq, "v32_style_state": v32, "vs_v32": per_seq / v32, "state_per_token": st.per_token, "state_fixed": st.fixed,
            "total": total, "budget": budget, "fits": total <= budget,
            "devices_needed": math.ceil(total / (profile.memory_gib.value * 2 ** 30 * HEADROOM)),
            "max_context": max_context,
            "max_batch": int(spare // per_seq) if spare > 0 else 0}
