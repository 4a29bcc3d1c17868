"""The Fashion-MNIST study: which of the paper's findings hold at laptop scale, measured over seeds.

``export`` turns the study's run folders (``runs/decisive/<sweep>/<point>-seed<k>``) into small tidy tables under
``data/results/decisive/`` (committed: the figures, the README's study section and the findings are made from
them, and later sessions add to them; the older three-seed study's are in ``data/results/study/``). ``claims``
measures each claim of the paper's Sections 4-5 as a paired difference over seeds with a t-based 95% interval
and gives a verdict by one rule (:func:`verdict`).
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from . import paper
from .paths import project_root
from .plots import VERDICT_COLORS, save
from .rundir import DamagedFile, RunDir
from .results import attack_column, load_bnstats, load_runs, read_metrics

TABLES_DIR = project_root() / "data" / "results" / "decisive"  # the decisive study (issue 15)
RUNS_ROOT = "runs/decisive"
RUN_COLUMNS = ["sweep", "run", "setting", "seed", "arch", "norm", "strategy", "adv_ratio", "clean_ratio",
               "running_stats_epochs", "finetune_bn", "train_steps", "train_eps", "n_train", "epochs", "branch",
               "attack", "eps", "step", "steps", "accuracy", "worst_accuracy", "n", "weights", "precision", "device",
               "code"]  # code: the commit that trained the run (environment.json); weights: their digest
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
        if "attack" in keys and "attack" not in old:  # written before AutoAttack rows were kept
            old = old.assign(attack=attack_of(old))
        if not new.empty:
            fresh = set(map(tuple, new[keys].astype(str).values))
            old = old[[tuple(k) not in fresh for k in old[keys].astype(str).values]]
        new = pd.concat([old, new], ignore_index=True)
    return new.sort_values(keys, kind="stable").reset_index(drop=True)


def export(runs_root: str | Path = RUNS_ROOT, out_dir: str | Path = TABLES_DIR) -> dict[str, int]:
    """Write ``runs.csv`` (accuracy per run, branch and PGD checkpoint, with the settings), ``bnstats.csv``
    (Figures 5-6 statistics) and ``training.csv`` (per-epoch metrics) for every finished run under
    ``runs_root``, merged with what ``out_dir`` already holds. Returns the row count of each table."""
    runs_root, out_dir = Path(runs_root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_runs(runs_root)
    if not loaded.empty:
        code = {d: RunDir(d).read_json(RunDir(d).environment_file).get("code") if RunDir(d).environment_file.exists()
                else None for d in loaded["run_dir"].unique()}
        runs = loaded.assign(sweep=[Path(d).parent.name for d in loaded["run_dir"]], run=loaded["name"],
                             setting=loaded["name"].map(setting_of), accuracy=loaded["accuracy"] * 100,
                             worst_accuracy=loaded["worst_accuracy"] * 100, attack=attack_column(loaded),
                             code=loaded["run_dir"].map(code))
        runs = runs.reindex(columns=RUN_COLUMNS)
    else:
        runs = pd.DataFrame(columns=RUN_COLUMNS)
    tables = {"runs": _merge(runs, out_dir / "runs.csv", ["sweep", "run", "branch", "attack", "steps"])}

    bnstats = load_bnstats(runs_root)
    if not bnstats.empty:
        bnstats = bnstats.assign(sweep=[Path(d).parent.name for d in bnstats["run_dir"]],
                                 setting=bnstats["run"].map(setting_of))
        bnstats = bnstats[bnstats["setting"].isin(BNSTATS_SETTINGS) & (bnstats["statistic"] != "var_biased")]
        bnstats = bnstats[BNSTATS_COLUMNS]
    else:  # no run recorded Figure 5-6 statistics (bnstats_channels 0)
        bnstats = pd.DataFrame(columns=BNSTATS_COLUMNS)
    tables["bnstats"] = _merge(bnstats, out_dir / "bnstats.csv", ["sweep", "run", "figure", "branch", "channel",
                                                                   "source", "statistic"])
    rows = []
    for run_dir in sorted({Path(d) for d in loaded["run_dir"]}):
        try:
            records = read_metrics(run_dir) if RunDir(run_dir).metrics_file.exists() else []
        except DamagedFile as exc:  # its results are sound; only its training curve is left out
            warnings.warn(f"training.csv leaves out {exc}", stacklevel=2)
            continue
        rows += [{"sweep": run_dir.parent.name, "run": run_dir.name} | record for record in records]
    training = pd.DataFrame(rows) if rows else pd.DataFrame(columns=["sweep", "run", "epoch"])
    tables["training"] = _merge(training, out_dir / "training.csv", ["sweep", "run", "epoch"])
    for name, table in tables.items():
        table.to_csv(out_dir / f"{name}.csv", index=False, float_format="%.6g")
    return {name: len(table) for name, table in tables.items()}


GATE = 89.0  # percent: standard training's clean accuracy on the full test set (docs/study-design.md)
GATE_COLUMNS = ["run", "clean_acc_full_test", "images", "weights", "precision", "device", "code", "gate"]


def record_gates(rows: list[dict], out_dir: str | Path = TABLES_DIR) -> pd.DataFrame:
    """Merge validity-gate rows (:func:`advkit.evaluate.full_test_accuracy` of a run, with its ``run`` name and
    ``code`` commit) into ``<out_dir>/gates.csv``, one row per run; return the table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    new = pd.DataFrame([row | {"gate": f">= {GATE:g}"} for row in rows]).reindex(columns=GATE_COLUMNS)
    table = _merge(new, out_dir / "gates.csv", ["run"])
    table.to_csv(out_dir / "gates.csv", index=False)
    return table


GPU_PREFIX = "gpu-"  # a GPU's sweeps (gpu-main.yaml, ...): their seeds (16+) pool with the CPU sweep of that name


def load(out_dir: str | Path = TABLES_DIR) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The committed study tables: (runs, bnstats); empty frames where a table does not exist yet. The GPU's
    sweeps are pooled with the CPU's (``sweep`` loses the ``gpu-`` prefix; ``device`` says which ran a run);
    ValueError where both devices hold the same run (a seed must run all its points on one device)."""
    out_dir = Path(out_dir)
    read = lambda name, columns: (pd.read_csv(out_dir / name) if (out_dir / name).exists()
                                  and (out_dir / name).stat().st_size > 0 else pd.DataFrame(columns=columns))
    runs, bnstats = read("runs.csv", RUN_COLUMNS), read("bnstats.csv", BNSTATS_COLUMNS)
    pooled = lambda frame: frame.assign(sweep=frame["sweep"].astype(str).str.removeprefix(GPU_PREFIX))
    runs, bnstats = pooled(runs), pooled(bnstats)
    both = runs[runs.duplicated([c for c in ("sweep", "run", "branch", "attack", "steps") if c in runs], keep=False)]
    if len(both):
        raise ValueError(f"{out_dir / 'runs.csv'}: runs {sorted(set(both['run']))} of sweep "
                         f"{sorted(set(both['sweep']))} exist on both devices; a seed must run on one (GPU seeds: 16+)")
    return runs, bnstats


# ---------------------------------------------------------------- the paper's own effects

def _table7(table7: pd.DataFrame, column: str = "pgd2000", *, network: str = "resnet152", steps: int = 30,
            clean_ratio: float = 1.0, norm: str = "bn", running_stats: int = 0) -> float:
    """One number of the paper's Table 7 (batch 4096, no ALP); ValueError unless exactly one row matches."""
    rows = table7[(table7["network"] == network) & (table7["batch_size"] == 4096)
                  & (table7["train_pgd_steps"] == steps) & (table7["clean_ratio"] == clean_ratio)
                  & (table7["norm"] == norm) & (table7["alp"] == 0) & (table7["running_stats"] == running_stats)]
    if len(rows) != 1:
        raise ValueError(f"table7.csv holds {len(rows)} rows for {network}, PGD-{steps}, {clean_ratio:g} clean, "
                         f"{norm}, running_stats={running_stats}; expected one")
    return float(rows[column].iloc[0])


