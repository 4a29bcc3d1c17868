"""Every figure and table of the paper, drawn by the same code from the paper's numbers and from the kit's runs.

Each ``figureN(frame)`` takes the analysis table of :mod:`advkit.results` (both sources) and draws two panels
side by side, the paper's and the kit's, saving PNG and PDF into ``figures/``. Where no kit run fits, the kit
panel says which sweep produces it. Kit panels say their scale (data set, network, attack) in the title; where
several seeds exist seaborn draws 95% confidence intervals over them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from . import paper
from .paths import project_root
from .results import paper_protocol

if TYPE_CHECKING:  # the experiment tier's dataclass, for the type hint only: plots imports no torch
    from .examples import AdversarialExamples

FIGURES_DIR = project_root() / "figures"
SOURCES = ("paper", "kit")
SWEEP_OF = {"figure1": "fmnist/figure1.yaml", "figure2": "fmnist/mbn-gn-alp.yaml", "figure3": "fmnist/mbn-gn-alp.yaml",
            "figure5": "fmnist/mbn-gn-alp.yaml", "figure6": "fmnist/mbn-gn-alp.yaml", "figure7": "fmnist/figure7.yaml"}


def save(fig: plt.Figure, name: str, folder: str | Path | None = None) -> list[Path]:
    """Write ``name``.png and ``name``.pdf into ``folder`` (default ``figures/``); return the paths. The PDF has no
    creation date, so that a figure redrawn from the same numbers is the same file (a clean git diff)."""
    folder = Path(folder) if folder is not None else FIGURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=130, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None})
    return paths


def _mode(series: pd.Series):
    return series.mode().iloc[0] if not series.dropna().empty else None


def dominant(frame: pd.DataFrame, columns: list[str], reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """Rows of ``frame`` with, column by column, the value most rows of ``reference`` (default ``frame``) hold among
    the values ``frame`` holds: one panel compares like with like, at the setting most runs share (the paper:
    ResNet-152, batch 4096, PGD-30), and never at one none of its candidates has (standard training's unused
    train PGD-N outnumbering the adversarial runs' emptied panels). A column the frame lacks (a table made by hand
    without ``recipe``) is not chosen on."""
    reference = frame if reference is None else reference
    for column in (c for c in columns if c in frame):
        value = _mode(reference[column][reference[column].isin(frame[column].dropna().unique())])
        if value is not None:
            frame = frame[frame[column] == value]
            reference = reference[reference[column] == value]
    return frame


def scale_note(frame: pd.DataFrame) -> str:
    """'fashion-mnist, small_resnet8, train PGD-5' for a panel's title."""
    if frame.empty:
        return ""
    archs = frame["arch"].unique()
    parts = [str(_mode(frame["dataset"])), str(archs[0]) if len(archs) == 1 else "several depths",
             f"train PGD-{_mode(frame['train_steps'])}", f"eps {_mode(frame['eps']):g}"]
    recipe = _mode(frame["recipe"]) if "recipe" in frame else None
    return ", ".join(parts + ([recipe] if recipe else []))


def _panel(ax: plt.Axes, source: str, rows: pd.DataFrame, draw: Callable, name: str, title: str) -> None:
    if rows.empty:
        ax.set_axis_off()
        hint = f"notebooks/sweeps/{SWEEP_OF.get(name, '...')}" if source == "kit" else "no published numbers"
        ax.text(0.5, 0.5, f"no {source} results for {title}\n" + (f"run: advkit sweep {hint}" if source == "kit"
                                                                   else hint), ha="center", va="center", fontsize=8)
        ax.set_title(source)
        return
    draw(ax, rows)
    ax.set_title(f"{source}: {scale_note(rows)}", fontsize=9)


def side_by_side(frame: pd.DataFrame, select: Callable[[pd.DataFrame], pd.DataFrame], draw: Callable,
                 name: str, title: str, folder: str | Path | None = None) -> plt.Figure:
    """Draw ``draw(ax, rows)`` for the paper's and the kit's rows chosen by ``select`` (among the rows of the
    paper's protocol: AutoAttack's rows are left out); save as ``name``."""
    frame = paper_protocol(frame)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, source in zip(axes, SOURCES):
        rows = frame[frame["source"] == source]
        _panel(ax, source, select(rows) if not rows.empty else rows, draw, name, title)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save(fig, name, folder)
    return fig


def _max_steps(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["steps"] == rows["steps"].max()]


