"""The interactive explorer of ``notebooks/explore.ipynb``: filter runs (and the paper's models) with widgets;
robustness curves and BN statistics redraw live.

Widget callbacks swallow exceptions, so the update logic is a plain function (:func:`update`) that records
what it drew (``explorer.selection``, ``explorer.error``) and can be driven headlessly in tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ipywidgets as widgets
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from IPython.display import display

from .results import attack_column

ALL = "(all)"
FILTERS = {  # widget label -> column of the analysis table
    "source": "source", "data set": "dataset", "strategy": "strategy", "norm": "norm", "clean ratio": "clean_ratio",
    "network": "arch", "training PGD-N": "train_steps", "MBN branch": "branch", "running stats": "running_stats",
}


@dataclass
class Explorer:
    frame: pd.DataFrame
    bnstats: pd.DataFrame
    filters: dict[str, widgets.Dropdown]
    curves: widgets.Output
    statistics: widgets.Output
    status: widgets.HTML
    selection: pd.DataFrame = field(default_factory=pd.DataFrame)
    drawn: dict = field(default_factory=dict)  # "curves" / "statistics": the last figure drawn (None: nothing)
    error: str | None = None
    widget: widgets.Widget | None = None


def _options(series: pd.Series) -> list:
    return [ALL] + sorted(series.dropna().unique().tolist(), key=str)


def selected(explorer: Explorer) -> pd.DataFrame:
    """Rows of the analysis table that match every filter."""
    rows = explorer.frame
    for label, dropdown in explorer.filters.items():
        if dropdown.value != ALL:
            rows = rows[rows[FILTERS[label]] == dropdown.value]
    return rows


def _label(rows: pd.DataFrame) -> pd.Series:
    branch = rows["branch"].map(lambda b: "" if b == "-" else f" MBN_{b}")
    running = rows["running_stats"].map(lambda r: ", running stats" if r else "")
    return rows["source"] + ": " + rows["strategy"] + ", " + rows["norm"] + branch + running + ", " + rows["arch"]


def update(explorer: Explorer, *_) -> None:
    """Redraw curves and BN statistics for the current filters; never raises (widgets would hide it)."""
    explorer.error = None
    try:
        rows = selected(explorer)
        explorer.selection = rows
        attack = attack_column(rows)  # PGD curves, and AutoAttack (its worst case) as one marker per model
        attacked = rows[(rows["steps"] > 0) & attack.isin(["pgd", "autoattack"])]
        explorer.status.value = (f"{rows['run'].nunique()} models selected "
                                 f"({(rows.drop_duplicates('run')['source'] == 'kit').sum()} kit runs)")
        explorer.drawn = {"curves": None, "statistics": None}
        explorer.curves.clear_output(wait=True)
        with explorer.curves:
            fig, ax = plt.subplots(figsize=(7, 3.6))
            explorer.drawn["curves"] = fig
            if attacked.empty:
                ax.text(0.5, 0.5, "no attacked models match the filters", ha="center", va="center")
                ax.set_axis_off()
            else:
                sns.lineplot(data=attacked.assign(model=_label(attacked), attack=attack[attacked.index]), x="steps",
                             y="accuracy", hue="model", style="attack", markers=True, errorbar=("ci", 95), ax=ax)
                ax.set(xscale="log", xlabel="attack iterations", ylabel="accuracy (%)")
                ax.legend(fontsize=6, loc="upper right")
            plt.show()
        explorer.statistics.clear_output(wait=True)
        with explorer.statistics:
            runs = set(rows.loc[rows["source"] == "kit", "run"])
            stats = explorer.bnstats[explorer.bnstats["run"].isin(runs)] if not explorer.bnstats.empty else explorer.bnstats
            if stats.empty:
                print("no BN statistics for the selected runs (kit runs write bnstats.csv)")
            else:
                fig, axes = plt.subplots(1, 2, figsize=(9, 3))
                explorer.drawn["statistics"] = fig
                for ax, statistic in zip(axes, ("mean", "var")):
                    part = stats[stats["statistic"] == statistic]
                    sns.pointplot(data=part.assign(where=part["figure"].astype(str) + ":" + part["source"] + " "
                                                   + part["branch"]), x="channel", y="value", hue="where",
                                  linestyles="none", dodge=0.3, markersize=3, ax=ax, errorbar=("ci", 95))
                    ax.set_ylabel(statistic)
                    ax.legend(fontsize=6)
                plt.show()
    except Exception as exc:  # shown in the widget and kept for tests
        explorer.error = f"{type(exc).__name__}: {exc}"
        explorer.status.value = f"<b>error:</b> {explorer.error}"


def make_explorer(frame: pd.DataFrame, bnstats: pd.DataFrame | None = None, show: bool = True) -> Explorer:
    """Build (and display) the explorer over an analysis table (:func:`advkit.results.analysis_frame`)."""
    filters = {label: widgets.Dropdown(options=_options(frame[column]), value=ALL, description=label,
                                       style={"description_width": "110px"})
               for label, column in FILTERS.items()}
    explorer = Explorer(frame=frame, bnstats=bnstats if bnstats is not None else pd.DataFrame(), filters=filters,
                        curves=widgets.Output(), statistics=widgets.Output(), status=widgets.HTML())
    for dropdown in filters.values():
        dropdown.observe(lambda change: update(explorer), names="value")
    controls = widgets.GridBox(list(filters.values()), layout=widgets.Layout(grid_template_columns="repeat(3, 320px)"))
    explorer.widget = widgets.VBox([controls, explorer.status, explorer.curves, explorer.statistics])
    update(explorer)
    if show:
        display(explorer.widget)
    return explorer