def paper_effects_at_kit_attack(folder: str | Path = paper.NUMBERS_DIR) -> dict[str, float]:
    """The paper's effects (PGD-2000, points) where its Table 7 also trains with PGD-5, step 4: the kit's training
    attack, the paper's weakest (C6's regime; its headline effects, :func:`paper_effects`, train with PGD-30,
    step 1). Table 7 has these rows for C1, C2a, C2c, C4 and C5 (no GroupNorm at PGD-5)."""
    t7 = functools.partial(_table7, pd.read_csv(paper.numbers_file("table7.csv", folder)), steps=5)
    mixed, adv_only, mbn = t7(), t7(clean_ratio=0.0), t7(norm="mbn_adv")
    lost = lambda **kw: t7("pgd10", **kw) - t7(**kw)
    return {"C1": adv_only - mixed, "C2a": mbn - mixed, "C2c": mbn - adv_only,
            "C4": t7(clean_ratio=0.0, running_stats=1) - adv_only, "C5": lost() - lost(clean_ratio=0.0)}


def paper_effects(folder: str | Path = paper.NUMBERS_DIR) -> dict[str, tuple[float, str]]:
    """Each claim's effect in the paper (percentage points) and how it is computed, from the paper's tables in
    ``data/paper`` (ResNet-152, batch 4096, PGD-30 training, targeted PGD-2000 unless said)."""
    table7 = pd.read_csv(paper.numbers_file("table7.csv", folder))
    clean = pd.read_csv(paper.numbers_file("clean_training.csv", folder))
    text = pd.read_csv(paper.numbers_file("section_numbers.csv", folder))

    t7 = functools.partial(_table7, table7)
    def one(frame: pd.DataFrame, **where) -> float:
        rows = frame.loc[np.logical_and.reduce([frame[k] == v for k, v in where.items()])]
        if len(rows) != 1:
            raise ValueError(f"the paper's tables hold {len(rows)} rows for {where}; expected one")
        return float(rows["value"].iloc[0])

    def diff(a: float, b: float, what: str = "PGD-2000") -> tuple[float, str]:
        return a - b, f"{what}: {a:.1f} - {b:.1f} = {a - b:+.1f}"

    mixed, adv_only = t7(), t7(clean_ratio=0.0)
    standard = one(clean, network="resnet152", adv_ratio=0.0, norm="bn", metric="clean")
    deeper_adv = t7(network="resnet338", clean_ratio=0.0, running_stats=1) - t7(clean_ratio=0.0, running_stats=1)
    deeper_clean = one(clean, network="resnet338", adv_ratio=0.0, norm="bn", metric="clean") - standard
    ft_adv = one(text, finetuning="BN-only on adversarial images", metric="pgd2000")
    lost = lambda **kw: t7("pgd10", **kw) - t7(**kw)
    weak = lambda **kw: t7(**kw) - t7(steps=5, **kw)
    return {
        "C1": diff(adv_only, mixed),
        "C2a": diff(t7(norm="mbn_adv"), mixed),
        "C2c": diff(t7(norm="mbn_adv"), adv_only),
        "C3b": diff(t7(norm="gn"), adv_only),
        "C2b": diff(one(clean, network="resnet152", norm="mbn", eval_bn="clean", metric="clean"), standard, "clean"),
        "C3": diff(t7(norm="gn"), mixed),
        "C4": diff(t7(clean_ratio=0.0, running_stats=1), adv_only),
        "C5": (lost() - lost(clean_ratio=0.0), f"PGD-10 to PGD-2000: {lost():.1f} - {lost(clean_ratio=0.0):.1f} = "
                                               f"{lost() - lost(clean_ratio=0.0):+.1f}"),
        "C6": (weak() - weak(clean_ratio=0.0), f"PGD-30 vs PGD-5 training, PGD-2000: {weak():.1f} - "
                                               f"{weak(clean_ratio=0.0):.1f} = {weak() - weak(clean_ratio=0.0):+.1f}"),
        "C7a": diff(one(text, finetuning="BN-only on clean images", metric="clean"), t7("clean", clean_ratio=0.0),
                    "clean"),
        "C7b": diff(ft_adv, adv_only),
        "C7c": (ft_adv, f"PGD-2000: {ft_adv:.1f} after finetuning BNs adversarially; standard training's is not "
                        f"reported (at least 0), so at most {ft_adv:+.1f} (no robustness gained)"),
        "C8": (deeper_adv - deeper_clean, f"ResNet-152 to 338: PGD-2000 of adversarial training "
                                          f"{deeper_adv:+.1f} minus clean accuracy of standard training "
                                          f"{deeper_clean:+.1f} = {deeper_adv - deeper_clean:+.1f}"),
    }


# ---------------------------------------------------------------- statistics over seeds

def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the t-based ``level`` interval of the mean over seeds: nan bounds with fewer than two, and where
    every seed gave the same value (accuracies on a fixed set move in steps, so equal differences happen, and a
    zero-wide interval would be an artefact of the steps, not a decision)."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean()) if len(values) else math.nan
    if len(values) < 2 or np.ptp(values) < 1e-9:  # equal up to the CSV's float rounding
        return mean, math.nan, math.nan
    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return mean, mean - half, mean + half


LOOKS = tuple(range(5, 17))  # the numbers of seeds after which the stopping rule is checked (docs/study-design.md)


def _smallest_p(looks: tuple[int, ...], sims: int, seed: int) -> np.ndarray:
    """Per simulated study of a claim without an effect, the smallest two-sided t-test p value over ``looks``
    (seeds keep coming: the worst case, where no look stops the study; t does not depend on the scale)."""
    draws = np.random.default_rng(seed).standard_normal((sims, max(looks)))
    p = [2 * stats.t.sf(np.abs(draws[:, :n].mean(1) / draws[:, :n].std(1, ddof=1) * math.sqrt(n)), n - 1)
         for n in looks]
    return np.min(p, axis=0)


