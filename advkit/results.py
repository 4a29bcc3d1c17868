"""Run folders as tidy pandas tables (the analysis layer reads runs through here)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

CONFIG_COLUMNS = ["name", "strategy", "norm", "adv_ratio", "clean_ratio", "alp_weight", "running_stats_epochs",
                  "finetune_bn", "arch", "dataset", "train_steps", "train_eps", "epochs", "seed"]


def run_status(run_dir: Path) -> str:
    """'done', 'running' or 'failed' as the run wrote it; 'unknown' without a status file."""
    path = Path(run_dir) / "status.json"
    return json.loads(path.read_text())["state"] if path.exists() else "unknown"


def load_runs(root: str | Path) -> pd.DataFrame:
    """Every finished run under ``root``: config columns + one row per result row of its ``results.csv``.

    Runs that failed or are still running are not mixed in: :func:`unfinished_runs` lists them.
    """
    frames = []
    for config_path in sorted(Path(root).glob("**/config.json")):
        run_dir = config_path.parent
        if run_status(run_dir) != "done" or not (run_dir / "results.csv").exists():
            continue
        cfg = json.loads(config_path.read_text())
        results = pd.read_csv(run_dir / "results.csv")
        for column in reversed(CONFIG_COLUMNS):
            if column not in results:
                results.insert(0, column, cfg.get(column))
        results.insert(0, "run_dir", str(run_dir))
        frames.append(results)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_dir", *CONFIG_COLUMNS])


def unfinished_runs(root: str | Path) -> pd.DataFrame:
    """Runs under ``root`` without a finished result: name, status and error (if it failed)."""
    rows = []
    for config_path in sorted(Path(root).glob("**/config.json")):
        run_dir = config_path.parent
        status_path = run_dir / "status.json"
        status = json.loads(status_path.read_text()) if status_path.exists() else {"state": "unknown"}
        if status["state"] != "done":
            rows.append({"run_dir": str(run_dir), "state": status["state"], "error": status.get("error")})
    return pd.DataFrame(rows, columns=["run_dir", "state", "error"])


def summary_table(root: str | Path) -> pd.DataFrame:
    """One row per run and MBN branch: strategy, norm, clean accuracy and PGD accuracy (percent)."""
    runs = load_runs(root)
    if runs.empty:
        return pd.DataFrame(columns=["name", "strategy", "norm", "branch", "clean", "pgd"])
    runs = runs.assign(metric=runs["attack"].where(runs["attack"] == "clean", "pgd" + runs["steps"].astype(str)))
    table = runs.pivot_table(index=["name", "strategy", "norm", "branch"], columns="metric", values="accuracy",
                             aggfunc="first", sort=False) * 100
    return table.round(1).reset_index()
