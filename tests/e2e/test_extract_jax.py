"""stages=[extract] with extract.backend=jax through launch.py (local launcher, two tasks,
the tiny Qwen2, fp32 on CPU): its shards hold the torch backend's activations (the same
config run in-process with extract.backend=torch) within 1e-4, with the same sample ids
and tokens; the task metadata names the backend; a rerun of the command redoes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from lib.config.compose import compose
from lib.core.paths import RunPaths
from lib.extract import ActivationReader
from lib.extract.task import run_extract_task
from tests.conftest import run_launch
from tests.unit.extract.helpers import texts, tiny_qwen2, write_jsonl

pytestmark = pytest.mark.slow

ROWS = 24
LAYERS = (2, 6)  # 6: the last layer, after the final norm


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract-jax-e2e")
    return root, tiny_qwen2(root, layers=6), write_jsonl(root / "docs.jsonl", texts(ROWS))


def _args(inputs, *extra: str) -> list[str]:
    root, model, data = inputs
    return [
        "dataset=files",
        f"dataset.path={data}",
        "stages=[extract]",
        f"extract.model={model}",
        f"extract.layers=[{','.join(map(str, LAYERS))}]",
        "extract.max_seq_length=32",
        "extract.batch_size=4",
        "extract.dtype=fp32",
        "extract.shard_size_mb=0.02",
        f"run.root={root}/runs",
        *extra,
    ]


def _files(paths: RunPaths) -> dict[str, str]:
    s = paths.storage
    return {
        n: s.sha256(n)
        for n in s.list("extract/")
        if n.endswith(".zst") or n.endswith("metadata.json") or "/completions/" in n
    }


def _layer(reader: ActivationReader, layer: int):
    chunks = list(reader.iter_layer(layer, as_torch=False, tokens=True))
    return (
        np.concatenate([c.sample_ids for c in chunks]),
        np.concatenate([c.token_ids for c in chunks]),
        np.concatenate([c.activations for c in chunks]),
    )


def test_jax_launch_equals_the_torch_backend_and_a_rerun_is_a_no_op(inputs):
    root = inputs[0]
    args = _args(inputs, "extract.backend=jax", "extract.num_tasks=2", "run.name=jax")
    proc = run_launch(*args, "cluster.parallelism=1")
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert f"extract        {ROWS} samples" in proc.stdout
    jax_run = RunPaths(root / "runs" / "jax")
    merged = jax_run.storage.read_json(jax_run.extract_metadata)
    assert (merged["num_tasks"], merged["samples"], merged["layers"]) == (2, ROWS, list(LAYERS))
    assert merged["shards"] > 2
    for t in range(2):
        meta = jax_run.storage.read_json(jax_run.extract_task_metadata(t))
        assert (meta["backend"], meta["compute_dtype"]) == ("jax", "fp32")

    # The torch backend on the same config, in this process (one task: shard boundaries
    # may differ, the samples may not).
    torch_run = RunPaths(root / "runs" / "torch")
    run_extract_task(
        compose(_args(inputs, "extract.backend=torch")),
        torch_run,
        stage="extract",
        task=0,
        num_tasks=1,
        rows=ROWS,
        config_hash="t",
    )
    jax_reader, torch_reader = ActivationReader(jax_run), ActivationReader(torch_run)
    for layer in LAYERS:
        ids, toks, acts = _layer(jax_reader, layer)
        want_ids, want_toks, want = _layer(torch_reader, layer)
        assert ids.tolist() == want_ids.tolist() == list(range(ROWS))
        assert toks.tolist() == want_toks.tolist()
        assert acts.dtype == np.float32 and acts.shape == want.shape
        np.testing.assert_allclose(acts, want, atol=1e-4, rtol=1e-4)

    before = _files(jax_run)
    proc = run_launch(*args, "cluster.parallelism=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "running" not in proc.stdout  # every task already complete
    assert _files(jax_run) == before
