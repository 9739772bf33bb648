"""The bundled quickstart corpus: docstrings of the Python standard library.

Extracted at run time from this interpreter's stdlib sources with ``ast`` (nothing is
imported or executed), so the text is real prose that nobody on the team wrote, and the
top-level module (``email``, ``asyncio``, ...) is a natural ``source`` for clusters.
Rows are ordered by file path and position, so the corpus is deterministic for a given
Python version; the cache file name carries that version.
"""

from __future__ import annotations

import ast
import logging
import platform
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lib.core.storage import atomic_path

log = logging.getLogger(__name__)

BUILTIN_CORPORA = ("stdlib_docstrings",)
MIN_CHARS = 30
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test"}


def _docstrings(path: Path, module: str) -> list[tuple[str, str]]:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):  # a few stdlib files are deliberately broken
        return []
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, qualname: str) -> None:
        doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
        if doc and len(doc) >= MIN_CHARS:
            found.append((qualname, doc))
        for child in getattr(node, "body", []):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                visit(child, f"{qualname}.{child.name}")

    visit(tree, module)
    return found


def build_stdlib_docstrings(stdlib: Path | None = None) -> pa.Table:
    """Table (id, source, module, text) of every docstring of >= 30 chars in the stdlib."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    ids: list[str] = []
    sources: list[str] = []
    modules: list[str] = []
    texts: list[str] = []
    seen: dict[str, int] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        for qualname, doc in _docstrings(path, module):
            n = seen.get(qualname, 0)
            seen[qualname] = n + 1
            ids.append(qualname if n == 0 else f"{qualname}#{n + 1}")
            sources.append(module.split(".")[0])
            modules.append(module)
            texts.append(doc)
    return pa.table({"id": ids, "source": sources, "module": modules, "text": texts})


def builtin_corpus_path(name: str, cache_dir: Path) -> Path:
    """Build (once) and return the parquet file of builtin corpus ``name``."""
    if name not in BUILTIN_CORPORA:
        raise ValueError(
            f"unknown builtin corpus {name!r}; available: {', '.join(BUILTIN_CORPORA)}"
        )
    target = Path(cache_dir) / f"{name}-py{platform.python_version()}.parquet"
    if not target.exists():
        log.info("extracting the %s corpus to %s", name, target)
        table = build_stdlib_docstrings()
        with atomic_path(target) as tmp:
            pq.write_table(table, tmp, row_group_size=2048)
    return target
