"""GCSStore against a real GCS emulator (fake-gcs-server): layout, commit protocol, verification,
retries and cleanup."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
from google.api_core.exceptions import ServiceUnavailable

from harness.checkpoint.gcs_store import GCSStore, parse_gs_url
from harness.checkpoint.manifest import CorruptCheckpoint, Manifest, file_entry
from harness.checkpoint.store import CommitConflict, StoreError
from harness.checkpoint.tiers import open_store
from harness.config import ConfigError
from infra import settings as infra_settings
from tests.gcs_emulator import FakeGCS, fake_gcs, running_fake_gcs  # noqa: F401  (fake_gcs is a fixture)

PREFIX = "runs/exp1"
MiB = 1 << 20
SMALL = {"__0_0.distcp": 4096, ".metadata": 100}
# One file over 8 MiB goes up as a resumable upload in 1 MiB chunks; the nested one tests directories.
MIXED = {"__0_0.distcp": 9 * MiB + 123, "__1_0.distcp": 3 * MiB // 2, ".metadata": 300, "extra/rng.pt": 10}


def new_store(bucket: str, **kw) -> GCSStore:
    return GCSStore(f"gs://{bucket}/{PREFIX}", **{"retry_deadline_s": 3.0, "chunk_size": MiB, **kw})


@pytest.fixture
def bucket(fake_gcs: FakeGCS) -> str:  # noqa: F811
    name = f"t-{uuid.uuid4().hex[:12]}"
    fake_gcs.make_bucket(name)
    return name


@pytest.fixture
def store(bucket: str) -> GCSStore:
    return new_store(bucket)


def make_checkpoint(tmp_path: Path, step: int, attempt: str, sizes: dict[str, int] = SMALL):
    src = tmp_path / f"src-{step}-{attempt}"
    for name, size in sizes.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(uuid.uuid4().bytes * (size // 16) + b"x" * (size % 16))
    manifest = Manifest(step=step, files={n: file_entry(src / n) for n in sizes}, attempt=attempt)
    return src, manifest


def objects(gcs: FakeGCS, bucket: str, under: str = "") -> set[str]:
    return {b.name for b in gcs.client().list_blobs(bucket, prefix=f"{PREFIX}/{under}")}


def obj(step: int, attempt: str, name: str) -> str:
    return f"{PREFIX}/step_{step:09d}/{attempt}/{name}"


def put_object(gcs: FakeGCS, bucket: str, name: str, data: bytes) -> None:
    gcs.client().bucket(bucket).blob(name).upload_from_string(data)


def test_round_trip(store, bucket, fake_gcs, tmp_path):  # noqa: F811
    src, manifest = make_checkpoint(tmp_path, 100, "a1", MIXED)
    store.put_committed(100, src, manifest)

    assert objects(fake_gcs, bucket) == {obj(100, "a1", n) for n in MIXED} | {
        f"{PREFIX}/step_000000100/manifest.json",
        f"{PREFIX}/latest",
    }
    assert store.committed_steps() == [100]
    assert store.latest_step() == 100
    assert store.verify(100) == manifest
    out = store.fetch(100, tmp_path / "scratch")
    assert out == tmp_path / "scratch" / "step_000000100"
    for name in MIXED:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name


def test_failed_upload_writes_no_manifest(store, bucket, fake_gcs, tmp_path):  # noqa: F811
    src, manifest = make_checkpoint(tmp_path, 7, "a1", MIXED)
    (src / ".metadata").unlink()
    with pytest.raises(StoreError, match=r"gs://.*runs/exp1.*uploading step 7.*nothing committed"):
        store.put_committed(7, src, manifest)

    # Bytes that differ from the manifest's CRC32C are refused as well.
    src, manifest = make_checkpoint(tmp_path, 8, "a1", SMALL)
    data = bytearray((src / "__0_0.distcp").read_bytes())
    data[10] ^= 0xFF
    (src / "__0_0.distcp").write_bytes(data)
    with pytest.raises(StoreError, match="crc32c"):
        store.put_committed(8, src, manifest)

    assert not any(n.endswith("manifest.json") for n in objects(fake_gcs, bucket))
    assert store.committed_steps() == []
    assert store.latest_step() is None


def test_emulator_dying_mid_upload_commits_nothing(tmp_path, monkeypatch):
    with running_fake_gcs() as gcs:
        gcs.make_bucket("dying")
        store = GCSStore("gs://dying/p", retry_deadline_s=1.0, workers=1)
        src, manifest = make_checkpoint(tmp_path, 3, "a1", MIXED)
        real_upload, commits = store._upload, []

        def upload_then_die(*args):
            real_upload(*args)
            gcs.stop()  # after the first file: the rest meet a dead endpoint

        monkeypatch.setattr(store, "_upload", upload_then_die)
        monkeypatch.setattr(store, "_commit", lambda *a: commits.append(a))
        with pytest.raises(StoreError, match="nothing committed"):
            store.put_committed(3, src, manifest)
        assert commits == []


def test_transient_outage_is_retried(tmp_path):
    with running_fake_gcs() as gcs:
        gcs.make_bucket("outage")
        store = GCSStore("gs://outage/p", retry_deadline_s=30.0, chunk_size=MiB)
        src, manifest = make_checkpoint(tmp_path, 5, "a1", MIXED)
        gcs.stop()
        errors: list[BaseException] = []

        def put() -> None:
            try:
                store.put_committed(5, src, manifest)
            except BaseException as err:
                errors.append(err)

        worker = threading.Thread(target=put)
        worker.start()
        time.sleep(1.5)
        assert worker.is_alive(), f"gave up during the outage: {errors}"
        gcs.start()  # same port; the memory backend is empty but the bucket is back
        worker.join(timeout=40)
        assert not worker.is_alive() and errors == []
        assert store.committed_steps() == [5]
        assert store.verify(5) == manifest


def test_unreachable_store_fails_within_deadline(tmp_path):
    with running_fake_gcs() as gcs:
        gcs.make_bucket("down")
        store = GCSStore("gs://down/p", retry_deadline_s=1.0)
        src, manifest = make_checkpoint(tmp_path, 5, "a1")
        gcs.stop()
        start = time.monotonic()
        with pytest.raises(StoreError, match=r"gs://down/p.*uploading step 5.*nothing committed"):
            store.put_committed(5, src, manifest)
        assert time.monotonic() - start < 10


def test_generation_precondition_one_winner(bucket, fake_gcs, tmp_path):  # noqa: F811
    stores = [new_store(bucket), new_store(bucket)]
    checkpoints = [make_checkpoint(tmp_path, 42, attempt) for attempt in ("a", "b")]
    barrier = threading.Barrier(2)
    outcomes: dict[str, BaseException | None] = {}

    def commit(store: GCSStore, src: Path, manifest: Manifest) -> None:
        barrier.wait()
        try:
            store.put_committed(42, src, manifest)
            outcomes[manifest.attempt] = None
        except BaseException as err:
            outcomes[manifest.attempt] = err

    pairs = zip(stores, checkpoints, strict=True)
    threads = [threading.Thread(target=commit, args=(s, *c)) for s, c in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    winner = stores[0].read_manifest(42).attempt
    loser = "b" if winner == "a" else "a"
    assert outcomes[winner] is None
    assert isinstance(outcomes[loser], CommitConflict)
    assert "step 42" in str(outcomes[loser]) and f"gs://{bucket}/{PREFIX}" in str(outcomes[loser])
    src, manifest = checkpoints[0] if winner == "a" else checkpoints[1]
    assert stores[1].verify(42) == manifest
    out = stores[1].fetch(42, tmp_path / "scratch")
    assert all((out / n).read_bytes() == (src / n).read_bytes() for n in SMALL)

    # A later writer loses too; the winner re-putting its own commit (a retried save) is accepted.
    with pytest.raises(CommitConflict):
        new_store(bucket).put_committed(42, *make_checkpoint(tmp_path, 42, "c"))
    new_store(bucket).put_committed(42, src, manifest)
    assert stores[0].verify(42) == manifest


def test_latest_never_moves_backwards(store, bucket, fake_gcs, tmp_path, monkeypatch):  # noqa: F811
    for step in (200, 100):
        store.put_committed(step, *make_checkpoint(tmp_path, step, "a"))
    assert store.latest_step() == 200
    assert store.committed_steps() == [100, 200]
    store.put_committed(300, *make_checkpoint(tmp_path, 300, "a"))
    latest = fake_gcs.client().bucket(bucket).blob(f"{PREFIX}/latest")
    assert json.loads(latest.download_as_bytes()) == {"step": 300}

    # Another writer moves `latest` to 500 between our read and our write: our write must not land.
    real_read = store._read_latest
    calls = []

    def stale_read():
        result = real_read()
        if not calls:
            put_object(fake_gcs, bucket, f"{PREFIX}/latest", b'{"step": 500}')
        calls.append(result)
        return result

    monkeypatch.setattr(store, "_read_latest", stale_read)
    store.put_committed(400, *make_checkpoint(tmp_path, 400, "a"))
    assert calls[0][0] == 300 and calls[1][0] == 500
    assert store.latest_step() == 500
    assert store.committed_steps() == [100, 200, 300, 400]


def test_corruption_names_object_and_reason(store, bucket, fake_gcs, tmp_path):  # noqa: F811
    for step in (1, 2, 3, 4):
        store.put_committed(step, *make_checkpoint(tmp_path, step, "a"))
    gs = f"gs://{bucket}/"
    data = bytearray(fake_gcs.client().bucket(bucket).blob(obj(1, "a", "__0_0.distcp")).download_as_bytes())
    data[0] ^= 0xFF
    put_object(fake_gcs, bucket, obj(1, "a", "__0_0.distcp"), bytes(data))
    put_object(fake_gcs, bucket, obj(2, "a", "__0_0.distcp"), bytes(data[:-1]))
    fake_gcs.client().bucket(bucket).blob(obj(3, "a", ".metadata")).delete()
    put_object(fake_gcs, bucket, f"{PREFIX}/step_000000004/manifest.json", b"{not json")

    cases = {
        1: (obj(1, "a", "__0_0.distcp"), "crc32c"),
        2: (obj(2, "a", "__0_0.distcp"), "size 4095 bytes, manifest says 4096"),
        3: (obj(3, "a", ".metadata"), "missing object"),
        4: (f"{PREFIX}/step_000000004/manifest.json", "malformed manifest"),
        9: (f"{PREFIX}/step_000000009/manifest.json", "manifest missing"),
    }
    for step, (name, reason) in cases.items():
        for check in (store.verify, lambda s: store.fetch(s, tmp_path / "scratch")):
            with pytest.raises(CorruptCheckpoint) as info:
                check(step)
            assert info.value.where == gs + name and reason in info.value.reason, (step, info.value)


def test_check_access(store, bucket, fake_gcs, monkeypatch):  # noqa: F811
    store.check_access()
    assert objects(fake_gcs, bucket) == set()  # the probe is gone

    with pytest.raises(StoreError, match=r"gs://no-such-bucket-x1/p.*does not exist"):
        GCSStore("gs://no-such-bucket-x1/p").check_access()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{closed}")
    start = time.monotonic()
    with pytest.raises(StoreError, match=f"gs://{bucket}/{PREFIX}"):
        new_store(bucket, retry_deadline_s=120.0).check_access()
    assert time.monotonic() - start < 8


@pytest.mark.parametrize(
    "url",
    [
        "gs://",
        "gs://UPPER_case!/x",
        "gs:///x",
        "gs://ab/x",
        "gs://" + "a" * 64,
        "gs://-dash-first/x",
        "gs://goog-ckpt/x",
        "gs://my-google-bucket/x",
        "gs://192.168.1.1/x",
        "gs://fine-bucket/a//b",
        "gs://fine-bucket/a/../b",
    ],
)
def test_malformed_urls(url):
    with pytest.raises(StoreError) as info:
        open_store(url)
    assert repr(url) in str(info.value)


@pytest.mark.parametrize(("bucket", "why"), [
    ("a..b", "no '..'"), ("ab-.cd", "no '..', '.-' or '-.'"), ("my-g00gle-ckpt", "contain 'google'"),
    ("googley", "start with 'goog'"),
])
def test_the_store_refuses_the_bucket_names_infra_refuses(bucket, why):
    """One rule set (harness/bucket_names.py) for the store and for infra's validation: these names were
    accepted by the store once while infra rejected them."""
    with pytest.raises(StoreError, match=f"not a valid bucket name .*{why}"):
        parse_gs_url(f"gs://{bucket}/run")
    with pytest.raises(ConfigError, match=f"is not a valid GCS bucket name: .*{why}"):
        infra_settings.load([f"infra.bucket.name={bucket}"])


def test_valid_urls():
    assert parse_gs_url("gs://my-bucket") == ("my-bucket", "")
    assert parse_gs_url("gs://my.bucket_1/a/b/") == ("my.bucket_1", "a/b")
    assert isinstance(open_store("gs://ckpt-bucket/run"), GCSStore)


def test_delete_removes_manifest_first(store, bucket, fake_gcs, tmp_path, monkeypatch):  # noqa: F811
    for step in (1, 2):
        store.put_committed(step, *make_checkpoint(tmp_path, step, "a"))
    real_delete = store._delete_blob

    def only_manifests(name: str) -> None:
        if not name.endswith("manifest.json"):
            raise ServiceUnavailable("injected")
        real_delete(name)

    monkeypatch.setattr(store, "_delete_blob", only_manifests)
    with pytest.raises(StoreError, match="deleting step 1"):
        store.delete(1)
    # Interrupted after the manifest: the checkpoint is gone although its files are still there.
    assert store.committed_steps() == [2]
    assert objects(fake_gcs, bucket, "step_000000001/") == {obj(1, "a", n) for n in SMALL}

    monkeypatch.undo()
    assert store.cleanup_uncommitted(older_than_s=3600) == []
    assert store.cleanup_uncommitted(older_than_s=0) == ["step_000000001/a"]
    assert objects(fake_gcs, bucket, "step_000000001/") == set()
    store.delete(2)
    assert store.committed_steps() == []
    assert objects(fake_gcs, bucket, "step_") == set()


def test_cleanup_uncommitted(store, bucket, fake_gcs, tmp_path):  # noqa: F811
    store.put_committed(1, *make_checkpoint(tmp_path, 1, "win"))
    with pytest.raises(CommitConflict):
        new_store(bucket).put_committed(1, *make_checkpoint(tmp_path, 1, "lose"))
    src, manifest = make_checkpoint(tmp_path, 2, "crash")
    (src / "__0_0.distcp").unlink()  # uploaded after .metadata, so that one is left behind
    with pytest.raises(StoreError):
        store.put_committed(2, src, manifest)
    store.put_committed(3, *make_checkpoint(tmp_path, 3, "a"))
    put_object(fake_gcs, bucket, f"{PREFIX}/step_000000003/manifest.json", b"garbage")
    put_object(fake_gcs, bucket, obj(3, "stray", "x"), b"x")
    before = objects(fake_gcs, bucket)
    assert obj(1, "lose", ".metadata") in before and obj(2, "crash", ".metadata") in before

    assert store.cleanup_uncommitted(older_than_s=3600) == []
    assert store.cleanup_uncommitted(older_than_s=0) == ["step_000000001/lose", "step_000000002/crash"]
    after = objects(fake_gcs, bucket)
    assert not any("/lose/" in n or "/crash/" in n for n in after)
    assert obj(3, "stray", "x") in after  # step 3's manifest is unreadable: left alone
    assert store.verify(1).attempt == "win"
