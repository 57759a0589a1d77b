"""Where every benchmark and simulator report goes: <name>.json (the record) beside <name>.png (a view
of it), in one place so all reports share the layout and the headless plotting set-up."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write_json_and_png(report: dict, stem: Path, plot: Callable[[dict, Path], None]) -> tuple[Path, Path]:
    """stem.json and stem.png (drawn by plot(report, path)); a rerun with the same stem replaces them."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, png_path)
    return json_path, png_path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (benchmarks run on machines with no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
