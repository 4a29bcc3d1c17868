"""``make figures``: execute every analysis notebook headlessly through papermill."""

from __future__ import annotations

from pathlib import Path

from .paths import project_root, resolve_output
from .sweep import execute_notebook

ANALYSIS_DIR = project_root() / "notebooks" / "analysis"


def run_analysis_notebooks(runs_root: str = "runs", figures_dir: str = "figures") -> dict[str, list]:
    """Run each ``notebooks/analysis/*.ipynb`` with ``runs_root`` and ``figures_dir``; executed copies go to
    ``<runs_root>/analysis/``. Carries on past a failing notebook and lists the failures and the figures.
    ValueError, before any notebook runs, where ``runs_root`` is not a folder: a mistyped one would otherwise be
    created and every kit panel drawn empty over the committed figures."""
    runs = resolve_output(runs_root)
    if not runs.is_dir():
        raise ValueError(f"runs_root={str(runs_root)!r} ({runs}) {'is not a folder' if runs.exists() else 'does not exist'}"
                         ": give the folder your sweeps wrote (e.g. runs/demo), or create an empty one for the "
                         "paper's panels alone")
    import papermill

    executed_dir = runs / "analysis"
    executed_dir.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, list] = {"done": [], "failed": []}
    offered = {"runs_root": runs_root, "figures_dir": figures_dir}
    for notebook in sorted(ANALYSIS_DIR.glob("*.ipynb")):
        output = executed_dir / notebook.name
        declared = papermill.inspect_notebook(str(notebook))  # the study notebook reads committed tables instead
        try:
            execute_notebook(notebook, output, {k: v for k, v in offered.items() if k in declared})
            outcome["done"].append(notebook.name)
        except Exception as exc:  # report them all at the end
            outcome["failed"].append((notebook.name, str(output), f"{type(exc).__name__}: {str(exc)[-300:]}"))
    out = resolve_output(figures_dir)
    for path in sorted(out.glob("*.png")) + sorted(out.glob("*.md")):
        print(path)
    for name, output, error in outcome["failed"]:
        print(f"[figures] FAILED {name}: see {output}\n    {error}")
    print(f"[figures] {len(outcome['done'])} notebooks done, {len(outcome['failed'])} failed; figures in {out}")
    return outcome
