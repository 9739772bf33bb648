"""The report page in a real browser: Debian's chromium, headless, driven by Playwright
(``executable_path``; its own browser download cannot work offline), network blocked.

One small run is made once for the module through launch.py (40 rows of 4 sources,
embed -> merge -> 2-level k-means -> curate -> metrics -> report), with ``<script>``,
``<img onerror=...>`` and ``</script>`` in row texts and in two source names. The page
must load nothing, log no console error, show each section the run has, put as many
points on each map as it says, a legend entry per source, a point's text on hover (and
pinned on click) literally, and run nothing from the data. A PNG of each section is
saved under the test's tmp dir for a person to look at. Under CI=true a browser that
does not start fails the test (never a skip).
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import random
import re
from pathlib import Path

import pytest

from tests.conftest import run_launch

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("EMBEDFLEET_CHROMIUM", "/usr/bin/chromium")
SOURCES = {
    "alpha": "the river flows past the old mill and the fish swim",
    "beta": "compile the kernel module and load it with modprobe",
    "<script>alert('src')</script>": "bake bread with flour water salt and yeast",
    "</script><img src=x onerror=alert(9)>": "the orchestra tuned violins before the symphony",
}
HOSTILE = (
    "<script>window.__pwned=1</script> ",
    '<img src=x onerror="window.__pwned=2"> ',
    "</script><script>window.__pwned=3</script> & <b>bold</b> ",
)
ROWS_PER_SOURCE = 10
ROWS = ROWS_PER_SOURCE * len(SOURCES)
PIPELINE = [
    "+experiment=curation",
    "dataset=files",
    "embed.num_shards=2",
    "embed.torch_threads=1",
    "embed.device=cpu",
    "model.max_length=48",
    "merge.by_source=false",
    "kmeans.n_clusters=[6,2]",
    "kmeans.n_resampling_steps=[2,1]",
    "kmeans.sample_size=[3,2]",
    "kmeans.n_iters=10",
    "kmeans.device=cpu",
    "curate.target_size=20",
    "stages=[embed,merge,kmeans,curate,metrics,report]",
]
SECTIONS = ("run", "embeddings", "clustering", "curation")


def _ok(proc):
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def report_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    rng = random.Random(0)
    lines = []
    for s, (source, base) in enumerate(SOURCES.items()):
        for k in range(ROWS_PER_SOURCE):
            words = base.split()
            rng.shuffle(words)
            text = (HOSTILE[k] if k < len(HOSTILE) else "") + " ".join(words) + f" number {k}"
            row = {"id": f"r{s * ROWS_PER_SOURCE + k}", "source": source, "text": text}
            lines.append(json.dumps(row))
    data = root / "hostile.jsonl"
    data.write_text("\n".join(lines) + "\n")
    _ok(
        run_launch(
            *PIPELINE, f"dataset.path={data}", f"run.root={root}", "run.name=run", timeout=900
        )
    )
    return root / "run"


class Browser:
    """One headless chromium for the module; ``open`` gives a page of a file with every
    other request refused and recorded."""

    def __init__(self) -> None:
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        try:
            self.browser = self._pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        except Exception:
            self._pw.stop()
            raise

    def open(self, path: Path):
        ctx = self.browser.new_context(viewport={"width": 1280, "height": 900}, offline=True)
        page = ctx.new_page()
        log = {"console_errors": [], "page_errors": [], "requests": [], "dialogs": []}

        def refuse(r):
            log["requests"].append(r.request.url)
            r.abort()

        ctx.route(re.compile(r"^(?!file:)"), refuse)  # anything but the page's own file
        page.on("console", lambda m: m.type == "error" and log["console_errors"].append(m.text))
        page.on("pageerror", lambda e: log["page_errors"].append(str(e)))
        page.on("dialog", lambda d: (log["dialogs"].append(d.message), d.dismiss()))
        page.goto(path.as_uri(), timeout=120_000)  # a busy 2-core CI machine
        page.wait_for_selector("body[data-ready='1']", timeout=120_000)
        return page, log

    def close(self) -> None:
        self.browser.close()
        self._pw.stop()


@pytest.fixture(scope="module")
def browser():
    try:
        b = Browser()
    except Exception as exc:
        # make install puts Debian's chromium here: a browser that cannot start is a
        # failure everywhere, never a skip.
        pytest.fail(f"headless chromium ({CHROMIUM}) did not start: {exc}; run make install")
    yield b
    b.close()


@pytest.fixture(scope="module")
def loaded(report_run, browser):
    page, log = browser.open(report_run / "report" / "index.html")
    yield page, log
    page.context.close()


def map_points(page, fig_id: str) -> int:
    return page.evaluate(
        "id => document.getElementById(id)._fullData.reduce((n, t) => n + t.x.length, 0)",
        fig_id,
    )


def test_the_page_is_one_self_contained_file_named_in_the_marker(report_run):
    page = report_run / "report" / "index.html"
    text = page.read_text()
    assert text.count("* plotly.js v") == 1  # plotly.js inlined once
    assert "<script src" not in text and "<link" not in text
    marker = json.loads((report_run / "report" / "completions" / "task_00000.json").read_text())
    (out,) = marker["outputs"]
    assert out["path"] == "report/index.html"
    assert out["sha256"] == hashlib.sha256(page.read_bytes()).hexdigest()
    assert marker["extra"]["sections"] == list(SECTIONS)


def test_sections_load_offline_without_errors_and_are_photographed(loaded, tmp_path_factory):
    page, log = loaded
    found = page.eval_on_selector_all("section", "els => els.map(e => e.dataset.section)")
    assert found == list(SECTIONS)  # no Activations section: the run has no extract stage
    shots = tmp_path_factory.mktemp("report-screenshots")
    for sid in SECTIONS:
        section = page.locator(f"#section-{sid}")
        section.scroll_into_view_if_needed()
        section.screenshot(path=str(shots / f"{sid}.png"))
        assert (shots / f"{sid}.png").stat().st_size > 1000
    print(f"report screenshots: {shots}")
    assert log["requests"] == [], "the page asked the network for something"
    assert log["console_errors"] == [] and log["page_errors"] == []
    stages = page.inner_text("#section-run")
    for stage in ("embed", "merge", "kmeans_level1", "curate", "metrics_level2"):
        assert stage in stages
    assert "peak RSS" in stages


def test_each_map_has_as_many_points_as_it_says_and_a_legend_entry_per_source(loaded):
    page, _ = loaded
    counts = page.eval_on_selector_all(
        "p.count",
        "els => els.map(e => [e.dataset.figure, +e.dataset.shown, +e.dataset.total, e.textContent])",
    )
    assert {c[0] for c in counts} == {"fig-map", "fig-map-level1", "fig-map-level2"}
    for fig_id, shown, total, text in counts:
        assert (shown, total) == (ROWS, ROWS) and text == f"showing {ROWS} of {ROWS} rows"
        assert map_points(page, fig_id) == shown
    legend = page.eval_on_selector_all(
        "#fig-map .legend .traces .legendtext", "els => els.map(e => e.textContent)"
    )
    assert sorted(legend) == sorted(SOURCES)  # the hostile names, literally


def _point_with(page, needle: str):
    """Viewport x, y and the literal text of the first map point whose text holds
    ``needle`` (escaped as the page holds it)."""
    return page.evaluate(
        """([id, needle]) => {
          const gd = document.getElementById(id);
          gd.scrollIntoView({block: "center"});
          const fl = gd._fullLayout, box = gd.getBoundingClientRect();
          for (const t of gd._fullData) {
            for (let i = 0; i < t.text.length; i++) {
              if (!t.text[i].includes(needle)) continue;
              const x = box.left + fl.xaxis._offset + fl.xaxis.l2p(t.x[i]);
              const y = box.top + fl.yaxis._offset + fl.yaxis.l2p(t.y[i]);
              return [x, y, t.text[i]];
            }
          }
          return null;
        }""",
        ["fig-map", needle],
    )


def test_hovering_a_point_shows_its_text_literally_and_a_click_pins_it(loaded):
    page, log = loaded
    found = _point_with(page, html.escape('<img src=x onerror="window.__pwned=2">', quote=False))
    assert found is not None
    x, y, escaped = found
    literal = html.unescape(escaped)
    assert literal.startswith("[") and '<img src=x onerror="window.__pwned=2">' in literal
    page.mouse.move(x, y)
    hover = page.wait_for_selector("#fig-map .hoverlayer .hovertext", timeout=10_000)
    assert '<img src=x onerror="window.__pwned=2">' in hover.text_content()
    page.mouse.click(x, y)
    page.wait_for_function("document.getElementById('pinned-fig-map').textContent.length > 0")
    assert page.text_content("#pinned-fig-map") == literal
    assert page.evaluate("window.__pwned") is None and log["dialogs"] == []


def test_nothing_in_the_data_runs_and_texts_show_literally(loaded):
    page, log = loaded
    assert page.evaluate("window.__pwned") is None
    assert log["dialogs"] == []
    assert page.evaluate("document.querySelectorAll('script').length") == 3  # ours only
    assert page.evaluate("document.querySelectorAll('img, b').length") == 0
    items = "\n".join(page.eval_on_selector_all("li", "els => els.map(e => e.textContent)"))
    assert "[<script>alert('src')</script>]" in items or "[</script><img src=x" in items
    ticks = page.eval_on_selector_all(
        "#fig-source-similarity .xtick text", "els => els.map(e => e.textContent)"
    )
    assert sorted(ticks) == sorted(SOURCES)


def test_launch_py_report_redraws_the_page_with_fewer_points(report_run, browser):
    """... and, with --umap, a UMAP map of the same 8 points (umap-learn)."""
    proc = _ok(run_launch("report", str(report_run), "--max-points", "8", "--umap"))
    page_file = report_run / "report" / "index.html"
    assert proc.stdout.strip().splitlines()[-1] == str(page_file)
    marker = json.loads((report_run / "report" / "completions" / "task_00000.json").read_text())
    assert marker["outputs"][0]["sha256"] == hashlib.sha256(page_file.read_bytes()).hexdigest()
    page, log = browser.open(page_file)
    try:
        text = page.text_content("p.count[data-figure='fig-map']")
        assert text == f"showing 8 of {ROWS} rows"
        assert map_points(page, "fig-map") == 8
        legend = page.eval_on_selector_all("#fig-map .legend .traces", "els => els.length")
        assert legend == len(SOURCES)  # 2 points of each source
        umap_text = page.text_content("p.count[data-figure='fig-umap']")
        assert umap_text == f"showing 8 of {ROWS} rows" and map_points(page, "fig-umap") == 8
        assert log["console_errors"] == [] and log["page_errors"] == []
    finally:
        page.context.close()
    status = _ok(run_launch("status", str(report_run)))
    assert "report" in status.stdout and "all stages complete" in status.stdout
