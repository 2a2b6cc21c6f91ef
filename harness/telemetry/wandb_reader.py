"""Read back what an offline W&B run logged, without W&B: wandb 0.31 writes no summary file offline and
has no Python reader for its `.wandb` files. Used by the tests, and to check a run before `wandb sync`.

Format (a LevelDB-style log): a 7-byte file header (`:W&B`, magic 0xBEE1, version), then 32 KiB
blocks of chunks, each with a 7-byte header (crc32, length, type FULL/FIRST/MIDDLE/LAST); a block's
tail shorter than a chunk header is padding. Reassembled payloads are
`wandb.proto.wandb_internal_pb2.Record` messages.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_FILE_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    path: Path
    run_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    step_metrics: dict[str, str] = field(default_factory=dict)  # define_metric: name or glob -> x axis
    exit_code: int | None = None


def records(path: Path) -> Iterator[Any]:
    """The Record messages of one `.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, _version = _FILE_HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, partial = _FILE_HEADER.size, b""
    while pos + _CHUNK_HEADER.size <= len(data):
        if _BLOCK - pos % _BLOCK < _CHUNK_HEADER.size:
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0:  # zero fill: the end of what was written
            break
        payload = data[pos + _CHUNK_HEADER.size: pos + _CHUNK_HEADER.size + length]
        pos += _CHUNK_HEADER.size + length
        if kind in (_FIRST, _MIDDLE):
            partial = (partial if kind == _MIDDLE else b"") + payload
            continue
        record = pb.Record()
        record.ParseFromString(partial + payload if kind == _LAST else payload)
        partial = b""
        yield record


def _key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


def read_run(path: Path) -> OfflineRun:
    """One offline run: `path` is its `.wandb` file or its `offline-run-*` folder."""
    path = Path(path)
    if path.is_dir():
        path = next(path.glob("run-*.wandb"))
    run = OfflineRun(path)
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id = record.run.run_id
            run.config.update({_key(u): json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            run.config.update({_key(u): json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary.update({_key(u): json.loads(u.value_json) for u in record.summary.update})
        elif kind == "metric" and record.metric.step_metric:
            run.step_metrics[record.metric.name or record.metric.glob_name] = record.metric.step_metric
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def offline_runs(wandb_parent: Path, run_id: str | None = None) -> list[OfflineRun]:
    """Every offline run folder under `<wandb_parent>/wandb`, oldest first, optionally of one run id."""
    folders = sorted(Path(wandb_parent, "wandb").glob("offline-run-*"))
    runs = [read_run(f) for f in folders if any(f.glob("run-*.wandb"))]
    return [r for r in runs if run_id is None or r.run_id == run_id]