def _plain_adversarial(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[(rows["adv_ratio"] == 1) & ~rows["finetune_bn"].astype(bool)]


# ---------------------------------------------------------------- figures

def figure1(frame: pd.DataFrame, folder: str | Path | None = None) -> plt.Figure:
    """Figure 1: accuracy against the strongest PGD against the share of clean images (plain BN)."""

    def select(rows):
        chosen = _plain_adversarial(rows)
        chosen = chosen[(chosen["norm"] == "bn") & ~chosen["alp"].astype(bool) & ~chosen["running_stats"].astype(bool)]
        return _max_steps(dominant(chosen, ["dataset", "arch", "batch_size", "train_steps", "eps", "recipe"], rows))

    def draw(ax, rows):
        sns.lineplot(data=rows.assign(clean_pct=rows["clean_ratio"] * 100), x="clean_pct", y="accuracy",
                     marker="o", errorbar=("ci", 95), ax=ax)
        ax.set(xlabel="clean images kept (%)", ylabel=f"accuracy vs PGD-{int(rows['steps'].max())} (%)")

    return side_by_side(frame, select, draw, "figure1", "Figure 1: robustness against the share of clean images", folder)


def _curves(rows: pd.DataFrame, ax: plt.Axes) -> None:
    rows = rows[rows["steps"] > 0]
    sns.lineplot(data=rows, x="steps", y="accuracy", hue="strategy", marker="o", errorbar=("ci", 95), ax=ax)
    ax.set(xscale="log", xlabel="PGD iterations", ylabel="accuracy (%)")
    ax.legend(fontsize=7)


def figure2(frame: pd.DataFrame, folder: str | Path | None = None) -> plt.Figure:
    """Figure 2: accuracy against PGD iterations, standard BN: 100% adv + 0% / 100% clean, and ALP."""

    def select(rows):
        chosen = _plain_adversarial(rows)
        chosen = chosen[(chosen["norm"] == "bn") & chosen["clean_ratio"].isin([0.0, 1.0])
                        & ~chosen["running_stats"].astype(bool)]
        return dominant(chosen, ["dataset", "arch", "batch_size", "train_steps", "eps", "recipe"], rows)

    return side_by_side(frame, select, lambda ax, rows: _curves(rows, ax), "figure2",
                        "Figure 2: robustness curves with standard BN", folder)


def figure3(frame: pd.DataFrame, folder: str | Path | None = None) -> plt.Figure:
    """Figure 3: accuracy against PGD iterations through MBN_adv (100% adv + 100% clean, with and without ALP)."""

    def select(rows):
        chosen = _plain_adversarial(rows)
        chosen = chosen[(chosen["norm"] == "mbn") & (chosen["branch"] == "adv") & ~chosen["running_stats"].astype(bool)]
        return dominant(chosen, ["dataset", "arch", "batch_size", "train_steps", "eps", "recipe"], rows)

    return side_by_side(frame, select, lambda ax, rows: _curves(rows, ax), "figure3",
                        "Figure 3: robustness curves through MBN_adv", folder)


def figure7(frame: pd.DataFrame, folder: str | Path | None = None) -> plt.Figure:
    """Figure 7: accuracy against depth: adversarial training (strongest PGD, 100% adv + 0% clean, running
    statistics) against clean training (clean accuracy, 0% adv + 100% clean)."""

    def select(rows):
        adversarial = rows[(rows["adv_ratio"] == 1) & (rows["clean_ratio"] == 0) & (rows["norm"] == "bn")
                           & rows["running_stats"].astype(bool) & ~rows["finetune_bn"].astype(bool)]
        adversarial = _max_steps(dominant(adversarial, ["dataset", "batch_size", "train_steps", "eps", "recipe"], rows))
        clean = rows[(rows["adv_ratio"] == 0) & (rows["steps"] == 0) & (rows["norm"] == "bn")
                     & ~rows["finetune_bn"].astype(bool)]
        both = pd.concat([adversarial.assign(training="adversarial (PGD)"), clean.assign(training="clean (clean acc.)")])
        return both.assign(depth=both["arch"].map(paper.depth_of))

    def draw(ax, rows):
        for training, part in rows.groupby("training"):
            sub_ax = ax if training.startswith("adversarial") else ax.twinx()
            sns.lineplot(data=part, x="depth", y="accuracy", marker="o", errorbar=("ci", 95), ax=sub_ax,
                         color="C0" if sub_ax is ax else "C1", label=training)
            sub_ax.set_ylabel(f"{training} accuracy (%)", fontsize=8)
            sub_ax.legend(loc="lower right" if sub_ax is ax else "upper left", fontsize=7)
        ax.set(xlabel="network depth (layers)")

    return side_by_side(frame, select, draw, "figure7", "Figure 7: depth, adversarial against clean training", folder)


def one_run(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of one run (the lowest seed's) where ``rows`` holds several: each run samples its own channels
    (``bnstats`` draws them with the run's seed), so channel c of two runs is not one feature to pool."""
    if rows.empty or "run_dir" not in rows or rows["run_dir"].nunique() <= 1:
        return rows
    first = rows.sort_values(["seed", "run_dir"])["run_dir"].iloc[0]
    return rows[rows["run_dir"] == first]


def _statistics_figure(rows: pd.DataFrame, name: str, title: str, draw: Callable, folder) -> plt.Figure:
    """Mean and variance panels of a BN-statistics figure (kit only: the paper gives no numbers for them), of
    one run (:func:`one_run`), named in the title."""
    runs = rows["run_dir"].nunique() if "run_dir" in rows else 1
    rows = one_run(rows)
    if runs > 1:
        title += f"; run {rows['run'].iloc[0]}, one of {runs}"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, statistic in zip(axes, ("mean", "var")):
        part = rows[rows["statistic"] == statistic] if not rows.empty else rows
        if part.empty:
            _panel(ax, "kit", part, None, name, title)
            continue
        draw(ax, part, statistic)
        ax.set_xlabel(f"channel of {part['layer'].iloc[0]}")
        ax.tick_params(axis="x", labelsize=6)
    fig.suptitle(f"{title} (paper: no published numbers)", fontsize=10)
    fig.tight_layout()
    save(fig, name, folder)
    return fig


def figure5(bnstats: pd.DataFrame, folder: str | Path | None = None) -> plt.Figure:
    """Figure 5: running mean and variance of MBN_clean against MBN_adv on the sampled channels."""
    rows = bnstats[bnstats["figure"] == 5] if not bnstats.empty else bnstats
    if "strategy" in rows:  # several runs: one setting (one of its runs is drawn)
        rows = dominant(rows, ["dataset", "arch", "layer", "strategy", "running_stats"])

    def draw(ax, part, statistic):
        sns.barplot(data=part.assign(BN="MBN_" + part["branch"]), x="channel", y="value", hue="BN", ax=ax,
                    errorbar=None)
        ax.set_ylabel(f"running {statistic}")

    return _statistics_figure(rows, "figure5", "Figure 5: running statistics of MBN_clean and MBN_adv", draw, folder)


def figure6(bnstats: pd.DataFrame, folder: str | Path | None = None) -> plt.Figure:
    """Figure 6: batch mean and (unbiased) variance of two adversarial mini-batches against running statistics."""
    rows = bnstats[(bnstats["figure"] == 6) & bnstats["statistic"].isin(["mean", "var"])] if not bnstats.empty else bnstats
    if "strategy" in rows:  # the paper's model: 100% adv + 0% clean, plain BN, where there is one
        madry = rows[(rows["strategy"] == "100% adv + 0% clean") & (rows["norm"] == "bn")]
        rows = dominant(madry if not madry.empty else rows, ["dataset", "arch", "layer", "strategy", "running_stats"])

    def draw(ax, part, statistic):
        sns.pointplot(data=part, x="channel", y="value", hue="source", linestyles="none", ax=ax,
                      errorbar=None, dodge=0.3, markersize=3)
        ax.set_ylabel(f"{statistic} ({'unbiased, like running_var' if statistic == 'var' else 'per channel'})")

    return _statistics_figure(rows, "figure6", "Figure 6: batch against running statistics of adversarial "
                              "mini-batches", draw, folder)


# ---------------------------------------------------------------- tables

def _accuracy_at(rows: pd.DataFrame, steps: int | None = None) -> float:
    rows = rows[rows["steps"] == (rows["steps"].max() if steps is None else steps)]
    return rows["accuracy"].mean() if not rows.empty else float("nan")


def _key(row: pd.Series) -> str:
    name = row["strategy"]
    if row["norm"] == "mbn":
        name = f"MBN_{row['branch']}, {name}"
    elif row["norm"] == "gn":
        name = f"GN, {name}"
    return name + ("*" if row["running_stats"] else "")


def _settings(rows: pd.DataFrame, running_stats_mark: bool = True) -> pd.Series:
    keys = [_key(r) if running_stats_mark else _key(r).rstrip("*") for _, r in rows.iterrows()]
    return pd.Series(keys, index=rows.index, dtype=object)


def table7(frame: pd.DataFrame) -> pd.DataFrame:
    """Every model: network, batch, training PGD-N, setting, clean and PGD-N accuracies (mean over seeds); data
    set and eps head the index where the rows hold several (runs of two data sets or eps are two models)."""
    rows = frame[~frame["finetune_bn"].astype(bool)]
    rows = rows.assign(setting=_settings(rows),
                       metric=rows["steps"].map(lambda s: "clean" if s == 0 else f"PGD-{s}"))
    varying = [c for c in ("dataset", "eps", "recipe") if c in rows and rows[c].nunique() > 1]
    table = rows.pivot_table(index=[*varying, "arch", "batch_size", "train_steps", "setting"], columns="metric",
                             values="accuracy", aggfunc="mean")
    ordered = [c for c in ("clean",) if c in table] + sorted((c for c in table.columns if c != "clean"),
                                                            key=lambda c: int(c[4:]))  # no rows: no columns
    return table[ordered].round(1).reset_index()


def table_by(frame: pd.DataFrame, index: str, columns: str) -> pd.DataFrame:
    """Strongest-PGD accuracy of plain adversarial training, ``index`` x ``columns`` (Tables 4, 5, 6)."""
    rows = _plain_adversarial(frame)
    rows = rows[rows["steps"] == rows["steps"].max()]
    rows = rows.assign(setting=_settings(rows))
    return rows.pivot_table(index=index, columns=columns, values="accuracy", aggfunc="mean").round(1)


def table1(frame: pd.DataFrame) -> pd.DataFrame:
    """Table 1: clean accuracy of standard training and MBN_clean; strongest-PGD accuracy of 100% adv + 0% clean
    and MBN_adv, with and without ALP (no running statistics). Every PGD row is read at the one PGD-N its
    ``metric`` names (NaN where a strategy was not evaluated there), and every row at the recipe the adversarial
    runs most share (standard training too: NaN where it has no run of that recipe), so differences compare like
    with like."""
    rows = frame[~frame["running_stats"].astype(bool) & ~frame["finetune_bn"].astype(bool) & (frame["norm"] != "gn")]
    adversarial = dominant(rows[rows["adv_ratio"] == 1], ["recipe", "train_steps", "eps"],
                           frame[frame["adv_ratio"] == 1])
    standard = rows[rows["adv_ratio"] == 0]
    if "recipe" in rows and len(adversarial):  # the clean rows' differences compare runs of one recipe
        standard = standard[standard["recipe"] == adversarial["recipe"].iloc[0]]
    elif "recipe" in rows:
        standard = dominant(standard, ["recipe"])
    rows = pd.concat([adversarial, standard])
    strongest = int(frame.loc[frame["steps"] > 0, "steps"].max()) if (frame["steps"] > 0).any() else 0
    out = []
    for label, part, steps in [
        ("0% adv + 100% clean", rows[(rows["adv_ratio"] == 0) & (rows["norm"] == "bn")], 0),
        ("MBN_clean, 100% adv + 100% clean", rows[(rows["branch"] == "clean") & ~rows["alp"].astype(bool)], 0),
        ("MBN_clean, 100% adv + 100% clean, ALP", rows[(rows["branch"] == "clean") & rows["alp"].astype(bool)], 0),
        ("100% adv + 0% clean", rows[(rows["adv_ratio"] == 1) & (rows["clean_ratio"] == 0) & (rows["norm"] == "bn")], None),
        ("MBN_adv, 100% adv + 100% clean", rows[(rows["branch"] == "adv") & ~rows["alp"].astype(bool)
                                                & (rows["clean_ratio"] == 1)], None),
        ("MBN_adv, 100% adv + 100% clean, ALP", rows[(rows["branch"] == "adv") & rows["alp"].astype(bool)
                                                     & (rows["clean_ratio"] == 1)], None),
    ]:
        out.append(dict(strategy=label, metric="clean" if steps == 0 else f"PGD-{strongest}",
                        accuracy=round(_accuracy_at(part, steps if steps == 0 else strongest), 1)))
    table = pd.DataFrame(out)
    for metric, part in table.groupby("metric"):
        table.loc[part.index, "difference"] = (part["accuracy"] - part["accuracy"].iloc[0]).round(1)
    return table


def table2(frame: pd.DataFrame) -> pd.DataFrame:
    """Table 2: strongest-PGD accuracy without and with running statistics in the last epochs."""
    rows = dominant(_plain_adversarial(frame), ["arch", "batch_size", "train_steps", "eps", "recipe"], frame)
    rows = rows[(rows["steps"] == rows["steps"].max()) & ((rows["clean_ratio"] == 0) & (rows["norm"] == "bn")
                                                          | (rows["branch"] == "adv") & (rows["clean_ratio"] == 1))]
    rows = rows.assign(setting=_settings(rows, running_stats_mark=False),
                       running_stats=rows["running_stats"].map({True: "with running stats", False: "without"}))
    table = rows.pivot_table(index="setting", columns="running_stats", values="accuracy", aggfunc="mean").round(1)
    if {"with running stats", "without"} <= set(table.columns):
        table["difference"] = (table["with running stats"] - table["without"]).round(1)
    return table.reset_index()


def write_table(table: pd.DataFrame, name: str, folder: str | Path | None = None) -> list[Path]:
    """``name``.csv and ``name``.md in ``folder`` (default ``figures/``)."""
    folder = Path(folder) if folder is not None else FIGURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.csv", folder / f"{name}.md"]
    table.to_csv(paths[0], index=False)
    paths[1].write_text(table.to_markdown(index=False) + "\n")
    return paths


def all_tables(frame: pd.DataFrame, folder: str | Path | None = None) -> dict[str, pd.DataFrame]:
    """Tables 1, 2, 4, 5, 6 and 7 for each source, written as CSV and Markdown (``tableN_<source>``), from the
    rows of the paper's protocol."""
    frame = paper_protocol(frame)
    tables = {}
    for source in SOURCES:
        rows = frame[frame["source"] == source]
        if rows.empty:
            continue
        plain = ~rows["running_stats"].astype(bool)
        two_extremes = rows["clean_ratio"].isin([0.0, 1.0]) & rows["norm"].isin(["bn", "mbn"])
        rs_strategies = (rows["clean_ratio"] == 0) & (rows["norm"] == "bn") | (rows["branch"] == "adv")
        built = {
            "table1": table1(dominant(rows, ["dataset", "arch", "batch_size", "eps"])),  # one network, one eps
            "table2": table2(dominant(rows, ["dataset"])),
            "table4": table_by(dominant(rows[plain & two_extremes], ["dataset", "eps", "arch", "batch_size", "recipe"]),
                               "train_steps", "setting"),
            "table5": table_by(dominant(rows[rs_strategies], ["dataset", "eps", "arch", "batch_size", "recipe"]),
                               "setting",
                               "train_steps"),
            "table6": table_by(dominant(rows[(rows["clean_ratio"] == 0) & rows["running_stats"].astype(bool)],
                                        ["dataset", "eps", "arch", "train_steps", "recipe"], rows), "batch_size",
                               "setting"),
            "table7": table7(rows),
        }
        for name, table in built.items():
            table = table.reset_index() if name in ("table4", "table5", "table6") else table
            write_table(table, f"{name}_{source}", folder)
            tables[f"{name}_{source}"] = table
    return tables


def run_curves(table: pd.DataFrame, title: str) -> plt.Figure:
    """One run's robustness curve from its ``results.csv`` rows: PGD accuracy against iterations (log axis),
    final and worst iterate, one line pair per MBN branch, AutoAttack as a marker where it ran; the legend
    outside the axes."""
    attacked = table[table["attack"] == "pgd"]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for branch, rows in attacked.groupby("branch"):
        label = "model" if branch == "-" else f"MBN_{branch}"
        ax.plot(rows["steps"], rows["accuracy"] * 100, marker="o", label=f"{label} (final iterate)")
        ax.plot(rows["steps"], rows["worst_accuracy"] * 100, ls="--", label=f"{label} (worst iterate)")
        aa = table[(table["attack"] == "autoattack") & (table["branch"] == branch)]  # eval_autoattack_n > 0
        if not aa.empty:
            ax.scatter(aa["steps"], aa["accuracy"] * 100, marker="x",
                       label=f"{label} (AutoAttack, {aa['n'].iloc[0]} images)")
    ax.set(xscale="log", xlabel="attack iterations", ylabel="accuracy (%)", title=title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    return fig


def training_curves(metrics: pd.DataFrame) -> plt.Figure:
    """One run's ``metrics.jsonl``: training loss and accuracies (adversarial, clean) per epoch."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3))
    ax_loss.plot(metrics["epoch"], metrics["loss"], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss")
    for column in ("train_adv_accuracy", "train_clean_accuracy"):
        if column in metrics and metrics[column].notna().any():
            ax_acc.plot(metrics["epoch"], metrics[column] * 100, marker="o", label=column.replace("_", " "))
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)")
    ax_acc.legend()
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the explorer's panels (notebooks/explore.ipynb)

GREYS = ("0.35", "0.55", "0.7", "0.45", "0.8", "0.6")
VERDICT_COLORS = {"holds": "tab:green", "reversed": "tab:red", "no effect larger than 2 points": "tab:blue"}


def _legend_outside(ax: plt.Axes, **kwargs) -> None:
    """The legend right of the axes, where it covers no curve."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, frameon=False, borderaxespad=0, **kwargs)


def _curve_lines(ax: plt.Axes, rows: pd.DataFrame, colors: dict, suffix: str = "", errorbar=("ci", 95),
                 **style) -> None:
    """One line per ``model`` in ``colors[model]``; where a model has several seeds, seaborn's 95% interval."""
    for model, part in rows.groupby("model", sort=False):
        if errorbar is not None and part.duplicated("steps").any():
            sns.lineplot(data=part, x="steps", y="accuracy", color=colors[model], label=f"{model}{suffix}", ax=ax,
                         errorbar=errorbar, **style)
        else:  # one value per point: a plain line (seaborn's per-call cost adds up over the paper's 40 models)
            part = part.sort_values("steps")
            ax.plot(part["steps"], part["accuracy"], color=colors[model], label=f"{model}{suffix}", **style)


def robustness_panel(rows: pd.DataFrame, threat_model: str = "targeted PGD") -> plt.Figure:
    """Accuracy against attack iterations for the explorer (Figures 2-3 style) under one threat model: the kit's
    models in colour, the paper's (targeted PGD only) greyed beside them, the legend outside the axes.

    ``rows``: analysis rows with ``model`` (the legend label), ``source``, ``attack``, ``threat_model``, ``steps``
    and ``accuracy``; seeds of one model pool into a 95% interval. Under 'AutoAttack' each kit model shows
    APGD-CE, APGD-T and their worst case as markers beside its targeted PGD curve (thin)."""
    fig, ax = plt.subplots(figsize=(9.5, 3.8))  # no layout engine: a long legend would squash the axes
    rows = rows[rows["steps"] > 0]
    kit = rows[rows["source"] == "kit"]
    paper = rows[(rows["source"] == "paper") & (rows["threat_model"] == "targeted PGD")]
    paper = paper if threat_model == "targeted PGD" else paper.iloc[:0]
    colors = dict(zip(kit["model"].unique(), sns.color_palette("tab10", kit["model"].nunique())))
    colors |= {m: GREYS[i % len(GREYS)] for i, m in enumerate(paper["model"].unique())}
    if threat_model == "AutoAttack":
        _curve_lines(ax, kit[kit["threat_model"] == "targeted PGD"], colors, suffix=": targeted PGD", linewidth=0.8,
                     alpha=0.6, marker=".")
        shown = kit[kit["threat_model"] == "AutoAttack"]
        for (model, attack), part in shown.groupby(["model", "attack"], sort=False):
            marker = {"apgd-ce": "v", "apgd-t": "^"}.get(attack, "*")
            ax.scatter(part["steps"], part["accuracy"], color=colors[model], marker=marker,
                       s=60 if marker == "*" else 30, label=f"{model}: {attack}", zorder=3)
    else:
        shown = kit[kit["threat_model"] == threat_model]
        _curve_lines(ax, shown, colors, marker="o")
        _curve_lines(ax, paper, colors, marker="o", linestyle="--", linewidth=1, errorbar=None)
    if shown.empty and paper.empty:
        ax.text(0.5, 0.5, f"no model of the selection was evaluated under {threat_model}", ha="center", va="center",
                transform=ax.transAxes)
    ax.set(xscale="log", xlabel="attack iterations", ylabel="accuracy (%)")
    steps = sorted(pd.concat([shown["steps"], paper["steps"]]).unique())
    if 0 < len(steps) <= 12:  # the evaluated iteration counts as plain numbers
        ax.set_xticks(steps, [f"{s:g}" for s in steps])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
    note = "" if threat_model == "targeted PGD" else " (the paper reports targeted PGD only)"
    ax.set_title(f"Robustness under {threat_model}{note}; kit in colour, paper in grey", fontsize=9)
    _legend_outside(ax)
    return fig


BN_SERIES = {5: ("branch", {"clean": "MBN_clean", "adv": "MBN_adv"}),
             6: ("source", {"batch1": "mini-batch 1", "batch2": "mini-batch 2", "running": "running"})}
BN_TITLES = {5: "Figure 5: running statistics of MBN_clean and MBN_adv",
             6: "Figure 6: batch against running statistics (adversarial mini-batches)"}


def bn_statistics_panel(stats: pd.DataFrame, title: str = "") -> plt.Figure:
    """Figures 5 and 6 as the paper draws them, for ONE run and layer: per sampled channel, Figure 5's running
    mean and variance of MBN_clean against MBN_adv (Mixture BN runs), Figure 6's batch mean and (unbiased)
    variance of two adversarial mini-batches against the running statistics. One row per figure present in
    ``stats`` (rows of a ``bnstats.csv``), the channel axis labelled with the channel numbers, legends outside."""
    figures = [f for f in (5, 6) if (stats["figure"] == f).any()]
    if not figures:
        raise ValueError("stats holds no rows of Figure 5 or 6; give the bnstats.csv rows of one run and layer")
    if stats["layer"].nunique() > 1:
        raise ValueError(f"stats holds several layers {sorted(stats['layer'].unique())}; give one layer")
    fig, axes = plt.subplots(len(figures), 2, figsize=(10.5, 2.9 * len(figures)), squeeze=False,
                             layout="constrained")
    for row, figure in zip(axes, figures):
        part = stats[(stats["figure"] == figure) & stats["statistic"].isin(["mean", "var"])]
        column, names = BN_SERIES[figure]
        channels = sorted(part["channel"].unique())
        position = {c: i for i, c in enumerate(channels)}
        series = [s for s in names if s in set(part[column])]
        for ax, statistic in zip(row, ("mean", "var")):
            for k, name in enumerate(series):
                points = part[(part["statistic"] == statistic) & (part[column] == name)].sort_values("channel")
                offset = (k - (len(series) - 1) / 2) * 0.18
                ax.plot(points["channel"].map(position) + offset, points["value"], marker="os^"[k % 3], markersize=4,
                        linestyle="none", label=names[name])
            ax.set_xticks(range(len(channels)), [str(c) for c in channels], fontsize=7,
                          rotation=90 if len(channels) > 12 else 0)
            ax.set_xlim(-0.6, len(channels) - 0.4)
            ax.set_xlabel("sampled channel", fontsize=8)
            kind = "running " if figure == 5 else ""
            ax.set_ylabel(f"{kind}{'variance (unbiased)' if statistic == 'var' else 'mean'}", fontsize=8)
            ax.grid(axis="x", linewidth=0.3, alpha=0.5)
        row[0].set_title(BN_TITLES[figure], fontsize=9, loc="left")
        _legend_outside(row[1])
    fig.suptitle(f"{title}, layer {stats['layer'].iloc[0]}" if title else f"layer {stats['layer'].iloc[0]}",
                 fontsize=9)
    return fig


def claims_panel(table: pd.DataFrame) -> plt.Figure:
    """The study's claims: the kit's effect with its 95% interval over seeds (coloured by verdict), the paper's
    effect (grey diamond) where it gives a number, and the verdict; one row per claim, as :func:`advkit.study.claims`
    writes them (columns claim, measured, mean, low, high, verdict; ``paper_effect`` where known)."""
    fig, ax = plt.subplots(figsize=(10, 0.42 * max(len(table), 1) + 1.5), layout="constrained")
    for i, r in enumerate(table.itertuples()):
        color = VERDICT_COLORS.get(r.verdict, "tab:gray")
        if not np.isnan(r.mean):
            xerr = None if np.isnan(r.low) else [[r.mean - r.low], [r.high - r.mean]]
            ax.errorbar(r.mean, i, xerr=xerr, fmt="o", color=color, capsize=3)
        if not np.isnan(getattr(r, "paper_effect", np.nan)):
            ax.plot(r.paper_effect, i, "D", color="0.55", markersize=5)
        ax.text(1.01, i, r.verdict, transform=ax.get_yaxis_transform(), va="center", fontsize=7, color=color)
    ax.axvline(0, color="black", linewidth=0.8)
    threat = (lambda r: f" [{r.threat_model}]") if "threat_model" in table else (lambda r: "")
    labels = [f"{r.claim}{threat(r)}: {r.measured[:55]}{'...' if len(r.measured) > 55 else ''}"
              for r in table.itertuples()]
    ax.set_yticks(range(len(table)), labels, fontsize=7)
    ax.set_ylim(len(table) - 0.5, -0.5)
    ax.set_xlabel("effect (percentage points; C9a: log2 ratio x 100)", fontsize=8)
    legend = [plt.Line2D([], [], marker="o", color="black", label="kit: mean and 95% interval over seeds"),
              plt.Line2D([], [], marker="D", color="0.55", linestyle="none", label="paper")]
    fig.legend(handles=legend, loc="outside lower right", ncol=2, fontsize=7, frameon=False)
    ax.set_title("The paper's claims: the kit's effect beside the paper's", fontsize=9, loc="left")
    return fig


def _image(ax: plt.Axes, image: np.ndarray, **kwargs) -> None:
    """One (C, H, W) image: grey for one channel, RGB otherwise."""
    ax.imshow(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0), **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


def adversarial_examples_panel(examples: AdversarialExamples, iteration: int | None = None) -> plt.Figure:
    """The adversarial-example viewer: per image a column with the clean image (true class), the perturbation at
    PGD ``iteration`` (scaled so that +-eps spans the colour map), the adversarial image (predicted class: green
    still right, red the target, orange another class) and the target's probability along the attack with a
    mark at ``iteration`` (default: the last), the true class's beside it."""
    iteration = examples.steps if iteration is None else iteration
    names, k = examples.class_names, len(examples.labels)
    adversarial = examples.image_at(iteration)
    predicted = examples.predictions[iteration]
    goal = examples.goal_probability()
    gray = "gray" if examples.clean.shape[1] == 1 else None
    fig, axes = plt.subplots(4, k, figsize=(1.75 * k + 1.2, 7.4), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 1, 1, 0.8]}, layout="constrained")
    for j in range(k):
        label = names[examples.labels[j]]
        target = names[examples.targets[j]] if examples.targeted else "(untargeted)"
        _image(axes[0, j], examples.clean[j], cmap=gray, vmin=0, vmax=1)
        axes[0, j].set_title(f"true: {label}\ntarget: {target}", fontsize=7)
        scaled = (adversarial[j] - examples.clean[j]).mean(0) * 255 / examples.eps
        _image(axes[1, j], scaled[None], cmap="RdBu_r", vmin=-1, vmax=1)
        _image(axes[2, j], adversarial[j], cmap=gray, vmin=0, vmax=1)
        right, hit = predicted[j] == examples.labels[j], examples.targeted and predicted[j] == examples.targets[j]
        color = "tab:green" if right else "tab:red" if hit else "tab:orange"
        axes[2, j].set_title(f"predicted: {names[predicted[j]]}\np = {examples.probabilities[iteration, j].max():.2f}",
                             fontsize=7, color=color)
        ax = axes[3, j]
        if examples.targeted:  # the true class's probability beside the target's
            ax.plot(range(examples.steps + 1), examples.probabilities[:, j, examples.labels[j]], color="tab:green",
                    linewidth=0.8, linestyle="--")
        ax.plot(range(examples.steps + 1), goal[:, j], color="tab:red" if examples.targeted else "tab:green")
        ax.axvline(iteration, color="black", linewidth=0.8)
        ax.set(ylim=(-0.03, 1.03), xlim=(0, max(examples.steps, 1)))
        ax.tick_params(labelsize=6)
        if j:
            ax.set_yticklabels([])
    for ax, text in zip(axes[:, 0], ("clean", f"perturbation\n(+-{examples.eps:g}/255\n= full colour)",
                                     "adversarial", "p(target), red\np(true), green" if examples.targeted
                                     else "p(true class)")):
        ax.set_ylabel(text, fontsize=7)
    axes[3, 0].set_xlabel("PGD iteration", fontsize=7)
    branch = "" if examples.branch == "-" else f", MBN_{examples.branch}"
    kind = "targeted" if examples.targeted else "untargeted"
    fig.suptitle(f"{examples.run}{branch}: {kind} PGD, eps {examples.eps:g}, step {examples.step:g}, iteration "
                 f"{iteration} of {examples.steps}", fontsize=9)
    return fig
