"""Results as tidy pandas tables: the kit's run folders and the paper's published numbers in one schema.

The analysis schema has one row per (model, MBN branch, attack): ``source`` ('paper' or 'kit'), ``run``,
``dataset``, ``arch``, ``batch_size``, ``train_steps``, ``eps`` (of the evaluation, 0-255), ``adv_ratio``,
``clean_ratio``, ``norm`` ('bn', 'mbn', 'gn'), ``branch`` ('-', 'clean', 'adv'), ``alp``, ``running_stats``,
``finetune_bn``, ``seed``, ``strategy`` (the paper's name), ``attack`` ('clean', 'pgd': the paper's protocol;
kit runs evaluated with ``eval_autoattack_n`` also 'apgd-ce', 'apgd-t' and their worst case 'autoattack', on
their first ``n`` test images), ``steps`` (0: clean images), ``accuracy`` and ``worst_accuracy`` in percent,
``n``. One plotting function then serves both sources; the paper's figures use :func:`paper_protocol`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .config import project_root

PAPER_DIR = project_root() / "data" / "paper"
SCHEMA = ["source", "run", "dataset", "arch", "batch_size", "train_steps", "eps", "adv_ratio", "clean_ratio", "norm",
          "branch", "alp", "running_stats", "finetune_bn", "seed", "strategy", "attack", "steps", "accuracy",
          "worst_accuracy", "n"]
PAPER_PROTOCOL = ("clean", "pgd")  # the paper's attacks; AutoAttack's rows are 'apgd-ce', 'apgd-t', 'autoattack'
CONFIG_COLUMNS = ["name", "strategy", "norm", "adv_ratio", "clean_ratio", "alp_weight", "running_stats_epochs",
                  "finetune_bn", "arch", "dataset", "train_steps", "train_eps", "batch_size", "epochs", "seed"]


def attack_column(frame: pd.DataFrame) -> pd.Series:
    """Each row's attack: the ``attack`` column, or where a row has none (tables written before AutoAttack)
    'clean' for steps 0 and 'pgd' otherwise."""
    derived = pd.Series(np.where(frame["steps"] == 0, "clean", "pgd"), index=frame.index)
    return frame["attack"].fillna(derived) if "attack" in frame else derived


def paper_protocol(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of the paper's protocol (clean and PGD), without AutoAttack's."""
    return frame[attack_column(frame).isin(PAPER_PROTOCOL)]


def strategy_label(adv_ratio: float, clean_ratio: float, alp: bool = False) -> str:
    """The paper's name of a strategy: '100% adv + 20% clean, ALP', '0% adv + 100% clean'."""
    if adv_ratio == 0:
        return "0% adv + 100% clean"
    return f"100% adv + {clean_ratio * 100:g}% clean" + (", ALP" if alp else "")


def run_status(run_dir: Path) -> str:
    """'done', 'running' or 'failed' as the run wrote it; 'unknown' without a status file."""
    path = Path(run_dir) / "status.json"
    return json.loads(path.read_text())["state"] if path.exists() else "unknown"


def _run_dirs(root: str | Path) -> list[Path]:
    return sorted(p.parent for p in Path(root).glob("**/config.json"))


def load_runs(root: str | Path) -> pd.DataFrame:
    """Every finished run under ``root``: config columns + its ``results.csv`` rows (accuracies as fractions).

    Runs that failed or are still running are not mixed in: :func:`unfinished_runs` lists them.
    """
    frames = []
    for run_dir in _run_dirs(root):
        if run_status(run_dir) != "done" or not (run_dir / "results.csv").exists():
            continue
        cfg = json.loads((run_dir / "config.json").read_text())
        results = pd.read_csv(run_dir / "results.csv")
        for column in reversed(CONFIG_COLUMNS):
            if column not in results:
                results.insert(0, column, [cfg.get(column)] * len(results))
        results.insert(0, "run_dir", str(run_dir))
        frames.append(results)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_dir", *CONFIG_COLUMNS])


def unfinished_runs(root: str | Path) -> pd.DataFrame:
    """Runs under ``root`` without a finished result: folder, status and error (if it failed)."""
    rows = []
    for run_dir in _run_dirs(root):
        status_path = run_dir / "status.json"
        status = json.loads(status_path.read_text()) if status_path.exists() else {"state": "unknown"}
        if status["state"] != "done":
            rows.append({"run_dir": str(run_dir), "state": status["state"], "error": status.get("error")})
    return pd.DataFrame(rows, columns=["run_dir", "state", "error"])


