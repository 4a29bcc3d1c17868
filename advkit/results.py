"""Results as tidy pandas tables: the kit's run folders and the paper's published numbers in one schema.

The analysis schema has one row per (model, MBN branch, attack): ``source`` ('paper' or 'kit'), ``run``,
``dataset``, ``arch``, ``batch_size``, ``train_steps``, ``eps`` (of the evaluation, 0-255), ``adv_ratio``,
``clean_ratio``, ``norm`` ('bn', 'mbn', 'gn'), ``branch`` ('-', 'clean', 'adv'), ``alp``, ``running_stats``,
``finetune_bn``, ``seed``, ``strategy`` (the paper's name), ``attack`` ('clean', 'pgd': the paper's protocol
where ``targeted``;
kit runs evaluated with ``eval_autoattack_n`` also 'apgd-ce', 'apgd-t' and their worst case 'autoattack', on
their first ``n`` test images), ``steps`` (0: clean images), ``accuracy`` and ``worst_accuracy`` in percent,
``n``, and ``recipe`` (what a kit run's training and evaluation change from the recipe most runs under its root
share, '' for those: runs that differ in it are different models, never seeds of one). One plotting function
then serves both sources; the paper's figures use :func:`paper_protocol`.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from . import paper
from .paths import project_root, resolve_output
from .rundir import DamagedFile, RunDir

PAPER_DIR = project_root() / "data" / "paper"
SCHEMA = ["source", "run", "dataset", "arch", "batch_size", "train_steps", "eps", "adv_ratio", "clean_ratio", "norm",
          "branch", "alp", "running_stats", "finetune_bn", "seed", "strategy", "attack", "targeted", "steps",
          "accuracy", "worst_accuracy", "n", "recipe"]
PAPER_PROTOCOL = ("clean", "pgd")  # the paper's attacks; AutoAttack's rows are 'apgd-ce', 'apgd-t', 'autoattack'
CONFIG_COLUMNS = ["name", "strategy", "norm", "adv_ratio", "clean_ratio", "alp_weight", "running_stats_epochs",
                  "finetune_bn", "arch", "dataset", "train_steps", "train_eps", "batch_size", "epochs", "seed", "n_train"]
# The config keys that are no part of a run's recipe: its name, folder and seed, where and how it ran
# (config.WHERE_AND_HOW; a test keeps them in step), what it logs, where it started from (a path per seed; the
# source's own recipe decides), and what the schema holds as columns of its own (figures vary those on purpose).
NOT_RECIPE = frozenset({
    "name", "run_dir", "seed", "runs_root", "resume", "overwrite", "data_root", "num_workers", "checkpoint_every_steps",
    "decode", "attack_compile", "device", "tensorboard", "sanity_n", "bnstats_channels", "bnstats_layer",
    "init_checkpoint", "eval_batch_size", "eval_checkpoints", "eval_autoattack_n", "eval_eps", "eval_targeted",
    "strategy", "adv_ratio", "clean_ratio", "norm", "alp_weight", "running_stats_epochs", "finetune_bn", "arch",
    "dataset", "train_steps", "batch_size"})
BNSTATS_COLUMNS = ["figure", "layer", "branch", "channel", "source", "statistic", "value"]


def attack_column(frame: pd.DataFrame) -> pd.Series:
    """Each row's attack: the ``attack`` column, or where a row has none (tables written before AutoAttack)
    'clean' for steps 0 and 'pgd' otherwise."""
    derived = pd.Series(np.where(frame["steps"] == 0, "clean", "pgd"), index=frame.index)
    return frame["attack"].fillna(derived) if "attack" in frame else derived


def targeted_column(frame: pd.DataFrame) -> pd.Series:
    """Each row's ``targeted`` as a bool; True where a table has none (the paper's, or one written before it)."""
    if "targeted" not in frame:
        return pd.Series(True, index=frame.index)
    return frame["targeted"].fillna(True).astype(str).str.lower().isin(["true", "1", "1.0"])


def paper_protocol(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of the paper's protocol: clean images and targeted PGD; without AutoAttack's and without
    untargeted PGD's (a run evaluated with ``eval_targeted=False``), which measure another threat model."""
    attack = attack_column(frame)
    return frame[(attack == "clean") | (attack.isin(PAPER_PROTOCOL) & targeted_column(frame))]


def read_metrics(run_dir: Path) -> list[dict]:
    """The per-epoch records of a finished run's ``metrics.jsonl``; DamagedFile naming the first bad line."""
    return RunDir(run_dir).metrics(strict=True)