@functools.lru_cache(maxsize=None)
def sequential_error(level: float = 0.95, looks: tuple[int, ...] = LOOKS, sims: int = 20_000, seed: int = 0) -> float:
    """The chance that a claim with no effect has a ``level`` interval that excludes zero at one or more of the
    ``looks`` (simulated): what looking after every seed does to the 5% of a single look."""
    return float((_smallest_p(looks, sims, seed) < 1 - level).mean())


@functools.lru_cache(maxsize=None)
def sequential_level(alpha: float = 0.05, looks: tuple[int, ...] = LOOKS, sims: int = 20_000, seed: int = 0) -> float:
    """The interval level to use at every look so that a claim with no effect excludes zero at some look with
    chance ``alpha`` (a constant boundary, as Pocock's, found by simulation)."""
    return 1 - float(np.quantile(_smallest_p(looks, sims, seed), alpha))


def verdict(low: float, high: float, direction: int = 1, margin: float = MARGIN, near: bool = False) -> str:
    """The rule for every claim, on the 95% interval of an effect whose sign the paper predicts (``direction``):
    'holds' where the whole interval lies on the paper's side of zero, 'reversed' where it lies on the other
    side, 'no effect larger than 2 points' where it holds zero but stays inside +-``margin``, 'undecided'
    otherwise (too few seeds or too wide). A claim of nearness (``near``: the paper finds no difference)
    'holds' where the interval lies inside +-margin and is 'reversed' where it lies wholly outside."""
    if math.isnan(low) or math.isnan(high):
        return "undecided"
    low, high = sorted((low * direction, high * direction))
    if near:
        return "holds" if -margin < low and high < margin else "reversed" if low >= margin or high <= -margin \
            else "undecided"
    if low > 0:
        return "holds"
    if high < 0:
        return "reversed"
    return f"no effect larger than {margin:g} points" if -margin < low and high < margin else "undecided"


def paper_size(low: float, high: float, paper_effect: float) -> str:
    """Whether the paper's own effect size lies inside the interval or is ruled out by it (at this scale)."""
    if any(math.isnan(v) for v in (low, high, paper_effect)):
        return ""
    if low <= paper_effect <= high:
        return f"the paper's {paper_effect:+.1f} lies inside the interval"
    if paper_effect > high:
        return f"the paper's {paper_effect:+.1f} is ruled out (here at most {high:+.1f})"
    return f"the paper's {paper_effect:+.1f} is ruled out (here at least {low:+.1f})"


def accuracy(runs: pd.DataFrame, setting: str, *, branch: str = "-", steps: int | None = None,
             arch: str | None = None, attack: str = "pgd") -> pd.Series:
    """Accuracy (percent) of ``setting`` per seed: clean (``steps=0``), or under ``attack`` ('pgd' or
    'autoattack') at ``steps`` iterations, None: the most evaluated."""
    rows = runs[(runs["setting"] == setting) & (runs["branch"] == branch)]
    if arch is not None:
        rows = rows[rows["arch"] == arch]
    rows = rows[attack_of(rows) == ("clean" if steps == 0 else attack)]
    if rows.empty:
        return pd.Series(dtype=float)
    steps = rows["steps"].max() if steps is None else steps
    rows = rows[rows["steps"] == steps]
    twice = rows[rows.duplicated("seed", keep=False)]
    if len(twice):  # two sweeps ran one setting on one seed: averaging them would hide which one a claim uses
        raise ValueError(f"setting {setting!r} (branch {branch!r}, arch {arch or 'any'}) has more than one run for "
                         f"seed(s) {sorted(set(twice['seed']))}: {sorted(set(twice['sweep'] + '/' + twice['run']))}; "
                         "a seed must run each setting once (give the other sweep's points their own names)")
    return rows.set_index("seed")["accuracy"].sort_index()


def attack_of(runs: pd.DataFrame) -> pd.Series:
    """Each row's attack; tables written before the column existed hold clean (0 steps) and PGD rows only."""
    derived = pd.Series(np.where(runs["steps"] == 0, "clean", "pgd"), index=runs.index)
    return runs["attack"].fillna(derived) if "attack" in runs else derived


def paired(a: pd.Series, b: pd.Series) -> pd.Series:
    """a - b over the seeds both have."""
    both = a.index.intersection(b.index)
    return a[both] - b[both]


def _row(claim: str, measured: str, effect: pd.Series, paper: tuple[float, str], direction: int = 1,
         near: bool = False, threat_model: str = "targeted PGD") -> dict:
    mean, low, high = t_interval(effect.values)
    text = ("not run yet" if effect.empty else f"{mean:+.1f} (n=1)" if len(effect) == 1 else
            f"{mean:+.1f} (n={len(effect)}, every seed the same: no interval)" if math.isnan(low) else
            f"{mean:+.1f} [{low:+.1f}, {high:+.1f}] (n={len(effect)})")
    rule = "not run yet" if effect.empty else verdict(low, high, direction, near=near)
    _, seq_low, seq_high = (t_interval(effect.values, sequential_level()) if len(effect) >= LOOKS[0]
                            else (math.nan, math.nan, math.nan))
    level = f"{sequential_level():.1%}"
    sequential = ("" if near or rule not in ("holds", "reversed") or math.isnan(seq_low) else
                  f"excludes zero at {level} too" if seq_low > 0 or seq_high < 0 else f"not at {level}")
    return dict(claim=claim, threat_model=threat_model, measured=measured, kit=text, paper=paper[1], verdict=rule,
                decided=rule not in ("not run yet", "undecided") and len(effect) >= LOOKS[0],  # rule from 5
                paper_size=paper_size(low, high, paper[0]), mean=mean, low=low,
                high=high, seeds=len(effect), direction=direction, near=near, paper_effect=paper[0],
                sequential=sequential, preliminary=0 < len(effect) < LOOKS[0] and rule != "undecided")


def _bn_ratio(bnstats: pd.DataFrame) -> pd.Series:
    """Per MBN run (by seed): mean over channels of log2(running var of MBN_adv / of MBN_clean)."""
    rows = bnstats[(bnstats["figure"] == 5) & (bnstats["statistic"] == "var")]
    if rows.empty:
        return pd.Series(dtype=float)
    wide = rows.pivot_table(index=["seed", "channel"], columns="branch", values="value")
    return np.log2(wide["adv"] / wide["clean"]).groupby("seed").mean()


def _variance_gap(bnstats: pd.DataFrame, setting: str) -> tuple[pd.Series, pd.Series]:
    """Per seed, mean over channels of |batch var - running var| / running var, and |batch1 var - batch2 var| /
    sqrt(2) / running var (sampling noise alone makes the two equal in expectation), for ``setting``'s Figure 6
    statistics."""
    rows = bnstats[(bnstats["figure"] == 6) & (bnstats["setting"] == setting) & (bnstats["statistic"] == "var")]
    if rows.empty:
        return pd.Series(dtype=float), pd.Series(dtype=float)
    wide = rows.pivot_table(index=["seed", "channel"], columns="source", values="value")
    to_running = ((wide["batch1"] - wide["running"]).abs() + (wide["batch2"] - wide["running"]).abs()) / 2
    between = (wide["batch1"] - wide["batch2"]).abs() / math.sqrt(2)  # the same size under sampling noise alone
    return ((to_running / wide["running"]).groupby("seed").mean() * 100,
            (between / wide["running"]).groupby("seed").mean() * 100)


