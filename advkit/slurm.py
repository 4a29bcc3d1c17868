"""A sweep on a SLURM cluster through submitit: ``advkit sweep FILE --slurm partition=gpu,timeout_min=240``.

One job per point: the points that can start together and ask for the same number of GPUs go in one job array
(``executor.batch()``); a job asks for its point's ``gpus`` and runs ``advkit sweep FILE --point NAME``, which
launches torchrun inside the job when ``gpus > 1`` (the experiment notebook's own path). A finetuning point is
submitted by this process once the job of the point it starts from has finished successfully, rather than with
a SLURM dependency: the same code then runs under submitit's local executor (``cluster=local``), and a point whose
source failed is reported with that reason. So ``advkit sweep --slurm`` stays until every job has ended and
reports like the serial sweep (run it in tmux or screen on the login node); started again, it skips the finished
points, and the job of a point that another job still runs waits for it (the run folder's lock).

Time limits and pre-emption follow submitit's checkpointing protocol: submitit sends USR2 ``signal_delay_s``
before the limit, and :meth:`PointJob.checkpoint` passes SIGTERM to the run, whose trainer writes a checkpoint at
the next step boundary and stops (:mod:`advkit.train`); once the run has stopped, submitit requeues the job, and
the requeued job resumes the run from that checkpoint (``resume='auto'``), ending with the weights of an
uninterrupted run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import DelayedSubmission

from .validate import check_choice, check_range

# key: (type, what it sets); the string form of --slurm, key=value pairs joined by commas
SLURM_KEYS: dict[str, tuple[type, str]] = {
    "cluster": (str, "slurm (sbatch; the default) or local (submitit's local executor, on this machine)"),
    "partition": (str, "the SLURM partition"),
    "account": (str, "the SLURM account"),
    "qos": (str, "the SLURM quality of service"),
    "constraint": (str, "the SLURM node constraint"),
    "timeout_min": (int, "each job's time limit in minutes (required)"),
    "gpus_per_node": (int, "the GPUs of one node: the most a point's gpus may ask for (0: a CPU partition)"),
    "cpus_per_task": (int, "CPU cores of each job"),
    "mem_gb": (float, "memory of each job in GB"),
    "signal_delay_s": (int, "seconds between the time-limit signal and the limit (default 120)"),
    "array_parallelism": (int, "jobs of one array that run at once (cluster=local: points at once)"),
    "max_num_timeout": (int, "requeues after reaching the time limit (default 3; pre-emptions do not count)"),
    "folder": (str, "submitit's folder: job scripts, pickles and logs (default: <runs_root>/.submitit)"),
    "gpus": (str, "cluster=local only: the jobs' device slots as --gpus gives them, with / between (0/1, or "
                  "0/0/1/1 for two jobs per device; default: one per GPU this machine has)"),
}
SLURM_DEFAULTS = {"cluster": "slurm", "signal_delay_s": 120, "max_num_timeout": 3}
CLUSTERS = ("slurm", "local")


def _value(key: str, text: str) -> Any:
    """``text`` as the type of --slurm's ``key``; ValueError naming the key otherwise."""
    kind = SLURM_KEYS[key][0]
    if kind is str:
        if not text:
            raise ValueError(f"--slurm {key}= is not accepted: give a value ({SLURM_KEYS[key][1]})")
        return text
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--slurm {key}={text!r} is not accepted: give {'an integer' if kind is int else 'a number'}"
                         f" ({SLURM_KEYS[key][1]})") from None


