"""The extract stage's plan: the seed experiment composes (Qwen2.5-7B, FineWeb-Edu
sample-10BT, layers 15-18, batch 16, 512 tokens, 32 tasks, gs://, cluster=tpu_vm, the JAX
backend on a 1d mesh) and plans 32 array tasks tiling the rows, then the metadata merge;
what the hash covers."""

from __future__ import annotations

import itertools

import pytest

from lib.config.compose import compose
from lib.core.errors import ConfigError
from lib.core.sharding import all_ranges
from lib.extract.checks import check_backend
from lib.plan.registry import build_plan

ROWS = 9_672_101


def test_fineweb_activations_composes_and_plans_32_tasks():
    cfg = compose(["+experiment=fineweb_activations"])
    assert str(cfg.cluster.launcher) == "tpu_vm"
    assert str(cfg.run.root).startswith("gs://")
    x = cfg.extract
    assert (x.model, list(x.layers), x.batch_size, x.max_seq_length) == (
        "Qwen/Qwen2.5-7B",
        [15, 16, 17, 18],
        16,
        512,
    )
    assert (cfg.dataset.path, cfg.dataset.subset) == ("HuggingFaceFW/fineweb-edu", "sample-10BT")
    plan = build_plan(cfg, ROWS)
    extract, merged = plan.stages
    assert (extract.name, extract.kind, extract.num_tasks) == ("extract", "array", 32)
    assert (merged.name, merged.kind, merged.depends_on) == (
        "extract_metadata",
        "single",
        ("extract",),
    )
    ranges = all_ranges(ROWS, extract.num_tasks)
    assert ranges[0][0] == 0 and ranges[-1][1] == ROWS
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    # The TPU path: the JAX backend, the model sharded over the machine's chips.
    assert (x.backend, x.mesh) == ("jax", "1d")
    check_backend(str(x.backend))  # installed by make install


def _hash(*overrides: str) -> str:
    cfg = compose(["+experiment=fineweb_activations", *overrides])
    return build_plan(cfg, 1000).stages[0].config_hash


def test_hash_covers_outputs_not_speed():
    base = _hash()
    assert _hash("extract.layers=[15]") != base
    assert _hash("extract.compression=none") != base
    assert _hash("extract.queue_batches=9", "extract.torch_threads=3") == base


def test_more_tasks_than_rows_is_refused():
    cfg = compose(["+experiment=fineweb_activations", "extract.max_samples=10"])
    with pytest.raises(ConfigError, match="extract.num_tasks=32 is more than the 10 rows"):
        build_plan(cfg, ROWS)
