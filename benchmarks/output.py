"""Where results go: markdown tables, and the JSON and markdown files under ``benchmarks/results``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers are right-aligned."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.2f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    # A column of numbers (where "-" marks a missing one) is right-aligned.
    numeric = [
        all(isinstance(row[i], (int, float)) or row[i] == "-" for row in rows) for i in range(len(headers))
    ]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = (v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2)) for w, n in zip(widths, numeric, strict=True))
    rule += "|"
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def write_results(name: str, payload: dict[str, Any], markdown: str, json_path: str | None = None) -> tuple[Path, Path]:
    """Write ``payload`` as JSON and ``markdown`` beside it; return both paths.

    By default ``benchmarks/results/<name>.json`` and ``.md``; ``json_path`` moves both.
    """
    target = Path(json_path) if json_path else RESULTS_DIR / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": name, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **payload}
    target.write_text(json.dumps(document, indent=2) + "\n")
    markdown_path = target.with_suffix(".md")
    markdown_path.write_text(markdown.rstrip() + "\n")
    return target, markdown_path


def publish_results(name: str, payload: dict[str, Any], markdown: str, json_path: str | None,
                    batch_size: int = 1) -> None:
    """Write and print the results of a run (measured at ``batch_size`` ops per task).

    One results file per batch size, so one-task-per-op and batched runs sit side by side.
    """
    json_file, md_file = write_results(name if batch_size == 1 else f"{name}-batch{batch_size}", payload, markdown,
                                       json_path)
    print()
    print(markdown)
    print(f"\nresults: {json_file}, {md_file}")
