"""The Fashion-MNIST study: which of the paper's findings hold at laptop scale, measured over seeds.

``export`` turns the study's run folders (``runs/study/<sweep>/<point>-seed<k>``) into small tidy tables under
``data/results/study/`` (committed: the figures and the findings are made from them, and later sessions add to
them). ``claims`` measures each claim of the paper's Sections 4-5 as a paired difference over seeds with a
t-based 95% interval and gives a verdict by one rule (:func:`verdict`).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from .paths import project_root
from .plots import save
from .results import DamagedRunError, load_bnstats, load_runs, paper_protocol, read_metrics

TABLES_DIR = project_root() / "data" / "results" / "study"
RUN_COLUMNS = ["sweep", "run", "setting", "seed", "arch", "norm", "strategy", "adv_ratio", "clean_ratio",
               "running_stats_epochs", "finetune_bn", "train_steps", "train_eps", "branch", "eps", "step", "steps",
               "accuracy", "worst_accuracy", "n"]
BNSTATS_COLUMNS = ["sweep", "run", "setting", "seed", "figure", "layer", "branch", "channel", "source", "statistic",
                   "value"]
BNSTATS_SETTINGS = ("adv-clean0", "adv-clean100-mbn")  # Figure 6 and Figure 5 (C9); kept small for git
MARGIN = 2.0  # percentage points: an effect whose interval stays inside (-MARGIN, MARGIN) counts as absent


def setting_of(run: str) -> str:
    """A run's setting: its name without the ``-seed<k>`` and ``-arch<name>`` tags of the sweeps' grids (seeds
    pair up across settings; the ``arch`` column keeps depths apart)."""
    return re.sub(r"-(?:arch[^-]+|seed\d+)(?=-|$)", "", run)


def _merge(new: pd.DataFrame, path: Path, keys: list[str]) -> pd.DataFrame:
    """``new`` plus the rows of the table at ``path`` whose ``keys`` are not in ``new`` (earlier exports)."""
    if path.exists() and path.stat().st_size > 0:
        old = pd.read_csv(path)
        if not new.empty:
            fresh = set(map(tuple, new[keys].astype(str).values))
            old = old[[tuple(k) not in fresh for k in old[keys].astype(str).values]]
        new = pd.concat([old, new], ignore_index=True)
    return new.sort_values(keys, kind="stable").reset_index(drop=True)


def export(runs_root: str | Path = "runs/study", out_dir: str | Path = TABLES_DIR) -> dict[str, int]:
    """Write ``runs.csv`` (accuracy per run, branch and PGD checkpoint, with the settings), ``bnstats.csv``
    (Figures 5-6 statistics) and ``training.csv`` (per-epoch metrics) for every finished run under
    ``runs_root``, merged with what ``out_dir`` already holds. Returns the row count of each table."""
    runs_root, out_dir = Path(runs_root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_runs(runs_root)
    if not loaded.empty:
        loaded = paper_protocol(loaded)  # AutoAttack's rows stay in each run's results.csv
        runs = loaded.assign(sweep=[Path(d).parent.name for d in loaded["run_dir"]], run=loaded["name"],
                             setting=loaded["name"].map(setting_of), accuracy=loaded["accuracy"] * 100,
                             worst_accuracy=loaded["worst_accuracy"] * 100)[RUN_COLUMNS]
    else:
        runs = pd.DataFrame(columns=RUN_COLUMNS)
    tables = {"runs": _merge(runs, out_dir / "runs.csv", ["sweep", "run", "branch", "steps"])}

    bnstats = load_bnstats(runs_root)
    if not bnstats.empty:
        bnstats = bnstats.assign(sweep=[Path(d).parent.name for d in bnstats["run_dir"]],
                                 setting=bnstats["run"].map(setting_of))
        bnstats = bnstats[bnstats["setting"].isin(BNSTATS_SETTINGS) & (bnstats["statistic"] != "var_biased")]
        bnstats = bnstats[BNSTATS_COLUMNS]
    tables["bnstats"] = _merge(bnstats, out_dir / "bnstats.csv", ["sweep", "run", "figure", "branch", "channel",
                                                                   "source", "statistic"])
    rows = []
    for run_dir in sorted({Path(d) for d in loaded["run_dir"]}):
        try:
            records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        except DamagedRunError as exc:  # its results are sound; only its training curve is left out
            warnings.warn(f"training.csv leaves out {exc}", stacklevel=2)
            continue
        rows += [{"sweep": run_dir.parent.name, "run": run_dir.name} | record for record in records]
    tables["training"] = _merge(pd.DataFrame(rows), out_dir / "training.csv", ["sweep", "run", "epoch"])
    for name, table in tables.items():
        table.to_csv(out_dir / f"{name}.csv", index=False, float_format="%.6g")
    return {name: len(table) for name, table in tables.items()}


def load(out_dir: str | Path = TABLES_DIR) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The committed study tables: (runs, bnstats); empty frames where a table does not exist yet."""
    out_dir = Path(out_dir)
    read = lambda name, columns: (pd.read_csv(out_dir / name) if (out_dir / name).exists()
                                  and (out_dir / name).stat().st_size > 0 else pd.DataFrame(columns=columns))
    return read("runs.csv", RUN_COLUMNS), read("bnstats.csv", BNSTATS_COLUMNS)


