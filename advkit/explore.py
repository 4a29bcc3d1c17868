"""The interactive explorer of ``notebooks/explore.ipynb``: filter runs (and the paper's models) with widgets; four
views redraw live: robustness curves under a chosen threat model, the BN statistics of Figures 5-6 (one run and
layer at a time), the adversarial-example viewer, and the study's claims.

Analysis tier: no torch here. The viewer's computation (:func:`advkit.examples.adversarial_examples`) is handed
in by the notebook as ``attack``. Widget callbacks swallow exceptions, so every callback is a plain function
that records what it drew (``explorer.drawn``, ``explorer.selection``, ``explorer.error``) and can be driven
headlessly in tests; each panel is a PNG in an ``ipywidgets.Image``, replaced whole on every redraw.
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display

from . import plots, results
from .paths import project_root

ALL = "(all)"
FILTERS = {  # widget label -> column of the analysis table
    "source": "source", "data set": "dataset", "strategy": "strategy", "norm": "norm", "clean ratio": "clean_ratio",
    "network": "arch", "training PGD-N": "train_steps", "MBN branch": "branch", "running stats": "running_stats",
}
THREAT_MODELS = ("targeted PGD", "untargeted PGD", "AutoAttack")
AUTOATTACK = ("apgd-ce", "apgd-t", "autoattack")  # results.csv's attack names of AutoAttack's rows
CLAIMS_CSV = project_root() / "figures" / "study_claims.csv"  # the committed table, wherever figures are written
PANELS = ("curves", "statistics", "examples", "claims")


# ---------------------------------------------------------------- tables

def threat_model_of(attack: pd.Series, targeted: pd.Series) -> pd.Series:
    """'clean', 'targeted PGD', 'untargeted PGD' or 'AutoAttack' for each results row."""
    targeted = targeted.astype(str).str.lower().isin(["true", "1", "1.0"])
    model = np.select([attack == "clean", attack.isin(AUTOATTACK), targeted], ["clean", "AutoAttack", "targeted PGD"],
                      "untargeted PGD")
    return pd.Series(model, index=attack.index)


def with_threat_models(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``attack``, ``targeted``, ``threat_model`` and ``run_dir`` columns; where a table has no
    ``attack``/``targeted`` (the paper's, or one written before them) its rows are the paper's protocol:
    clean for 0 steps, targeted PGD otherwise."""
    frame = frame.copy()
    derived = pd.Series(np.where(frame["steps"] == 0, "clean", "pgd"), index=frame.index)
    frame["attack"] = frame["attack"].fillna(derived) if "attack" in frame else derived
    frame["targeted"] = frame["targeted"].fillna(True) if "targeted" in frame else True
    frame["threat_model"] = threat_model_of(frame["attack"], frame["targeted"])
    run_dir = frame["run_dir"] if "run_dir" in frame else pd.Series(np.nan, index=frame.index, dtype=object)
    frame["run_dir"] = run_dir.fillna(frame["run"]).astype(str)
    return frame


def explorer_frame(runs_root: str | Path | None = None) -> pd.DataFrame:
    """The paper's numbers and the finished runs under ``runs_root`` in the analysis schema plus ``attack``,
    ``targeted``, ``threat_model`` and ``run_dir`` (:func:`advkit.results.analysis_frame` does not carry them)."""
    frames = [results.paper_results()]
    if runs_root is not None and Path(runs_root).exists():
        loaded = results.load_runs(runs_root)
        if not loaded.empty:
            kit = results._in_schema(loaded)
            frames.append(kit.assign(attack=loaded["attack"].values, targeted=loaded["targeted"].values,
                                     run_dir=loaded["run_dir"].values))
    return with_threat_models(pd.concat(frames, ignore_index=True))


def paper_effect(text: str) -> float:
    """The paper's effect in a claims row's ``paper`` text ('PGD-2000: 39.2 - 20.9 = +18.3' -> 18.3); NaN where
    the text states no single number after '='."""
    found = re.search(r"=\s*([+-]?\d+(?:\.\d+)?)\s*$", str(text))
    return float(found.group(1)) if found else float("nan")


