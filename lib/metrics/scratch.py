"""A rank's memory-mapped scratch arrays (per-point distances), each with a sidecar."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lib.formats.arrays import create_memmap, open_memmap


class Scratch:
    """This rank's memory-mapped scratch arrays under ``dir`` (each with a sidecar).

    ``create`` writes the sidecar and sizes the file; ``open`` re-opens it checking the
    sidecar against the expected shape and dtype (``ArrayFormatError`` on a mismatch).
    """

    def __init__(self, dir: str | Path, rank: int = 0) -> None:
        self.dir = Path(dir)
        self.rank = rank
        self.paths: list[Path] = []

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.r{self.rank}"

    def create(self, name: str, shape: tuple[int, ...], dtype: str) -> np.memmap:
        p = self.path(name)
        self.paths.append(p)
        return create_memmap(p, shape, dtype)

    def open(self, name: str, shape: tuple[int, ...], dtype: str, mode: str = "r") -> np.memmap:
        return open_memmap(self.path(name), mode, shape=shape, dtype=dtype)

    def cleanup(self) -> None:
        """Remove this rank's files (and the dir when it is left empty)."""
        for p in self.paths:
            p.unlink(missing_ok=True)
            p.with_name(p.name + ".json").unlink(missing_ok=True)
        self.paths.clear()
        for d in (self.dir, self.dir.parent):
            try:
                d.rmdir()
            except OSError:
                break
