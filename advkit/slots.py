"""A sweep over a machine's GPUs: ``advkit sweep FILE --gpus 0,1,2,3`` runs one point per slot at once, each in
its own process that sees only its device(s) (``CUDA_VISIBLE_DEVICES``), and starts the next point as one ends.

A slot is one entry of ``--gpus``: ``0,0,1,1`` gives two slots on each of two devices (small models are
launch-bound on a big GPU). A point with ``gpus: N`` takes N slots of distinct devices and launches torchrun inside
its process (the experiment notebook's own path). A finetuning point starts only after the point it starts from
finished successfully; if that point failed, it is reported failed, with the reason, and not run. A failing point
does not stop the others. Each slot process is ``advkit sweep FILE --point NAME``: the serial sweep's path (the
experiment notebook through papermill, :func:`advkit.sweep.run_points`), so a point's results do not depend on
how the sweep was scheduled. On a CPU the slot ids are passed all the same (the runs use the CPU), and each
process gets cores/slots threads.

:func:`schedule` is the scheduler; :mod:`advkit.slurm` uses it with submitit jobs in place of processes.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from .rundir import RunDir
from .sweep import Point, load_sweep, point_named, report, run_points, up_to_date, usable_cores
from .validate import check_range

# a started point's check: None while it runs, "" once it succeeded, else why it failed
Check = Callable[[], "str | None"]
# starts a batch of (point, its device ids) at once and returns one check per point, in the same order
Start = Callable[[list[tuple[Point, list[str]]]], list[Check]]


def parse_gpus(text: str) -> list[str]:
    """The slots of ``--gpus``: comma-separated device indices, one slot each (``0,0,1,1``: two per device).
    ValueError naming the option and the entry otherwise."""
    hint = "give comma-separated device indices, e.g. 0,1,2,3 (an index given twice runs two points on it: 0,0,1,1)"
    slots = [part.strip() for part in str(text).split(",")]
    for slot in slots:
        if not re.fullmatch(r"[0-9]+", slot):
            raise ValueError(f"--gpus={text!r} is not accepted: {slot!r} is no device index; {hint}")
    return [str(int(slot)) for slot in slots]


def visible_devices(slots: list[str]) -> dict[str, str]:
    """What each ``--gpus`` index becomes in a point's ``CUDA_VISIBLE_DEVICES``: the index itself, or, where this
    process already sees a subset (a SLURM allocation: ``CUDA_VISIBLE_DEVICES=4,5,6,7``), that subset's entry, so
    ``--gpus 0,1`` stays on the allocation's first two devices. ValueError naming ``--gpus`` for an index the
    subset does not have."""
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not inherited:
        return {slot: slot for slot in slots}
    seen = [device.strip() for device in inherited.split(",")]
    for slot in slots:
        if int(slot) >= len(seen):
            raise ValueError(f"--gpus={','.join(slots)} is not accepted: index {slot} is beyond the devices this "
                             f"process sees (CUDA_VISIBLE_DEVICES={inherited}: indices 0-{len(seen) - 1})")
    return {slot: seen[int(slot)] for slot in slots}


def check_devices(points: list[Point], slots: list[str]) -> None:
    """Refuse, before anything runs, a point that asks for more GPUs (``gpus``) than ``slots`` has devices, and
    a slot this process cannot see (:func:`visible_devices`)."""
    visible_devices(slots)
    devices = len(set(slots))
    for point in points:
        if point.config.gpus > devices:
            raise ValueError(f"point {point.config.name!r}: gpus={point.config.gpus} is not accepted with --gpus="
                             f"{','.join(slots)}: that gives {devices} distinct device(s), and a point's processes "
                             "each take their own")


def _take(free: list[str], n: int) -> list[str] | None:
    """``n`` free slots on distinct devices, the devices with the most free slots first (removed from ``free``);
    None if there are not that many."""
    counts = Counter(free)
    if len(counts) < n:
        return None
    chosen = sorted(counts, key=lambda device: -counts[device])[:n]  # stable: --gpus order among equals
    for device in chosen:
        free.remove(device)
    return chosen


def _fail(outcome: dict[str, list], point: Point, reason: str) -> None:
    outcome["failed"].append((point.config.name, str(point.output), reason))
    print(f"[sweep] {point.config.name} ended: failed", flush=True)


def _ready(point: Point, failed: set[str], succeeded: set[str], deferred: set[str], outcome: dict[str, list],
           waiting: list[Point]) -> bool:
    """Whether ``point`` can start now. Settles (and takes out of ``waiting``) a point whose source failed, a
    point that is up to date (skipped) or refused; moves a point in use by another process to the end, once."""
    name = point.config.name
    if point.source is not None and point.source not in succeeded:
        if point.source in failed:
            waiting.remove(point)
            failed.add(name)
            _fail(outcome, point, f"not run: the point it starts from, {point.source}, failed")
        return False
    try:
        skip = up_to_date(point)
    except Exception as exc:  # e.g. a finished run trained otherwise, a damaged file: this point only
        waiting.remove(point)
        failed.add(name)
        _fail(outcome, point, f"{type(exc).__name__}: {exc}")
        return False
    if skip:
        waiting.remove(point)
        succeeded.add(name)
        outcome["skipped"].append(name)
        print(f"[sweep] skip {name}: finished", flush=True)
        return False
    holder = RunDir(point.config.run_dir).locked_by_other()
    if holder is not None and name not in deferred:  # its process waits for the holder when it comes round
        deferred.add(name)
        waiting.remove(point)
        waiting.append(point)
        print(f"[sweep] {name} is in use by {holder}: left to it for now", flush=True)
        return False
    return True


def not_started(exc: BaseException) -> str:
    """The failure reason of a point whose process or job could not start: the error's type and last line (a
    scheduler's message ends with what it refused)."""
    lines = [line for line in str(exc).splitlines() if line.strip()] or [""]
    return f"not started: {type(exc).__name__}: {lines[-1].strip()}"


