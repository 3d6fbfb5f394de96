"""Exponential moving averages of model weights.

    ema <- decay * ema + (1 - decay) * model         (per parameter, in float32)

Used twice in RL: the reference model can follow the actor ("Is DPO Superior to PPO for LLM
Alignment?": ref <- a * ref + (1 - a) * actor every k steps), and DeepSpeed-Chat keeps an EMA copy of
the actor that is saved as its own checkpoint (often better than the last iterate).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def ema_update_(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """In place: every parameter and buffer of `target` <- decay * target + (1 - decay) * source."""
    src = dict(source.named_parameters())
    for name, p in target.named_parameters():
        s = src[name].detach().to(p.device, p.dtype)
        p.mul_(decay).add_(s, alpha=1 - decay)


class EMAWeights:
    """A float32 CPU shadow of a model's parameters (does not hold a second module)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            self.shadow[n].mul_(self.decay).add_(p.detach().float().cpu(), alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n].to(p.device, p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, s: dict) -> None:
        self.decay, self.shadow = s["decay"], s["shadow"]