# ---------------------------------------------------------------- statistics over seeds

def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the t-based ``level`` interval of the mean over seeds (nan bounds with fewer than two)."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean()) if len(values) else math.nan
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def verdict(low: float, high: float, direction: int = 1, margin: float = MARGIN, near: bool = False) -> str:
    """The rule for every claim, on the interval of an effect whose sign the paper predicts (``direction``):
    'reproduced' where the whole interval lies on the paper's side of zero; 'contradicted' where it lies on the
    other side; 'not reproduced at this scale' where it holds zero but stays inside +-margin (any effect is
    smaller than ``margin`` points); 'inconclusive' otherwise (too few seeds or too wide). A claim of nearness
    (``near``) is reproduced where the interval lies above -margin and contradicted where it lies below (with
    ``direction=-1``: below +margin, and contradicted above it)."""
    if math.isnan(low) or math.isnan(high):
        return "inconclusive"
    low, high = sorted((low * direction, high * direction))
    if near:
        return "reproduced" if low > -margin else "contradicted" if high < -margin else "inconclusive"
    if low > 0:
        return "reproduced"
    if high < 0:
        return "contradicted"
    return "not reproduced at this scale" if -margin < low and high < margin else "inconclusive"


def accuracy(runs: pd.DataFrame, setting: str, *, branch: str = "-", steps: int | None = None,
             arch: str | None = None) -> pd.Series:
    """Accuracy (percent) of ``setting`` per seed: clean (``steps=0``), at PGD-``steps``, or (None) at the
    strongest attack evaluated."""
    rows = runs[(runs["setting"] == setting) & (runs["branch"] == branch)]
    if arch is not None:
        rows = rows[rows["arch"] == arch]
    if rows.empty:
        return pd.Series(dtype=float)
    steps = rows["steps"].max() if steps is None else steps
    return rows[rows["steps"] == steps].groupby("seed")["accuracy"].mean()


def paired(a: pd.Series, b: pd.Series) -> pd.Series:
    """a - b over the seeds both have."""
    both = a.index.intersection(b.index)
    return a[both] - b[both]


def _row(claim: str, measured: str, effect: pd.Series, paper: str, direction: int = 1, near: bool = False) -> dict:
    mean, low, high = t_interval(effect.values)
    text = "not run yet" if effect.empty else (
        f"{mean:+.1f} [{low:+.1f}, {high:+.1f}] (n={len(effect)})" if len(effect) > 1 else f"{mean:+.1f} (n=1)")
    return dict(claim=claim, measured=measured, kit=text, paper=paper,
                verdict="not run yet" if effect.empty else verdict(low, high, direction, near=near),
                mean=mean, low=low, high=high, seeds=len(effect), direction=direction)


def _bn_ratio(bnstats: pd.DataFrame) -> pd.Series:
    """Per MBN run (by seed): mean over channels of log2(running var of MBN_adv / of MBN_clean)."""
    rows = bnstats[(bnstats["figure"] == 5) & (bnstats["statistic"] == "var")]
    if rows.empty:
        return pd.Series(dtype=float)
    wide = rows.pivot_table(index=["seed", "channel"], columns="branch", values="value")
    return np.log2(wide["adv"] / wide["clean"]).groupby("seed").mean()


