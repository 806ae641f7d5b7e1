"""The optimiser and its learning-rate schedule, shared by the GRPO trainer and the warm-up."""

from __future__ import annotations

import math

import torch


def adamw(params, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """torch's AdamW in its fused form: one kernel per step, on the CPU as on a GPU.

    Fused also makes CPU runs reproducible across CPU vendors: its √v̂ is the processor's
    correctly rounded square root, where the unfused step calls MKL's vector maths, whose
    last bits differ between Intel and AMD processors."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def lr_lambda(config: GRPOConfig):
    """The multiplier of ``config.lr`` at each step: linear warm-up, then the schedule."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        if config.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if config.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor
