"""One table of every result file of a GPU smoke run, and one JSON of them all.

python -m bench.gpu.report RESULTS_DIR      # reads RESULTS_DIR/*.json, writes summary.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(parts: dict[str, dict]) -> str:
    lines = ["| bench | what | value | unit | note |", "|---|---|---:|---|---|"]
    for doc in parts.values():
        for r in doc["rows"]:
            v = r["value"]
            shown = "–" if v is None else (f"{v:,.3g}" if isinstance(v, float) else str(v))
            lines.append(f"| {r['bench']} | {r['what']} | {shown} | {r['unit']} | {r['note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    results = Path(args[0])
    parts = {
        p.stem: json.loads(p.read_text())
        for p in sorted(results.glob("*.json"))
        if p.name != "summary.json"
    }
    gpus = sorted({d["meta"].get("gpu", "?") for d in parts.values()})
    print(f"GPU smoke suite on {', '.join(gpus)} ({results})")
    print(table(parts))
    (results / "summary.json").write_text(json.dumps({"gpu": gpus, "parts": parts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