def claims_table(path: str | Path = CLAIMS_CSV) -> pd.DataFrame:
    """The study's claims table (:func:`advkit.study.claims`, committed as ``figures/study_claims.csv``), with a
    numeric ``paper_effect`` (parsed from the ``paper`` text where the table has no such column)."""
    table = pd.read_csv(path)
    missing = [c for c in ("claim", "measured", "kit", "paper", "verdict", "mean", "low", "high") if c not in table]
    if missing:
        raise ValueError(f"claims table {path} lacks column(s) {missing}: write it with advkit.study.claims")
    if "paper_effect" not in table:
        table["paper_effect"] = table["paper"].map(paper_effect)
    return table


# ---------------------------------------------------------------- the explorer

@dataclass
class Explorer:
    frame: pd.DataFrame
    bnstats: pd.DataFrame
    claims: pd.DataFrame | None
    attack: Callable | None  # (run_dir, branch, n_images) -> advkit.examples.AdversarialExamples
    runs_root: Path | None
    filters: dict[str, widgets.Dropdown]
    controls: dict[str, widgets.Widget]  # the views' own widgets, by name
    images: dict[str, widgets.Image]  # one per panel of PANELS
    notes: dict[str, widgets.HTML]  # one per panel: what it shows, or why nothing
    status: widgets.HTML
    claims_text: widgets.HTML
    selection: pd.DataFrame = field(default_factory=pd.DataFrame)
    drawn: dict = field(default_factory=dict)  # panel -> the last figure drawn (None: nothing)
    examples: dict = field(default_factory=dict)  # (run_dir, branch, n_images) -> computed examples
    live: bool = False  # the viewer recomputes on a change once its button was pressed
    quiet: bool = False  # set while options are rebuilt, so observers do not redraw half-way
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
    """A model's legend label: source, strategy, norm, branch, running statistics, network, and the training
    PGD-N, batch size, data set, eps and recipe where the rows hold several (the paper's Table 7 varies the first
    two; runs of two data sets, eps or recipes are two models, never one model's seeds)."""
    branch = rows["branch"].map(lambda b: "" if b == "-" else f" MBN_{b}")
    running = rows["running_stats"].map(lambda r: ", running stats" if r else "")
    label = rows["source"] + ": " + rows["strategy"] + ", " + rows["norm"] + branch + running + ", " + rows["arch"]
    for column, name in (("train_steps", ", train PGD-"), ("batch_size", ", batch "), ("dataset", ", "),
                         ("eps", ", eps "), ("recipe", ", ")):
        if column in rows and rows[column].nunique() > 1:
            values = rows[column].replace("", "the recipe most runs share") if column == "recipe" else rows[column]
            label = label + name + values.astype(str)
    return label


def _run_label(explorer: Explorer, run_dir: str) -> str:
    root = explorer.runs_root
    path = Path(run_dir)
    return str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else path.name


def _show(explorer: Explorer, panel: str, fig: plt.Figure | None, note: str = "") -> None:
    """Put ``fig`` (PNG) into the panel's image, or hide it; ``note`` says what is shown or why nothing is."""
    explorer.drawn[panel] = fig
    explorer.notes[panel].value = note
    image = explorer.images[panel]
    if fig is None:
        image.layout.display = "none"
        return
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    image.value = buffer.getvalue()
    image.layout.display = None


def _guarded(explorer: Explorer, panel: str, draw: Callable[[Explorer], None]) -> None:
    """Run one panel's ``draw``; an exception is shown in the panel and kept in ``explorer.error``."""
    try:
        draw(explorer)
    except Exception as exc:  # widgets would swallow it
        explorer.error = f"{type(exc).__name__}: {exc}"
        _show(explorer, panel, None, f"<b>error:</b> {html.escape(explorer.error)}")


def _set_options(dropdown: widgets.Dropdown, options: list) -> None:
    """New options; the current value stays where it is still offered, else the first option is chosen."""
    keep = dropdown.value
    values = [o[1] if isinstance(o, tuple) else o for o in options]
    dropdown.options = options
    dropdown.value = keep if keep in values else values[0] if values else None


# ---------------------------------------------------------------- robustness curves

