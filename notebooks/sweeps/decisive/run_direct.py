"""Run sweep files' points as ``python -m advkit.run`` processes, several at once, without papermill or Jupyter: for
a GPU machine that has neither (the decisive study's GPU sessions, docs/study-design.md). It uses only the kit's
public API of the code it runs with (``PYTHONPATH``: the study's frozen commit), so it travels beside that code.

    python run_direct.py FILE [FILE ...] --jobs 12 --deadline 360 --stop 540 --logs DIR [--recorded RUNS_CSV]

Points run in the files' order. A finished point is skipped, and so is one that ``--recorded`` (the study's
committed runs.csv: its sweep and run columns) holds, whose run folder a new machine no longer has; a point that starts from another point's run
(``init_checkpoint: run:NAME``) waits until that run has finished and is dropped if it fails. No point starts
after ``--deadline`` seconds; the ones still running at ``--stop`` seconds get SIGTERM (the kit saves a checkpoint
and exits 143) and are reported as stopped, never as done, unless the run's folder says it finished (its work
ended between the last look and the signal). TF32 is switched off in every run, so that a GPU's fp32
training and evaluation are fp32 (the sweep files switch bf16 off). Exit status 1 if a point failed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from advkit import sweep
from advkit.rundir import RunDir

CHILD = ("import sys, torch; torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False; "
         "from advkit.run import main; raise SystemExit(main(['--resume', sys.argv[1]]))")


def recorded_runs(table: Path) -> set[tuple[str, str]]:
    """The (sweep, run) pairs of a study table (runs.csv); a table without those columns is refused."""
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and not {"sweep", "run"} <= set(rows[0]):
        raise ValueError(f"--recorded={str(table)!r} is not accepted: it has no sweep and run columns")
    return {(row["sweep"], row["run"]) for row in rows}


def run_points(files: list[str], jobs: int, deadline: float, stop: float, logs: Path,
               recorded: set[tuple[str, str]] = frozenset()) -> dict[str, list[str]]:
    """Run the points of ``files`` that are neither finished nor ``recorded`` ((sweep folder, run) pairs) nor
    held by another process (another driver's run: skipped, its log untouched), ``jobs`` at a time, starting
    none after ``deadline`` seconds and stopping those still running at ``stop``."""
    points = [p for f in files for p in sweep.load_sweep(f)]
    logs.mkdir(parents=True, exist_ok=True)
    waiting = [p for p in points if not sweep.finished(p)
               and (Path(p.config.run_dir).parent.name, p.config.name) not in recorded]
    outcome: dict[str, list[str]] = {"done": [], "skipped": [p.config.name for p in points if p not in waiting],
                                     "failed": [], "stopped": [], "not started": []}
    planned = {str(p.config.run_dir) for p in waiting}
    running: dict[str, tuple[subprocess.Popen, object]] = {}
    start = time.monotonic()
    failed_dirs: set[str] = set()
    while waiting or running:
        for name, (process, point) in list(running.items()):
            if process.poll() is not None:
                del running[name]
                ok = process.returncode == 0 and RunDir(point.config.run_dir).finished()
                outcome["done" if ok else "failed"].append(name)
                if not ok:
                    failed_dirs.add(str(point.config.run_dir))
                print(f"[direct] {name}: {'done' if ok else f'failed (exit {process.returncode})'} at "
                      f"{time.monotonic() - start:.0f} s", flush=True)
        if time.monotonic() - start >= stop or (time.monotonic() - start >= deadline and not running):
            break
        for point in list(waiting) if time.monotonic() - start < deadline else []:
            if len(running) >= jobs:
                break
            source = point.config.init_checkpoint
            if source and str(source) in failed_dirs:
                waiting.remove(point)
                outcome["failed"].append(f"{point.config.name} (its starting run failed)")
                continue
            busy = {str(q.config.run_dir) for _, q in running.values()}
            if source and str(source) in planned and (str(source) in busy or not RunDir(source).finished()):
                continue  # its starting run has not finished yet
            waiting.remove(point)
            holder = RunDir(point.config.run_dir).locked_by_other()
            if holder:  # another driver runs it: leave its log and folder alone
                outcome["skipped"].append(f"{point.config.name} (in use by {holder})")
                print(f"[direct] {point.config.name}: skipped, in use by {holder}", flush=True)
                continue
            config_file = logs / f"{point.config.name}.json"
            values = dataclasses.replace(point.config, resume="auto", overwrite=False).to_dict()
            config_file.write_text(json.dumps(values, default=str))
            with open(logs / f"{point.config.name}.log", "w") as log:  # the child keeps its own copy
                running[point.config.name] = (subprocess.Popen([sys.executable, "-c", CHILD, str(config_file)],
                                                               stdout=log, stderr=subprocess.STDOUT), point)
            print(f"[direct] {point.config.name}: started at {time.monotonic() - start:.0f} s", flush=True)
        time.sleep(1)
    for name, (process, _) in running.items():  # --stop: each saves its checkpoint and exits
        process.send_signal(signal.SIGTERM)
    for name, (process, point) in running.items():
        process.wait()  # a run that finished its work just before the signal (exiting) has a finished folder
        state = "done" if RunDir(point.config.run_dir).finished() else "stopped"
        outcome[state].append(name)
        print(f"[direct] {name}: {state} at stop (exit {process.returncode})", flush=True)
    outcome["not started"] = [p.config.name for p in waiting]
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="sweep files, run in this order")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--deadline", type=float, default=float("inf"), help="seconds until no run starts")
    parser.add_argument("--stop", type=float, default=None,
                        help="seconds at which running ones are stopped (default: the deadline)")
    parser.add_argument("--logs", type=Path, default=Path("runs/direct-logs"), help="each run's log and config")
    parser.add_argument("--recorded", type=Path, default=None, metavar="RUNS_CSV",
                        help="skip the points this study table holds (their folders may be gone)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs={args.jobs} is not accepted: give 1 or more")
    for file in args.files:
        sweep.load_sweep(file)  # every file checked before anything runs
    stop = args.deadline if args.stop is None else args.stop
    if stop < args.deadline:
        parser.error(f"--stop={stop:g} is not accepted: give at least --deadline={args.deadline:g}")
    try:
        recorded = recorded_runs(args.recorded) if args.recorded is not None else set()
    except OSError as exc:
        parser.error(f"--recorded={str(args.recorded)!r} is not accepted: {exc.strerror}")
    except ValueError as exc:
        parser.error(str(exc))
    outcome = run_points(args.files, args.jobs, args.deadline, stop, args.logs, recorded)
    for state, names in outcome.items():
        shown = ", ".join(names[:12]) + (f", ... ({len(names) - 12} more)" if len(names) > 12 else "")
        print(f"[direct] {state}: {len(names)}" + (f" ({shown})" if names else ""), flush=True)
    return 1 if outcome["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