def _variance_gap(bnstats: pd.DataFrame, setting: str) -> tuple[pd.Series, pd.Series]:
    """Per seed, mean over channels of |batch var - running var| / running var, and the same between the two
    batches (sampling noise), for ``setting``'s Figure 6 statistics."""
    rows = bnstats[(bnstats["figure"] == 6) & (bnstats["setting"] == setting) & (bnstats["statistic"] == "var")]
    if rows.empty:
        return pd.Series(dtype=float), pd.Series(dtype=float)
    wide = rows.pivot_table(index=["seed", "channel"], columns="source", values="value")
    to_running = ((wide["batch1"] - wide["running"]).abs() + (wide["batch2"] - wide["running"]).abs()) / 2
    between = (wide["batch1"] - wide["batch2"]).abs()
    return ((to_running / wide["running"]).groupby("seed").mean() * 100,
            (between / wide["running"]).groupby("seed").mean() * 100)


def claims(runs: pd.DataFrame, bnstats: pd.DataFrame) -> pd.DataFrame:
    """Every claim of the paper's Sections 4-5 measured on the study's runs (percentage points unless said)."""
    base_arch = "small_resnet8"  # every claim but C8 compares runs of the base network
    acc: Callable[..., pd.Series] = lambda setting, arch=base_arch, **kw: accuracy(runs, setting, arch=arch, **kw)
    bnstats = bnstats[bnstats["sweep"] == "main"] if not bnstats.empty else bnstats
    strongest = f"PGD-{int(runs['steps'].max())}" if not runs.empty else "PGD-max"
    deep = sorted(runs.loc[runs["sweep"] == "depth", "arch"].unique(), key=lambda a: int(a.split("resnet")[1])) \
        if not runs.empty else []
    deepest = deep[-1] if deep else None
    drop = lambda setting: paired(acc(setting, steps=10), acc(setting))
    to_running, between = _variance_gap(bnstats, "adv-clean0") if not bnstats.empty else (pd.Series(dtype=float),) * 2
    rows = [
        _row("C1", f"{strongest}: 100% adv + 0% clean minus 100% adv + 100% clean (BN)",
             paired(acc("adv-clean0"), acc("adv-clean100")), "PGD-2000: 39.2 - 20.9 = +18.3"),
        _row("C2a", f"{strongest}: MBN_adv minus BN, both 100% adv + 100% clean",
             paired(acc("adv-clean100-mbn", branch="adv"), acc("adv-clean100")), "PGD-2000: 38.3 - 20.9 = +17.4"),
        _row("C2b", "clean accuracy: MBN_clean minus standard training (near: loses less than 2 points)",
             paired(acc("adv-clean100-mbn", branch="clean", steps=0), acc("standard", steps=0)),
             "79.3 - 78.9 = +0.4", near=True),
        _row("C3", f"{strongest}: GroupNorm minus BN, both 100% adv + 100% clean",
             paired(acc("adv-clean100-gn"), acc("adv-clean100")), "PGD-2000: 39.0 - 20.9 = +18.1"),
        _row("C4", f"{strongest}: running statistics in the last epoch minus none, 100% adv + 0% clean",
             paired(acc("adv-clean0-rs"), acc("adv-clean0")), "PGD-2000: 42.2 - 39.2 = +3.0"),
        _row("C5", f"accuracy lost from PGD-10 to {strongest}: 100% adv + 100% clean minus 100% adv + 0% clean",
             paired(drop("adv-clean100"), drop("adv-clean0")),
             "PGD-10 to PGD-2000: (56.2 - 20.9) - (52.5 - 39.2) = +22.0"),
        _row("C6", f"{strongest} lost by training with PGD-2 instead of PGD-5: mixed (100% clean) minus 100% adv",
             paired(paired(acc("adv-clean100"), acc("adv-clean100-pgd2")),
                    paired(acc("adv-clean0"), acc("adv-clean0-pgd2"))),
             "PGD-30 to PGD-5 training, PGD-2000: (20.9 - 0.0) - (39.2 - 35.9) = +17.6"),
        _row("C7a", "clean accuracy: BN-only finetuning on clean images minus before (100% adv + 0% clean filters)",
             paired(acc("ft-clean", steps=0), acc("adv-clean0", steps=0)), "73.0 - 62.3 = +10.7"),
        _row("C7b", f"{strongest}: clean-trained filters with BN finetuned adversarially minus adversarial training",
             paired(acc("ft-adv"), acc("adv-clean0")), "PGD-2000: 0.0 - 39.2 = -39.2", direction=-1),
        _row("C7c", f"{strongest}: clean-trained filters with BN finetuned adversarially minus standard training "
                    "(the paper: no robustness gained; reproduced = gains less than 2 points)",
             paired(acc("ft-adv"), acc("standard")), "PGD-2000: 0.0 after finetuning", direction=-1, near=True),
        _row("C8", f"gain from small_resnet8 to {deepest}: {strongest} of adversarial training minus clean "
                   "accuracy of standard training",
             paired(paired(acc("adv-clean0", arch=deepest), acc("adv-clean0", arch="small_resnet8")),
                    paired(acc("standard", arch=deepest, steps=0), acc("standard", arch="small_resnet8", steps=0)))
             if deepest else pd.Series(dtype=float),
             "ResNet-152 to 638, PGD-2000: +4.5; clean training 152 to 338: +0.5"),
        _row("C9a", "MBN running variance: mean log2(adv / clean) over 20 channels (x100)",
             _bn_ratio(bnstats) * 100 if not bnstats.empty else pd.Series(dtype=float),
             "adversarial larger (Figure 5, no number)"),
        _row("C9b", "100% adv + 0% clean: |batch - running| variance minus |batch - batch| (% of running)",
             paired(to_running, between), "batch variance differs from running (Figure 6, no number)"),
    ]
    return pd.DataFrame(rows)