def parse_slurm(text: str) -> dict[str, Any]:
    """The settings of ``--slurm key=value,...``, with defaults, checked (ValueError naming the key and listing
    the accepted keys) before anything is submitted."""
    accepted = f"accepted keys: {', '.join(SLURM_KEYS)}"
    options: dict[str, Any] = {}
    for item in str(text).split(","):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals or not key:
            raise ValueError(f"--slurm={text!r} is not accepted: {item.strip()!r} is no key=value pair (e.g. "
                             f"partition=gpu,timeout_min=240); {accepted}")
        if key not in SLURM_KEYS:
            raise ValueError(f"--slurm: key {key!r} is not accepted; {accepted}")
        if key in options:
            raise ValueError(f"--slurm: key {key!r} is given twice")
        options[key] = _value(key, value)
    if "timeout_min" not in options:
        raise ValueError(f"--slurm: timeout_min is required ({SLURM_KEYS['timeout_min'][1]}); {accepted}")
    options = SLURM_DEFAULTS | options
    check_choice("--slurm cluster", options["cluster"], CLUSTERS)
    for key, low in (("timeout_min", 1), ("gpus_per_node", 0), ("cpus_per_task", 1), ("array_parallelism", 1),
                     ("max_num_timeout", 0), ("signal_delay_s", 1)):
        if key in options:
            check_range(f"--slurm {key}", options[key], low, integer=True)
    if "gpus" in options:
        if options["cluster"] != "local":
            raise ValueError(f"--slurm gpus={options['gpus']} is not accepted with cluster={options['cluster']}: "
                             "SLURM gives each job its GPUs (gpus is for cluster=local)")
        from .slots import parse_gpus

        options["gpus"] = parse_gpus(options["gpus"].replace("/", ","))
    if "mem_gb" in options:
        check_range("--slurm mem_gb", options["mem_gb"], 0, low_open=True)
    if options["signal_delay_s"] >= 60 * options["timeout_min"]:
        raise ValueError(f"--slurm signal_delay_s={options['signal_delay_s']} is not accepted with timeout_min="
                         f"{options['timeout_min']}: the pre-emption signal must come before the time limit")
    return options


def check_points(points: list, options: dict[str, Any]) -> None:
    """Refuse, before anything is submitted, a point asking for more GPUs than a node has, and cluster=slurm
    where SLURM's commands are missing."""
    limit = options.get("gpus_per_node")
    for point in points:
        if limit and point.config.gpus > limit:
            raise ValueError(f"point {point.config.name!r}: gpus={point.config.gpus} is not accepted with --slurm "
                             f"gpus_per_node={limit}: a point runs on one node")
    if options["cluster"] == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise ValueError("--slurm cluster=slurm is not accepted here: SLURM's sbatch and srun are not on PATH; run "
                         "the sweep on the cluster's login node (cluster=local runs the jobs on this machine)")


def local_slots(options: dict[str, Any], points: list) -> list[str] | None:
    """cluster=local: the device slots its jobs share (``gpus``, else one per GPU torch sees here; None without
    GPUs, or when every point runs on the CPU: then ``array_parallelism`` alone bounds the jobs at once).
    submitit's local executor alone gives every job ``CUDA_VISIBLE_DEVICES=0..gpus-1``: with several jobs at once
    on a machine of several GPUs, all of them ran on the first."""
    if options.get("gpus"):
        return options["gpus"]
    if all(point.config.device == "cpu" for point in points):
        return None
    import torch

    count = torch.cuda.device_count()
    return [str(i) for i in range(count)] if count else None


def make_executor(options: dict[str, Any], folder: Path) -> submitit.AutoExecutor:
    """submitit's executor for the settings: one task on one node per job, torchrun starting the ranks inside.
    The SLURM-only keys (partition ... signal_delay_s) do not apply to cluster=local."""
    cluster = options["cluster"]
    executor = submitit.AutoExecutor(folder, cluster=cluster,
                                     **{f"{cluster}_max_num_timeout": options["max_num_timeout"]})
    generic = {k: options[k] for k in ("timeout_min", "cpus_per_task", "mem_gb") if k in options}
    specific = {f"slurm_{k}": options[k] for k in ("partition", "account", "qos", "constraint", "signal_delay_s",
                                                   "array_parallelism") if k in options and cluster == "slurm"}
    executor.update_parameters(nodes=1, tasks_per_node=1, name="advkit-sweep", **generic, **specific)
    return executor