THREAT_MODELS = {"targeted PGD": "pgd", "AutoAttack": "autoattack"}  # name in the claims table -> attack rows
SCALE_SIZES = {"n6k": 6144, "n12k": 12288, "": 24576}  # the decisive study's scale axis: setting suffix -> images
NO_NUMBER = (math.nan, "")


def claims(runs: pd.DataFrame, bnstats: pd.DataFrame, threat_model: str = "targeted PGD") -> pd.DataFrame:
    """Every claim of the paper's Sections 4-5 measured on the study's runs under one threat model (its strongest
    evaluated attack; percentage points unless said), with the paper's own effect. Claims about clean accuracy
    or BN statistics are the same under every threat model: see :func:`all_claims`."""
    if threat_model not in THREAT_MODELS:
        raise ValueError(f"threat_model={threat_model!r} is not accepted; choose one of {list(THREAT_MODELS)}")
    attack = THREAT_MODELS[threat_model]
    base_arch = "small_resnet8"  # every claim but C8 compares runs of the base network
    acc: Callable[..., pd.Series] = lambda setting, arch=base_arch, **kw: accuracy(runs, setting, arch=arch,
                                                                                  attack=attack, **kw)
    bnstats = bnstats[bnstats["sweep"] == "main"] if not bnstats.empty else bnstats
    rows_of = runs[attack_of(runs) == attack] if not runs.empty else runs
    strongest = (f"{'PGD' if attack == 'pgd' else threat_model}-{int(rows_of['steps'].max())}"
                 if not rows_of.empty else threat_model)
    deep = sorted(runs.loc[runs["sweep"] == "depth", "arch"].unique(), key=paper.depth_of) if not runs.empty else []
    depth_gain = lambda arch: paired(
        paired(acc("adv-clean0", arch=arch), acc("adv-clean0", arch=base_arch)),
        paired(acc("standard", arch=arch, steps=0), acc("standard", arch=base_arch, steps=0)))
    # the deepest network with a seed of both trainings (a depth whose other training has not finished yet waits)
    deepest = ([arch for arch in deep if not depth_gain(arch).empty] or deep or [None])[-1]
    drop = lambda setting: paired(acc(setting, steps=10), acc(setting))
    fx = paper_effects()
    row = lambda *args, **kw: _row(*args, threat_model=threat_model, **kw)
    rows = [
        row("C1", f"{strongest}: 100% adv + 0% clean minus 100% adv + 100% clean (BN)",
            paired(acc("adv-clean0"), acc("adv-clean100")), fx["C1"]),
        row("C2a", f"{strongest}: MBN_adv minus BN, both 100% adv + 100% clean",
            paired(acc("adv-clean100-mbn", branch="adv"), acc("adv-clean100")), fx["C2a"]),
        row("C2c", f"{strongest}: MBN_adv (100% adv + 100% clean) minus 100% adv + 0% clean (near: within 2 points)",
            paired(acc("adv-clean100-mbn", branch="adv"), acc("adv-clean0")), fx["C2c"], near=True),
        row("C3", f"{strongest}: GroupNorm minus BN, both 100% adv + 100% clean",
            paired(acc("adv-clean100-gn"), acc("adv-clean100")), fx["C3"]),
        row("C3b", f"{strongest}: GroupNorm (100% adv + 100% clean) minus 100% adv + 0% clean (near: within 2 "
                   "points)", paired(acc("adv-clean100-gn"), acc("adv-clean0")), fx["C3b"], near=True),
        # gn-groups.yaml (added after C3's seeds 0-4, docs/study-design.md): 4 groups, 4-16 channels each; the
        # 32 groups above leave small_resnet8 with 1-2 channels per group, nearly InstanceNorm
        row("C3-g4", f"{strongest}: GroupNorm with 4 groups minus BN, both 100% adv + 100% clean",
            paired(acc("adv-clean100-gn4"), acc("adv-clean100")), fx["C3"]),
        row("C3b-g4", f"{strongest}: GroupNorm with 4 groups (100% adv + 100% clean) minus 100% adv + 0% clean "
                      "(near: within 2 points)", paired(acc("adv-clean100-gn4"), acc("adv-clean0")), fx["C3b"],
            near=True),
        row("C4", f"{strongest}: running statistics in the last epoch minus none, 100% adv + 0% clean",
            paired(acc("adv-clean0-rs"), acc("adv-clean0")), fx["C4"]),
        *([row("C5", f"accuracy lost from PGD-10 to {strongest}: 100% adv + 100% clean minus 100% adv + 0% clean",
               paired(drop("adv-clean100"), drop("adv-clean0")), fx["C5"])] if attack == "pgd" else []),
        row("C6", f"{strongest} lost by training with PGD-2 instead of PGD-5: mixed (100% clean) minus 100% adv",
            paired(paired(acc("adv-clean100"), acc("adv-clean100-pgd2")),
                   paired(acc("adv-clean0"), acc("adv-clean0-pgd2"))), fx["C6"]),
        row("C7b", f"{strongest}: clean-trained filters with BN finetuned adversarially minus adversarial training",
            paired(acc("ft-adv"), acc("adv-clean0")), fx["C7b"], direction=-1),
        row("C7c", f"{strongest}: clean-trained filters with BN finetuned adversarially minus standard training "
                   f"(near: the paper finds no robustness gained){'' if attack == 'pgd' else _retrained_text(runs)}",
            # main.yaml's standard runs skip AutoAttack: standard-autoattack.yaml's (CPU) or gpu-main.yaml's give it
            paired(acc("ft-adv"), acc("standard") if attack == "pgd" else
                   acc("standard-aa").combine_first(acc("standard"))), fx["C7c"], near=True),
        row("C8", f"gain from small_resnet8 to {deepest or 'a deeper ResNet'}: {strongest} of adversarial training minus clean "
                  "accuracy of standard training",
            depth_gain(deepest) if deepest else pd.Series(dtype=float), fx["C8"]),
        *_scale_rows(acc, row, strongest),
    ]
    table = pd.DataFrame(rows)
    return table.assign(paper_pgd5=table["claim"].map(paper_effects_at_kit_attack()))


def retrained_seeds_that_differ(runs: pd.DataFrame) -> tuple[list[int], list[int]]:
    """(seeds checked, seeds whose weights differ) between standard-autoattack.yaml's ``standard-aa`` runs and
    main.yaml's ``standard`` runs: the former trains the latter's point again only to evaluate it with AutoAttack,
    so C7c under AutoAttack is paired with the model ft-adv was finetuned from only where the digests agree."""
    if runs.empty or "weights" not in runs:
        return [], []
    digests = lambda setting: (runs[(runs["setting"] == setting) & (runs["arch"] == "small_resnet8")]
                               .dropna(subset=["weights"]).groupby("seed")["weights"].agg(set))
    retrained, original = digests("standard-aa"), digests("standard")
    both = sorted(retrained.index.intersection(original.index))
    return [int(s) for s in both], [int(s) for s in both if retrained[s] != original[s]]


