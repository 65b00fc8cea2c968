"""Benchmark reports on disk: results JSON, a markdown table and PNG plots, each written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def save_png(fig, path: Path) -> Path:
    """Save a matplotlib figure so a reader never sees half a PNG."""
    from fedmem.memory import atomic_write_file

    atomic_write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return Path(path)


def write_report(summary: dict, out: Path, table_markdown: Callable[[dict], str],
                 plot: Callable[[dict, Path], list[Path]]) -> list[Path]:
    """OUT/results.json, OUT/table.md and the plots; returns the paths written."""
    from fedmem.memory import atomic_write_text

    out = Path(out)
    atomic_write_text(out / "results.json", json.dumps(summary, indent=1, default=float))
    atomic_write_text(out / "table.md", table_markdown(summary))
    return [out / "results.json", out / "table.md"] + plot(summary, out)
