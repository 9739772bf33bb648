"""The report's Plotly figures, each a plain function of arrays.

Every string that reaches a figure (source names, texts, ids) comes from the dataset and
goes through ``plot_text`` first: Plotly renders a subset of HTML in text, hover labels,
legends and tick labels, so ``<`` and ``&`` are turned into entities, which Plotly shows
as the literal characters.
"""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go

LAYOUT = {"margin": {"l": 60, "r": 20, "t": 40, "b": 50}, "template": "plotly_white"}


def plot_text(text: str, limit: int | None = None) -> str:
    """``text`` cut to ``limit`` characters, as literal text for Plotly (entities for
    ``&<>"'``, line breaks as ``<br>``)."""
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return html.escape(text, quote=True).replace("\n", "<br>")


def histogram(values: np.ndarray, title: str, x_title: str, bins: int = 60) -> go.Figure:
    counts, edges = np.histogram(np.asarray(values, dtype=np.float64), bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure(go.Bar(x=centres, y=counts, width=np.diff(edges), marker_line_width=0))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title="rows", bargap=0, **LAYOUT)
    return fig


def scree(explained: np.ndarray) -> go.Figure:
    k = np.arange(1, len(explained) + 1)
    fig = go.Figure(
        [
            go.Bar(x=k, y=explained, name="explained variance"),
            go.Scatter(x=k, y=np.cumsum(explained), name="cumulative", mode="lines+markers"),
        ]
    )
    fig.update_layout(
        title=f"PCA scree: the first {len(explained)} components",
        xaxis_title="component",
        yaxis_title="fraction of variance",
        **LAYOUT,
    )
    return fig


def source_map(
    xy: np.ndarray,
    codes: np.ndarray,
    sources: list[str],
    hover: list[str],
    title: str,
    axes: tuple[str, str] = ("PC1", "PC2"),
) -> go.Figure:
    """A WebGL scatter, one trace (legend entry) per source, hover = ``hover`` (already
    ``plot_text``-escaped)."""
    traces = []
    hover_arr = np.asarray(hover, dtype=object)
    for code, name in enumerate(sources):
        mask = codes == code
        if not mask.any():
            continue
        traces.append(
            go.Scattergl(
                x=xy[mask, 0],
                y=xy[mask, 1],
                mode="markers",
                name=plot_text(name, 60),
                text=list(hover_arr[mask]),
                hovertemplate="%{text}<extra></extra>",
                marker={"size": 5, "opacity": 0.75},
            )
        )
    fig = go.Figure(traces)
    fig.update_layout(title=title, xaxis_title=axes[0], yaxis_title=axes[1], height=620, **LAYOUT)
    fig.update_layout(legend={"itemsizing": "constant"})
    return fig


def cluster_map(
    xy: np.ndarray, clusters: np.ndarray, hover: list[str], title: str, axes: tuple[str, str]
) -> go.Figure:
    fig = go.Figure(
        go.Scattergl(
            x=xy[:, 0],
            y=xy[:, 1],
            mode="markers",
            text=hover,
            customdata=clusters,
            hovertemplate="cluster %{customdata}<br>%{text}<extra></extra>",
            marker={"size": 5, "opacity": 0.8, "color": clusters, "colorscale": "Turbo"},
            showlegend=False,
        )
    )
    fig.update_layout(title=title, xaxis_title=axes[0], yaxis_title=axes[1], height=620, **LAYOUT)
    return fig


def similarity_heatmap(sources: list[str], sim: np.ndarray) -> go.Figure:
    labels = [plot_text(s, 40) for s in sources]
    fig = go.Figure(
        go.Heatmap(
            z=sim,
            x=labels,
            y=labels,
            zmin=-1,
            zmax=1,
            colorscale="RdBu",
            reversescale=True,
            hovertemplate="%{y} · %{x}: %{z:.3f}<extra></extra>",
        )
    )
    side = max(420, min(1200, 28 * len(sources) + 200))
    fig.update_layout(title="Cosine similarity of the source means", height=side, **LAYOUT)
    fig.update_yaxes(autorange="reversed")
    return fig


def bars(
    x: list[str], series: dict[str, list[float]], title: str, y_title: str, log_y: bool = False
) -> go.Figure:
    fig = go.Figure([go.Bar(x=x, y=y, name=name) for name, y in series.items()])
    fig.update_layout(title=title, yaxis_title=y_title, barmode="group", **LAYOUT)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def size_distribution(sizes: dict[str, np.ndarray], title: str) -> go.Figure:
    """Cluster sizes, largest first, one line per series (log y)."""
    fig = go.Figure(
        [
            go.Scatter(
                x=np.arange(1, len(s) + 1), y=np.sort(s)[::-1], mode="lines+markers", name=name
            )
            for name, s in sizes.items()
        ]
    )
    fig.update_layout(
        title=title, xaxis_title="cluster rank (largest first)", yaxis_title="rows", **LAYOUT
    )
    fig.update_yaxes(type="log")
    return fig