def run_status(run_dir: Path) -> str:
    """'done', 'running' or 'failed' as the run wrote it; 'unknown' without a status file."""
    return RunDir(run_dir).status()["state"]


def _read_finished(folder: RunDir) -> tuple[dict, pd.DataFrame, pd.DataFrame | None]:
    """Config, results and BN statistics (None without them) of a run whose status is 'done'."""
    config = folder.config(CONFIG_COLUMNS)
    path = folder.bnstats_file
    bnstats = folder.read_table(path, BNSTATS_COLUMNS) if path.exists() and path.stat().st_size > 1 else None
    return config, folder.results(), bnstats


def scan_runs(root: str | Path) -> tuple[list[tuple[Path, dict, pd.DataFrame, pd.DataFrame | None]], pd.DataFrame]:
    """Every run folder under ``root``: the finished ones as (folder, config, results, bnstats) and a table of
    the others (folder, state, error): failed, running, or 'damaged' with the message naming the file."""
    finished, others = [], []
    for folder in RunDir.find(root):
        try:
            status = folder.status()
            if status["state"] == "done":
                finished.append((folder.path, *_read_finished(folder)))
            else:
                others.append({"run_dir": str(folder.path), "state": status["state"], "error": status.get("error")})
        except (DamagedFile, OSError) as exc:
            message = str(exc) if isinstance(exc, DamagedFile) else f"run {folder.name}: {exc}"
            others.append({"run_dir": str(folder.path), "state": "damaged", "error": message})
    return finished, pd.DataFrame(others, columns=["run_dir", "state", "error"])


def _warn_damaged(others: pd.DataFrame) -> None:
    damaged = others[others["state"] == "damaged"]
    if len(damaged):
        warnings.warn(f"{len(damaged)} damaged run(s) left out (results.unfinished_runs lists them): "
                      + "; ".join(damaged["error"]), stacklevel=3)


def recipe_labels(configs: list[dict]) -> list[str]:
    """Each run's recipe (its config without :data:`NOT_RECIPE`) as what it changes from the recipe most of
    ``configs`` share: '' for those, else e.g. 'epochs=16, lr=0.05' ('n_train unset' where a config lacks a key)."""
    recipes = [{k: json.dumps(v, sort_keys=True) for k, v in cfg.items() if k not in NOT_RECIPE} for cfg in configs]
    if not recipes:
        return []
    common = dict(Counter(tuple(sorted(r.items())) for r in recipes).most_common(1)[0][0])
    return [", ".join(f"{k}={json.loads(r[k])}" if k in r else f"{k} unset"
                      for k in sorted(r.keys() | common.keys()) if r.get(k) != common.get(k)) for r in recipes]


def load_runs(root: str | Path) -> pd.DataFrame:
    """Every finished run under ``root``: config columns + its ``results.csv`` rows (accuracies as fractions).

    Runs that failed, are still running or are damaged are not mixed in: :func:`unfinished_runs` lists them
    (and a warning names the damaged ones).
    """
    finished, others = scan_runs(root)
    _warn_damaged(others)
    frames = []
    for (run_dir, cfg, results, _), recipe in zip(finished, recipe_labels([cfg for _, cfg, _, _ in finished])):
        for column in reversed(CONFIG_COLUMNS):
            if column not in results:
                results.insert(0, column, [cfg.get(column)] * len(results))
        results.insert(0, "run_dir", str(run_dir))
        frames.append(results.assign(recipe=recipe))
    return (pd.concat(frames, ignore_index=True) if frames
            else pd.DataFrame(columns=["run_dir", *CONFIG_COLUMNS, "recipe"]))


def unfinished_runs(root: str | Path) -> pd.DataFrame:
    """Runs under ``root`` without a finished result: folder, state ('failed', 'running', 'unknown', or
    'damaged': a file that cannot be read) and error (the failure, or the message naming the damaged file)."""
    return scan_runs(root)[1]


def kit_results(root: str | Path) -> pd.DataFrame:
    """The finished runs under ``root`` in the analysis schema (accuracies in percent)."""
    return _in_schema(load_runs(root))


