"""The index stage and ``launch.py search`` end to end, with the real model on a slice of
the bundled corpus: a run without an index is told the launch that builds one, that
launch builds it, and search finds rows by their own text, by row, from a file; bad
inputs get clear errors."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.index_data import recall_at_k
from cli.commands import run_subcommand
from lib.formats.arrays import open_embeddings
from lib.formats.matrix_reader import MatrixReader
from lib.index.build import build_index
from lib.index.choice import choose_layout
from lib.index.params import IndexParams
from tests.conftest import REPO, run_launch

pytestmark = pytest.mark.slow

SLICE = [
    "+experiment=quickstart",
    "dataset.limit=64",
    "embed.num_shards=1",
    "model.max_length=128",
    "embed.device=cpu",
    "stages=[embed,merge]",
]


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def built(shared_root) -> tuple[Path, str, subprocess.CompletedProcess]:
    """embed + merge of the slice, then the index built by the very command ``search``
    prints for a run without one: (run dir, search's message, the build's output)."""
    from cli.commands import build_parser
    from lib.core.errors import EmbedfleetError

    _ok(run_launch(*SLICE, f"run.root={shared_root}", "run.name=ix"))
    run = shared_root / "ix"
    args = build_parser().parse_args(["search", str(run), "anything"])
    with pytest.raises(EmbedfleetError) as missing:
        args.fn(args)
    message = str(missing.value)
    command = message.split("Build it (the finished stages are skipped):\n  ", 1)[-1].strip()
    argv = shlex.split(command)
    assert argv[:2] == ["python", "launch.py"], message
    return run, message, _ok(run_launch(*argv[2:]))


def test_a_run_without_an_index_says_how_to_build_it_and_that_command_builds_it(built, capsys):
    run, message, build = built
    assert "index/completions/task_00000.json does not exist: the run has no index" in message
    assert message.rstrip().endswith("'stages=[embed,merge,index]'")
    assert "embed: all 1 task(s) already complete" in build.stdout
    assert "index: done" in build.stdout
    assert f"search         python launch.py search {run}" in build.stdout
    assert (run / "index" / "index.faiss").exists()
    assert run_subcommand(["status", str(run)]) == 0
    status = capsys.readouterr().out
    line = next(x for x in status.splitlines() if x.startswith("index "))
    assert line.split()[1:3] == ["1", "1"] and line.split()[-3].endswith(("M", "G"))


@pytest.fixture(scope="module")
def run_dir(built) -> Path:
    return built[0]


def _texts(run: Path) -> tuple[list[int], list[str], list[str]]:
    """Dataset rows, ids and texts of the indexed rows, read back as search reads them."""
    from cli.search import row_texts
    from lib.config.compose import load_run_config
    from lib.core.paths import RunPaths

    meta = pq.read_table(run / "merge" / "metadata.parquet")
    rows = meta.column("row_index").to_pylist()
    texts = row_texts(load_run_config(RunPaths(run)), rows)
    return rows, meta.column("id").to_pylist(), [texts[r] for r in rows]


def test_a_rows_own_text_comes_back_first(run_dir, capsys):
    rows, ids, texts = _texts(run_dir)
    pick = next(i for i in range(len(rows) // 2, len(rows)) if texts.count(texts[i]) == 1)
    assert run_subcommand(["search", str(run_dir), texts[pick], "-k", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["index"] == {"kind": "flat", "metric": "ip", "vectors": len(rows)}
    (block,) = result["results"]
    first = block["hits"][0]
    assert first["row_index"] == rows[pick] and first["rank"] == 1 and first["id"] == ids[pick]
    assert first["score"] == pytest.approx(1.0, abs=1e-4)
    assert first["text"] == texts[pick].strip().splitlines()[0].strip()[:100]
    assert len(block["hits"]) == 3


def test_row_and_file_queries(run_dir, tmp_path, capsys):
    rows, ids, texts = _texts(run_dir)
    unique = [i for i, t in enumerate(texts) if texts.count(t) == 1]
    row = rows[unique[5]]
    assert run_subcommand(["search", str(run_dir), "--row", str(row), "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"][0]["hits"]
    assert hits[0]["row_index"] == row and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    # one-line texts no other row shares (the corpus repeats some docstrings verbatim)
    single = [i for i in unique if "\n" not in texts[i].strip()][:3]
    queries = tmp_path / "q.txt"
    queries.write_text("\n".join(texts[i] for i in single) + "\n\n")
    assert run_subcommand(["search", str(run_dir), "--file", str(queries), "-k", "2"]) == 0
    blocks = capsys.readouterr().out.strip().split("\n\n")
    assert len(blocks) == len(single)
    for block, i in zip(blocks, single, strict=True):
        top = block.splitlines()[2].split()
        assert top[0] == "1" and top[2] == ids[i]


def test_launch_py_routes_search(run_dir):
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), "search", str(run_dir), "   "],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1 and "the query is empty" in proc.stderr


def test_bad_inputs_get_clear_errors(run_dir, capsys):
    run = str(run_dir)
    assert run_subcommand(["search", run, "   "]) == 1
    assert "the query is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        run_subcommand(["search", run, "x", "-k", "0"])
    assert exit_.value.code == 2 and "must be >= 1, got 0" in capsys.readouterr().err
    assert run_subcommand(["search", run]) == 1
    assert "exactly one of: a QUERY text, --row N or --file FILE" in capsys.readouterr().err
    assert run_subcommand(["search", run, "x", "--model", "Qwen/Qwen3-Embedding-0.6B"]) == 1
    err = capsys.readouterr().err
    assert "holds vectors of model all-MiniLM-L6-v2" in err and "not comparable" in err
    assert run_subcommand(["search", run, "--row", "99999"]) == 1
    assert "dataset row 99999 is not in the index" in capsys.readouterr().err


def test_a_corrupt_index_is_named_and_retry_rebuilds_it(run_dir, capsys):
    index = run_dir / "index" / "index.faiss"
    good = index.read_bytes()
    index.write_bytes(b"\0" * len(good))
    row = pq.read_table(run_dir / "merge" / "metadata.parquet").column("row_index")[0].as_py()
    assert run_subcommand(["search", str(run_dir), "--row", str(row)]) == 1
    err = capsys.readouterr().err
    assert f"{index}: sha256" in err and f"python launch.py retry {run_dir}" in err
    assert not (run_dir / "index" / "completions" / "task_00000.json").exists()
    _ok(run_launch("retry", str(run_dir)))
    assert index.read_bytes() == good  # rebuilt identically
    assert run_subcommand(["search", str(run_dir), "--row", str(row), "-k", "1"]) == 0


def test_ivf_recall_against_flat_on_the_corpus_embeddings(run_dir):
    x = open_embeddings(run_dir / "merge" / "embeddings.safetensors")
    reader = MatrixReader(x)
    n, d = x.shape
    flat = build_index(
        choose_layout(IndexParams(kind="flat"), n, d, "ip"), reader, seed=0, chunk_rows=16
    )
    layout = choose_layout(IndexParams(kind="ivf_flat"), n, d, "ip")
    ivf = build_index(layout, reader, seed=0, chunk_rows=16)
    queries = np.asarray(x, dtype=np.float32)
    _, exact = flat.search(queries, 10)
    _, approx = ivf.search(queries, 10)
    assert faiss.extract_index_ivf(ivf).nprobe == layout.nprobe
    assert recall_at_k(approx, exact) >= 0.95
