"""Every experiment writes its table three ways: CSV (for tools), JSON (for code) and Markdown (for
people)."""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from ..io import atomic_write_text, strict, write_json


def format_cell(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(directory: str | Path, name: str, rows: Sequence[dict], title: str = "") -> dict[str, Path]:
    """``DIR/name.csv``, ``DIR/name.json`` and ``DIR/name.md``; returns their paths. A number that
    does not exist (NaN, ±inf) is an empty CSV cell, ``null`` in the JSON and "n/a" in Markdown; put
    the reason in a ``note`` column."""
    directory = Path(directory)
    if not rows:
        raise ValueError(f"table {name!r} has no rows")
    rows = strict(rows)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    paths = {"csv": directory / f"{name}.csv", "json": directory / f"{name}.json", "md": directory / f"{name}.md"}
    atomic_write_text(paths["csv"], buffer.getvalue())
    write_json(paths["json"], list(rows))
    atomic_write_text(paths["md"], (f"### {title}\n\n" if title else "") + markdown_table(rows, columns))
    return paths


def plot_bars(rows: Sequence[dict], label: str | Sequence[str], value: str, out: str | Path, title: str = "",
              error: str | None = None) -> Path:
    """A bar per row: ``value`` (with ``error`` bars when given), labelled by the ``label`` column(s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [" / ".join(str(r[c]) for c in ([label] if isinstance(label, str) else label)) for r in rows]
    values = [float(r[value]) for r in rows]
    figure, axis = plt.subplots(figsize=(max(4.0, 0.6 * len(rows) + 1.5), 3.6))
    axis.bar(range(len(rows)), values, yerr=[float(r.get(error, 0)) for r in rows] if error else None,
             color="#4a7bd0", capsize=3)
    axis.set_xticks(range(len(rows)), labels, rotation=35, ha="right", fontsize=8)
    axis.set_ylabel(value)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    out = Path(out)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
