"""Completion markers: valid only with the run's config hash and intact outputs; written
create-only; a stage's markers read with one listing, on a local path and on S3."""

import pytest

from lib.core.errors import ConfigMismatchError
from lib.core.markers import (
    CompletionMarker,
    check_marker,
    completed_tasks,
    discard_marker,
    read_marker,
    valid_marker,
    write_marker,
)
from lib.core.paths import RunPaths


def _publish_task(paths: RunPaths, task: int, data: bytes, h: str = "h1") -> CompletionMarker:
    out = paths.storage.publish_bytes(f"s/out_{task}.bin", data)
    marker = CompletionMarker("s", task, 3, h, outputs=[out])
    assert write_marker(paths.storage, paths.marker("s", task), marker)
    return marker


def test_marker_validity(tmp_path):
    paths = RunPaths(tmp_path)
    _publish_task(paths, 0, b"12345")
    assert check_marker(paths, "s", 0, "h1") is not None
    with pytest.raises(ConfigMismatchError, match="different configuration"):
        check_marker(paths, "s", 0, "h2")
    (tmp_path / "s" / "out_0.bin").write_bytes(b"123")  # truncated: the marker no longer counts
    assert check_marker(paths, "s", 0, "h1") is None


@pytest.mark.parametrize("where", ["local", "s3"])
def test_markers_are_create_only_and_listed_in_one_call(where, tmp_path, request):
    root = request.getfixturevalue("s3_root") if where == "s3" else str(tmp_path)
    paths = RunPaths(root)
    first = _publish_task(paths, 0, b"aaaa")
    _publish_task(paths, 2, b"cc")
    again = CompletionMarker("s", 0, 3, "h1", outputs=first.outputs, extra={"second": True})
    assert not write_marker(paths.storage, paths.marker("s", 0), again)  # nothing overwritten
    assert "second" not in read_marker(paths.storage, paths.marker("s", 0)).extra
    assert completed_tasks(paths, "s", 3, "h1") == {0, 2}
    with pytest.raises(ConfigMismatchError):
        completed_tasks(paths, "s", 3, "other")
    paths.storage.remove("s/out_2.bin")  # an output gone: task 2 is no longer done
    assert completed_tasks(paths, "s", 3, "h1") == {0}
    # a stale marker is discarded before the task publishes again
    discard_marker(paths.storage, paths.marker("s", 2))
    _publish_task(paths, 2, b"cc")
    assert completed_tasks(paths, "s", 3, "h1") == {0, 2}


def test_a_checkpoint_of_another_config_is_redone_not_an_error(tmp_path):
    paths = RunPaths(tmp_path)
    _publish_task(paths, 1, b"x", h="old")
    name = paths.marker("s", 1)
    assert valid_marker(paths.storage, name, "new", on_mismatch="stale") is None
    with pytest.raises(ConfigMismatchError):
        valid_marker(paths.storage, name, "new")
    assert valid_marker(paths.storage, name, None) is not None  # any config: outputs intact
