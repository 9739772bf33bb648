"""Completion markers: valid only with the run's config hash and intact outputs; written
create-only; a stage's markers read with one listing, on a local path and on S3."""

import json

import pytest

from lib.core.errors import ConfigMismatchError, InvalidMarkerError
from lib.core.markers import (
    CompletionMarker,
    check_marker,
    completed_tasks,
    discard_marker,
    output_problems,
    read_marker,
    require_intact,
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


def test_a_changed_output_invalidates_its_marker_with_the_reason(tmp_path):
    paths = RunPaths(tmp_path)
    _publish_task(paths, 0, b"12345")
    name = paths.marker("s", 0)
    assert require_intact(paths.storage, name) is not None
    (tmp_path / "s" / "out_0.bin").write_bytes(b"12945")  # same size: only sha256 sees it
    assert check_marker(paths, "s", 0, "h1") is not None  # sizes alone trust it
    with pytest.raises(InvalidMarkerError) as err:
        require_intact(paths.storage, name)
    msg = str(err.value)
    assert "out_0.bin: sha256" in msg and "modified or corrupted in place" in msg
    assert "marker invalidated; rerun the same command to redo task 0 of s" in msg
    # Gone from where every launcher, retry and job looks; kept aside with the reason.
    assert check_marker(paths, "s", 0, "h1") is None
    (aside,) = (tmp_path / "s" / "completions" / "invalid").iterdir()
    assert aside.name.startswith("task_00000.") and str(aside) in msg
    record = json.loads(aside.read_text())
    assert record["marker"] == name and "sha256" in record["reason"]
    assert record["content"]["outputs"][0]["path"] == "s/out_0.bin"
    assert not RunPaths.is_marker(aside.relative_to(tmp_path).as_posix())
    assert completed_tasks(paths, "s", 3, "h1") == set()


def test_output_problems_names_missing_truncated_and_changed_files(tmp_path):
    paths = RunPaths(tmp_path)
    outs = [paths.storage.publish_bytes(f"s/{n}", b"abcd") for n in ("a", "b", "c", "d")]
    marker = CompletionMarker("s", 0, 1, "h", outputs=outs)
    paths.storage.remove("s/a")
    (tmp_path / "s" / "b").write_bytes(b"ab")
    (tmp_path / "s" / "c").write_bytes(b"abcX")
    problems = output_problems(paths.storage, marker)
    assert set(problems) == {"s/a", "s/b", "s/c"}
    assert "is missing" in problems["s/a"]
    assert "has 2 bytes but its marker recorded 4" in problems["s/b"]
    assert "sha256" in problems["s/c"]
    assert set(output_problems(paths.storage, marker, verify_sha256=False)) == {"s/a", "s/b"}
    assert output_problems(paths.storage, marker, only=["s/d"]) == {}


def test_a_checkpoint_naming_the_same_file_is_invalidated_too(tmp_path):
    """A k-means level marker repeats its final step's outputs: if only the level marker
    went, the redone level would trust the step and publish the broken file again."""
    paths = RunPaths(tmp_path)
    step = paths.kmeans_step(1, "step0")
    out = paths.storage.publish_bytes(step.array("centroids"), b"0123")
    other = paths.storage.publish_bytes(paths.kmeans_step(1, "step1").array("centroids"), b"x")
    step_marker = paths.marker(step.dir, 0)
    write_marker(paths.storage, step_marker, CompletionMarker("k", 0, 1, "h", outputs=[out]))
    untouched = paths.marker(paths.kmeans_step(1, "step1").dir, 0)
    write_marker(paths.storage, untouched, CompletionMarker("k", 0, 1, "h", outputs=[other]))
    level = paths.marker(paths.kmeans_level(1), 0)
    write_marker(paths.storage, level, CompletionMarker("k", 0, 1, "h", outputs=[out]))
    (tmp_path / out.path).write_bytes(b"0124")
    with pytest.raises(InvalidMarkerError):
        require_intact(paths.storage, level)
    assert not paths.storage.exists(level) and not paths.storage.exists(step_marker)
    assert paths.storage.exists(untouched)


def test_marker_names():
    assert RunPaths.is_marker("embed/completions/task_00003.json")
    assert RunPaths.is_marker("kmeans/level2/step1/completions/task_00000.json")
    assert RunPaths.is_marker("embed/parts/shard_00001/part_00002.json")
    assert not RunPaths.is_marker("embed/completions/invalid/task_00003.20260101T000000Z-ab.json")
    assert not RunPaths.is_marker("kmeans/level1/final.json")
    assert not RunPaths.is_marker("embed/attempts/task_00000.json")
    assert (
        RunPaths.invalid_marker("merge/completions/task_00000.json", "T")
        == "merge/completions/invalid/task_00000.T.json"
    )
