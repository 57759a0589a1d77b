"""PEFT-format adapter helpers for tests: the random-weight writer (shared with the benchmarks) and a
.tar.gz packer."""

from __future__ import annotations

import tarfile
from pathlib import Path

from loraplex.tools.synthetic_adapters import PROJECTIONS, write_peft_adapter

__all__ = ["PROJECTIONS", "pack_adapter", "write_peft_adapter"]


def pack_adapter(adapter_dir: Path, archive: Path) -> Path:
    """A .tar.gz with the adapter's files at its root."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(adapter_dir.iterdir()):
            tar.add(path, arcname=path.name)
    return archive