def _in_schema(runs: pd.DataFrame) -> pd.DataFrame:
    if runs.empty:
        return pd.DataFrame(columns=SCHEMA)
    frame = pd.DataFrame({
        "source": "kit", "run": runs["name"], "dataset": runs["dataset"], "arch": runs["arch"],
        "batch_size": runs["batch_size"], "train_steps": runs["train_steps"], "eps": runs["eps"],
        "adv_ratio": runs["adv_ratio"],
        "clean_ratio": runs["clean_ratio"], "norm": runs["norm"], "branch": runs["branch"],
        "alp": runs["alp_weight"] > 0, "running_stats": runs["running_stats_epochs"] > 0,
        "finetune_bn": runs["finetune_bn"].astype(bool), "seed": runs["seed"], "strategy": runs["strategy"],
        "attack": attack_column(runs), "targeted": targeted_column(runs), "steps": runs["steps"],
        "accuracy": runs["accuracy"] * 100, "worst_accuracy": runs["worst_accuracy"] * 100, "n": runs["n"],
        "recipe": runs["recipe"]})
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
                     strategy=paper.strategy_label(1.0, r["clean_ratio"], bool(r["alp"])), n=50000, recipe="")
        for column, steps in [("clean", 0), ("pgd10", 10), ("pgd20", 20), ("pgd100", 100), ("pgd500", 500),
                              ("pgd2000", 2000)]:
            rows.append(model | dict(attack="pgd" if steps else "clean", targeted=True, steps=steps, accuracy=r[column],
                                     worst_accuracy=np.nan))
    extra = pd.read_csv(folder / "clean_training.csv")
    for i, r in extra.iterrows():
        alp = r["norm"].endswith("_alp")
        norm = r["norm"].removesuffix("_alp")
        rows.append(dict(source="paper", run=f"clean-{i + 1}", dataset="imagenet", arch=r["network"],
                         batch_size=4096, train_steps=30 if r["adv_ratio"] else 0, eps=16.0, adv_ratio=r["adv_ratio"],
                         clean_ratio=r["clean_ratio"], norm=norm, branch=r["eval_bn"], alp=alp, running_stats=False,
                         finetune_bn=False, seed=np.nan, strategy=paper.strategy_label(r["adv_ratio"], r["clean_ratio"], alp),
                         attack="clean", targeted=True, steps=0, accuracy=r["value"], worst_accuracy=np.nan, n=50000,
                         recipe=""))
    return pd.DataFrame(rows)[SCHEMA]


def load_bnstats(root: str | Path) -> pd.DataFrame:
    """The ``bnstats.csv`` of every finished run under ``root``, with run name, strategy and norm."""
    finished, others = scan_runs(root)
    _warn_damaged(others)
    frames = [bnstats.assign(run=cfg["name"], run_dir=str(run_dir), strategy=cfg["strategy"], norm=cfg["norm"],
                             dataset=cfg["dataset"], arch=cfg["arch"], running_stats=cfg["running_stats_epochs"] > 0,
                             seed=cfg["seed"])
              for run_dir, cfg, _, bnstats in finished if bnstats is not None]
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
    test images) beside them (percent). A run is named by its folder under ``root`` (runs of the same name in
    two sweeps are two rows)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"runs root {root} {'is not a folder' if root.exists() else 'does not exist'}")
    loaded = load_runs(root)
    runs = _in_schema(loaded)
    if runs.empty:
        return pd.DataFrame(columns=["run", "strategy", "norm", "branch", "clean"])
    folders = [Path(d).relative_to(root) for d in loaded["run_dir"]]
    runs["run"] = [str(f) if f.parts else Path(d).name for f, d in zip(folders, loaded["run_dir"])]
    attack = attack_column(runs)
    runs = runs.assign(metric=np.where(attack == "pgd", "pgd" + runs["steps"].astype(str), attack))
    table = runs.pivot_table(index=["run", "strategy", "norm", "branch"], columns="metric", values="accuracy",
                             aggfunc="first", sort=False)
    pgd = sorted((c for c in table.columns if c.startswith("pgd")), key=lambda c: int(c[3:]))
    others = [c for c in table.columns if c != "clean" and c not in pgd]
    return table[["clean", *pgd, *sorted(others)]].round(1).reset_index()


def notebook_inputs(runs_root: str | Path, figures_dir: str | Path) -> tuple[pd.DataFrame, Path]:
    """What every analysis notebook starts from: the analysis frame (the paper's numbers and the finished runs
    under ``runs_root``) and the figures folder, both resolved like every output path; prints what it found and
    lists the runs it left out (failed, unfinished, damaged)."""
    runs = resolve_output(runs_root)
    frame = analysis_frame(runs)
    print(f"paper rows: {(frame.source == 'paper').sum()}, kit rows: {(frame.source == 'kit').sum()} from {runs}")
    if runs.exists():
        left_out = unfinished_runs(runs)
        if not left_out.empty:
            print(f"runs not mixed in (failed, unfinished or damaged):\n{left_out.to_string(index=False)}")
    return frame, resolve_output(figures_dir)