def _retrained_text(runs: pd.DataFrame) -> str:
    checked, differ = retrained_seeds_that_differ(runs)
    if differ:
        return (f"; standard-aa's weights differ from standard's for seeds {differ}: those seeds compare with a "
                "model trained again, not the one ft-adv was finetuned from")
    return f"; standard-aa's weights equal standard's (checked for {len(checked)} seeds)" if checked else ""


def _scale_rows(acc: Callable[..., pd.Series], row: Callable[..., dict], strongest: str) -> list[dict]:
    """C1 at each training-set size of the scale axis (the 24,576-image point is C1 itself) and its slope per
    doubling of the data (least squares per seed over the sizes a seed has all of; Section 4.2's thesis: the
    clean-image effect grows with the data set)."""
    effect = {suffix: paired(acc(f"adv-clean0{'-' + suffix if suffix else ''}"),
                             acc(f"adv-clean100{'-' + suffix if suffix else ''}")) for suffix in SCALE_SIZES}
    rows = [row(f"C1@{n // 1024}k", f"{strongest}: C1 with {n:,} training images", effect[suffix], NO_NUMBER)
            for suffix, n in SCALE_SIZES.items() if suffix]
    frame = pd.DataFrame({suffix: e for suffix, e in effect.items()}).dropna()
    if len(frame) and not all(e.empty for suffix, e in effect.items() if suffix):
        x = np.log2([SCALE_SIZES[c] for c in frame.columns])
        slope = frame.apply(lambda e: np.polyfit(x, e.values, 1)[0], axis=1)
    else:
        slope = pd.Series(dtype=float)
    rows.append(row("C1-scale", f"{strongest}: change of C1 per doubling of the training set "
                                f"({', '.join(f'{n:,}' for n in SCALE_SIZES.values())} images)", slope, NO_NUMBER))
    return rows


def threat_free_claims(runs: pd.DataFrame, bnstats: pd.DataFrame) -> pd.DataFrame:
    """The claims about clean accuracy (C2b, C7a) and BN statistics (C9a, C9b), which no threat model changes."""
    acc = lambda setting, **kw: accuracy(runs, setting, arch="small_resnet8", steps=0, **kw)
    bnstats = bnstats[bnstats["sweep"] == "main"] if not bnstats.empty else bnstats
    to_running, between = _variance_gap(bnstats, "adv-clean0") if not bnstats.empty else (pd.Series(dtype=float),) * 2
    fx = paper_effects()
    rows = [
        _row("C2b", "clean accuracy: MBN_clean minus standard training (near: within 2 points)",
             paired(acc("adv-clean100-mbn", branch="clean"), acc("standard")), fx["C2b"], near=True,
             threat_model="clean"),
        _row("C7a", "clean accuracy: BN-only finetuning on clean images minus before (100% adv + 0% clean filters)",
             paired(acc("ft-clean"), acc("adv-clean0")), fx["C7a"], threat_model="clean"),
        _row("C9a", "MBN running variance: mean log2(adv / clean) over the sampled channels (x100)",
             _bn_ratio(bnstats) * 100 if not bnstats.empty else pd.Series(dtype=float),
             (math.nan, "adversarial larger (Figure 5, no number)"), threat_model="BN statistics"),
        _row("C9b", "100% adv + 0% clean: mean |batch - running| variance minus |batch1 - batch2| / sqrt(2) "
                    "(% of running; 0 under sampling noise alone)", paired(to_running, between),
             (math.nan, "batch variance differs from running (Figure 6, no number)"), threat_model="BN statistics"),
    ]
    return pd.DataFrame(rows)


def all_claims(runs: pd.DataFrame, bnstats: pd.DataFrame) -> pd.DataFrame:
    """The claims table: every robustness claim under each threat model the runs were evaluated with, then the
    threat-free claims."""
    present = set(attack_of(runs)) if not runs.empty else {"pgd"}
    tables = [claims(runs, bnstats, name) for name, attack in THREAT_MODELS.items() if attack in present]
    return pd.concat([*tables, threat_free_claims(runs, bnstats)], ignore_index=True)


LONGER_CLAIMS = {"C1": (("adv-clean0", "-"), ("adv-clean100", "-")),
                 "C2a": (("adv-clean100-mbn", "adv"), ("adv-clean100", "-")),
                 "C3": (("adv-clean100-gn", "-"), ("adv-clean100", "-"))}  # claim -> (minuend, subtrahend)