def draw_curves(explorer: Explorer) -> None:
    """Accuracy against attack iterations for the selection under the chosen threat model."""
    rows = explorer.selection
    threat = explorer.controls["threat model"].value
    attacked = rows[(rows["steps"] > 0) & (rows["threat_model"] != "clean")]
    if attacked.empty:
        _show(explorer, "curves", None, "no attacked models match the filters")
        return
    _show(explorer, "curves", plots.robustness_panel(attacked.assign(model=_label(attacked)), threat))


# ---------------------------------------------------------------- BN statistics (Figures 5-6)

def _stats_runs(explorer: Explorer) -> list[tuple[str, str]]:
    if explorer.bnstats.empty:
        return []
    kit = explorer.selection[explorer.selection["source"] == "kit"]
    runs = sorted(set(kit["run_dir"]) & set(explorer.bnstats["run_dir"]))
    return [(_run_label(explorer, r), r) for r in runs]


def refresh_statistics(explorer: Explorer) -> None:
    """The run dropdown follows the selection, the layer dropdown the run; then redraw."""
    explorer.quiet = True
    try:
        _set_options(explorer.controls["BN run"], _stats_runs(explorer))
        run = explorer.controls["BN run"].value
        stats = explorer.bnstats
        layers = sorted(stats.loc[stats["run_dir"] == run, "layer"].unique()) if run is not None else []
        _set_options(explorer.controls["BN layer"], layers)
    finally:
        explorer.quiet = False
    draw_statistics(explorer)


def draw_statistics(explorer: Explorer) -> None:
    """Figures 5 and 6 for the chosen run and layer."""
    run, layer = explorer.controls["BN run"].value, explorer.controls["BN layer"].value
    if run is None or layer is None:
        _show(explorer, "statistics", None, "no BN statistics for the selected runs (kit runs with BN or Mixture "
                                            "BN write bnstats.csv; the paper gives Figures 5-6 without numbers)")
        return
    stats = explorer.bnstats[(explorer.bnstats["run_dir"] == run) & (explorer.bnstats["layer"] == layer)]
    _show(explorer, "statistics", plots.bn_statistics_panel(stats, _run_label(explorer, run)))


# ---------------------------------------------------------------- adversarial-example viewer

def refresh_viewer(explorer: Explorer, run_changed: bool = False) -> None:
    """The viewer's run and branch dropdowns follow the selection; recompute if the run or branch changed."""
    before = (explorer.controls["run"].value, explorer.controls["branch"].value)
    explorer.quiet = True
    try:
        kit = explorer.selection[explorer.selection["source"] == "kit"]
        _set_options(explorer.controls["run"], [(_run_label(explorer, r), r) for r in sorted(kit["run_dir"].unique())])
        run = explorer.controls["run"].value
        _set_options(explorer.controls["branch"], sorted(kit.loc[kit["run_dir"] == run, "branch"].unique()))
    finally:
        explorer.quiet = False
    after = (explorer.controls["run"].value, explorer.controls["branch"].value)
    if run_changed or after != before or not explorer.live:
        compute_examples(explorer)


def compute_examples(explorer: Explorer, *, force: bool = False) -> None:
    """Attack the chosen run's first images (once per run, branch and count; cached) and draw them. Before the
    viewer's button is first pressed (``force``) it only says what it would compute: opening the notebook
    attacks nothing."""
    explorer.live = explorer.live or force
    run, branch = explorer.controls["run"].value, explorer.controls["branch"].value
    count = explorer.controls["images"].value
    if explorer.attack is None or run is None or not explorer.live:
        why = ("no kit run in the selection" if run is None else
               "no attack function: pass attack=advkit.examples.adversarial_examples to make_explorer"
               if explorer.attack is None else f"press 'attack' to show adversarial examples of "
                                               f"{_run_label(explorer, run)}")
        _show(explorer, "examples", None, why)
        return
    key = (run, branch, count)
    if key not in explorer.examples:
        explorer.notes["examples"].value = f"attacking {count} images of {_run_label(explorer, run)} ..."
        explorer.examples[key] = explorer.attack(run, None if branch == "-" else branch, count)
    slider = explorer.controls["iteration"]
    explorer.quiet = True
    try:
        slider.max = explorer.examples[key].steps
        slider.value = slider.max
    finally:
        explorer.quiet = False
    draw_examples(explorer)


