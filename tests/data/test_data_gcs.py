"""Token data from GCS against a real emulator (fake-gcs-server): a 2-rank torchrun job copies the
shards once (one process fetches, the other finds them verified) and trains exactly as on the same
files read locally; the cache then serves without a download; a download SIGKILLed midway resumes
from the chunks it left; a corrupted cached copy is detected and fetched again; bad input fails
before anything downloads, naming the key. Shards are read in order, one global index over them."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from harness.config import ConfigError
from harness.data import gcs_cache as gcs
from harness.data.tokens import TokenFile
from tests import runs
from tests.gcs_emulator import FakeGCS

KiB = 1 << 10
TRAIN = ["data=tokens", "data.vocab_size=256", "data.block_size=32", "train.max_steps=10", "model.n_embd=32",
         "checkpoint.interval_steps=50"]


@pytest.fixture
def bucket(fake_gcs: FakeGCS) -> str:
    name = f"tok-{uuid.uuid4().hex[:12]}"
    fake_gcs.make_bucket(name)
    return name


def tokens(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint16).tobytes()


def upload(gcs_server: FakeGCS, bucket: str, name: str, data: bytes) -> str:
    gcs_server.client().bucket(bucket).blob(name).upload_from_string(data)
    return f"gs://{bucket}/{name}"


def test_shards_from_gcs_train_exactly_as_the_same_files_read_locally_and_fill_the_cache_once(
        tmp_path, fake_gcs, bucket):
    # 31 windows of 32 in the first shard, so 10 steps of 16 samples run through both and wrap around.
    shards = {"tok/train-000.bin": tokens(1000, 1), "tok/train-001.bin": tokens(3000, 2)}
    urls, files = [], []
    for name, data in shards.items():
        urls.append(upload(fake_gcs, bucket, name, data))
        files.append(tmp_path / Path(name).name)
        files[-1].write_bytes(data)
    cache = tmp_path / "cache"
    gs_log, local_log = tmp_path / "gs.txt", tmp_path / "local.txt"
    gs_run = [*TRAIN, f"data.paths=[{','.join(urls)}]", f"data.cache_dir={cache}", f"run.dir={tmp_path / 'gs'}"]
    local_run = [*TRAIN, f"data.paths=[{','.join(map(str, files))}]", f"run.dir={tmp_path / 'local'}"]
    assert runs.run_launcher(2, gs_run, gs_log) == 0, runs.tail(gs_log)  # what a VM's unit runs
    assert runs.run(2, local_run, local_log) == 0, runs.tail(local_log)
    assert runs.summary(tmp_path / "gs")["model_sha256"] == runs.summary(tmp_path / "local")["model_sha256"]

    # The launcher fetched before torchrun started; one rank verified the copies, the other found them so.
    text = gs_log.read_text()
    assert len(re.findall(rf"data: 2 gs:// file\(s\), 7.8 KiB in {cache}: 7.8 KiB fetched", text)) == 1, text
    fetched, torchrun = text.index("7.8 KiB fetched"), text.index("torch.distributed.run")
    assert fetched < torchrun < text.index("verified by another process")
    for name, data in shards.items():
        assert (cache / bucket / name).read_bytes() == data

    again = gcs.cached([("data.paths[0]", urls[0]), ("data.paths[1]", urls[1])], cache)
    assert (again.fetched, again.verified, again.total) == (0, 8000, 8000)
    assert again.paths == [cache / bucket / name for name in shards]


FETCH = """
import sys
from pathlib import Path
from harness.data.gcs_cache import cached
cached([("data.path", sys.argv[1])], Path(sys.argv[2]), threads=2, chunk_bytes=16 * 1024)
"""


def kill_midway(url: str, cache: Path, record: Path) -> bool:
    """Start a process filling `cache` with `url`, SIGKILL it once it recorded 20 chunks; True if it had
    not finished by then."""
    proc = subprocess.Popen([sys.executable, "-c", FETCH, url, str(cache)], cwd=runs.REPO, env=runs.env(),
                            start_new_session=True)
    try:
        runs.wait_for(lambda: proc.poll() is not None or (record.exists() and record.read_text().count("\n") > 20),
                      timeout=60, what="chunks on disk")
    finally:
        runs.kill_tree(proc.pid)
        proc.wait()
    return not record.with_suffix("").exists()


def test_a_download_killed_midway_resumes_from_the_chunks_it_left(tmp_path, fake_gcs, bucket):
    data = tokens(4 << 20, 3)  # 8 MiB: 512 chunks of 16 KiB
    url = upload(fake_gcs, bucket, "big.bin", data)
    for attempt in range(5):  # the download is short: retry until the kill lands inside it
        cache = tmp_path / f"cache{attempt}"
        record = cache / bucket / "big.bin.chunks"
        if kill_midway(url, cache, record):
            break
    else:
        pytest.fail("could not land a kill inside the download in 5 attempts")
    assert (cache / bucket / "big.bin.part").exists(), "the killed download's chunks were not kept"

    fill = gcs.cached([("data.path", url)], cache, threads=2, chunk_bytes=16 * KiB)
    assert 0 < fill.resumed < len(data) and fill.fetched == len(data) - fill.resumed
    assert fill.paths[0].read_bytes() == data
    assert not (cache / bucket / "big.bin.part").exists() and not record.exists()


def test_a_corrupted_cached_copy_is_detected_and_fetched_again(tmp_path, fake_gcs, bucket):
    data = tokens(50_000, 4)
    url = upload(fake_gcs, bucket, "t.bin", data)
    cache = tmp_path / "cache"
    (copy,) = gcs.cached([("data.path", url)], cache, chunk_bytes=16 * KiB).paths
    flipped = bytearray(copy.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    copy.write_bytes(bytes(flipped))

    fill = gcs.cached([("data.path", url)], cache, chunk_bytes=16 * KiB)
    assert fill.refetched == (url,) and fill.fetched == len(data) and fill.verified == 0
    assert copy.read_bytes() == data


def test_bad_gcs_input_fails_before_any_download_naming_the_key(tmp_path, fake_gcs, bucket, monkeypatch):
    cache = tmp_path / "cache"
    odd = upload(fake_gcs, bucket, "odd.bin", b"\x01\x02\x03")
    good = upload(fake_gcs, bucket, "good.bin", tokens(1000, 5))
    for files, says in [
        ([("data.paths[1]", f"gs://{bucket}/missing.bin")], rf"data\.paths\[1\]='gs://{bucket}/missing.bin': no such"),
        ([("data.path", odd)], r"data\.path='.*odd.bin': 3 bytes, not a whole number of uint16 tokens"),
        ([("data.path", f"gs://{bucket}")], r"data\.path='gs://.*' is not a gs:// file URL; use gs://bucket/"),
        ([("data.path", f"gs://{bucket}/a/../b.bin")], r"is not a gs:// file URL"),
    ]:
        with pytest.raises(ConfigError, match=says):
            gcs.cached(files, cache)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: SimpleNamespace(total=10 << 30, used=10 << 30, free=1000))
    with pytest.raises(ConfigError, match=r"data\.cache_dir='.*': 2.0 KiB left to fetch for data\.path/data\.paths, "
                                          r"only 1000 B free there"):
        gcs.cached([("data.path", good)], cache)
    assert not list((cache / bucket).glob("*")), "something was downloaded"
    with pytest.raises(ConfigError, match=r"data\.cache_dir='/proc/nope': cannot be created"):
        gcs.cached([("data.path", good)], Path("/proc/nope"))


def test_a_process_waiting_on_a_stalled_filler_gives_up_naming_the_setting(tmp_path, fake_gcs, bucket):
    cache = tmp_path / "cache"
    cache.mkdir()
    holder = os.open(cache / gcs.LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another process of the node, filling the cache and stuck
    try:
        started = time.monotonic()
        stalled = r"has made no progress filling the cache for .*s \(data\.download_stall_s=0\.5\)"
        with pytest.raises(TimeoutError, match=stalled):
            gcs.cached([("data.path", upload(fake_gcs, bucket, "w.bin", b"\0\0"))], cache, stall_s=0.5)
        assert time.monotonic() - started < 5
    finally:
        os.close(holder)


def test_shards_read_in_order_under_one_global_index(tmp_path):
    shards = [np.arange(n, dtype=np.uint16) % 200 for n in (70, 40, 100)]  # 2, 1 and 3 windows of 32
    for i, s in enumerate(shards):
        s.tofile(tmp_path / f"{i}.bin")
    data = TokenFile(vocab_size=200, block_size=32, paths=[str(tmp_path / f"{i}.bin") for i in range(3)])
    expected = [shards[k][w * 32 : w * 32 + 33] for k, count in enumerate((2, 1, 3)) for w in range(count)]
    assert data.windows == 6
    for index in range(14):  # and around again
        assert data.sample(index).tolist() == expected[index % 6].tolist()
    single = TokenFile(vocab_size=200, block_size=32, path=str(tmp_path / "0.bin"))
    assert single.sample(3).tolist() == shards[0][32:65].tolist()


def test_bad_token_files_name_the_key(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"abc")
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "short.bin")
    np.full(100, 300, dtype=np.uint16).tofile(tmp_path / "big_ids.bin")
    for kw, says in [
        ({}, r"data=tokens needs data\.path=FILE or data\.paths=\[FILE,\.\.\.\]"),
        ({"path": "a", "paths": ["b"]}, r"data\.path and data\.paths are both set"),
        ({"paths": [str(tmp_path / "short.bin"), str(tmp_path / "nope.bin")]}, r"data\.paths\[0\]=.*10 tokens"),
        ({"paths": [str(tmp_path / "odd.bin")]}, r"data\.paths\[0\]=.*3 bytes, not a whole number of uint16"),
        ({"path": str(tmp_path / "nope.bin")}, r"data\.path=.*no such token file"),
    ]:
        with pytest.raises(ConfigError, match=says):
            TokenFile(vocab_size=256, block_size=32, **kw)
    with pytest.raises(ConfigError, match=r"data\.path: token id 300 .* >= data\.vocab_size=256"):
        TokenFile(vocab_size=256, block_size=32, path=str(tmp_path / "big_ids.bin")).sample(0)
