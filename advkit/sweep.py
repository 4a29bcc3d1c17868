"""Sweeps: expand a YAML grid into experiment-notebook runs, one papermill execution per point.

A sweep file::

    notebook: notebooks/experiment.ipynb   # optional (this is the default)
    runs_root: runs/demo                   # where the run folders go (relative: to the repository root)
    base: {preset: demo}                   # parameters of every point
    grid: {seed: [0, 1, 2]}                # cartesian product over these
    order: points                          # optional: points (each point over the grid) | grid (see below)
    points:                                # named settings, each crossed with the grid
      - {name: standard, adv_ratio: 0, clean_ratio: 1}
      - {name: adv-only, clean_ratio: 0}
      - {name: ft, finetune_bn: true, init_checkpoint: "run:adv-only", adv_ratio: 0, clean_ratio: 1}

``init_checkpoint: run:<name>`` starts from an earlier point of the same sweep (with a grid, the earlier
point with the same grid values), once that point's run is finished. ``order: grid`` runs every point of one
grid combination before the next combination starts (seeds added one at a time: the points of seed 0, then of
seed 1, ...); the default ``points`` runs each point over the whole grid before the next point.

Every point is validated before anything runs (a key given twice, a malformed entry, a run name that is no
safe folder name: one-line messages naming the entry). A point whose ``results.csv`` exists is skipped; one
with a checkpoint but no ``results.csv`` (killed, pre-empted) is resumed; a failing point, whatever fails in
it, does not stop the sweep; failures are listed at the end with the failing notebook's path. With several
shard processes (``--jobs``), a shard that fails or is killed and every point left unfinished are reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import Config, make_config, resume_conflicts
from .paths import project_root
from .rundir import ATTEMPT_VARIABLE, RunDir
from .validate import check_choice, check_range

SWEEP_KEYS = ("notebook", "runs_root", "base", "grid", "order", "points")
ORDERS = ("points", "grid")
MAX_NAME_BYTES = 100  # a run name is a folder name: well under the 255 bytes that file systems allow


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the last one, so a
    second ``grid:`` block or a parameter set twice in a point would silently replace the first). Like
    ``SafeLoader`` it refuses ``!!python`` tags."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' merges: later keys override by design
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first at line {first.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep)


@dataclass
class Point:
    config: Config
    notebook: Path
    source: str | None = None  # the earlier point this one starts from (init_checkpoint: run:<name>)

    @property
    def output(self) -> Path:
        return RunDir(self.config.run_dir).notebook


def _value_tag(value: Any) -> str:
    return str(value).replace(" ", "").replace("/", "_")


def _read_spec(path: Path) -> dict:
    """The sweep file's top-level mapping; ValueError (one line) for invalid YAML or a duplicate key."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"sweep file {path} cannot be read: {getattr(exc, 'strerror', None) or exc}; give the path "
                         "of a YAML sweep file") from None
    try:
        spec = yaml.load(text, Loader=StrictLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = "; ".join(str(p) for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p)
        raise ValueError(f"sweep file {path} is not valid YAML{where}: {problem or exc}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"sweep file {path} must hold a mapping with keys {list(SWEEP_KEYS)}")
    unknown = sorted(set(spec) - set(SWEEP_KEYS), key=str)
    if unknown:
        raise ValueError(f"sweep file {path}: unknown key(s) {unknown}; accepted keys: {list(SWEEP_KEYS)}")
    return spec


def _parameters(entry: Any, label: str) -> dict:
    """``entry`` (the file's ``base`` or one of its points) as a dict of parameters; ValueError naming it."""
    if entry is None:
        return {}
    if not isinstance(entry, dict):
        raise ValueError(f"{label}={entry!r} is not accepted; give a mapping of parameter names to values")
    for key in entry:
        if not isinstance(key, str):
            raise ValueError(f"{label}: parameter name {key!r} is not accepted; parameter names are strings")
    return dict(entry)


def _grid(grid: Any) -> dict[str, list]:
    if grid is None:
        return {}
    if not isinstance(grid, dict):
        raise ValueError(f"grid={grid!r} is not accepted; give a mapping of parameter names to lists of values")
    for key, values in grid.items():
        if not isinstance(key, str):
            raise ValueError(f"grid: parameter name {key!r} is not accepted; parameter names are strings")
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid: {key}={values!r} is not accepted; give a non-empty list of values")
    return grid


def _points(points: Any) -> list[dict]:
    if points is None:
        return [{}]
    if not isinstance(points, list):
        raise ValueError(f"points={points!r} is not accepted; give a list of mappings, one per named setting")
    checked = []
    for i, point in enumerate(points):
        if not isinstance(point, dict):
            raise ValueError(f"points[{i}]={point!r} is not accepted; each point must be a mapping of parameters, "
                             "e.g. {name: adv, clean_ratio: 0}")
        point = _parameters(point, f"points[{i}]")
        if "name" in point and (not isinstance(point["name"], str) or not point["name"]):
            raise ValueError(f"points[{i}]: name={point['name']!r} is not accepted; give a non-empty string")
        checked.append(point)
    return checked or [{}]


def check_run_name(name: Any) -> str:
    """Return ``name`` if it can be a run folder on any common file system, else raise ValueError: a non-empty
    string of at most ``MAX_NAME_BYTES`` bytes (UTF-8), without '/', '\\', NUL or other control characters,
    not starting with '.'."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} is not accepted; give a non-empty string (the run's folder name)")
    size = len(name.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        shown = name[:40] + "..."
        raise ValueError(f"name={shown!r} is {size} bytes long (UTF-8); at most {MAX_NAME_BYTES} are accepted "
                         "(it names a folder)")
    control = next((c for c in name if ord(c) < 32 or ord(c) == 127), None)
    if control is not None:
        raise ValueError(f"name={name!r} is not accepted: it holds the control character {control!r}")
    for bad in ("/", "\\"):
        if bad in name:
            raise ValueError(f"name={name!r} is not accepted: it holds {bad!r} (it names one folder)")
    if name.startswith("."):
        raise ValueError(f"name={name!r} is not accepted: a name starting with '.' makes a hidden folder")
    return name


def _check_unique(path: Path, names: list[str]) -> None:
    """Refuse names given twice and names that differ only in case (one folder on macOS or Windows)."""
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"sweep file {path}: several points share the run name(s) {duplicates}")
    by_fold: dict[str, list[str]] = {}
    for name in names:
        by_fold.setdefault(name.casefold(), []).append(name)
    folded = sorted(sorted(group) for group in by_fold.values() if len(group) > 1)
    if folded:
        raise ValueError(f"sweep file {path}: run names that differ only in case (one folder on a case-insensitive "
                         f"file system): {', '.join(map(str, folded))}")


def load_sweep(path: str | Path) -> list[Point]:
    """Read and validate a sweep file into its points (nothing runs). Every problem is a one-line ValueError
    naming the file and the entry. Linear in the number of points (finetuning sources are looked up by name)."""
    path = Path(path)
    spec = _read_spec(path)
    try:
        notebook = spec.get("notebook", "notebooks/experiment.ipynb")
        if not isinstance(notebook, str):
            raise ValueError(f"notebook={notebook!r} is not accepted; give a path to the experiment notebook")
        base = _parameters(spec.get("base"), "base")
        if "runs_root" in spec and "runs_root" in base:
            raise ValueError("runs_root is given twice (at the top and in base); give it once")
        if "runs_root" in spec:
            base["runs_root"] = spec["runs_root"]
        grid, named = _grid(spec.get("grid")), _points(spec.get("points"))
        check_choice("order", spec.get("order", "points"), ORDERS)
        for index, point in enumerate(named):
            if clash := sorted(set(point) & set(grid)):
                raise ValueError(f"points[{index}] sets {clash}, which the grid sets too (the grid's values would "
                                 "silently replace the point's); give each parameter in one place")
        notebook = Path(notebook) if Path(notebook).is_absolute() else project_root() / notebook
        if not notebook.is_file():
            raise ValueError(f"notebook={str(notebook)!r} is not accepted: no such file; give the path of the "
                             "experiment notebook (relative paths: to the repository root)")
    except ValueError as exc:
        raise ValueError(f"sweep file {path}: {exc}") from None
    points: list[Point] = []
    run_dirs: dict[str, Path] = {}  # run name -> folder, of the points so far
    labels = [point.pop("name", None) for point in named]
    combos = list(itertools.product(*grid.values()))
    if spec.get("order", "points") == "grid":
        order = [(index, combo) for combo in combos for index in range(len(named))]
    else:
        order = [(index, combo) for index in range(len(named)) for combo in combos]
    for index, combo in order:
        point, label = named[index], labels[index]
        values = base | point | dict(zip(grid, combo))
        preset = values.pop("preset", None)
        grid_tags = [f"{k}{_value_tag(v)}" for k, v in zip(grid, combo)]
        values.setdefault("name", "-".join(([label] if label else []) + grid_tags) or "run")
        try:
            check_run_name(values["name"])
        except ValueError as exc:
            raise ValueError(f"sweep file {path}, points[{index}]: {exc}") from None
        start = values.get("init_checkpoint")
        from_sweep = isinstance(start, str) and start.startswith("run:")
        wanted = None
        if from_sweep:
            candidates = ["-".join([start[4:], *grid_tags]), start[4:]]  # same grid values first
            wanted = next((c for c in candidates if c in run_dirs), None)
            if wanted is None:
                raise ValueError(f"sweep file {path}, point {values['name']!r}: init_checkpoint={start!r} "
                                 f"names no earlier point; earlier points: {sorted(run_dirs)}")
            values["init_checkpoint"] = str(run_dirs[wanted])
        try:
            cfg = make_config(preset, check_paths=not from_sweep, **values)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sweep file {path}, point {values['name']!r}: {exc}") from None
        run_dirs.setdefault(cfg.name, cfg.run_dir)
        points.append(Point(cfg, notebook, wanted))
    _check_unique(path, [p.config.name for p in points])
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


def finished(point: Point) -> bool:
    """Whether a point's run is finished (the one rule, :meth:`RunDir.finished`)."""
    return RunDir(point.config.run_dir).finished()


def finished_differently(point: Point) -> list[str]:
    """For a finished point, the parameters in which its run differs from the sweep file as it is now (an edited
    file): what it was trained with may not change; evaluation parameters may (the run is evaluated again). A
    finetuning point's source must still hold the weights it started from (:func:`advkit.run.source_changed`)."""
    from .run import source_changed

    run = RunDir(point.config.run_dir)
    conflicts = resume_conflicts(run.config(), point.config)
    return conflicts + ([changed] if (changed := source_changed(point.config, run)) else [])


# the kernel's own log (e.g. "Kernel is running over TCP without encryption", about its loopback connection to
# papermill) is noise to a user; errors still show
QUIET_KERNEL = ["--IPKernelApp.log_level=ERROR"]
# jupyter_client's words for a kernel that never came up (it picks free TCP ports, then the kernel binds them: two
# kernels starting at once in two processes can pick the same port, and one dies with "Address already in use")
KERNEL_NEVER_STARTED = ("Kernel didn't respond", "Kernel died before replying to kernel_info")
KERNEL_START_TRIES = 3


def kernel_never_started(exc: BaseException) -> bool:
    """Whether papermill failed because the notebook's kernel never came up (no cell ran)."""
    return isinstance(exc, RuntimeError) and str(exc).startswith(KERNEL_NEVER_STARTED)


def execute_notebook(notebook: Path, output: Path, parameters: dict, *, kernel: str | None = None,
                     progress: bool = False, label: str = "") -> None:
    """papermill from the project root, the kernel's log quiet; started again, up to KERNEL_START_TRIES times in
    all, while the kernel never comes up (then no cell ran, so nothing of the notebook's work is repeated)."""
    import papermill

    for tries in range(1, KERNEL_START_TRIES + 1):
        try:
            papermill.execute_notebook(str(notebook), str(output), parameters=parameters, kernel_name=kernel,
                                       progress_bar=progress, cwd=str(project_root()), extra_arguments=QUIET_KERNEL)
            return
        except RuntimeError as exc:
            if not kernel_never_started(exc) or tries == KERNEL_START_TRIES:
                raise
            print(f"[papermill] {label or notebook.name}: its notebook's kernel did not start ({exc}); starting it "
                  f"again (try {tries + 1} of {KERNEL_START_TRIES})", flush=True)


class RunRefused(Exception):
    """The kit refused the run before it took the folder (bad input, a finished run without resume, a run in use
    by another process, a resume that would change training): nothing of the run changed, its record neither."""

    def __init__(self, ename: str, evalue: str) -> None:
        super().__init__(f"{ename}: {evalue}")
        self.ename, self.evalue = ename, evalue


def execute(notebook: Path, cfg: Config, kernel: str | None = None, progress: bool = True) -> None:
    """Execute the experiment notebook for ``cfg`` through papermill, keeping the run's record safe: papermill
    writes into ``<run>/.attempts/`` and the executed notebook becomes ``experiment.ipynb`` only if the kit
    accepted the run in this attempt, which it marks by writing ``status.json`` under the folder's lock with the
    attempt's name (``$ADVKIT_ATTEMPT``: a status another process wrote meanwhile is not this attempt's). A
    notebook that fails without that mark was refused: its attempt is deleted, the earlier record (or the absence
    of a folder) stays as it was, and :class:`RunRefused` is raised. One that succeeds without it found the run
    finished by another process: that run's record stays."""
    import os
    import time

    import papermill

    run = RunDir(cfg.run_dir)
    existed = run.path.exists()
    run.path.mkdir(parents=True, exist_ok=True)
    attempts = run.path / ".attempts"
    attempts.mkdir(parents=True, exist_ok=True)
    attempt = attempts / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.ipynb"

    def discard() -> None:
        attempt.unlink(missing_ok=True)
        for folder in (attempts, run.path) if not existed else (attempts,):
            with contextlib.suppress(OSError):
                folder.rmdir()

    previous = os.environ.get(ATTEMPT_VARIABLE)
    os.environ[ATTEMPT_VARIABLE] = attempt.name  # the kernel inherits it; the run writes it into status.json
    try:
        execute_notebook(notebook, attempt, cfg.to_dict(), kernel=kernel, progress=progress, label=cfg.name)
    except papermill.PapermillExecutionError as exc:
        if not run.written_by(attempt.name):  # never accepted
            discard()
            raise RunRefused(exc.ename, exc.evalue) from None
        os.replace(attempt, run.notebook)  # the run was accepted and failed in it: its record shows how
        raise
    except BaseException as exc:  # a dead kernel (SIGKILL, out of memory), Ctrl-C: keep the record of a started run
        if run.written_by(attempt.name) and attempt.exists():
            os.replace(attempt, run.notebook)
        elif kernel_never_started(exc):  # no cell ran: nothing to keep, as for a refused run
            discard()
        raise
    finally:
        if previous is None:
            os.environ.pop(ATTEMPT_VARIABLE, None)
        else:
            os.environ[ATTEMPT_VARIABLE] = previous
    if run.written_by(attempt.name):
        os.replace(attempt, run.notebook)
    discard()


def _run_point(point: Point, kernel: str | None, progress: bool) -> None:
    """Carry on with one point's run folder (``resume='auto'``: under the run's lock, resume from its checkpoint,
    evaluate again if only evaluation parameters changed, or start a folder without checkpoint again) and
    execute its notebook."""
    cfg = dataclasses.replace(point.config, resume="auto", overwrite=False)
    resuming = " resuming" if RunDir(cfg.run_dir).has_checkpoint() else ""
    print(f"[sweep] run {cfg.name} ({cfg.strategy}, norm={cfg.norm}){resuming}", flush=True)
    execute(point.notebook, cfg, kernel, progress)


def up_to_date(point: Point) -> bool:
    """Whether the point's run is finished with what the sweep file now gives (nothing to do: skip it); a finished
    run trained with other parameters raises ValueError naming them. Any other change but where things live (more
    epochs, evaluation, sanity checks, BN statistics, TensorBoard): not up to date, so the point runs with
    ``resume='auto'``, which extends its training or computes its outputs again (:func:`run.outputs_differ`)."""
    from .run import outputs_differ

    if not finished(point):
        return False
    conflicts = finished_differently(point)
    if conflicts:
        raise ValueError(f"the finished run {point.config.run_dir} was trained with other parameters than the sweep "
                         f"file now gives ({'; '.join(conflicts)}); restore the file, or delete the run to train it "
                         "anew")
    return not outputs_differ(RunDir(point.config.run_dir).config(), point.config)


def _source_ready(point: Point, failed: set[str], elsewhere: list[Point], outcome: dict[str, list]) -> bool:
    """Whether a finetuning point can start: only from a source that is finished now (Section 4.4 finetunes the
    final model). A source that failed in this sweep, or that is unfinished and not left to another process,
    fails the point (recorded in ``outcome``); one left to another process defers the point after it."""
    name, source = point.config.name, point.source
    if source in failed:
        reason = f"not run: the point it starts from, {source}, failed"
    elif any(p.config.name == source for p in elsewhere) and point not in elsewhere:
        elsewhere.append(point)  # after its source, which this sweep waits for at the end
        print(f"[sweep] {name} waits for {source}, which another process holds", flush=True)
        return False
    else:
        from .run import check_source_finished

        try:
            check_source_finished(point.config.init_checkpoint)
            return True
        except ValueError as exc:
            reason = f"not run: the point it starts from, {source}: {exc}"
    outcome["failed"].append((name, "", reason))
    failed.add(name)
    return False


def point_named(points: list[Point], name: str, path: str | Path) -> Point:
    """The point of sweep file ``path`` called ``name`` (``--point NAME``); ValueError listing the file's points."""
    chosen = [p for p in points if p.config.name == name]
    if not chosen:
        raise ValueError(f"--point={name!r} is not accepted: {path} has no point of that name; its points: "
                         f"{[p.config.name for p in points]}")
    return chosen[0]


def preflight(points: list[Point]) -> None:
    """The checks every way of running a sweep makes before a point's compute, made for every point without
    running any (``advkit sweep FILE --check``): a finished run trained with other parameters than the file now
    gives, a damaged run folder, a data set not readable under ``data_root``. One ValueError naming each failing
    point and why."""
    from .data import check_available

    problems = []
    for point in points:
        try:
            up_to_date(point)
            check_available(point.config.dataset, point.config.data_root)
        except (OSError, ValueError) as exc:
            problems.append(f"point {point.config.name!r}: {exc}")
    if problems:
        raise ValueError("\n".join(problems))


def run_points(points: list[Point], kernel: str | None = None, progress: bool = True) -> dict[str, list]:
    """Run every unfinished point of ``points``, in order, through papermill; return {'done', 'skipped', 'failed'}
    lists. Any exception of one point, in its set-up or its notebook, is recorded and the sweep goes on. A point in
    use by another process (another sweep of the same file) is left to it; at the end this sweep waits for that
    process and runs the point only if it did not finish, so every point is trained once. A finetuning point
    runs only from a source finished now (:func:`_source_ready`): after it, if the source was left to another
    process; not at all, reported failed with the reason, if the source failed or is unfinished."""
    outcome: dict[str, list] = {"done": [], "skipped": [], "failed": []}
    elsewhere: list[Point] = []
    failed: set[str] = set()

    def attempt(point: Point) -> None:
        name = point.config.name
        try:
            if up_to_date(point):
                outcome["skipped"].append(name)
                print(f"[sweep] skip {name}: finished", flush=True)
                return
            if point.source is not None and not _source_ready(point, failed, elsewhere, outcome):
                return
            holder = RunDir(point.config.run_dir).locked_by_other()
            if holder is not None and point not in elsewhere:
                elsewhere.append(point)
                print(f"[sweep] {name} is in use by {holder}: left to it for now", flush=True)
                return
            _run_point(point, kernel, progress)
            outcome["done"].append(name)
            print(f"[sweep] {name}: done", flush=True)
        except Exception as exc:  # carry on; report at the end
            if getattr(exc, "ename", None) == "RunLocked" and point not in elsewhere:
                elsewhere.append(point)
                print(f"[sweep] {name} was taken by another process: left to it for now", flush=True)
                return
            record = "" if isinstance(exc, RunRefused) else str(point.output)  # a refusal wrote no record
            outcome["failed"].append((name, record, f"{type(exc).__name__}: {str(exc)[-300:]}"))
            failed.add(name)

    for point in points:
        attempt(point)
    for point in elsewhere:
        with RunDir(point.config.run_dir).lock(wait=True):  # wait for the other process to let go
            pass
        attempt(point)
    return outcome


def report(outcome: dict[str, list]) -> None:
    """Print each failure (with the failing notebook's path, where it ran) and the counts."""
    for name, notebook, error in outcome["failed"]:
        where = f": see {notebook}" if Path(notebook).is_file() else " before its run started:"
        print(f"[sweep] FAILED {name}{where}\n    {error}", flush=True)
    print(f"[sweep] {len(outcome['done'])} done, {len(outcome['skipped'])} skipped, "
          f"{len(outcome['failed'])} failed", flush=True)


def run_sweep(path: str | Path, kernel: str | None = None, progress: bool = True, shard: int = 0,
              shards: int = 1) -> dict[str, list]:
    """Run every unfinished point (of one shard) through papermill (:func:`run_points`), report the failures and
    counts; return {'done', 'skipped', 'failed'} lists."""
    outcome = run_points(shard_points(load_sweep(path), shard, shards), kernel, progress)
    report(outcome)
    return outcome


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a SLURM allocation, taskset), not the machine's."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_shards(path: str | Path, jobs: int, kernel: str | None = None) -> int:
    """``advkit sweep FILE --jobs N``: N shard processes at once, the cores split between them (small models
    train faster as several one-thread processes than as one process with several threads). Returns 0 only if
    every shard exited 0 and every point finished; else names each shard that failed or was killed and every
    point that did not finish, and returns 1."""
    import os
    import subprocess
    import sys

    check_range("jobs", jobs, 1, integer=True)
    points = load_sweep(path)  # every point validated before anything starts
    threads = str(max(1, usable_cores() // jobs))
    env = os.environ | {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    command = [sys.executable, "-m", "advkit.cli", "sweep", str(path)] + (["--kernel", kernel] if kernel else [])
    processes = [subprocess.Popen(command + ["--shard", f"{i}/{jobs}"], env=env) for i in range(jobs)]
    codes = [p.wait() for p in processes]
    for i, code in enumerate(codes):
        if code < 0:
            print(f"[sweep] shard {i}/{jobs} was killed by signal {-code} ({_signal_name(-code)})", flush=True)
        elif code > 0:
            print(f"[sweep] shard {i}/{jobs} exited with status {code}", flush=True)
    unfinished = [p.config.name for p in points if not finished(p)]
    if unfinished:
        print(f"[sweep] {len(unfinished)} point(s) did not finish: {', '.join(unfinished)}", flush=True)
    return 1 if unfinished or any(codes) else 0
