"""Where things live: the repository, and where relative output paths resolve. No torch (the analysis tier uses it)."""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The repository this package lives in (run folders and data resolve against it, whatever the cwd). The
    kit is installed editable (``pip install -e .``): ``data/paper``, ``notebooks`` and ``figures`` are read
    from this folder, not from an installed copy."""
    return Path(__file__).resolve().parents[1]


def runs_base() -> Path:
    """Where relative output paths (``runs_root``, the analysis notebooks' ``figures_dir``) resolve:
    ``$ADVKIT_OUTPUT_BASE`` if set (the test suite points it at a temporary folder), else the repository root."""
    return Path(os.environ.get("ADVKIT_OUTPUT_BASE", project_root()))


def resolve_output(path: str | Path) -> Path:
    """``path`` if absolute, else ``runs_base() / path``."""
    path = Path(path)
    return path if path.is_absolute() else runs_base() / path
