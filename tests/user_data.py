"""A dataset with a poisoned record at global sample $POISON_AT: every attempt that reaches it fails
the same way, which is what a crash loop looks like."""

import os

import torch

from harness.data.synthetic import SyntheticTokens


class PoisonedTokens(SyntheticTokens):
    def sample(self, index: int) -> torch.Tensor:
        if index >= int(os.environ["POISON_AT"]):
            raise ValueError(f"corrupt record at sample {index}")
        return super().sample(index)
