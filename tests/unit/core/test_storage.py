"""Publication on a local path, a real S3 server (moto) and a real GCS emulator
(fake-gcs-server): whole or absent, create-only markers, one-call listings, cached local
copies, and an upload killed halfway never listed."""

import json
import subprocess
import sys

import pytest

from lib.core.errors import StorageError
from lib.core.storage import (
    LocalStorage,
    atomic_path,
    atomic_write_json,
    check_writable,
    open_storage,
    remove_stale_temporaries,
)
from tests.conftest import REPO


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_and_stale_cleanup(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    (tmp_path / "b.json.tmp-abc").write_text("junk")
    assert remove_stale_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_clean_temporaries_touches_only_the_prefix(tmp_path):
    storage = LocalStorage(tmp_path)
    junk = [
        "merge/embeddings.safetensors.tmp-0123456789ab",
        "merge/by_source/a/metadata.parquet.tmp-0123456789ab",
        "embed/shards/shard_00001.parquet.tmp-0123456789ab",
    ]
    keep = [
        "embed/shards/shard_00010.parquet.tmp-0123456789ab",  # a sibling task, still writing
        "embed/shards/shard_00001.parquet",
        "merged/x.tmp-0123456789ab",
    ]
    for name in junk + keep:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert storage.clean_temporaries("merge/") == 2
    assert storage.clean_temporaries("embed/shards/shard_00001.") == 1
    assert storage.clean_temporaries("kmeans/level1/") == 0  # no such dir
    assert sorted(
        p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()
    ) == sorted(keep)


def test_check_writable_names_the_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="not writable.*run.root"):
        check_writable(blocker / "sub")


@pytest.fixture(params=["local", "s3", "gs"])
def storage(request, tmp_path):
    if request.param != "local":
        root = request.getfixturevalue({"s3": "s3_root", "gs": "gcs_root"}[request.param])
        return open_storage(root, scratch=tmp_path / "scratch")
    return open_storage(tmp_path / "run")


def test_publish_is_whole_or_absent(storage):
    with storage.publish("a/b/data.bin") as staged:
        staged.path.write_bytes(b"hello world")
    assert staged.output.path == "a/b/data.bin" and staged.output.bytes == 11
    assert storage.read_bytes("a/b/data.bin") == b"hello world"
    assert storage.sha256("a/b/data.bin") == staged.output.sha256
    with pytest.raises(RuntimeError), storage.publish("a/b/broken.bin") as staged:
        staged.path.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert not storage.exists("a/b/broken.bin")
    assert not staged.path.exists()  # no staging file left behind
    assert storage.list("a") == {"a/b/data.bin": 11}


def test_create_only_list_read_and_remove(storage):
    assert storage.create("m/task.json", b"{}")
    assert not storage.create("m/task.json", b'{"other": 1}')
    assert storage.read_json("m/task.json") == {}
    storage.publish_json("m/other.json", {"x": 1})
    assert storage.read_many(["m/task.json", "m/other.json", "m/missing.json"]) == {
        "m/task.json": b"{}",
        "m/other.json": b'{\n  "x": 1\n}\n',
    }
    assert storage.read_json("m/missing.json") is None
    assert storage.size("m/missing.json") is None
    storage.remove("m/task.json")
    storage.remove("m/task.json")  # absent: no error
    assert sorted(storage.list("m")) == ["m/other.json"]
    storage.remove_tree("m")
    assert storage.list("m") == {}


def test_local_path_is_a_checked_copy(storage):
    storage.publish_bytes("x/arr.bin", b"1234")
    first = storage.local_path("x/arr.bin")
    assert first.read_bytes() == b"1234"
    storage.publish_bytes("x/arr.bin", b"56789")  # replaced: the copy must follow
    assert storage.local_path("x/arr.bin").read_bytes() == b"56789"
    with pytest.raises(FileNotFoundError):
        storage.local_path("x/none.bin")


def test_local_files_are_published_as_logs(storage):
    log = storage.local_file("embed/logs/task_00000.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        fh.write("line 1\n")
    storage.publish_log("embed/logs/task_00000.log")
    assert storage.read_text("embed/logs/task_00000.log") == "line 1\n"


def test_an_unreachable_bucket_names_the_fix(s3_server, tmp_path):
    storage = open_storage("s3://no-such-bucket-here/runs", scratch=tmp_path)
    with pytest.raises(StorageError, match="not writable.*AWS_ENDPOINT_URL"):
        storage.check_writable()


def test_local_storage_is_the_directory_itself(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.publish_bytes("f.txt", b"x")
    assert storage.local_path("f.txt") == tmp_path / "f.txt"
    assert storage.local_file("logs/a.log") == tmp_path / "logs" / "a.log"


# Uploads a 6 MiB object in 5 MiB parts (S3 multipart, GCS resumable) and stops, unfinished,
# after the first part is on the server: the parent kills it there.
_HALF_UPLOAD = """
import sys, time
from lib.core.storage import open_storage
storage = open_storage(sys.argv[1])
fh = storage.fs.open(storage._p("big/shard.bin"), "wb", block_size=5 * 2**20)
fh.write(b"x" * (6 * 2**20))
fh.flush()
print("part sent", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("store", ["s3", "gs"])
def test_an_upload_killed_halfway_is_never_listed(store, request):
    root = request.getfixturevalue({"s3": "s3_root", "gs": "gcs_root"}[store])
    proc = subprocess.Popen(
        [sys.executable, "-c", _HALF_UPLOAD, root],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line == "part sent\n", line + proc.stdout.read()
    finally:
        proc.kill()  # SIGKILL mid-upload: the object was never completed
        proc.wait(timeout=30)
    storage = open_storage(root)
    storage.publish_bytes("big/other.bin", b"done")
    assert storage.list("big") == {"big/other.bin": 4}
    assert not storage.exists("big/shard.bin") and storage.size("big/shard.bin") is None


def test_a_missing_gcs_bucket_names_the_fix(gcs_server, tmp_path):
    storage = open_storage("gs://no-such-bucket-here/runs", scratch=tmp_path)
    with pytest.raises(StorageError, match="no-such-bucket-here.*not writable.*STORAGE_EMULATOR"):
        storage.check_writable()
