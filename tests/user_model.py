"""A user's own model, reachable by `model._target_=tests.user_model.BigramMLP`: it only honours the
model contract (token ids (B, T) -> logits (B, T, vocab_size)); unknown knobs arrive as kwargs."""

import os
import time

import torch
import torch.nn as nn


class BigramMLP(nn.Module):
    def __init__(self, vocab_size: int, n_embd: int = 32, **_unused):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, n_embd)
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(n_embd, vocab_size))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(idx))


class StallingBigram(BigramMLP):
    """Stalls every forward pass while the file named by $STALL_FILE exists: a hung job, for real."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        while os.environ.get("STALL_FILE") and os.path.exists(os.environ["STALL_FILE"]):
            time.sleep(0.05)
        return super().forward(idx)
