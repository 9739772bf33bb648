"""The report's Plotly figures, each a plain function of arrays returning a figure as a
plain dict (``{"data": [...], "layout": {...}}``, what ``Plotly.newPlot`` takes).

Plain dicts rather than ``plotly.graph_objects``: the graph objects validate and deep-copy
every element, which took ~2/3 of a 63k-row report's time for 150k map points; these
traces use only attributes plotly.js documents. The page adds the ``plotly_white``
template once for all figures (``lib.report.page``).

Every string that reaches a figure (source names, texts, ids) comes from the dataset and
goes through ``plot_text`` first: Plotly renders a subset of HTML in text, hover labels,
legends and tick labels, so ``<``, ``>`` and ``&`` become entities, which Plotly shows as
the literal characters.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np

Figure = dict[str, Any]
MARGIN = {"l": 60, "r": 20, "t": 40, "b": 50}


def plot_text(text: str, limit: int | None = None) -> str:
    """``text`` cut to ``limit`` characters, as literal text for Plotly: ``&<>`` as
    entities (Plotly decodes those three, but shows ``&quot;`` as it is; without ``<`` no
    quote can be inside a tag), line breaks as ``<br>``."""
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return html.escape(text, quote=False).replace("\n", "<br>")


def coords(values: np.ndarray, decimals: int = 5) -> list[float]:
    """Plot coordinates as short JSON numbers (5 decimals: far below a pixel)."""
    return np.round(np.asarray(values, dtype=np.float64), decimals).tolist()


def _layout(title: str, **extra: Any) -> dict[str, Any]:
    return {"title": {"text": title}, "margin": MARGIN, **extra}


def _axis(title: str, **extra: Any) -> dict[str, Any]:
    return {"title": {"text": title}, **extra}


def histogram(values: np.ndarray, title: str, x_title: str, bins: int = 60) -> Figure:
    values = np.asarray(values, dtype=np.float64)
    counts, edges = np.histogram(values[np.isfinite(values)], bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    return {
        "data": [
            {
                "type": "bar",
                "x": centres.tolist(),
                "y": counts.tolist(),
                "width": np.diff(edges).tolist(),
                "marker": {"line": {"width": 0}},
            }
        ],
        "layout": _layout(
            title,
            xaxis=_axis(x_title, exponentformat="none"),
            yaxis=_axis("rows"),
            bargap=0,
        ),
    }


def scree(explained: np.ndarray) -> Figure:
    k = list(range(1, len(explained) + 1))
    return {
        "data": [
            {"type": "bar", "x": k, "y": coords(explained, 6), "name": "explained variance"},
            {
                "type": "scatter",
                "x": k,
                "y": coords(np.cumsum(explained), 6),
                "name": "cumulative",
                "mode": "lines+markers",
            },
        ],
        "layout": _layout(
            f"PCA scree: the first {len(explained)} components",
            xaxis=_axis("component"),
            yaxis=_axis("fraction of variance"),
        ),
    }


def _map_layout(title: str, axes: tuple[str, str]) -> dict[str, Any]:
    return _layout(
        title,
        xaxis=_axis(axes[0]),
        yaxis=_axis(axes[1]),
        height=620,
        hovermode="closest",
        legend={"itemsizing": "constant"},
    )


def source_map(
    xy: np.ndarray,
    codes: np.ndarray,
    sources: list[str],
    hover: list[str],
    title: str,
    axes: tuple[str, str] = ("PC1", "PC2"),
) -> Figure:
    """A WebGL scatter, one trace (legend entry) per source present, hover = ``hover``
    (already ``plot_text``-escaped)."""
    hover_arr = np.asarray(hover, dtype=object)
    traces = []
    for code, name in enumerate(sources):
        mask = codes == code
        if not mask.any():
            continue
        traces.append(
            {
                "type": "scattergl",
                "x": coords(xy[mask, 0]),
                "y": coords(xy[mask, 1]),
                "mode": "markers",
                "name": plot_text(name, 60),
                "text": hover_arr[mask].tolist(),
                "hovertemplate": "%{text}<extra></extra>",
                "marker": {"size": 5, "opacity": 0.75},
            }
        )
    return {"data": traces, "layout": _map_layout(title, axes)}


def cluster_map(
    xy: np.ndarray, clusters: np.ndarray, hover: list[str], title: str, axes: tuple[str, str]
) -> Figure:
    clusters = np.asarray(clusters).tolist()
    return {
        "data": [
            {
                "type": "scattergl",
                "x": coords(xy[:, 0]),
                "y": coords(xy[:, 1]),
                "mode": "markers",
                "text": hover,
                "customdata": clusters,
                "hovertemplate": "cluster %{customdata}<br>%{text}<extra></extra>",
                "marker": {"size": 5, "opacity": 0.8, "color": clusters, "colorscale": "Turbo"},
                "showlegend": False,
            }
        ],
        "layout": _map_layout(title, axes),
    }


def similarity_heatmap(sources: list[str], sim: np.ndarray) -> Figure:
    labels = [plot_text(s, 40) for s in sources]
    side = max(420, min(1200, 28 * len(sources) + 200))
    return {
        "data": [
            {
                "type": "heatmap",
                "z": [coords(row, 4) for row in sim],
                "x": labels,
                "y": labels,
                "zmin": -1,
                "zmax": 1,
                "colorscale": "RdBu",
                "reversescale": True,
                "hovertemplate": "%{y} · %{x}: %{z:.3f}<extra></extra>",
            }
        ],
        "layout": _layout(
            "Cosine similarity of the source means",
            height=side,
            yaxis={"autorange": "reversed"},
        ),
    }


def bars(
    x: list[str], series: dict[str, list[float]], title: str, y_title: str, log_y: bool = False
) -> Figure:
    return {
        "data": [
            {"type": "bar", "x": x, "y": [float(v) for v in y], "name": name}
            for name, y in series.items()
        ],
        "layout": _layout(
            title, yaxis=_axis(y_title, type="log" if log_y else "linear"), barmode="group"
        ),
    }


def size_distribution(sizes: dict[str, np.ndarray], title: str) -> Figure:
    """Cluster sizes, largest first, one line per series (log y)."""
    return {
        "data": [
            {
                "type": "scatter",
                "x": list(range(1, len(s) + 1)),
                "y": np.sort(np.asarray(s))[::-1].tolist(),
                "mode": "lines+markers",
                "name": name,
            }
            for name, s in sizes.items()
        ],
        "layout": _layout(
            title,
            xaxis=_axis("cluster rank (largest first)"),
            yaxis=_axis("rows", type="log"),
        ),
    }
