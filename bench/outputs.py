"""The benchmarks' outputs under their --out folder: the rows as JSON and the table as markdown, side by
side (the GPU suite packs every *.md into its summary)."""

from __future__ import annotations

import json
from pathlib import Path


def write_outputs(out: Path, stem: str, rows: list[dict], markdown: str) -> None:
    """out/STEM.json (the rows) and out/STEM.md (the markdown), out created if needed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    (out / f"{stem}.md").write_text(markdown)


def publish(out: Path | None, stem: str, rows: list[dict], heading: str, text: str) -> None:
    """Prints text; with an --out folder, also writes out/STEM.json and out/STEM.md (## heading, then text)."""
    if out:
        write_outputs(out, stem, rows, f"## {heading}\n\n{text}")
    print(text, end="")
