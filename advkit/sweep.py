"""Sweeps: expand a YAML grid into experiment-notebook runs, one papermill execution per point.

A sweep file::

    notebook: notebooks/experiment.ipynb   # optional (this is the default)
    runs_root: runs/demo                   # where the run folders go (relative: to the repository root)
    base: {preset: demo}                   # parameters of every point
    grid: {seed: [0, 1, 2]}                # cartesian product over these
    points:                                # named settings, each crossed with the grid
      - {name: standard, adv_ratio: 0, clean_ratio: 1}
      - {name: adv-only, clean_ratio: 0}
      - {name: ft, finetune_bn: true, init_checkpoint: "run:adv-only", adv_ratio: 0, clean_ratio: 1}

``init_checkpoint: run:<name>`` starts from an earlier point of the same sweep (with a grid, the earlier
point with the same grid values).

Every point is validated before anything runs. A point whose ``results.csv`` exists is skipped; one with a
checkpoint but no ``results.csv`` (killed, pre-empted) is resumed; a failing point does not stop the sweep;
failures are listed at the end with the failing notebook's path.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import Config, make_config, project_root
from .train import continuing
from .validate import check_range

SWEEP_KEYS = ("notebook", "runs_root", "base", "grid", "points")


@dataclass
class Point:
    config: Config
    notebook: Path
    source: str | None = None  # the earlier point this one starts from (init_checkpoint: run:<name>)

    @property
    def output(self) -> Path:
        return self.config.run_dir / "experiment.ipynb"


def _value_tag(value: Any) -> str:
    return str(value).replace(" ", "").replace("/", "_")


def load_sweep(path: str | Path) -> list[Point]:
    """Read and validate a sweep file into its points (nothing runs)."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"sweep file {path} is not valid YAML{where}: {exc}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"sweep file {path} must hold a mapping with keys {list(SWEEP_KEYS)}")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ValueError(f"sweep file {path}: unknown key(s) {unknown}; accepted keys: {list(SWEEP_KEYS)}")
    notebook = Path(spec.get("notebook", "notebooks/experiment.ipynb"))
    notebook = notebook if notebook.is_absolute() else project_root() / notebook
    base = dict(spec.get("base") or {})
    if "runs_root" in spec:
        base["runs_root"] = spec["runs_root"]
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ValueError(f"sweep file {path}: grid must map parameter names to non-empty lists, got {grid!r}")
    named = spec.get("points") or [{}]
    points = []
    for point in named:
        point = dict(point)
        label = point.pop("name", None)
        for combo in itertools.product(*grid.values()):
            values = base | point | dict(zip(grid, combo))
            preset = values.pop("preset", None)
            grid_tags = [f"{k}{_value_tag(v)}" for k, v in zip(grid, combo)]
            values.setdefault("name", "-".join(([label] if label else []) + grid_tags) or "run")
            start = values.get("init_checkpoint")
            from_sweep = isinstance(start, str) and start.startswith("run:")
            if from_sweep:
                earlier = {p.config.name: p.config.run_dir for p in points}
                candidates = ["-".join([start[4:], *grid_tags]), start[4:]]  # same grid values first
                wanted = next((c for c in candidates if c in earlier), None)
                if wanted is None:
                    raise ValueError(f"sweep file {path}, point {values['name']!r}: init_checkpoint={start!r} "
                                     f"names no earlier point; earlier points: {sorted(earlier)}")
                values["init_checkpoint"] = str(earlier[wanted])
            try:
                cfg = make_config(preset, check_paths=not from_sweep, **values)
            except ValueError as exc:
                raise ValueError(f"sweep file {path}, point {values['name']!r}: {exc}") from None
            points.append(Point(cfg, notebook, wanted if from_sweep else None))
    names = [p.config.name for p in points]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"sweep file {path}: several points share the run name(s) {duplicates}")
    return points


def shard_points(points: list[Point], shard: int, shards: int) -> list[Point]:
    """The points that shard ``shard`` of ``shards`` runs: every ``shards``-th point, each finetuning point in
    the shard of the point it starts from (which runs earlier in the same shard). Shards share nothing else,
    so they can run at once (one per GPU, or one per CPU core with one thread each)."""
    check_range("shards", shards, 1, integer=True)
    check_range("shard", shard, 0, shards - 1, integer=True)
    owner: dict[str, int] = {}
    for index, point in enumerate(points):
        owner[point.config.name] = owner[point.source] if point.source else index % shards
    return [p for p in points if owner[p.config.name] == shard]


def run_sweep(path: str | Path, kernel: str | None = None, progress: bool = True, shard: int = 0,
              shards: int = 1) -> dict[str, list]:
    """Run every unfinished point (of one shard) through papermill; return {'done', 'skipped', 'failed'} lists."""
    import papermill

    outcome: dict[str, list] = {"done": [], "skipped": [], "failed": []}
    for point in shard_points(load_sweep(path), shard, shards):
        cfg = point.config
        if (cfg.run_dir / "results.csv").exists():
            outcome["skipped"].append(cfg.name)
            print(f"[sweep] skip {cfg.name}: {cfg.run_dir / 'results.csv'} exists", flush=True)
            continue
        cfg = continuing(cfg)  # resume from its checkpoint; a folder without one starts again
        parameters = cfg.to_dict()
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        print(f"[sweep] run {cfg.name} ({cfg.strategy}, norm={cfg.norm}){' resuming' if cfg.resume else ''}",
              flush=True)
        try:
            papermill.execute_notebook(str(point.notebook), str(point.output), parameters=parameters,
                                       kernel_name=kernel, progress_bar=progress, cwd=str(project_root()))
            outcome["done"].append(cfg.name)
        except Exception as exc:  # carry on; report at the end
            outcome["failed"].append((cfg.name, str(point.output), f"{type(exc).__name__}: {str(exc)[-300:]}"))
    for name, notebook, error in outcome["failed"]:
        print(f"[sweep] FAILED {name}: see {notebook}\n    {error}", flush=True)
    print(f"[sweep] {len(outcome['done'])} done, {len(outcome['skipped'])} skipped, "
          f"{len(outcome['failed'])} failed", flush=True)
    return outcome