def kit_results(root: str | Path) -> pd.DataFrame:
    """The finished runs under ``root`` in the analysis schema (accuracies in percent)."""
    runs = load_runs(root)
    if runs.empty:
        return pd.DataFrame(columns=SCHEMA)
    frame = pd.DataFrame({
        "source": "kit", "run": runs["name"], "dataset": runs["dataset"], "arch": runs["arch"],
        "batch_size": runs["batch_size"], "train_steps": runs["train_steps"], "eps": runs["eps"],
        "adv_ratio": runs["adv_ratio"],
        "clean_ratio": runs["clean_ratio"], "norm": runs["norm"], "branch": runs["branch"],
        "alp": runs["alp_weight"] > 0, "running_stats": runs["running_stats_epochs"] > 0,
        "finetune_bn": runs["finetune_bn"].astype(bool), "seed": runs["seed"], "strategy": runs["strategy"],
        "attack": attack_column(runs), "steps": runs["steps"], "accuracy": runs["accuracy"] * 100, "worst_accuracy": runs["worst_accuracy"] * 100,
        "n": runs["n"]})
    return frame[SCHEMA]


def paper_results(folder: str | Path = PAPER_DIR) -> pd.DataFrame:
    """The paper's numbers (Table 7 and the clean accuracies of Table 1 / Section 5) in the analysis schema."""
    folder = Path(folder)
    table7 = pd.read_csv(folder / "table7.csv")
    rows = []
    for i, r in table7.iterrows():
        norm = {"mbn_adv": "mbn"}.get(r["norm"], r["norm"])
        branch = "adv" if r["norm"] == "mbn_adv" else "-"
        model = dict(source="paper", run=f"table7-{i + 1}", dataset="imagenet", arch=r["network"],
                     batch_size=r["batch_size"], train_steps=r["train_pgd_steps"], eps=16.0, adv_ratio=1.0,
                     clean_ratio=r["clean_ratio"], norm=norm, branch=branch, alp=bool(r["alp"]),
                     running_stats=bool(r["running_stats"]), finetune_bn=False, seed=np.nan,
                     strategy=strategy_label(1.0, r["clean_ratio"], bool(r["alp"])), n=50000)
        for column, steps in [("clean", 0), ("pgd10", 10), ("pgd20", 20), ("pgd100", 100), ("pgd500", 500),
                              ("pgd2000", 2000)]:
            rows.append(model | dict(attack="pgd" if steps else "clean", steps=steps, accuracy=r[column],
                                     worst_accuracy=np.nan))
    extra = pd.read_csv(folder / "clean_training.csv")
    for i, r in extra.iterrows():
        alp = r["norm"].endswith("_alp")
        norm = r["norm"].removesuffix("_alp")
        rows.append(dict(source="paper", run=f"clean-{i + 1}", dataset="imagenet", arch=r["network"],
                         batch_size=4096, train_steps=30 if r["adv_ratio"] else 0, eps=16.0, adv_ratio=r["adv_ratio"],
                         clean_ratio=r["clean_ratio"], norm=norm, branch=r["eval_bn"], alp=alp, running_stats=False,
                         finetune_bn=False, seed=np.nan, strategy=strategy_label(r["adv_ratio"], r["clean_ratio"], alp),
                         attack="clean", steps=0, accuracy=r["value"], worst_accuracy=np.nan, n=50000))
    return pd.DataFrame(rows)[SCHEMA]


def load_bnstats(root: str | Path) -> pd.DataFrame:
    """The ``bnstats.csv`` of every finished run under ``root``, with run name, strategy and norm."""
    frames = []
    for run_dir in _run_dirs(root):
        path = run_dir / "bnstats.csv"
        if run_status(run_dir) == "done" and path.exists() and path.stat().st_size > 1:
            cfg = json.loads((run_dir / "config.json").read_text())
            frames.append(pd.read_csv(path).assign(run=cfg["name"], run_dir=str(run_dir), strategy=cfg["strategy"], norm=cfg["norm"],
                                                   dataset=cfg["dataset"], arch=cfg["arch"],
                                                   running_stats=cfg["running_stats_epochs"] > 0, seed=cfg["seed"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def analysis_frame(runs_root: str | Path | None = None) -> pd.DataFrame:
    """The paper's numbers and (if ``runs_root`` exists) the kit's finished runs, in one table."""
    frames = [paper_results()]
    if runs_root is not None and Path(runs_root).exists():
        frames.append(kit_results(runs_root))
    return pd.concat([f for f in frames if not f.empty], ignore_index=True)


def summary_table(root: str | Path) -> pd.DataFrame:
    """One row per run and MBN branch: strategy, norm, clean accuracy, PGD-N accuracies and, for runs evaluated
    with AutoAttack, its accuracies (``apgd-ce``, ``apgd-t``, ``autoattack``; on the first ``eval_autoattack_n``
    test images) beside them (percent)."""
    runs = kit_results(root)
    if runs.empty:
        return pd.DataFrame(columns=["run", "strategy", "norm", "branch", "clean"])
    attack = attack_column(runs)
    runs = runs.assign(metric=np.where(attack == "pgd", "pgd" + runs["steps"].astype(str), attack))
    table = runs.pivot_table(index=["run", "strategy", "norm", "branch"], columns="metric", values="accuracy",
                             aggfunc="first", sort=False)
    pgd = sorted((c for c in table.columns if c.startswith("pgd")), key=lambda c: int(c[3:]))
    others = [c for c in table.columns if c != "clean" and c not in pgd]
    return table[["clean", *pgd, *sorted(others)]].round(1).reset_index()