def _started(start: Start, batch: list[tuple[Point, list[str]]]) -> list[Check]:
    """``start(batch)``; if it raises (e.g. sbatch refuses the job), a check per point that reports why."""
    try:
        return start(batch)
    except Exception as exc:
        reason = not_started(exc)
        return [lambda: reason for _ in batch]


def schedule(points: list[Point], start: Start, slots: list[str] | None = None, poll_s: float = 0.2,
             most: int | None = None) -> dict[str, list]:
    """Run ``points`` through ``start``: in the sweep's order, each as soon as its source (a finetuning point's
    starting run) succeeded and, with ``slots`` (device ids, one entry per slot; None: no limit), as many free
    slots on distinct devices as its ``gpus``; ``most``: at most that many points at once. Returns {'done',
    'skipped', 'failed'} like :func:`advkit.sweep.run_points`; failed entries are (name, notebook, reason)."""
    outcome: dict[str, list] = {"done": [], "skipped": [], "failed": []}
    free = None if slots is None else list(slots)
    waiting, running = list(points), []
    succeeded: set[str] = set()
    failed: set[str] = set()
    deferred: set[str] = set()
    while waiting or running:
        batch, marks = [], (len(waiting), len(deferred))
        for point in list(waiting):
            if point not in waiting or not _ready(point, failed, succeeded, deferred, outcome, waiting):
                continue
            full = most is not None and len(running) + len(batch) >= most
            devices = None if full else [] if free is None else _take(free, point.config.gpus)
            if devices is None:
                break  # points start in the sweep's order: the next waits for slots too
            waiting.remove(point)
            batch.append((point, devices))
        if batch:
            running += [(point, devices, check) for (point, devices), check in zip(batch, _started(start, batch))]
        still = []
        for point, devices, check in running:
            error = check()
            if error is None:
                still.append((point, devices, check))
                continue
            if free is not None:
                free.extend(devices)
            if error:
                failed.add(point.config.name)
                _fail(outcome, point, error)
            else:
                succeeded.add(point.config.name)
                outcome["done"].append(point.config.name)
                print(f"[sweep] {point.config.name} ended: done", flush=True)
        if not batch and len(still) == len(running):
            if not running and marks == (len(waiting), len(deferred)):  # check_devices rules this out
                raise RuntimeError(f"points {[p.config.name for p in waiting]} can never start")
            time.sleep(poll_s)
        running = still
    return outcome