def longer_training(runs: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """The validity check on training length (``longer.yaml``: the pilot seed trains the C1, C2a and C3 points at
    8 and at 16 epochs): each claim's effect at both lengths under each threat model, and whether the 16-epoch
    effect lies inside the study's interval for the claim (``table``: :func:`all_claims`); where it does not, the
    verdict depends on training length (the pre-registered rule). ``within_8`` says whether the 8-epoch effect lies
    inside too: where it does not either, the pilot seed itself sits outside the interval, which the rule cannot
    tell from a training-length effect. Empty until the longer runs are exported."""
    rows = []
    longer = runs[runs["sweep"] == "longer"] if not runs.empty else runs
    for threat_model, attack in THREAT_MODELS.items():
        for claim, ((a, a_branch), (b, b_branch)) in LONGER_CLAIMS.items():
            effect = {}
            for epochs in (8, 16):
                one = lambda setting, branch: accuracy(longer, f"{setting}-epochs{epochs}", branch=branch,
                                                       attack=attack)
                difference = paired(one(a, a_branch), one(b, b_branch))
                if len(difference):
                    effect[epochs] = float(difference.iloc[0])
            if len(effect) < 2:
                continue
            main_row = table[(table["claim"] == claim) & (table["threat_model"] == threat_model)]
            low, high = (main_row[["low", "high"]].iloc[0] if len(main_row) else (math.nan, math.nan))
            inside = lambda value: bool(low <= value <= high) if not math.isnan(low) else None
            rows.append(dict(claim=claim, threat_model=threat_model, effect_8=effect[8], effect_16=effect[16],
                             change=effect[16] - effect[8], study_low=low, study_high=high,
                             within=inside(effect[16]), within_8=inside(effect[8])))
    return pd.DataFrame(rows, columns=["claim", "threat_model", "effect_8", "effect_16", "change", "study_low",
                                       "study_high", "within", "within_8"])


def settings_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% interval over seeds of the clean accuracy, the strongest targeted PGD and (where evaluated)
    AutoAttack for every setting and branch."""
    rows = []
    runs = runs.assign(attack=attack_of(runs))
    for (sweep, setting, arch, branch), group in runs.groupby(["sweep", "setting", "arch", "branch"]):
        for attack in ("clean", "pgd", "autoattack"):
            chosen = group[group["attack"] == attack]
            if chosen.empty:
                continue
            steps = chosen["steps"].max()
            mean, low, high = t_interval(chosen[chosen["steps"] == steps].groupby("seed")["accuracy"].mean())
            label = {"clean": "clean", "pgd": f"PGD-{steps}", "autoattack": "AutoAttack"}[attack]
            rows.append(dict(sweep=sweep, setting=setting, arch=arch, branch=branch, metric=label, steps=steps,
                             mean=mean, low=low, high=high, seeds=chosen["seed"].nunique()))
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
    rows = runs[runs["sweep"] == "main"] if not runs.empty else runs
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for setting, branch, label in CURVE_SETTINGS:
        curve = rows[(rows["setting"] == setting) & (rows["branch"] == branch) & (attack_of(rows) == "pgd")]
        if curve.empty:
            continue
        points = [(steps, *t_interval(accuracy(rows, setting, branch=branch, steps=steps, arch="small_resnet8")))
                  for steps in sorted(curve["steps"].unique())]
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


def _claim_points(ax: plt.Axes, table: pd.DataFrame) -> None:
    """Each row's effect and 95% interval in the paper's predicted direction, its verdict at the right."""
    for i, r in enumerate(table.itertuples()):
        if r.seeds:
            low, high = sorted((r.low * r.direction, r.high * r.direction))
            xerr = None if np.isnan(low) else [[r.mean * r.direction - low], [high - r.mean * r.direction]]
            ax.errorbar(r.mean * r.direction, i, xerr=xerr, fmt="o",
                        color=VERDICT_COLORS.get(r.verdict, "tab:gray"))
        early = f" (n={r.seeds}, preliminary)" if r.preliminary else ""
        ax.text(1.02, i, r.verdict + early, transform=ax.get_yaxis_transform(), va="center", fontsize=7)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(table)), [f"{r.claim}{' (sign flipped)' if r.direction < 0 else ''}, {r.threat_model}"
                                      for r in table.itertuples()], fontsize=7)
    ax.set_ylim(len(table) - 0.5, -0.5)


def plot_claims(table: pd.DataFrame, folder: str | Path | None = None) -> plt.Figure:
    """Each claim's effect with its 95% interval, in the paper's predicted direction (C7b flipped): accuracy
    claims in percentage points on one axis, the BN-statistics claims (C9a, C9b) on their own."""
    if "threat_model" not in table:
        table = table.assign(threat_model="targeted PGD")
    bn = table["threat_model"] == "BN statistics"
    parts = [(table[~bn], "accuracy effect in the paper's predicted direction (percentage points)"),
             (table[bn], "C9a: mean log2(adv / clean) running variance x 100;\n"
                         "C9b: |batch - running| minus |batch1 - batch2| / sqrt(2), % of running")]
    parts = [(rows, label) for rows, label in parts if len(rows)]
    fig, axes = plt.subplots(len(parts), 1, figsize=(6.5, 0.3 * len(table) + 1.6), squeeze=False,
                             gridspec_kw={"height_ratios": [max(len(rows), 1) for rows, _ in parts]})
    for ax, (rows, label) in zip(axes[:, 0], parts):
        _claim_points(ax, rows)
        ax.set_xlabel(label, fontsize=8)
    axes[0, 0].set_title("The paper's claims on Fashion-MNIST: effect and 95% interval over seeds", fontsize=9)
    _save(fig, "study_claims", folder)
    return fig


def plot_scale(table: pd.DataFrame, folder: str | Path | None = None) -> plt.Figure:
    """C1 (100% adv + 0% clean minus 100% adv + 100% clean) against the training-set size, per threat model,
    with 95% intervals over seeds: the paper's Section 4.2 expects it to grow with the data."""
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    names = {f"C1@{n // 1024}k" if suffix else "C1": n for suffix, n in SCALE_SIZES.items()}
    for threat_model, marker in (("targeted PGD", "o-"), ("AutoAttack", "s--")):
        rows = table[(table["threat_model"] == threat_model) & table["claim"].isin(names) & (table["seeds"] > 0)]
        if rows.empty:
            continue
        rows = rows.assign(images=rows["claim"].map(names)).sort_values("images")
        err = np.nan_to_num([rows["mean"] - rows["low"], rows["high"] - rows["mean"]])
        ax.errorbar(rows["images"], rows["mean"], yerr=err, fmt=marker, capsize=3,
                    label=f"{threat_model} (n={'-'.join(map(str, sorted({rows['seeds'].min(), rows['seeds'].max()})))} "
                          "seeds)")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(SCALE_SIZES.values()), [f"{n:,}" for n in SCALE_SIZES.values()])
    ax.set_xlabel("training images (8 epochs each)")
    ax.set_ylabel("C1: 0% minus 100% clean (points)")
    ax.set_title("The clean-image effect against the data set's size", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no scale-axis runs yet", transform=ax.transAxes, ha="center", fontsize=8)
    _save(fig, "study_scale", folder)
    return fig


DEPTH_CURVES = (("adv-clean0", None, "100% adv + 0% clean, strongest PGD"), ("standard", 0, "standard training, clean"))


def plot_depth(runs: pd.DataFrame, folder: str | Path | None = None) -> plt.Figure:
    """Depth (C8). Left: strongest-attack accuracy of adversarial training and clean accuracy of standard
    training per depth, mean and 95% interval over seeds. Right: each one's gain over small_resnet8, paired per
    seed (the comparison C8 makes), with its 95% interval. Every point is labelled with its number of seeds."""
    depth_of = paper.depth_of
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4), layout="constrained")
    rows = runs[runs["sweep"].isin(["main", "depth"])] if not runs.empty else runs
    for curve, (setting, steps, label) in enumerate(DEPTH_CURVES):
        per_depth = {depth_of(arch): accuracy(rows, setting, steps=steps, arch=arch)
                     for arch in sorted(rows["arch"].unique(), key=depth_of)} if not rows.empty else {}
        per_depth = {d: v for d, v in per_depth.items() if not v.empty}
        base = per_depth.get(8, pd.Series(dtype=float))
        for ax, values in ((axes[0], per_depth),
                           (axes[1], {d: paired(v, base) for d, v in per_depth.items() if not base.empty})):
            points = [(d, *t_interval(v), len(v)) for d, v in values.items() if not v.empty]
            if not points:
                continue
            depth, mean, low, high, seeds = (np.array(v) for v in zip(*points))
            err = None if np.isnan(low).all() else np.nan_to_num([mean - low, high - mean])
            line = ax.errorbar(depth, mean, yerr=err, fmt="o-", capsize=3, label=label)
            for d, m, n in zip(depth, mean, seeds):  # a point of one seed has no bar: say how many seeds each has
                ax.annotate(f"n={n}", (d, m), xytext=(4, 4 - 12 * curve), textcoords="offset points", fontsize=6,
                            color=line.lines[0].get_color())
    axes[0].set_ylabel("accuracy (%)")
    axes[0].set_title("Depth: mean and 95% interval over seeds", fontsize=9)
    axes[1].axhline(0, color="black", linewidth=0.8)
    axes[1].set_ylabel("gain over small_resnet8 (points)")
    axes[1].set_title("C8: gain over depth 8, paired per seed, 95% interval", fontsize=9)
    for ax in axes:
        ax.set_xlabel("depth (small ResNet, 6n+2)")
        ax.margins(x=0.1)  # room for the deepest point's seed label inside the frame
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # one legend under both panels, where it cannot cover an interval
        fig.legend(handles, labels, loc="outside lower center", ncol=len(handles), fontsize=7, frameon=False)
    save(fig, "study_depth", folder)
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
    """The claims table as Markdown: claim, threat model, what is measured, the kit's effect with its interval,
    the paper's, the verdict (with, from 5 seeds on, whether an interval that excludes zero still does at the
    sequential level: :func:`sequential_level`) and whether the paper's effect size is ruled out."""
    columns = [c for c in ("claim", "threat_model", "measured", "kit", "paper", "paper_pgd5", "verdict", "sequential",
                           "paper_size")
               if c in table]
    return table[columns].to_markdown(index=False)


