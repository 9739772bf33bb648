"""The report page: a Jinja2 template (autoescaped) with plotly.js inlined once.

Figures travel as JSON in one ``<script type="application/json">`` element; ``<``, ``>``,
``&`` and the JavaScript line separators are written as ``\\uXXXX`` escapes there, so no
text of the dataset can end the element (``</script>``) or open markup. Every other text
goes through Jinja2's autoescape. The page loads nothing: no CDN, no fonts, no network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from plotly.offline import get_plotlyjs

from lib.report.figures import Figure

TEMPLATES = Path(__file__).parent / "templates"
_SCRIPT_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def script_json(text: str) -> str:
    """JSON text made safe inside a ``<script>`` element (see the module doc)."""
    for char, escape in _SCRIPT_ESCAPES.items():
        text = text.replace(char, escape)
    return text


@dataclass
class Block:
    """One piece of a section: ``kind`` is ``text`` (a paragraph), ``count`` (a "showing
    N of M" line: ``data`` {shown, total, what}), ``table`` (``data`` {headers, rows}),
    ``figure`` (``data`` the figure id), ``texts`` (``data`` a list of {label, items}),
    ``pinned`` (the box a click on a map fills)."""

    kind: str
    data: Any = None
    title: str = ""


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Page:
    title: str
    subtitle: str
    sections: list[Section] = field(default_factory=list)
    figures: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def figure(self, section: Section, fig_id: str, fig: Figure, title: str = "") -> None:
        self.figures[fig_id] = fig
        section.blocks.append(Block("figure", fig_id, title))


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


@lru_cache(maxsize=1)
def _template() -> dict:
    """The ``plotly_white`` layout template, sent once for every figure."""
    import plotly.io as pio

    return pio.templates["plotly_white"].to_plotly_json()


def render(page: Page) -> str:
    """The whole HTML document of ``page``."""
    payload = {"template": _template(), "figures": page.figures}
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            page=page,
            figures_json=script_json(json.dumps(payload, separators=(",", ":"), allow_nan=False)),
            plotly_js=get_plotlyjs(),
        )
    )
