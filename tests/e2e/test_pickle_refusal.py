"""A legacy merge of pickle shards through launch.py: by default nothing is unpickled (a
canary in the pickles would leave a file), and the error says how to allow it."""

import numpy as np

from tests.conftest import run_launch
from tests.pickle_canary import write_legacy_shards


def test_legacy_merge_refuses_pickles_unless_allowed_by_name(tmp_path):
    legacy, canary = tmp_path / "legacy", tmp_path / "UNPICKLED"
    write_legacy_shards(legacy, np.random.default_rng(0), canary)
    proc = run_launch(
        "+experiment=quickstart",
        "stages=[merge]",
        "merge.input=legacy",
        f"merge.legacy_dir={legacy}",
        f"run.root={tmp_path / 'runs'}",
        "run.name=legacy",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert not canary.exists(), "a pickle was loaded although merge.allow_pickle is false"
    assert "merge.allow_pickle=true" in out, out
    assert not (tmp_path / "runs" / "legacy" / "merge" / "embeddings.safetensors").exists()
