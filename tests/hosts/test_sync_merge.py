"""The seed's whole flow: 16 ``cluster{c}_gpu{g}.pkl`` shards on two SSH hosts ->
``stages=[sync,merge] merge.input=legacy merge.allow_pickle=true`` -> the same matrix as
merging the original files locally; a gap between the two hosts' shards is reported
naming the files on both sides."""

from __future__ import annotations

import os

import numpy as np

from lib.formats.arrays import open_embeddings
from tests.conftest import run_launch
from tests.hosts.conftest import source_override
from tests.merge_helpers import write_pickle

ROWS_PER_SHARD = 10
LEGACY = ["merge.input=legacy", "merge.allow_pickle=true", "merge.by_source=false"]


def _hosts_with_shards(hosts, data, skip=()):
    """Cluster 0's 8 GPU shards on h1, cluster 1's on h2 (rows in order); ``skip``: (c, g)
    shards left out. Returns the two remote dirs."""
    dirs = [hosts.data_dir(f"seed-c{c}") for c in (0, 1)]
    for c in (0, 1):
        for g in range(8):
            start = (c * 8 + g) * ROWS_PER_SHARD
            if (c, g) not in skip:
                path = dirs[c] / "embeddings" / f"cluster{c}_gpu{g}.pkl"
                write_pickle(path, data[start : start + ROWS_PER_SHARD], start)
                path.parent.chmod(0o755)
                path.chmod(0o644)
    return dirs


def _sources(hosts, dirs):
    return [
        {
            "name": f"cluster{c}",
            "address": hosts.address(h),
            "port": hosts.port,
            "username": hosts.user,
            "key_file": hosts.key,
            "known_hosts": hosts.known_hosts,
            "remote_dir": str(d),
            "glob": "embeddings/cluster*_gpu*.pkl",
        }
        for c, (h, d) in enumerate(zip(("h1", "h2"), dirs, strict=True))
    ]


def test_sync_then_merge_of_two_hosts_legacy_shards_equals_the_local_merge(ssh_hosts, tmp_path):
    """... then merge-only finds it complete, and a shard re-made on its host is synced
    again and merged again."""
    data = np.random.default_rng(7).normal(size=(16 * ROWS_PER_SHARD, 8)).astype(np.float32)
    dirs = _hosts_with_shards(ssh_hosts, data)
    sources = source_override(_sources(ssh_hosts, dirs))

    def seed_launch(stages):
        return run_launch(
            "+experiment=quickstart", stages, *LEGACY, f"run.root={tmp_path}", "run.name=seed",
            sources, timeout=300,
        )  # fmt: skip

    synced = seed_launch("stages=[sync,merge]")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    # The reference: the same 16 files merged where they are (a local legacy_dir).
    local = tmp_path / "originals"
    for d in dirs:
        for f in (d / "embeddings").iterdir():
            (local / f.name).parent.mkdir(exist_ok=True)
            (local / f.name).write_bytes(f.read_bytes())
    ref = run_launch(
        "+experiment=quickstart", "stages=[merge]", *LEGACY, f"merge.legacy_dir={local}",
        f"run.root={tmp_path}", "run.name=ref", timeout=300,
    )  # fmt: skip
    assert ref.returncode == 0, ref.stdout + ref.stderr
    got = np.asarray(open_embeddings(tmp_path / "seed/merge/embeddings.safetensors"))
    want = np.asarray(open_embeddings(tmp_path / "ref/merge/embeddings.safetensors"))
    assert got.shape == (160, 8) and np.array_equal(got, want) and np.array_equal(got, data)
    # The seed's --merge-only: stages=[merge] plans the sync as its (complete) upstream, so
    # the merge hashes as under stages=[sync,merge] and is found complete, not a conflict.
    again = seed_launch("stages=[merge]")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "merge: all 1 task(s) already complete" in again.stdout, again.stdout
    # A shard re-made on its host (same size, later mtime): the re-sync downloads it, sets
    # the merge's marker aside, and the merge is redone from the new file.
    changed = dirs[1] / "embeddings" / "cluster1_gpu3.pkl"
    start = (8 + 3) * ROWS_PER_SHARD
    data[start : start + ROWS_PER_SHARD] += 1.0
    write_pickle(changed, data[start : start + ROWS_PER_SHARD], start)
    changed.chmod(0o644)
    os.utime(changed, (changed.stat().st_atime, changed.stat().st_mtime + 60))
    resync = seed_launch("stages=[sync,merge]")
    text = resync.stdout + resync.stderr
    assert resync.returncode == 0, text
    assert "merge: running 1 task(s)" in resync.stdout, text
    assert (
        "downloaded new or changed files the merge reads (embeddings/cluster1_gpu3.pkl)" in text
    ), text
    regot = np.asarray(open_embeddings(tmp_path / "seed/merge/embeddings.safetensors"))
    assert np.array_equal(regot, data) and not np.array_equal(regot, got)


def test_a_gap_between_the_hosts_shards_names_both_files(ssh_hosts, tmp_path):
    data = np.random.default_rng(8).normal(size=(16 * ROWS_PER_SHARD, 8)).astype(np.float32)
    dirs = _hosts_with_shards(ssh_hosts, data, skip={(1, 0)})
    out = run_launch(
        "+experiment=quickstart", "stages=[sync,merge]", *LEGACY, f"run.root={tmp_path}",
        "run.name=gap", source_override(_sources(ssh_hosts, dirs)), timeout=300,
    )  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "cluster0_gpu7.pkl" in text and "cluster1_gpu1.pkl" in text, text
    assert "gap" in text.lower(), text
