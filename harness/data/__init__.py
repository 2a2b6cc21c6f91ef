"""Datasets addressed by a global sample index, so any world size continues the same sample stream.

A dataset is any object with `sample(index) -> LongTensor[block_size + 1]` (inputs and the next-token
targets come from one window); `batch_for_rank` picks a rank's share of a global batch.
"""

from __future__ import annotations

from typing import Protocol

import torch


class IndexedDataset(Protocol):
    vocab_size: int
    block_size: int

    def sample(self, index: int) -> torch.Tensor: ...


def rank_indices(start: int, global_batch: int, rank: int, world_size: int) -> range:
    """The global sample indices that `rank` trains on in the global batch starting at `start`.

    Contiguous shares: rank r of W takes [start + r*B/W, start + (r+1)*B/W). The batch as a whole is
    always [start, start + B), whatever W is.
    """
    share = global_batch // world_size
    first = start + rank * share
    return range(first, first + share)


def make_batch(dataset: IndexedDataset, indices: range) -> tuple[torch.Tensor, torch.Tensor]:
    windows = torch.stack([dataset.sample(i) for i in indices])
    return windows[:, :-1], windows[:, 1:]