def draw_examples(explorer: Explorer) -> None:
    """The computed examples at the slider's PGD iteration."""
    key = (explorer.controls["run"].value, explorer.controls["branch"].value, explorer.controls["images"].value)
    if key not in explorer.examples:
        compute_examples(explorer)
        return
    iteration = explorer.controls["iteration"].value
    examples = explorer.examples[key]
    _show(explorer, "examples", plots.adversarial_examples_panel(examples, iteration),
          f"{_run_label(explorer, key[0])}: the first {key[2]} images of its first evaluation batch, with the "
          f"evaluation's targets and starts")


# ---------------------------------------------------------------- claims

def draw_claims(explorer: Explorer) -> None:
    """The claims that match the threat-model filter: effect, interval, the paper's effect, verdict."""
    table = explorer.claims
    if table is None or table.empty:
        _show(explorer, "claims", None, "no claims table (the study notebook writes figures/study_claims.csv)")
        explorer.claims_text.value = ""
        return
    threat = explorer.controls["claims threat model"].value
    if "threat_model" in table and threat != ALL:
        table = table[table["threat_model"] == threat]
    columns = [c for c in ("claim", "threat_model", "measured", "kit", "paper", "verdict") if c in table]
    explorer.claims_text.value = table[columns].to_html(index=False, border=0, classes="advkit-claims")
    if table.empty:
        _show(explorer, "claims", None, f"no claim measured under {threat}")
        return
    _show(explorer, "claims", plots.claims_panel(table.reset_index(drop=True)))


# ---------------------------------------------------------------- wiring

def update(explorer: Explorer, *_) -> None:
    """Apply the filters and redraw every view that depends on them; never raises (widgets would hide it)."""
    explorer.error = None
    try:
        rows = selected(explorer)
        explorer.selection = rows
        models = rows.drop_duplicates("run_dir")  # a run is its folder: two sweeps may hold runs of one name
        explorer.status.value = f"{len(models)} models selected ({(models['source'] == 'kit').sum()} kit runs)"
    except Exception as exc:  # shown in the widget and kept for tests
        explorer.error = f"{type(exc).__name__}: {exc}"
        explorer.status.value = f"<b>error:</b> {html.escape(explorer.error)}"
        return
    for panel, draw in (("curves", draw_curves), ("statistics", refresh_statistics), ("examples", refresh_viewer)):
        _guarded(explorer, panel, draw)
    if explorer.error:
        explorer.status.value += f" <b>error:</b> {html.escape(explorer.error)}"


def _observe(explorer: Explorer, widget: widgets.Widget, panel: str, draw: Callable, name: str = "value") -> None:
    def changed(_):
        if not explorer.quiet:
            explorer.error = None
            _guarded(explorer, panel, draw)

    widget.observe(changed, names=name)


def _controls(frame: pd.DataFrame, claims: pd.DataFrame | None) -> dict[str, widgets.Widget]:
    style = {"description_width": "110px"}
    threats = [t for t in THREAT_MODELS if t == "targeted PGD" or (frame["threat_model"] == t).any()]
    claim_threats = _options(claims["threat_model"]) if claims is not None and "threat_model" in claims else [ALL]
    return {
        "threat model": widgets.Dropdown(options=threats, value="targeted PGD", description="threat model",
                                         style=style),
        "BN run": widgets.Dropdown(options=[], description="run", style=style, layout={"width": "420px"}),
        "BN layer": widgets.Dropdown(options=[], description="layer", style=style, layout={"width": "320px"}),
        "run": widgets.Dropdown(options=[], description="run", style=style, layout={"width": "420px"}),
        "branch": widgets.Dropdown(options=[], description="MBN branch", style=style),
        "images": widgets.BoundedIntText(value=6, min=1, max=16, description="images", style=style,
                                         layout={"width": "200px"}),
        "attack": widgets.Button(description="attack", button_style="primary", icon="bolt"),
        "iteration": widgets.IntSlider(value=0, min=0, max=0, description="PGD iteration", style=style,
                                       continuous_update=False, layout={"width": "520px"}),
        "claims threat model": widgets.Dropdown(options=claim_threats, value=ALL, description="threat model",
                                                style=style, layout={"display": None if len(claim_threats) > 1
                                                                     else "none"}),
    }


