"""A memory-mapped uint16 token file (nanoGPT's .bin): sample i is the window starting at i * block_size.

Windows wrap around the end of the file, so the global sample index can grow past one epoch and the
stream stays a pure function of the index.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class TokenFile:
    def __init__(self, path: str, vocab_size: int, block_size: int, **_: object):
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"data.path={path!r}: no such token file (uint16 .bin expected)")
        if file.stat().st_size % 2:
            raise ValueError(f"data.path={path!r}: size is odd, not a uint16 token file")
        self.tokens = np.memmap(file, dtype=np.uint16, mode="r")
        if len(self.tokens) < block_size + 1:
            raise ValueError(f"data.path={path!r}: {len(self.tokens)} tokens, need > block_size={block_size}")
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.windows = (len(self.tokens) - 1) // block_size

    def sample(self, index: int) -> torch.Tensor:
        start = (index % self.windows) * self.block_size
        window = self.tokens[start : start + self.block_size + 1].astype(np.int64)
        return torch.from_numpy(window)
