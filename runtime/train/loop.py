"""The training loop: seeded, bounded memory, resumable, and the official-layout export.

Everything a resumed run needs lives in `OUT/train_state.safetensors` (float32 masters `p.*`, AdamW moments
`m.*` / `v.*`, the data generator's state) and `OUT/train_state.json` (step, arguments, the model config):
no pickle. The AdamW here is written out (a dozen lines) so its whole state is those named tensors.
Memory is bounded by the batch shape: one forward/backward of `batch x seq` tokens at a time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint.inventory import expected_tensors
from ..checkpoint.make import _encode, make_weights
from ..config import ModelConfig
from ..errors import InputError
from .objective import compute_losses, storage_kinds


@dataclass
class TrainArgs:
    steps: int = 2000
    qat_steps: int = 200             # the last `qat_steps` of `steps` run with fake-quantised weights
    batch: int = 8
    seq: int = 256
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    mtp_weight: float = 0.3
    indexer_weight: float = 1.0
    clip: float = 1.0
    seed: int = 0
    eval_every: int = 200
    eval_windows: int = 16
    save_every: int = 100


class AdamW:
    def __init__(self, params: dict, lr: float, wd: float, betas=(0.9, 0.95), eps: float = 1e-8):
        self.p, self.lr, self.wd, self.betas, self.eps, self.t = params, lr, wd, betas, eps, 0
        self.m = {n: torch.zeros_like(t) for n, t in params.items()}
        self.v = {n: torch.zeros_like(t) for n, t in params.items()}

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.t += 1
        b1, b2 = self.betas
        for n, p in self.p.items():
            if p.grad is None:
                continue
            g = p.grad
            self.m[n].mul_(b1).add_(g, alpha=1 - b1)
            self.v[n].mul_(b2).addcmul_(g, g, value=1 - b2)
            mh = self.m[n] / (1 - b1 ** self.t)
            vh = self.v[n] / (1 - b2 ** self.t)
            if p.dim() >= 2 and self.wd:                   # no decay on norms, biases, gates' scalars
                p.mul_(1 - lr * self.wd)
            p.addcdiv_(mh, vh.sqrt().add_(self.eps), value=-lr)
            p.grad = None


def lr_at(step: int, args: TrainArgs) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


class Trainer:
    def __init__(self, cfg: ModelConfig, hf_config: dict, args: TrainArgs, out: Path):
        self.cfg, self.hf_config, self.args, self.out = cfg, hf_config, args, Path(out)
        torch.manual_seed(args.seed)
        _, _, masters = make_weights(cfg, args.seed)
        self.fixed = {n: t for n, t in masters.items() if not t.is_floating_point()}        # hash tables
        self.params = {n: t.float().clone().requires_grad_(True) for n, t in masters.items() if t.is_floating_point()}
        self.quantized = frozenset(n for n, (_, k) in expected_tensors(cfg, "fp4").items() if k in ("fp8", "fp4"))
        self.kinds = storage_kinds(cfg)
        self.opt = AdamW(self.params, args.lr, args.weight_decay)
        self.gen = torch.Generator().manual_seed(args.seed)
        self.step = 0

    # ---- one step
    def train_step(self, batch: torch.Tensor) -> dict:
        a = self.args
        qat = self.step >= a.steps - a.qat_steps
        L = compute_losses(self.cfg, {**self.params, **self.fixed}, self.quantized, batch, qat, self.kinds)
        loss = L.lm + a.mtp_weight * L.mtp + a.indexer_weight * L.indexer
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), a.clip)
        self.opt.step(lr_at(self.step, a))
        self.step += 1
        return {"lm": L.lm.item(), "mtp": L.mtp.item(), "kl": L.indexer.detach().item(), "qat": qat}

    @torch.no_grad()
    def evaluate(self, windows: torch.Tensor, qat: bool = False) -> dict:
        lm = mtp = kl = 0.0
        correct = mtp_correct = tokens = 0
        for i in range(0, windows.shape[0], self.args.batch):
            L = compute_losses(self.cfg, {**self.params, **self.fixed}, self.quantized,
                               windows[i:i + self.args.batch], qat, self.kinds)
            n = L.tokens
            lm, mtp, kl = lm + L.lm.item() * n, mtp + L.mtp.item() * n, kl + float(L.indexer) * n
            correct, mtp_correct, tokens = correct + L.correct, mtp_correct + L.mtp_correct, tokens + n
        return {"ppl": math.exp(lm / tokens), "top1": correct / tokens, "mtp_top1": mtp_correct / tokens,
                "kl": kl / tokens, "tokens": tokens}

    # ---- checkpoints (safetensors + JSON)
    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        t = {f"p.{n}": p.detach().contiguous() for n, p in self.params.items()}
        t.update({f"m.{n}": m for n, m in self.opt.m.items()})
        t.update({f"v.{n}": v for n, v in self.opt.v.items()})
        t.update({f"f.{n}": f.contiguous() for n, f in self.fixed.items()})
        t["gen_state"] = self.gen.get_state()
        tmp = self.out / "train_state.safetensors.tmp"
        save_file(t, str(tmp))
        tmp.replace(self.out / "train_state.safetensors")
        meta = {"step": self.step, "adam_t": self.opt.t, "args": vars(self.args), "config": self.hf_config}
        (self.out / "train_state.json").write_text(json.dumps(meta, indent=1))

    def load(self) -> bool:
        path = self.out / "train_state.safetensors"
        if not path.is_file():
            return False
        meta = json.loads((self.out / "train_state.json").read_text())
        if meta["config"] != self.hf_config:
            raise InputError(f"{path}: saved for another model config; use a fresh --out folder")
        t = load_file(str(path))
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(t[f"p.{n}"])
                self.opt.m[n].copy_(t[f"m.{n}"])
                self.opt.v[n].copy_(t[f"v.{n}"])
        self.fixed = {n: t[f"f.{n}"] for n in self.fixed}
        self.gen.set_state(t["gen_state"])
        self.step, self.opt.t = meta["step"], meta["adam_t"]
        return True

    # ---- the shipped checkpoint
    def export(self, folder: Path, tokenizer_json: Path | None = None) -> Path:
        """Write the official HF layout (FP8 linears, FP4 experts, bf16 / f32 rest) of the current weights."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stored = {}
        values = {**{n: p.detach() for n, p in self.params.items()}, **self.fixed}
        for name, (_, kind) in expected_tensors(self.cfg, "fp4").items():
            w, s, _ = _encode(values[name], kind)
            stored[name] = w.contiguous()
            if s is not None:
                stored[name.removesuffix(".weight") + ".scale"] = s.contiguous()
        fname = "model-00001-of-00001.safetensors"
        save_file(stored, str(folder / fname), metadata={"format": "pt"})
        total = sum(t.numel() * t.element_size() for t in stored.values())
        index = {"metadata": {"total_size": total, "generator": "dsv4rt runtime.train", "step": self.step},
                 "weight_map": {n: fname for n in stored}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (folder / "config.json").write_text(json.dumps(self.hf_config, indent=2))
        if tokenizer_json is not None:
            (folder / "tokenizer.json").write_bytes(Path(tokenizer_json).read_bytes())
        return folder