def _wire(explorer: Explorer) -> None:
    for dropdown in explorer.filters.values():
        dropdown.observe(lambda change: update(explorer), names="value")
    c = explorer.controls
    _observe(explorer, c["threat model"], "curves", draw_curves)
    _observe(explorer, c["BN run"], "statistics", refresh_statistics)
    _observe(explorer, c["BN layer"], "statistics", draw_statistics)
    _observe(explorer, c["run"], "examples", lambda e: refresh_viewer(e, run_changed=True))
    _observe(explorer, c["branch"], "examples", compute_examples)
    _observe(explorer, c["images"], "examples", compute_examples)
    _observe(explorer, c["iteration"], "examples", draw_examples)
    _observe(explorer, c["claims threat model"], "claims", draw_claims)
    c["attack"].on_click(lambda _: _guarded(explorer, "examples", lambda e: compute_examples(e, force=True)))


def _layout(explorer: Explorer) -> widgets.Widget:
    c, images, notes = explorer.controls, explorer.images, explorer.notes
    views = {
        "robustness curves": [c["threat model"], notes["curves"], images["curves"]],
        "BN statistics": [widgets.HBox([c["BN run"], c["BN layer"]]), notes["statistics"],
                                        images["statistics"]],
        "adversarial examples": [widgets.HBox([c["run"], c["branch"], c["images"], c["attack"]]), c["iteration"],
                                 notes["examples"], images["examples"]],
        "claims": [c["claims threat model"], notes["claims"], images["claims"], explorer.claims_text],
    }
    tabs = widgets.Tab([widgets.VBox(children) for children in views.values()])
    tabs.titles = tuple(views)
    filters = widgets.GridBox(list(explorer.filters.values()),
                              layout=widgets.Layout(grid_template_columns="repeat(3, 320px)"))
    return widgets.VBox([filters, explorer.status, tabs])


def make_explorer(frame: pd.DataFrame, bnstats: pd.DataFrame | None = None, show: bool = True, *,
                  claims: pd.DataFrame | None = None, attack: Callable | None = None,
                  runs_root: str | Path | None = None) -> Explorer:
    """Build (and display) the explorer over an analysis table (:func:`explorer_frame`, or
    :func:`advkit.results.analysis_frame`), with the runs' BN statistics (:func:`advkit.results.load_bnstats`),
    the study's ``claims`` (:func:`claims_table`) and the viewer's ``attack``
    (:func:`advkit.examples.adversarial_examples`; None: no viewer)."""
    frame = with_threat_models(frame)
    bnstats = bnstats if bnstats is not None else pd.DataFrame()
    if not bnstats.empty:
        bnstats = bnstats.assign(run_dir=bnstats["run_dir"] if "run_dir" in bnstats else bnstats["run"])
    filters = {label: widgets.Dropdown(options=_options(frame[column]), value=ALL, description=label,
                                       style={"description_width": "110px"})
               for label, column in FILTERS.items()}
    explorer = Explorer(
        frame=frame, bnstats=bnstats, claims=claims, attack=attack,
        runs_root=Path(runs_root) if runs_root is not None else None, filters=filters,
        controls=_controls(frame, claims), images={p: widgets.Image(format="png") for p in PANELS},
        notes={p: widgets.HTML() for p in PANELS}, status=widgets.HTML(), claims_text=widgets.HTML())
    for panel, image in explorer.images.items():  # CSS classes: the browser test finds the widgets by them
        image.add_class(f"advkit-{panel}")
    for prefix, named in (("advkit-", explorer.controls), ("advkit-filter-", explorer.filters)):
        for name, widget in named.items():
            widget.add_class(prefix + name.replace(" ", "-"))
    _wire(explorer)
    explorer.widget = _layout(explorer)
    update(explorer)
    _guarded(explorer, "claims", draw_claims)
    if show:
        display(explorer.widget)
    return explorer