def settings_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% interval over seeds of clean and strongest-attack accuracy for every setting and branch."""
    rows = []
    for (sweep, setting, arch, branch), group in runs.groupby(["sweep", "setting", "arch", "branch"]):
        for label, steps in (("clean", 0), ("strongest", group["steps"].max())):
            mean, low, high = t_interval(group[group["steps"] == steps].groupby("seed")["accuracy"].mean())
            rows.append(dict(sweep=sweep, setting=setting, arch=arch, branch=branch, metric=label, steps=steps,
                             mean=mean, low=low, high=high, seeds=group["seed"].nunique()))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- figures (from the committed tables)

CURVE_SETTINGS = [("standard", "-", "0% adv + 100% clean"), ("adv-clean0", "-", "100% adv + 0% clean"),
                  ("adv-clean100", "-", "100% adv + 100% clean, BN"),
                  ("adv-clean100-mbn", "adv", "100% adv + 100% clean, MBN_adv"),
                  ("adv-clean100-mbn", "clean", "100% adv + 100% clean, MBN_clean"),
                  ("adv-clean100-gn", "-", "100% adv + 100% clean, GN")]


def _save(fig: plt.Figure, name: str, folder: str | Path | None) -> None:
    fig.tight_layout()
    save(fig, name, folder)


def plot_eps_sweep(runs: pd.DataFrame, folder: str | Path | None = None) -> plt.Figure:
    """The eps sweep: accuracy against the strongest attack (solid) and clean (dashed) for the C1 pair."""
    rows = runs[runs["sweep"] == "eps"]
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for clean_ratio, color in ((0.0, "tab:blue"), (1.0, "tab:red")):
        pair = rows[rows["clean_ratio"] == clean_ratio]
        label = f"100% adv + {clean_ratio * 100:g}% clean"
        strongest = pair[pair["steps"] == pair["steps"].max()].groupby("eps")["accuracy"].mean()
        clean = pair[pair["steps"] == 0].groupby("eps")["accuracy"].mean()
        ax.plot(strongest.index, strongest.values, "o-", color=color, label=f"{label}, PGD-{pair['steps'].max()}")
        ax.plot(clean.index, clean.values, "o--", color=color, alpha=0.6, label=f"{label}, clean")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("eps (0-255 scale), training and evaluation")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Study step 1: where the clean-image effect shows (one seed)", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, "study_eps", folder)
    return fig


def plot_curves(runs: pd.DataFrame, folder: str | Path | None = None) -> plt.Figure:
    """Robustness curves of the main strategies: mean over seeds with 95% t-intervals (C1, C2, C3, C5)."""
    rows = runs[(runs["sweep"] == "main") & (runs["steps"] > 0)]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for setting, branch, label in CURVE_SETTINGS:
        curve = rows[(rows["setting"] == setting) & (rows["branch"] == branch)]
        if curve.empty:
            continue
        points = [(steps, *t_interval(g.groupby("seed")["accuracy"].mean())) for steps, g in curve.groupby("steps")]
        steps, mean, low, high = (np.array(v) for v in zip(*points))
        line, = ax.plot(steps, mean, "o-", label=f"{label} (n={curve['seed'].nunique()})", markersize=3)
        if not np.isnan(low).all():
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("PGD iterations (targeted)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Robustness curves, mean and 95% interval over seeds", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    _save(fig, "study_curves", folder)
    return fig


def plot_claims(table: pd.DataFrame, folder: str | Path | None = None) -> plt.Figure:
    """Each claim's effect (percentage points) with its 95% interval; the sign the paper predicts is right of 0
    after flipping claims whose predicted sign is negative (C7b, C7c)."""
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(table) + 1))
    for i, r in enumerate(table.itertuples()):
        if r.seeds:
            low, high = sorted((r.low * r.direction, r.high * r.direction))
            xerr = None if np.isnan(low) else [[r.mean * r.direction - low], [high - r.mean * r.direction]]
            ax.errorbar(r.mean * r.direction, i, xerr=xerr, fmt="o",
                        color={"reproduced": "tab:green", "contradicted": "tab:red"}.get(r.verdict, "tab:gray"))
        ax.text(1.02, i, r.verdict, transform=ax.get_yaxis_transform(), va="center", fontsize=7)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(table)), [f"{r.claim}{' (sign flipped)' if r.direction < 0 else ''}"
                                      for r in table.itertuples()], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("effect in the paper's predicted direction (percentage points; C9a: log2 ratio x 100)")
    ax.set_title("The paper's claims on Fashion-MNIST: effect and 95% interval over seeds", fontsize=9)
    _save(fig, "study_claims", folder)
    return fig


def plot_depth(runs: pd.DataFrame, folder: str | Path | None = None) -> plt.Figure:
    """Depth (C8): strongest-attack accuracy of adversarial training and clean accuracy of standard training."""
    depth_of = lambda arch: int(arch.split("resnet")[1])
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for setting, steps, label in (("adv-clean0", None, "100% adv + 0% clean, strongest PGD"),
                                  ("standard", 0, "standard training, clean")):
        points = []
        for arch in sorted(runs["arch"].unique(), key=depth_of):
            values = accuracy(runs[runs["sweep"].isin(["main", "depth"])], setting, steps=steps, arch=arch)
            if not values.empty:
                points.append((depth_of(arch), *t_interval(values)))
        if points:
            depth, mean, low, high = (np.array(v) for v in zip(*points))
            err = None if np.isnan(low).all() else np.nan_to_num([mean - low, high - mean])
            ax.errorbar(depth, mean, yerr=err, fmt="o-", capsize=3, label=label)
    ax.set_xlabel("depth (small ResNet, 6n+2)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Depth: mean and 95% interval over seeds", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    _save(fig, "study_depth", folder)
    return fig


def plot_bnstats(bnstats: pd.DataFrame, folder: str | Path | None = None) -> plt.Figure:
    """C9: running variance of MBN_adv against MBN_clean per channel (left); batch against running variance of
    100% adv + 0% clean (right); every seed's sampled channels."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    five = bnstats[(bnstats["figure"] == 5) & (bnstats["statistic"] == "var")] if not bnstats.empty else bnstats
    six = bnstats[(bnstats["figure"] == 6) & (bnstats["statistic"] == "var")] if not bnstats.empty else bnstats
    for ax, rows, x, ys, title in ((axes[0], five, "clean", ["adv"], "MBN running variance (Figure 5)"),
                                   (axes[1], six, "running", ["batch1", "batch2"], "batch vs running variance "
                                                                                    "(Figure 6)")):
        if rows.empty:
            ax.set_axis_off()
            ax.text(0.5, 0.5, "no runs yet: advkit sweep notebooks/sweeps/study/main.yaml", ha="center", fontsize=8)
            continue
        column = "branch" if x == "clean" else "source"
        wide = rows.pivot_table(index=["seed", "channel"], columns=column, values="value")
        for y in ys:
            ax.scatter(wide[x], wide[y], s=10, alpha=0.7, label=f"{y} (n seeds={wide.index.get_level_values(0).nunique()})")
        top = float(np.nanmax(wide.values))
        ax.plot([0, top], [0, top], color="black", linewidth=0.8)
        ax.set_xlabel(f"{x} variance")
        ax.set_ylabel(" / ".join(ys) + " variance")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    _save(fig, "study_bnstats", folder)
    return fig


def findings_markdown(table: pd.DataFrame) -> str:
    """The claims table as Markdown for the README's findings section."""
    columns = ["claim", "measured", "kit", "paper", "verdict"]
    return table[columns].to_markdown(index=False)
