"""The report's streamed PCA, per-source sample and script-safe JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lib.formats.arrays import open_embeddings, save_npy
from lib.report.figures import plot_text
from lib.report.page import script_json
from lib.report.pca import (
    component_scores,
    principal_components,
    project,
    streamed_moments,
)
from lib.report.task import sample_per_source


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    # A large common offset: the one-pass formula must not lose the small variance.
    x = (rng.normal(size=(1003, 24)) * np.linspace(0.1, 3, 24) + 1000.0).astype(np.float32)
    codes = rng.integers(0, 5, size=len(x)).astype(np.int32)
    return x, codes


def test_streamed_moments_match_numpy_on_a_memmap_in_odd_blocks(tmp_path, data):
    x, codes = data
    save_npy(tmp_path / "e.npy", x)
    matrix = open_embeddings(tmp_path / "e.npy")
    assert isinstance(matrix, np.memmap)
    m = streamed_moments(matrix, block_rows=97, codes=codes, n_codes=5)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(m.mean, x64.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(m.covariance, np.cov(x64, rowvar=False), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(m.norms, np.linalg.norm(x64, axis=1), rtol=1e-6)
    for c in range(5):
        np.testing.assert_allclose(m.source_sums[c], x64[codes == c].sum(axis=0), rtol=1e-10)
    # the same from an in-memory array, one block
    again = streamed_moments(x, block_rows=10_000)
    np.testing.assert_allclose(again.covariance, m.covariance, rtol=1e-9, atol=1e-9)


def test_components_are_sklearns_up_to_sign_and_scores_stream(data):
    from sklearn.decomposition import PCA

    x, _ = data
    comps = principal_components(streamed_moments(x, 128), 5)
    ref = PCA(n_components=5).fit(x.astype(np.float64))
    np.testing.assert_allclose(comps.explained, ref.explained_variance_ratio_, rtol=1e-6)
    for i in range(5):
        assert abs(abs(comps.vectors[:, i] @ ref.components_[i]) - 1) < 1e-6
    scores = component_scores(x, comps, 3, block_rows=50)
    np.testing.assert_allclose(scores, project(x, comps, 3), rtol=1e-5, atol=1e-3)
    assert np.argmax(np.abs(comps.vectors[:, 0])) == np.argmax(comps.vectors[:, 0])  # sign fixed


def test_one_row_is_refused():
    with pytest.raises(ValueError, match="at least 2 rows"):
        streamed_moments(np.ones((1, 3), dtype=np.float32), 8)


def test_the_sample_shares_points_equally_and_keeps_small_sources_whole():
    codes = np.array([0] * 1000 + [1] * 7 + [2] * 300, dtype=np.int32)
    rows = sample_per_source(codes, 3, 100, seed=0)
    assert len(rows) == 100 and len(np.unique(rows)) == 100 and np.all(np.diff(rows) > 0)
    counts = np.bincount(codes[rows], minlength=3)
    assert counts.tolist() == [47, 7, 46]  # 7 whole, the other 93 split between the two
    assert np.array_equal(rows, sample_per_source(codes, 3, 100, seed=0))
    assert len(sample_per_source(codes, 3, 5000, seed=0)) == len(codes)  # all of them


def test_script_json_cannot_close_the_script_element_and_round_trips():
    hostile = {"t": "</script><script>alert(1)</script> & <img onerror=x> \u2028"}
    text = script_json(json.dumps(hostile))
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == hostile


def test_plot_text_is_literal_for_plotly():
    assert plot_text("<b>x</b> & y\nz") == "&lt;b&gt;x&lt;/b&gt; &amp; y<br>z"
    assert plot_text("abcdef", 4) == "abc…"
