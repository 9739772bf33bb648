"""What the GPU smoke suite's scripts share: the device, timing, the matmul peak, results.

Every script takes ``--smoke`` (tiny sizes, runs on the CPU: proves the code, measures
nothing) and ``--out FILE`` (its JSON: a list of result rows)."""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def parser(doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (no timing)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file of result rows")
    return ap


def device(smoke: bool) -> torch.device:
    """CUDA for a real run (an error without it), the CPU for ``--smoke``."""
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit(
            f"no CUDA device visible to torch {torch.__version__}: install the CUDA build "
            "(bench/gpu/README.md) or run with --smoke"
        )
    return torch.device("cuda", 0)


def gpu_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.machine()}, smoke)"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], Any], dev: torch.device) -> tuple[float, Any]:
    """(seconds, result) of ``fn()``, with the device drained before and after."""
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return time.perf_counter() - t0, out


def matmul_peak(dev: torch.device, dtype: torch.dtype, *, tf32: bool, n: int = 8192) -> float:
    """Measured TFLOP/s of an n x n x n matmul in ``dtype`` (best of 5 after a warm-up)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        a @ b
        best = min(timed(lambda: a @ b, dev)[0] for _ in range(5))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n**3 / best / 1e12


def row(
    bench: str, what: str, value: float | str | None, unit: str = "", note: str = ""
) -> dict[str, Any]:
    return {"bench": bench, "what": what, "value": value, "unit": unit, "note": note}


def write(out: Path, rows: list[dict[str, Any]], **meta: Any) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    for r in rows:
        value = r["value"]
        shown = f"{value:,.3g}" if isinstance(value, float) else str(value)
        print(f"{r['bench']:8} {r['what']:44} {shown:>12} {r['unit']:10} {r['note']}")