def undecided(table: pd.DataFrame) -> pd.DataFrame:
    """The claims the seeds have not yet decided (the stopping rule of the decisive study): claim, threat model,
    seeds so far and the interval's half-width."""
    rows = table[~table["decided"].astype(bool)]
    return rows.assign(half_width=(rows["high"] - rows["low"]) / 2)[["claim", "threat_model", "seeds", "half_width"]]


# ---------------------------------------------------------------- the README's study section

CLAIM_TITLES = {  # what the paper finds, in a few words (README table)
    "C1": "clean images in training cost robustness (it says: perhaps not on small data sets or at small eps)",
    "C1-scale": "... and more so with more data (per doubling)",
    "C2a": "Mixture BN: MBN_adv beats BN",
    "C2c": "MBN_adv is as robust as 100% adv + 0% clean",
    "C2b": "MBN_clean keeps the clean accuracy",
    "C3": "GroupNorm beats BN (kit: 32 groups, 1-2 channels each, nearly InstanceNorm)",
    "C3b": "GroupNorm is as robust as 100% adv + 0% clean (32 groups)",
    "C3-g4": "GroupNorm beats BN (4 groups, 4-16 channels each; added)",
    "C3b-g4": "GroupNorm is as robust as 100% adv + 0% clean (4 groups; added)",
    "C4": "BN running statistics in the last epoch help",
    "C5": "with clean images, accuracy falls further with PGD-N",
    "C6": "a weaker training attack hurts mixed training more",
    "C7a": "BN-only finetuning on clean images regains clean accuracy",
    "C7b": "adversarial BNs on clean filters: far below adversarial training",
    "C7c": "... and no robustness gained",
    "C8": "depth helps adversarial more than standard training",
    "C9a": "adversarial images give larger BN variances",
    "C9b": "batch variances differ from running ones beyond noise",
}
README_BEGIN = ("<!-- study:begin (written by advkit study --readme README.md from data/results/decisive; "
                "tests/test_study.py checks it) -->")
README_END = "<!-- study:end -->"


def readme_block(path: str | Path) -> str:
    """The text between the study markers of ``path``; ValueError naming a missing marker."""
    text = Path(path).read_text()
    for marker in (README_BEGIN, README_END):
        if marker not in text:
            raise ValueError(f"{path} has no line {marker!r}")
    return text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip("\n")


def write_readme_section(path: str | Path, section: str) -> None:
    """Replace the text between the study markers of ``path`` with ``section``."""
    readme_block(path)
    text = Path(path).read_text()
    head, rest = text.split(README_BEGIN, 1)
    Path(path).write_text(f"{head}{README_BEGIN}\n{section}\n{README_END}{rest.split(README_END, 1)[1]}")


def _verdict_cell(row: pd.Series, length_dependent: dict | None = None) -> str:
    """``length_dependent``: (claim, threat model) -> whether the pilot's 8-epoch effect lay inside the interval."""
    length_dependent = length_dependent or {}
    ruled_out = ", the paper's effect ruled out" if "ruled out" in row["paper_size"] else ""
    key = (row["claim"], row["threat_model"])
    depends = "" if key not in length_dependent else ", depends on training length" + (
        "" if length_dependent[key] else " (the pilot seed lies outside at 8 epochs too)")
    early = f" (preliminary: {row['seeds']} seeds, the rule applies from {LOOKS[0]})" if row["preliminary"] else ""
    return f"{row['verdict']}{early}{ruled_out}{depends}"


def _longer_text(check: pd.DataFrame) -> str:
    if check.empty:
        return "Longer-training check (`longer.yaml`, pilot seed 101, 16 against 8 epochs): not run yet."

    def where(r) -> str:
        if r.within is None:
            return ""
        at_8 = "" if r.within else ", and at 8 epochs already" if not r.within_8 else ", inside at 8 epochs"
        return (f" (study [{r.study_low:+.2f}, {r.study_high:+.2f}]: "
                + ("inside" if r.within else "outside") + f" at 16 epochs{at_8})")

    parts = [f"{r.claim} {r.threat_model} {r.effect_8:+.2f} -> {r.effect_16:+.2f}{where(r)}"
             for r in check.itertuples()]
    both = check[(check["within"] == False) & (check["within_8"] == False)]  # noqa: E712 (None: no interval)
    caveat = "" if both.empty else (
        f" Where the pilot lies outside at 8 epochs as well ({', '.join(both['claim'] + ' ' + both['threat_model'])}),"
        " the pre-registered rule still says \"depends on training length\", but one seed's offset from the mean, not"
        " its training length, may put it there; as seeds narrow the intervals, such flags become likelier.")
    return ("Longer-training check (`longer.yaml`, pilot seed 101, not in the verdicts), effect at 8 -> 16 epochs"
            " (two decimals: the flags turn on the second): "
            + "; ".join(parts) + "." + caveat)


def _sequential_text(table: pd.DataFrame) -> str:
    """What looking after every seed does to the 95% intervals, and how many decided verdicts survive it."""
    looked = table[(table["seeds"] >= LOOKS[0]) & table["verdict"].isin(["holds", "reversed"]) & ~table["near"]]
    kept = int(looked["sequential"].str.startswith("excludes").sum())
    return (f"The stopping rule looks after each seed from {LOOKS[0]} to {LOOKS[-1]}: a claim without an effect "
            f"then excludes zero at some look in {sequential_error():.0%} of studies, not 5% (simulated); at the "
            f"per-look level {sequential_level():.1%}, which keeps that at 5%, "
            + (f"{kept} of the {len(looked)} intervals with {LOOKS[0]}+ seeds that exclude zero still do."
               if len(looked) else f"no interval has {LOOKS[0]} seeds yet."))


