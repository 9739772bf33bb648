"""Deterministic contiguous sharding by original row index (DESIGN.md contract 6)."""

from __future__ import annotations


def contiguous_range(n: int, part: int, parts: int) -> tuple[int, int]:
    """[start, stop) of part ``part`` of ``parts`` contiguous, near-equal ranges of ``n``.

    The first ``n % parts`` parts get one row more; the ranges tile ``0..n`` exactly.
    """
    if parts < 1:
        raise ValueError(f"number of parts must be >= 1, got {parts}")
    if not 0 <= part < parts:
        raise ValueError(f"part {part} is outside 0..{parts - 1}")
    base, extra = divmod(n, parts)
    start = part * base + min(part, extra)
    return start, start + base + (1 if part < extra else 0)


def all_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    return [contiguous_range(n, i, parts) for i in range(parts)]


def compress_indices(indices: list[int] | set[int]) -> str:
    """``[0,1,2,3,7,9,10,11,12]`` -> ``"0-3,7,9-12"`` (the SLURM --array syntax)."""
    out: list[str] = []
    ordered = sorted(set(indices))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)
