"""A synthetic corpus whose sample i is a pure function of (seed, i), with structure a model can learn.

Each sequence follows a fixed random successor table (drawn once from the seed) with 10% noise, so
the achievable loss is well below log(vocab_size) and a falling loss shows the model learns.
"""

from __future__ import annotations

import numpy as np
import torch


class SyntheticTokens:
    def __init__(self, vocab_size: int, block_size: int, seed: int, noise: float = 0.1, **_: object):
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.seed = seed
        self.noise = noise
        self.successor = np.random.default_rng(seed).permutation(vocab_size)

    def sample(self, index: int) -> torch.Tensor:
        if index < 0:
            raise IndexError(f"sample index {index} must be >= 0")
        rng = np.random.default_rng((self.seed, index))
        n = self.block_size + 1
        random_tokens = rng.integers(0, self.vocab_size, size=n)
        is_noise = rng.random(n) < self.noise
        out = np.empty(n, dtype=np.int64)
        out[0] = random_tokens[0]
        for t in range(1, n):
            out[t] = random_tokens[t] if is_noise[t] else self.successor[out[t - 1]]
        return torch.from_numpy(out)
