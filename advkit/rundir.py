"""A run folder, in one place: its file names, status, the "finished" rule, metrics, an exclusive lock, atomic
writes of its small files, and checkpoints with their checksums.

    <runs_root>/<name>/
        config.json        every parameter, resolved          environment.json  versions, hardware, precision
        status.json        running | done | failed | interrupted
        metrics.jsonl      one line per epoch                 checkpoints/last.pt, prev.pt
        results.csv        the robustness curves (last)       sanity.csv, bnstats.csv
        eval/<branch>-<hash>/   spec.json, batches/, examples.npz
        tensorboard/train/, tensorboard/eval/   TensorBoard event files (tensorboard=True)
        experiment.ipynb   the executed notebook              .lock   held by the process writing the run

No other module spells these names. The module imports no torch at load time (the analysis layer reads run
folders without it); the checkpoint functions import it when called.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import os
import re
import socket
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ATTEMPT_VARIABLE = "ADVKIT_ATTEMPT"  # set by a sweep for the kernel of each notebook it executes

CHECKPOINT_FORMAT = "advkit-checkpoint-1"
RESULT_COLUMNS = ("branch", "attack", "targeted", "eps", "step", "step_rule", "restarts", "steps", "accuracy",
                  "worst_accuracy", "n", "seed")  # results.csv as run.run writes it (evaluate.curve_table)
REQUIRED_VALUES = ("branch", "attack", "steps", "accuracy", "worst_accuracy", "n")  # empty in no row


PROBE_RETRIES, PROBE_WAIT_S = 10, 0.05  # lock(wait=False) gives up after ~0.5 s, long past any probe
_held: dict[Path, int] = {}  # lock files this process holds, with their nesting depth


class DamagedFile(ValueError):
    """A run folder's file that cannot be read (truncated, not JSON/CSV, missing columns): names file and run."""


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupt (checksum mismatch) or refused (it carries code)."""


class RunLocked(RuntimeError):
    """Another live process holds the run folder's lock; the message names it."""


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (it lives in the folder's own metadata)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``path`` so that a reader (or a kill) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class RunDir:
    """The folder of one run. ``RunDir(path).status()``, ``.finished()``, ``.metrics()``, ``.lock()`` ..."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @staticmethod
    def find(root: str | Path) -> list[RunDir]:
        """Every run folder under ``root`` (a folder holding a config.json), sorted by path."""
        return [RunDir(p.parent) for p in sorted(Path(root).glob("**/config.json"))]

    # ---------------------------------------------------------------- names
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def environment_file(self) -> Path:
        return self.path / "environment.json"

    @property
    def status_file(self) -> Path:
        return self.path / "status.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def previous_checkpoint(self) -> Path:
        return self.checkpoints / "prev.pt"

    @property
    def results_file(self) -> Path:
        return self.path / "results.csv"

    @property
    def sanity_file(self) -> Path:
        return self.path / "sanity.csv"

    @property
    def bnstats_file(self) -> Path:
        return self.path / "bnstats.csv"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    @property
    def tensorboard_train(self) -> Path:
        return self.tensorboard_dir / "train"

    @property
    def tensorboard_eval(self) -> Path:
        return self.tensorboard_dir / "eval"

    @property
    def notebook(self) -> Path:
        return self.path / "experiment.ipynb"

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    # ---------------------------------------------------------------- reading
    def _damaged(self, path: Path, reason: str) -> DamagedFile:
        return DamagedFile(f"run {self.name}: damaged file {path}: {reason} (repair or delete that file, or "
                           "resume/overwrite the run)")

    def read_json(self, path: Path, required: Sequence[str] = ()) -> dict[str, Any]:
        """A JSON object from one of the run's files, with the ``required`` keys; DamagedFile naming the file and
        the run otherwise."""
        try:
            value = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise self._damaged(Path(path), f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except UnicodeDecodeError:
            raise self._damaged(Path(path), "not valid JSON (not text)") from None
        if not isinstance(value, dict):
            raise self._damaged(Path(path), f"holds {type(value).__name__}, not a JSON object")
        missing = [key for key in required if key not in value]
        if missing:
            raise self._damaged(Path(path), f"no {', '.join(map(repr, missing))}")
        return value

    def read_table(self, path: Path, columns: Sequence[str]):
        """The CSV table in ``path`` (``results.csv``, ``bnstats.csv``) after checking that it was written whole:
        text that ends with a newline, the ``columns`` present, every row as many fields as the header. (A cut
        inside the last number would otherwise read as a different number.)"""
        import pandas as pd

        try:
            text = Path(path).read_text()
        except UnicodeDecodeError:
            raise self._damaged(Path(path), "not text") from None
        if not text:
            raise self._damaged(Path(path), "empty")
        if not text.endswith("\n"):
            raise self._damaged(Path(path), "ends mid-row (no final newline): cut while being written")
        rows = list(csv.reader(io.StringIO(text)))
        missing = [c for c in columns if c not in rows[0]]
        if missing:
            raise self._damaged(Path(path), f"missing column(s) {missing}")
        short = [i for i, row in enumerate(rows) if len(row) != len(rows[0])]
        if short:  # (the kit's tables hold no quoted line breaks: row i is line i + 1)
            raise self._damaged(Path(path), f"line {short[0] + 1} has {len(rows[short[0]])} fields, the header "
                                            f"{len(rows[0])}")
        return pd.read_csv(io.StringIO(text))

    def exists(self) -> bool:
        return self.config_file.exists()

    def config(self, required: Sequence[str] = ()) -> dict[str, Any]:
        return self.read_json(self.config_file, required)

    def status(self) -> dict[str, Any]:
        """``{'state': ...}`` as the run wrote it; ``{'state': 'unknown'}`` without a status file."""
        if not self.status_file.exists():
            return {"state": "unknown"}
        status = self.read_json(self.status_file, ["state"])
        if not isinstance(status["state"], str):
            raise self._damaged(self.status_file, f"state={status['state']!r} is not a string")
        return status

    def state(self) -> str:
        """'done', 'running', 'failed', 'interrupted', 'unknown', or 'damaged' (a file that cannot be read)."""
        try:
            state = self.status()["state"]
            if state == "done":
                self.results()
            return state
        except DamagedFile:
            return "damaged"

    def finished(self) -> bool:
        """The one rule for a finished run: status 'done' and a readable ``results.csv``."""
        return self.state() == "done"

    def results(self):
        """``results.csv`` as a DataFrame, checked (:meth:`read_table`): written whole, the columns run.run
        writes, at least one row, none without its attack, steps or accuracies."""
        if not self.results_file.exists():
            if self.status()["state"] == "done":
                raise self._damaged(self.results_file, f"missing, though {self.status_file.name} says 'done'")
            raise FileNotFoundError(f"run {self.name} has no {self.results_file.name} yet: {self.results_file}")
        table = self.read_table(self.results_file, RESULT_COLUMNS)
        if table.empty:
            raise self._damaged(self.results_file, "a header without rows")
        if table[list(REQUIRED_VALUES)].isna().any().any():
            raise self._damaged(self.results_file, f"a row without a value in {list(REQUIRED_VALUES)}")
        return table

    def metrics(self, repair: bool = False, strict: bool = False) -> list[dict[str, Any]]:
        """The epochs of ``metrics.jsonl`` (objects with an 'epoch'). A damaged line (a kill mid-write) ends the
        readable part: it and any later lines are dropped with a warning, and with ``repair`` the file is
        rewritten without them. ``strict`` (the analysis: a finished run's curve must be whole) raises
        DamagedFile naming the line instead."""
        if not self.metrics_file.exists():
            return []
        records, lines = [], self.metrics_file.read_bytes().decode("utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                problem = f"line {number} is not valid JSON ({exc.msg})"
            else:
                problem = None if isinstance(record, dict) and "epoch" in record else \
                    f"line {number} is not a JSON object with an 'epoch'"
            if problem is None:
                records.append(record)
                continue
            if strict:
                raise self._damaged(self.metrics_file, problem)
            warnings.warn(f"run {self.name}: damaged file {self.metrics_file}: {problem}; it and the "
                          f"{len(lines) - number} line(s) after it are {'dropped from the file' if repair else 'ignored'}",
                          RuntimeWarning, stacklevel=2)
            if repair:
                self.write_metrics(records)
            break
        return records

    # ---------------------------------------------------------------- writing
    def write_json(self, path: Path, value: dict[str, Any]) -> None:
        write_atomic(path, json.dumps(value, indent=2))

    def write_status(self, state: str, **extra: Any) -> None:
        """Write ``status.json``; under a sweep it names the attempt (``$ADVKIT_ATTEMPT``) that took the folder,
        so that the sweep tells its own run's status from one another process wrote meanwhile."""
        attempt = {"attempt": os.environ[ATTEMPT_VARIABLE]} if os.environ.get(ATTEMPT_VARIABLE) else {}
        self.write_json(self.status_file, {"state": state, "time": time.time(), **attempt, **extra})

    def written_by(self, attempt: str) -> bool:
        """Whether ``status.json`` was last written by the run of ``attempt`` (see :meth:`write_status`)."""
        try:
            return self.status().get("attempt") == attempt
        except DamagedFile:
            return False

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        write_atomic(self.metrics_file, "".join(json.dumps(r) + "\n" for r in records))

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Add one epoch's line (the file is rewritten atomically: a kill never leaves half a line)."""
        self.write_metrics(self.metrics(repair=True) + [record])

    def trim_metrics(self, epochs_done: int) -> None:
        """Drop the lines of epochs after the checkpoint (logged before a kill, to be trained again)."""
        if self.metrics_file.exists():
            self.write_metrics([r for r in self.metrics(repair=True) if r["epoch"] <= epochs_done])

    def write_table(self, path: Path, table) -> None:
        write_atomic(path, table.to_csv(index=False))

    def clear(self) -> None:
        """Delete the run's files for ``overwrite=True``, keeping the lock and papermill's notebooks (papermill may
        be writing one of them for this very run)."""
        import shutil

        for path in self.path.iterdir():
            if path.name in (self.notebook.name, self.lock_file.name, ".attempts"):
                continue
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    # ---------------------------------------------------------------- the lock
    @contextlib.contextmanager
    def lock(self, wait: bool = False) -> Iterator[None]:
        """Hold the run's exclusive lock while writing it (re-entrant within a process). ``flock`` belongs to the
        open file: it is released when the process ends however it ends, so a crashed run never locks anyone
        out. ``wait=False`` raises RunLocked naming the holder (pid, host, command, since when) if another
        live process holds it."""
        key = self.lock_file.resolve()
        if _held.get(key):
            _held[key] += 1
            try:
                yield
            finally:
                _held[key] -= 1
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for attempt in range(PROBE_RETRIES + 1):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
                    break
                except BlockingIOError:  # a locked_by_other() probe holds it for microseconds, a run for its life
                    if attempt == PROBE_RETRIES:
                        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                        raise RunLocked(f"run {self.path} is in use by {holder}; wait for it to finish (nothing "
                                        "was changed)") from None
                    time.sleep(PROBE_WAIT_S)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} "
                          f"({' '.join(sys.argv)[:200]})".encode(), 0)
            _held[key] = 1
            try:
                yield
            finally:
                del _held[key]
        finally:
            os.close(fd)  # releases the lock

    def locked_by_other(self) -> str | None:
        """The holder's description if another live process holds the lock, else None. The probe takes a shared
        lock for an instant (probes never exclude each other; :meth:`lock` retries past one)."""
        if not self.lock_file.exists() or _held.get(self.lock_file.resolve()):
            return None
        fd = os.open(self.lock_file, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        finally:
            os.close(fd)
        return None

    # ---------------------------------------------------------------- checkpoints
    def has_checkpoint(self) -> bool:
        """Whether the run holds a checkpoint to resume from (``last.pt`` or the previous one)."""
        return self.last_checkpoint.exists() or self.previous_checkpoint.exists()

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write ``last.pt`` (keeping the current one as ``prev.pt``) so that a kill or power loss at any moment
        leaves a good checkpoint: the serialised bytes go into a wrapper with their SHA-256 (the file checks
        itself), through a temporary file, flush and fsync, a rename, and an fsync of the folder."""
        import torch

        self.checkpoints.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        view = buffer.getbuffer()
        wrapper = {"format": CHECKPOINT_FORMAT, "sha256": hashlib.sha256(view).hexdigest(),
                   "payload": torch.frombuffer(view, dtype=torch.uint8)}
        tmp = self.last_checkpoint.with_name(self.last_checkpoint.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(wrapper, f)
            f.flush()
            os.fsync(f.fileno())
        del wrapper, view
        if self.last_checkpoint.exists():
            os.replace(self.last_checkpoint, self.previous_checkpoint)
        os.replace(tmp, self.last_checkpoint)
        fsync_dir(self.checkpoints)

    def load_resume_checkpoint(self) -> dict[str, Any]:
        """The newest good checkpoint: ``last.pt``, else ``prev.pt`` with a warning saying why; CheckpointError
        listing both problems when neither is good."""
        problems = []
        for path in (self.last_checkpoint, self.previous_checkpoint):
            try:
                state = load_checkpoint(path)
            except (CheckpointError, FileNotFoundError) as exc:
                problems.append(str(exc))
                continue
            if problems:
                warnings.warn(f"{problems[0]}; resuming from the previous checkpoint {path} instead", RuntimeWarning,
                              stacklevel=2)
            return state
        raise CheckpointError(f"no good checkpoint to resume from in {self.checkpoints}: " + "; ".join(problems))


def _load_plain(source, path: Path) -> Any:
    """``torch.load(weights_only=True)`` with its failures turned into a CheckpointError naming ``path``."""
    import torch

    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch reports a damaged archive in many ways
        text = str(exc)
        code = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if code:
            raise CheckpointError(f"checkpoint {path} is refused: it refers to {code.group(1)}, not only to tensors "
                                  "and plain values, and checkpoints load with torch.load(weights_only=True) so that "
                                  "a file carrying code never runs it") from None
        said = text.split("WeightsUnpickler error:")[-1].strip().split("\n")[0] if text else ""
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {said})") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file, or a run folder's last checkpoint, checked against its SHA-256; tensors and plain
    values only (a file carrying code is refused). A bad file raises CheckpointError naming it."""
    path = Path(path)
    if path.is_dir():
        path = RunDir(path).last_checkpoint
    wrapper = _load_plain(path, path)
    if not (isinstance(wrapper, dict) and wrapper.get("format") == CHECKPOINT_FORMAT):
        raise CheckpointError(f"checkpoint {path} is not an advkit checkpoint: it has no {CHECKPOINT_FORMAT!r} "
                              "checksum wrapper (advkit.rundir.RunDir.save_checkpoint writes one)")
    payload, digest = wrapper.get("payload"), wrapper.get("sha256")
    if not (hasattr(payload, "numpy") and isinstance(digest, str)):
        raise CheckpointError(f"checkpoint {path} is corrupt: its {CHECKPOINT_FORMAT!r} wrapper lacks the payload "
                              "tensor or its SHA-256")
    payload = payload.numpy().tobytes()
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt: the SHA-256 of its contents differs from the one "
                              "recorded when it was written")
    return _load_plain(io.BytesIO(payload), path)