def point_command(path: str | Path, name: str, kernel: str | None = None) -> list[str]:
    """The command that runs one point of a sweep file (a slot's process, a submitit job's)."""
    return ([sys.executable, "-m", "advkit.cli", "sweep", str(Path(path).resolve()), "--point", name]
            + (["--kernel", kernel] if kernel else []))


def _process_check(process: subprocess.Popen) -> Check:
    def check() -> str | None:
        code = process.poll()
        return None if code is None else "" if code == 0 else f"its process exited with status {code}"
    return check


def run_slots(path: str | Path, gpus: str, kernel: str | None = None, threads: int | None = None,
              poll_s: float = 0.2) -> dict[str, list]:
    """``advkit sweep FILE --gpus 0,1,2,3``: every point of the sweep file in its own process, as many at once
    as there are slots (see the module's text); ``threads``: torch threads of each process (default: the
    machine's cores / slots). Everything is checked before the first process starts. Returns
    {'done', 'skipped', 'failed'} and prints the failures and counts."""
    slots = parse_gpus(gpus)
    if threads is not None:
        check_range("threads", threads, 1, integer=True)
    points = load_sweep(path)
    check_devices(points, slots)
    threads = threads or max(1, usable_cores() // len(slots))
    physical = visible_devices(slots)

    def start(batch: list[tuple[Point, list[str]]]) -> list[Check]:
        checks = []
        for point, devices in batch:
            env = os.environ | {"CUDA_VISIBLE_DEVICES": ",".join(physical[d] for d in devices),
                                "OMP_NUM_THREADS": str(threads),
                                "MKL_NUM_THREADS": str(threads)}
            print(f"[sweep] start {point.config.name} on device(s) {','.join(devices)}", flush=True)
            try:
                process = subprocess.Popen(point_command(path, point.config.name, kernel), env=env)
            except OSError as exc:  # this point only: the batch's started processes run on, tracked
                checks.append(lambda reason=not_started(exc): reason)
                continue
            checks.append(_process_check(process))
        return checks

    outcome = schedule(points, start, slots, poll_s)
    report(outcome)
    return outcome


# ---------------------------------------------------------------- the process of one point


def _holder_pid(run_dir: Path) -> int | None:
    """The pid of the process on this host that holds the run's lock (the one training it), if any."""
    holder = RunDir(run_dir).locked_by_other()
    found = re.match(r"pid (\d+) on (\S+) ", holder or "")
    return int(found.group(1)) if found and found.group(2) == socket.gethostname() else None


def _descends_from_this_process(pid: int) -> bool:
    """Whether ``pid`` is a child, grandchild ... of this process (read from /proc; False where there is none)."""
    for _ in range(16):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the command name: the parent's pid
        if pid == os.getpid():
            return True
        if pid <= 1:
            return False
    return False


def _pass_sigterm(run_dir: Path) -> None:
    """SIGTERM in a point's process: hand it to the process this one started that trains the run (the notebook's
    kernel, or torchrun's rank 0, which holds the run's lock), so that it writes a checkpoint and stops at a step
    boundary (advkit.train); papermill then ends with that error. With no such process, stop here."""
    pid = _holder_pid(run_dir)
    if pid is None or not _descends_from_this_process(pid):
        raise SystemExit(128 + signal.SIGTERM)
    os.kill(pid, signal.SIGTERM)


def run_point(path: str | Path, name: str, kernel: str | None = None) -> int:
    """``advkit sweep FILE --point NAME``: run that one point as the serial sweep does (skipped if finished, resumed
    from its checkpoint if it has one); 0 if it finished. A SIGTERM (a cluster stopping the job, or submitit's
    checkpoint) reaches the run's training, which writes a checkpoint before the process ends."""
    point = point_named(load_sweep(path), name, path)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: _pass_sigterm(point.config.run_dir))
    try:
        outcome = run_points([point], kernel, progress=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
    for name, notebook, error in outcome["failed"]:
        print(f"[sweep] FAILED {name}: {error}", flush=True)
    return 1 if outcome["failed"] else 0