def gates_text(gates: pd.DataFrame) -> str:
    """The validity gates (``gates.csv``) in one sentence: each gated run's clean accuracy on the full test set
    with its weights, and how many fall below the gate."""
    g = gates.iloc[0]
    each = ", ".join(f"{r.run} **{r.clean_acc_full_test:.2f}%** (weights {r.weights})" for r in gates.itertuples())
    below = [r.run for r in gates.itertuples() if not r.clean_acc_full_test >= GATE]
    verdict = f"{len(below)} of {len(gates)} below it ({', '.join(below)})" if below else (
        "it is met" if len(gates) == 1 else f"all {len(gates)} meet it")
    return (f"Validity gate: standard training's clean accuracy on the full {int(g.images):,}-image test set "
            f"({g.precision}, code {str(g.code)[:7]}; gate >= {GATE:g}%): {each}; {verdict}.")


def _devices_text(runs: pd.DataFrame) -> str:
    """Which device trained which runs and seeds (GPU seeds are pooled with the CPU's: docs/study-design.md)."""
    if runs.empty or "device" not in runs:
        return ""
    kind = runs["device"].astype(str).str.split(":").str[0]
    groups = list(runs.groupby(kind))
    parts = []
    for name, g in groups:
        precision = f" ({', '.join(sorted(set(g['precision'].astype(str))))})" if "precision" in g else ""
        seeds = sorted(g["seed"].unique())
        n_runs = len(g[["sweep", "run"]].drop_duplicates())
        parts.append(f"{name}{precision} trained {'all ' if len(groups) == 1 else ''}{n_runs} runs "
                     f"(seed{'s' if len(seeds) > 1 else ''} {_seed_list(seeds)})")
    return "Devices: " + "; ".join(parts) + "."


def _seed_list(seeds: list) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    spans, start = [], None
    for i, seed in enumerate(seeds):
        start = seed if start is None else start
        if i + 1 == len(seeds) or seeds[i + 1] != seed + 1:
            spans.append(f"{start}" if start == seed else f"{start}-{seed}")
            start = None
    return ", ".join(spans)


def _mean_text(summary: pd.DataFrame, metric: str) -> str:
    row = summary[summary["metric"] == metric]
    if row.empty:
        return "not run yet"
    r = row.iloc[0]
    return f"{r['mean']:.1f}" + (f" [{r['low']:.1f}, {r['high']:.1f}]" if r["seeds"] > 1 else "")


def _readme_row(claim: str, title: str, by: dict, dependent: dict) -> str | None:
    """One claim's row of the README table: the kit's effect under each threat model, the paper's, verdicts."""
    pgd_row, aa_row = by.get((claim, "targeted PGD")), by.get((claim, "AutoAttack"))
    free = next((r for (c, t), r in by.items() if c == claim and t in ("clean", "BN statistics")), None)
    first = pgd_row if pgd_row is not None else free
    if first is None:
        return None
    paper_cell = f"{first['paper_effect']:+.1f}" if not math.isnan(first["paper_effect"]) else (
        "no number" if first["paper"] else "-")
    if not math.isnan(first.get("paper_pgd5", math.nan)):
        paper_cell += f" ({first['paper_pgd5']:+.1f})"
    if free is not None:
        cells = [f"{free['kit']}, {free['threat_model']}", "-", _verdict_cell(free, dependent)]
    else:
        # no AutoAttack row: a claim about the PGD-N curve (C5), which AutoAttack has no counterpart of
        cells = [pgd_row["kit"], aa_row["kit"] if aa_row is not None else "- (PGD-N only)",
                 _verdict_cell(pgd_row, dependent) + ("; " + _verdict_cell(aa_row, dependent)
                                                      if aa_row is not None and aa_row["seeds"] + pgd_row["seeds"] > 0
                                                      else "")]
    return f"| {claim} | {title} | {cells[0]} | {cells[1]} | {paper_cell} | {cells[2]} |"


README_HEADER = ["| claim | the paper finds | kit, targeted PGD | kit, AutoAttack | paper (PGD-5 training) | "
                 "verdict (PGD; AutoAttack) |", "| --- | --- | --- | --- | --- | --- |"]
README_UNITS = ("Effects in accuracy points (C9a: mean log2 variance ratio x 100; C9b: % of the running variance; "
                "the rule's +-2 margin is read in each row's own units), "
                "paired per seed, mean [95% t interval] (n seeds); the paper's effects are its ImageNet numbers "
                "(robustness under PGD-2000) from `data/paper`, trained with PGD-30 (step 1), the verdicts' reference; "
                "in parentheses where the paper also trains with PGD-5 (step 4): the kit's training attack, the "
                "paper's weakest (C6's regime).")


def readme_section(tables_dir: str | Path = TABLES_DIR) -> str:
    """The README's study section, every number from the committed tables in ``tables_dir``: the validity
    gates, what 100% adv + 0% clean reaches, and each claim under targeted PGD and AutoAttack beside the
    paper's effect with the verdict of the pre-registered rule."""
    tables_dir = Path(tables_dir)
    runs, bnstats = load(tables_dir)
    table = all_claims(runs, bnstats)
    by = {(r.claim, r.threat_model): r for _, r in table.iterrows()}
    check = longer_training(runs, table)
    dependent = {(r.claim, r.threat_model): r.within_8 for r in check.itertuples() if r.within is False}
    gates = pd.read_csv(tables_dir / "gates.csv") if (tables_dir / "gates.csv").exists() else pd.DataFrame()
    summary = settings_summary(runs) if not runs.empty else pd.DataFrame(columns=["setting", "metric"])
    base = summary[(summary["setting"] == "adv-clean0") & (summary["arch"] == "small_resnet8")] \
        if not summary.empty else summary
    pgd = base.loc[base["metric"].str.startswith("PGD"), "metric"]
    strongest = pgd.iloc[0] if len(pgd) else "PGD"
    intro = [gates_text(gates)] if len(gates) else []
    intro.append(f"100% adv + 0% clean at eps 16 on the fixed evaluation set "
                 f"(n={int(base['seeds'].max()) if not base.empty else 0} seeds, mean [95% interval]): clean "
                 f"{_mean_text(base, 'clean')}, targeted {strongest} {_mean_text(base, strongest)}, AutoAttack "
                 f"{_mean_text(base, 'AutoAttack')}.")
    rows = [_readme_row(claim, title, by, dependent) for claim, title in CLAIM_TITLES.items()]
    with_runs = table[table["seeds"] > 0]
    closing = (f"{README_UNITS} Undecided so far: {len(undecided(with_runs))} of {len(with_runs)} verdicts with runs "
               f"(each interval is 95% on its own: were no claim real, about {0.05 * len(with_runs):.1f} of these "
               f"{len(with_runs)} would still exclude zero by chance). The paper's own exception to C1 (Section "
               "4.2: small data sets, small eps) is what the scale rows test: C1 at 6,144, 12,288 and 24,576 images. "
               "Every row with its interval bounds: "
               f"[figures/study_claims.md](figures/study_claims.md). {_sequential_text(table)} "
               f"{_longer_text(check)} {_devices_text(runs)}")
    return "\n".join([" ".join(intro), "", *README_HEADER, *[r for r in rows if r], "", closing, "",
                      "![claims](figures/study_claims.png) ![C1 against the data set's size](figures/study_scale.png) "
                      "![C8: depth, gains paired per seed](figures/study_depth.png)"])
