"""Memory-mapped uint16 token files (nanoGPT's .bin), local or in GCS: `data=tokens`.

`data.path` is one file, `data.paths` a list of shards; each is a local path or a gs:// URL. gs://
files are copied once per VM into `data.cache_dir` and verified first (harness/data/gcs_cache.py); every
file is then memory-mapped.

Sample i is a window of block_size + 1 tokens. Shard k holds (tokens_k - 1) // block_size windows, its
windows follow those of the shards before it, and no window spans two shards, so the global index
runs through the shards in the order given (a single file reads as it always did: window i starts at
i * block_size). The index wraps around past the last window, so it can grow past one epoch and the
stream stays a pure function of the index.

Bad input fails here, before any training, with a ConfigError naming the key: a missing or odd-sized
file (not a whole number of uint16 tokens), a file shorter than one window, and at the sample that
holds it, a token id >= data.vocab_size.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np
import torch

from harness.config import ConfigError
from harness.data import gcs_cache as gcs


class TokenFile:
    def __init__(self, vocab_size: int, block_size: int, path: str | None = None, paths: list[str] | None = None,
                 cache_dir: str = "data", download_threads: int = 8, download_chunk_mb: float = 32.0,
                 download_stall_s: float = 600.0, **_: object):
        sources = _sources(path, paths or [])
        remote = [(key, url) for key, url in sources if url.startswith(gcs.PREFIX)]
        local = dict(sources)
        if remote:
            if download_threads < 1:
                raise ConfigError(f"data.download_threads={download_threads} must be >= 1")
            if download_chunk_mb <= 0:
                raise ConfigError(f"data.download_chunk_mb={download_chunk_mb} must be > 0")
            if download_stall_s <= 0:
                raise ConfigError(f"data.download_stall_s={download_stall_s} must be > 0")
            fetched = gcs.cached(remote, Path(cache_dir), threads=download_threads,
                                 chunk_bytes=max(1, int(download_chunk_mb * gcs.MiB)), stall_s=download_stall_s)
            local.update({key: str(file) for (key, _), file in zip(remote, fetched.paths, strict=True)})
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.keys = [key for key, _ in sources]
        self.shards = [_open(key, local[key], url, block_size) for key, url in sources]
        counts = [(len(tokens) - 1) // block_size for tokens in self.shards]
        self.starts = np.cumsum([0, *counts[:-1]]).tolist()  # the first global window of each shard
        self.windows = sum(counts)

    def sample(self, index: int) -> torch.Tensor:
        window = index % self.windows
        shard = bisect.bisect_right(self.starts, window) - 1
        start = (window - self.starts[shard]) * self.block_size
        tokens = self.shards[shard][start : start + self.block_size + 1].astype(np.int64)
        if (top := int(tokens.max())) >= self.vocab_size:
            raise ConfigError(f"{self.keys[shard]}: token id {top} (in tokens {start}..{start + len(tokens)}) is >= "
                              f"data.vocab_size={self.vocab_size}; set data.vocab_size to the tokenizer's vocabulary "
                              "size (harness.data.prepare prints it)")
        return torch.from_numpy(tokens)


def _sources(path: str | None, paths: list[str]) -> list[tuple[str, str]]:
    """(key, location) per file, in order; the key names the setting in error messages."""
    if path and paths:
        raise ConfigError("data.path and data.paths are both set; use data.path for one file or data.paths "
                          "for a list of shards")
    if path:
        return [("data.path", path)]
    if not paths:
        raise ConfigError("data=tokens needs data.path=FILE or data.paths=[FILE,...] (local paths or gs:// URLs)")
    return [(f"data.paths[{i}]", p) for i, p in enumerate(paths)]


def _open(key: str, file: str, given: str, block_size: int) -> np.memmap:
    where = f"{key}={given!r}" + (f" (cached as {file})" if file != given else "")
    if not Path(file).is_file():
        raise ConfigError(f"{where}: no such token file (uint16 .bin expected)")
    size = Path(file).stat().st_size
    if size % 2:
        raise ConfigError(f"{where}: {size} bytes, not a whole number of uint16 tokens")
    tokens = np.memmap(file, dtype=np.uint16, mode="r") if size else np.zeros(0, np.uint16)
    if len(tokens) < block_size + 1:
        raise ConfigError(f"{where}: {len(tokens)} tokens, need more than data.block_size={block_size}")
    return tokens
