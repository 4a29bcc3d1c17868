"""``advkit sweep FILE --plan``: what a sweep has cost so far and what is left, in core-hours, from the runs it
has finished (issue 15: measure the cost per run, print the plan before spending the budget)."""

from __future__ import annotations

import os
import re
import statistics
from pathlib import Path

from .rundir import DamagedFile, RunDir
from .sweep import Point, usable_cores


def point_key(name: str) -> str:
    """A run's point: its name without the ``seed<k>`` tag of a grid (seeds of one point cost alike); a sweep of
    seeds alone (runs ``seed0``, ``seed1``, ...) is one point, ``''``."""
    return re.sub(r"(?:^|-)seed\d+(?=-|$)", "", name)


PAUSED = 3.0  # an epoch over 3x the run's median epoch was paused or stopped: it counts as the median


def measured_minutes(run: RunDir) -> float | None:
    """Core-minutes a finished run took: its epochs' training seconds (metrics.jsonl, which survive a resume; an
    epoch over ``PAUSED`` x the median counts as the median) plus its evaluation (from the last checkpoint, or
    from the start of the attempt that evaluated it again, environment.json's, to results.csv), times its threads
    and processes. These are wall times of the run's own processes: on a shared
    machine, or when an evaluation was paused, they overstate the work. None for a run that is not finished."""
    if not run.finished() or not run.last_checkpoint.exists():
        return None
    try:
        metrics = run.metrics()
        threads = run.read_json(run.environment_file).get("torch_threads", 1)
    except (OSError, ValueError, DamagedFile):
        return None
    seconds = [record.get("seconds", 0.0) for record in metrics]
    typical = statistics.median(seconds) if seconds else 0.0
    training = sum(typical if s > PAUSED * typical else s for s in seconds)
    processes = max((record.get("processes", 1) for record in metrics), default=1)
    evaluation_began = max(run.last_checkpoint.stat().st_mtime, run.environment_file.stat().st_mtime)
    evaluation = max(0.0, run.results_file.stat().st_mtime - evaluation_began)
    return (training + evaluation) * threads * processes / 60


def _beside(points: list[Point], keys: set[str]) -> dict[str, list[float]]:
    """Core-minutes of the finished runs in the points' folders that are not among the points but share one of
    ``keys``: another sweep's seeds of the same point in the same folder (more-seeds.yaml beside main.yaml)."""
    own = {Path(point.config.run_dir).resolve() for point in points}
    found: dict[str, list[float]] = {}
    for parent in sorted({folder.parent for folder in own}):
        for folder in sorted(parent.iterdir()) if parent.is_dir() else []:
            key = point_key(folder.name)
            if key in keys and folder not in own and folder.is_dir():
                minutes = measured_minutes(RunDir(folder))
                if minutes is not None:
                    found.setdefault(key, []).append(minutes)
    return found


def plan(points: list[Point]) -> list[dict]:
    """One row per point: run, state, core-minutes and where they come from ('measured' for a finished run,
    'median of k' finished runs of the same point for the others, else 'median of k beside it': finished runs
    of that point in the same folder from another sweep; None where no run of the point finished)."""
    rows, measured = [], {}
    for point in points:
        run = RunDir(point.config.run_dir)
        minutes = measured_minutes(run)
        rows.append(dict(run=point.config.name, state=run.state() if run.exists() else "not started",
                         minutes=minutes, source="measured" if minutes is not None else None))
        if minutes is not None:
            measured.setdefault(point_key(point.config.name), []).append(minutes)
    unmeasured = {point_key(row["run"]) for row in rows if row["minutes"] is None} - set(measured)
    beside = _beside(points, unmeasured) if unmeasured else {}
    for row in rows:
        if row["minutes"] is None:
            key = point_key(row["run"])
            known, where = (measured[key], "") if key in measured else (beside.get(key, []), " beside it")
            if known:
                row["minutes"], row["source"] = statistics.median(known), f"median of {len(known)}{where}"
    return rows


def print_plan(rows: list[dict], cores: int | None = None) -> None:
    """The plan as a table and its totals: core-hours spent, core-hours left (estimated) and about how many
    wall-hours that is on ``cores`` cores (default: this machine's), and the points no estimate covers."""
    cores = cores or usable_cores()
    width = max((len(r["run"]) for r in rows), default=3)
    print(f"{'run':<{width}}  {'state':<11}  core-min  from")
    for r in rows:
        minutes = "?" if r["minutes"] is None else f"{r['minutes']:.0f}"
        print(f"{r['run']:<{width}}  {r['state']:<11}  {minutes:>8}  {r['source'] or 'no finished run of its point'}")
    done = [r for r in rows if r["source"] == "measured"]
    left = [r for r in rows if r["source"] != "measured"]
    unknown = sorted({point_key(r["run"]) for r in left if r["minutes"] is None})
    spent = sum(r["minutes"] for r in done) / 60
    remaining = sum(r["minutes"] for r in left if r["minutes"] is not None) / 60
    print(f"finished: {len(done)} runs, {spent:.1f} core-hours measured")
    print(f"left: {len(left)} runs, about {remaining:.1f} core-hours (about {remaining / cores:.1f} wall-hours "
          f"on {cores} cores)" + (f"; no estimate yet for {', '.join(unknown)}" if unknown else ""))


def run_plan(path: str | Path, points: list[Point]) -> int:
    """``advkit sweep FILE --plan``: print the plan of ``points``; runs nothing."""
    print(f"[sweep] plan of {path}")
    print_plan(plan(points))
    return 0
