"""AdamW and a warmup + cosine learning-rate schedule that is a pure function of the step (so the step
is the schedule's whole state in a checkpoint)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)


def lr_at(step: int, max_steps: int, cfg, scale: float = 1.0) -> float:
    """Linear warmup for `warmup_steps`, then cosine decay to `min_lr` at `max_steps`."""
    if step < cfg.warmup_steps:
        return scale * cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return scale * (cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
