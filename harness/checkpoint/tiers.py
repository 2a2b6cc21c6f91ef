"""The ordered list of checkpoint tiers built from config: the first is always a local directory that
the DCP writer fills; slower tiers receive copies of its committed files. `open_store` is where a
store's implementation is chosen from its URL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from harness.checkpoint.store import LocalStore, Store, StoreError

if TYPE_CHECKING:
    from harness.config import CheckpointConfig


@dataclass
class Tier:
    name: str
    store: Store
    keep: int
    every: int = 1  # promote every Nth checkpoint committed in the first tier
    every_seconds: float = 0.0  # ...or when this long has passed since the last promotion
    ephemeral: bool = False  # dies with the VM (local SSD, staging): not a safe home for a last save
    assumed_bandwidth_mb_s: float = 0.0  # until measured (0: checkpoint.assumed_bandwidth_mb_s)

    def __str__(self) -> str:
        return f"{self.name} ({self.store.url})"


def open_store(url: str, retry_deadline_s: float = 120.0) -> Store:
    """A store for a URL: gs://bucket/prefix or a local path. Malformed URLs fail naming the URL.
    `retry_deadline_s` bounds the retries of transient errors of a remote store."""
    if "://" in url:
        scheme = url.split("://", 1)[0]
        if scheme == "gs":
            from harness.checkpoint.gcs_store import GCSStore

            return GCSStore(url, retry_deadline_s=retry_deadline_s)
        if scheme == "file":
            return LocalStore(url[len("file://") :])
        raise StoreError(f"checkpoint store {url!r}: unsupported scheme {scheme!r}; use a local path or gs://bucket/prefix")
    if not url.strip():
        raise StoreError("checkpoint store '' is empty; use a local path or gs://bucket/prefix")
    return LocalStore(url)


def build_tiers(cfg: CheckpointConfig) -> list[Tier]:
    """Tiers from `checkpoint.*`: the store (local, or gs:// staged through a local directory), then
    `checkpoint.slower_tiers` in order."""
    retry_s = cfg.remote_retry_s
    first = open_store(cfg.store, retry_s)
    tiers: list[Tier] = []
    if first.is_local:
        tiers.append(Tier("local", first, keep=cfg.keep, ephemeral=cfg.ephemeral))
    else:
        tiers.append(Tier("staging", LocalStore(cfg.staging_dir), keep=1, ephemeral=True))
        tiers.append(Tier(_scheme(cfg.store), first, keep=cfg.keep))
    for i, extra in enumerate(cfg.slower_tiers):
        store = open_store(extra.url, retry_s)
        name = extra.name or f"{_scheme(extra.url)}{i}"
        tiers.append(
            Tier(name, store, keep=extra.keep, every=extra.every, every_seconds=extra.every_seconds,
                 ephemeral=extra.ephemeral, assumed_bandwidth_mb_s=extra.assumed_bandwidth_mb_s)
        )
    return tiers


def durable(tiers: list[Tier]) -> Tier:
    """The last tier, the most durable (the bucket on a VM): where what outlives every VM is kept."""
    return tiers[-1]


def _scheme(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "disk"