def _stop(pid: int, timeout_s: float) -> None:
    """SIGTERM to a point's process (it passes the signal to the run's training), then wait for it to end."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(0.2)
    print(f"[sweep] the point's process {pid} did not end within {timeout_s:g} s; requeued all the same (the run "
          "resumes from its newest checkpoint)", flush=True)


class PointJob:
    """A submitit job running one point (``command``: ``advkit sweep FILE --point NAME``) in a subprocess that
    ignores submitit's pre-emption signal (a cluster may send it to every process of the job), so that the signal
    reaches the run only as the SIGTERM of :meth:`checkpoint`. ``gpus``: the point's processes (threads per
    process: the job's cores / gpus, unless OMP_NUM_THREADS is set); ``devices``: the point's
    ``CUDA_VISIBLE_DEVICES`` (cluster=local's slots; None: as submitit set it)."""

    def __init__(self, command: list[str], gpus: int = 1, stop_timeout_s: float = 100.0,
                 devices: str | None = None) -> None:
        self.command, self.gpus, self.stop_timeout_s, self.devices = list(command), gpus, stop_timeout_s, devices
        self._process: subprocess.Popen | None = None

    def __call__(self) -> None:
        env = dict(os.environ) | ({"CUDA_VISIBLE_DEVICES": self.devices} if self.devices is not None else {})
        if "OMP_NUM_THREADS" not in env:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(max(1, cores // self.gpus))
        preempt = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        previous = signal.signal(preempt, signal.SIG_IGN)  # inherited by the point's process and its children
        try:
            self._process = subprocess.Popen(self.command, env=env)
        finally:
            signal.signal(preempt, previous)
        while (code := self._process.poll()) is None:
            time.sleep(0.5)
        if code:
            raise RuntimeError(f"advkit {' '.join(self.command[3:])} exited with status {code}")

    def checkpoint(self) -> DelayedSubmission:
        """submitit's checkpointing protocol, called on the pre-emption or time-limit signal: stop the run (it
        writes a checkpoint first) and return a fresh job to requeue, which resumes it from that checkpoint."""
        if self._process is not None and self._process.returncode is None:
            print("[sweep] pre-emption or time limit: stopping the run at a checkpoint, then requeueing", flush=True)
            _stop(self._process.pid, self.stop_timeout_s)
        return DelayedSubmission(PointJob(self.command, self.gpus, self.stop_timeout_s, self.devices))

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_process": None}  # a process is no part of a pickled job


def _job_check(job: submitit.Job):
    """The scheduler's check of a submitted job: None while it runs, "" if it succeeded, else the error's last
    line with the job's log."""
    def check() -> str | None:
        if not job.done():
            return None
        error = job.exception()
        if error is None:
            return ""
        lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        return f"{lines[-1].strip()} (job {job.job_id}; log {job.paths.stdout})"
    return check


def run_slurm(path: str | Path, slurm: str, kernel: str | None = None, poll_s: float | None = None
              ) -> dict[str, list]:
    """``advkit sweep FILE --slurm key=value,...``: every unfinished point as a submitit job (see the module's
    text); the options and every point are checked before anything is submitted. Waits for the jobs and returns
    {'done', 'skipped', 'failed'} like :func:`advkit.sweep.run_sweep`."""
    from .slots import check_devices, not_started, point_command, schedule, visible_devices
    from .sweep import load_sweep, report

    options = parse_slurm(slurm)
    points = load_sweep(path)
    check_points(points, options)
    local = options["cluster"] == "local"
    slots = local_slots(options, points) if local else None
    if slots is not None:
        check_devices(points, slots)
    physical = visible_devices(slots) if slots is not None else {}
    folder = Path(options.get("folder") or points[0].config.run_dir.parent / ".submitit")
    executor = make_executor(options, folder)
    stop_timeout_s = max(options["signal_delay_s"] - 15, 5)

    def submit(batch: list) -> list:
        checks = {}
        devices = {p.config.name: ",".join(physical[d] for d in slot) for p, slot in batch} if slots else {}
        for gpus in sorted({point.config.gpus for point, _ in batch}):
            group = [point for point, _ in batch if point.config.gpus == gpus]
            try:
                executor.update_parameters(gpus_per_node=0 if options.get("gpus_per_node") == 0 else gpus)
                with executor.batch():
                    jobs = [executor.submit(PointJob(point_command(path, p.config.name, kernel), gpus, stop_timeout_s,
                                                     devices.get(p.config.name))) for p in group]
            except Exception as exc:  # this group's array only (sbatch refused it): the others' jobs stay tracked
                for p in group:
                    checks[p.config.name] = lambda reason=not_started(exc): reason
                continue
            for point, job in zip(group, jobs):
                print(f"[sweep] submitted {point.config.name} as job {job.job_id}; log: {job.paths.stdout}",
                      flush=True)
                checks[point.config.name] = _job_check(job)
        return [checks[point.config.name] for point, _ in batch]

    outcome = schedule(points, submit, slots, poll_s or (1.0 if local else 15.0),
                       most=options.get("array_parallelism") if local else None)
    report(outcome)
    return outcome
