"""Sweeps over a server's GPUs (``--gpus``) and on a SLURM cluster (``--slurm``, through submitit), on the CPU:
the slot scheduler with a stand-in launcher (assignment, ordering of finetuning points, failure isolation,
multi-GPU points), real slot processes, submitit's local executor with a pre-empted and requeued point, and the
demo's five strategies giving the same results serially, in slots and as submitit jobs."""

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
import types
from pathlib import Path

import pandas as pd
import pytest
import torch

from advkit import cli, rundir, slots, slurm, sweep

FAST = {"preset": "test", "epochs": 1, "n_train": 128, "n_test": 64, "train_steps": 1, "eval_checkpoints": [1],
        "sanity_n": 0, "bnstats_channels": 0}
FT = {"finetune_bn": True, "adv_ratio": 0, "clean_ratio": 1}


def _sweep_file(tmp_path: Path, points: list[dict], base: dict | None = None, **extra) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps({"runs_root": str(tmp_path / "runs"), "base": base or FAST, "points": points,
                                **extra}))
    return path


# ---------------------------------------------------------------- the scheduler, with a stand-in launcher

class FakeLauncher:
    """Starts nothing: each point 'runs' for ``polls`` checks, then succeeds (or fails, if named in ``failing``).
    Records every start and end, and the most points that ran at once."""

    def __init__(self, polls: int = 3, failing: tuple[str, ...] = ()):
        self.polls, self.failing = polls, failing
        self.events: list[tuple[str, str, list[str]]] = []  # (start|end, name, devices)
        self.running: set[str] = set()
        self.most = 0

    def __call__(self, batch):
        checks = []
        for point, devices in batch:
            name = point.config.name
            self.events.append(("start", name, devices))
            self.running.add(name)
            self.most = max(self.most, len(self.running))
            checks.append(self._check(name, devices))
        return checks

    def _check(self, name, devices):
        left = [self.polls]

        def check():
            left[0] -= 1
            if left[0] > 0:
                return None
            self.running.discard(name)
            self.events.append(("end", name, devices))
            return f"RuntimeError: {name} failed on purpose" if name in self.failing else ""
        return check

    def devices(self) -> dict[str, list[str]]:
        return {name: devices for kind, name, devices in self.events if kind == "start"}

    def index(self, kind: str, name: str) -> int:
        return next(i for i, (k, n, _) in enumerate(self.events) if (k, n) == (kind, name))


def _schedule(tmp_path, points, gpus, **launcher):
    fake = FakeLauncher(**launcher)
    outcome = slots.schedule(sweep.load_sweep(_sweep_file(tmp_path, points)), fake, slots.parse_gpus(gpus), poll_s=0)
    return fake, outcome


def test_every_point_gets_a_slot_and_two_run_at_once_on_one_device_given_twice(tmp_path):
    fake, outcome = _schedule(tmp_path, [{"name": n} for n in "abcde"], "0,0")
    assert outcome == {"done": list("abcde"), "skipped": [], "failed": []}
    assert fake.devices() == {n: ["0"] for n in "abcde"}
    assert fake.most == 2  # both slots of device 0 used, never more
    fake, _ = _schedule(tmp_path, [{"name": "a"}, {"name": "b"}], "0,0,1,1")
    assert fake.devices() == {"a": ["0"], "b": ["1"]}  # spread over the devices first
    fake, _ = _schedule(tmp_path, [{"name": n} for n in "abc"], "3")
    assert fake.most == 1 and fake.devices() == {n: ["3"] for n in "abc"}
    fake = FakeLauncher()  # no slots (submitit jobs), at most 2 at once (cluster=local, array_parallelism=2)
    points = sweep.load_sweep(_sweep_file(tmp_path, [{"name": n} for n in "abcde"]))
    assert slots.schedule(points, fake, None, poll_s=0, most=2)["done"] == list("abcde") and fake.most == 2


def test_a_finetuning_point_starts_after_its_source_and_is_not_run_if_the_source_failed(tmp_path):
    points = [{"name": "adv", "clean_ratio": 0}, {"name": "ft", "init_checkpoint": "run:adv", **FT},
              {"name": "other"}, {"name": "third"}]
    fake, outcome = _schedule(tmp_path, points, "0,1,2,3")
    assert outcome["done"] == ["adv", "other", "third", "ft"] and not outcome["failed"]
    assert fake.index("start", "ft") > fake.index("end", "adv")  # free slots did not start it earlier
    assert fake.index("start", "other") < fake.index("end", "adv")  # ... nor did it hold up the later points

    fake, outcome = _schedule(tmp_path, points, "0,1", failing=("adv",))
    assert sorted(outcome["done"]) == ["other", "third"]  # a failing point does not stop the others
    failed = {name: reason for name, _, reason in outcome["failed"]}
    assert failed == {"adv": "RuntimeError: adv failed on purpose",
                      "ft": "not run: the point it starts from, adv, failed"}
    assert "ft" not in fake.devices()


def test_a_launch_that_fails_fails_its_points_only(tmp_path):
    """E.g. sbatch refusing a job (an unknown partition): those points fail with the reason, the rest run."""
    fake = FakeLauncher()

    def start(batch):
        if batch[0][0].config.name == "b":
            raise RuntimeError("sbatch: error: Batch job submission failed\ninvalid partition specified: gpux")
        return fake(batch)

    outcome = slots.schedule(sweep.load_sweep(_sweep_file(tmp_path, [{"name": n} for n in "abc"])), start, ["0"],
                             poll_s=0)
    assert outcome["done"] == ["a", "c"]
    assert outcome["failed"][0][::2] == ("b", "not started: RuntimeError: invalid partition specified: gpux")


def test_a_point_with_gpus_2_takes_two_slots_of_distinct_devices(tmp_path):
    fake, outcome = _schedule(tmp_path, [{"name": "one"}, {"name": "two", "gpus": 2}, {"name": "three"}], "0,0,1,1")
    assert outcome["done"] == ["one", "two", "three"]
    devices = fake.devices()
    assert sorted(devices["two"]) == ["0", "1"]
    assert fake.most == 3  # one + two hold three of the four slots; three took the last one
    fake, _ = _schedule(tmp_path, [{"name": "two", "gpus": 2}, {"name": "a"}], "0,0,1,1")
    assert sorted(fake.devices()["two"]) == ["0", "1"] and fake.devices()["a"] in (["0"], ["1"])
    fake, _ = _schedule(tmp_path, [{"name": "two", "gpus": 2}, {"name": "a"}, {"name": "b"}], "0,1")
    assert fake.index("start", "a") > fake.index("end", "two")  # points start in the sweep's order


def test_a_point_in_use_by_another_process_is_left_to_it_until_the_end(tmp_path, capsys):
    import subprocess
    import sys

    f = _sweep_file(tmp_path, [{"name": n} for n in "abc"])
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from advkit.rundir import RunDir\n"
                               f"with RunDir({str(tmp_path / 'runs' / 'a')!r}).lock():\n"
                               "    print('held', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        fake = FakeLauncher()
        outcome = slots.schedule(sweep.load_sweep(f), fake, ["0"], poll_s=0)
    finally:
        holder.kill()
        holder.wait()
    assert outcome["done"] == ["b", "c", "a"]  # its own process then waits for the holder, as run_points does
    assert re.search(r"\[sweep\] a is in use by pid \d+ .*: left to it for now", capsys.readouterr().out)


def test_point_runs_one_named_point_and_refuses_an_unknown_name(tmp_path, capsys):
    f = _sweep_file(tmp_path, [{"name": "a"}, {"name": "b"}])
    assert cli.main(["sweep", str(f), "--point", "c"]) == 2
    assert re.fullmatch(r"advkit sweep: --point='c' is not accepted: \S+ has no point of that name; its points: "
                        r"\['a', 'b'\]\n", capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("gpus, bad", [("", ""), ("0,,1", ""), ("0,x", "x"), ("-1", "-1"), ("0.5", "0.5"),
                                       ("cuda:0", "cuda:0"), ("0;1", "0;1")])
def test_a_bad_gpus_string_is_refused_before_anything_runs(tmp_path, capsys, gpus, bad):
    with pytest.raises(ValueError, match=rf"--gpus='{re.escape(gpus)}' is not accepted: '{re.escape(bad)}' is no "
                                         r"device index; give comma-separated device indices"):
        slots.parse_gpus(gpus)
    f = _sweep_file(tmp_path, [{"name": "a"}])
    assert cli.main(["sweep", str(f), "--gpus", gpus]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"advkit sweep: --gpus={gpus!r} is not accepted") and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_a_point_asking_more_gpus_than_devices_and_gpus_with_jobs_are_refused(tmp_path, capsys):
    f = _sweep_file(tmp_path, [{"name": "a"}, {"name": "big", "gpus": 2}])
    assert cli.main(["sweep", str(f), "--gpus", "0,0"]) == 2
    assert re.fullmatch(r"advkit sweep: point 'big': gpus=2 is not accepted with --gpus=0,0: that gives 1 distinct "
                        r"device\(s\), and a point's processes each take their own\n", capsys.readouterr().err)
    assert cli.main(["sweep", str(f), "--gpus", "0,0", "--check"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["sweep", str(f), "--gpus", "0,1", "--jobs", "2"])
    assert "--gpus is not accepted together with --jobs or --shard" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- real slot processes

STAND_IN = """import os, pathlib
from advkit.rundir import RunDir
run = pathlib.Path(runs_root) / name
run.mkdir(parents=True, exist_ok=True)
RunDir(run).write_status("running")  # the kit's mark of an accepted run
(run / "slot.txt").write_text(os.environ["CUDA_VISIBLE_DEVICES"] + " " + os.environ["OMP_NUM_THREADS"])
if name == "broken":
    raise RuntimeError("broken on purpose")
(run / "results.csv").write_text("branch,attack,targeted,eps,step,step_rule,restarts,steps,accuracy,worst_accuracy,n,seed\\n-,clean,True,8,1,fixed,1,0,0.5,0.5,2,0\\n")
RunDir(run).write_status("done")
"""


def test_slot_processes_see_their_device_and_a_failing_one_does_not_stop_the_others(tmp_path, capfd, monkeypatch):
    """Each point's process gets CUDA_VISIBLE_DEVICES of its slot (on this CPU-only machine too) and cores/slots
    threads; a point that fails is listed, the others finish, and the status is 1."""
    import nbformat

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = [nbformat.v4.new_code_cell(STAND_IN)]
    nbformat.write(notebook, tmp_path / "stand-in.ipynb")
    f = _sweep_file(tmp_path, [{"name": n} for n in ("a", "broken", "b")], base={"preset": "test"},
                    notebook=str(tmp_path / "stand-in.ipynb"))
    assert cli.main(["sweep", str(f), "--gpus", "0,1"]) == 1
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    seen = {n: (tmp_path / "runs" / n / "slot.txt").read_text() for n in ("a", "broken", "b")}
    assert seen["a"] == f"0 {threads}" and seen["broken"] == f"1 {threads}"
    assert seen["b"] in (f"0 {threads}", f"1 {threads}")
    out = capfd.readouterr().out
    assert "[sweep] FAILED broken: see" in out and "[sweep] 2 done, 0 skipped, 1 failed" in out
    assert rundir.RunDir(tmp_path / "runs" / "b").finished()


@pytest.mark.parametrize("option", ["", ",gpus=1/0"])
def test_local_submitit_jobs_at_once_each_see_their_own_device(tmp_path, monkeypatch, option):
    """cluster=local on a machine of 2 GPUs (torch's count faked here), 2 jobs at once: submitit alone gave every
    job CUDA_VISIBLE_DEVICES=0; each job now takes a slot (one per GPU, or ``gpus=`` as --gpus gives them)."""
    import nbformat
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = [nbformat.v4.new_code_cell(STAND_IN)]
    nbformat.write(notebook, tmp_path / "stand-in.ipynb")
    f = _sweep_file(tmp_path, [{"name": "a"}, {"name": "b"}], base={"preset": "test"},
                    notebook=str(tmp_path / "stand-in.ipynb"))
    outcome = slurm.run_slurm(f, "cluster=local,timeout_min=20,array_parallelism=2" + option, poll_s=0.2)
    assert sorted(outcome["done"]) == ["a", "b"], outcome
    seen = {n: (tmp_path / "runs" / n / "slot.txt").read_text().split()[0] for n in ("a", "b")}
    assert seen == ({"a": "0", "b": "1"} if not option else {"a": "1", "b": "0"})


def test_local_jobs_on_the_cpu_take_no_gpu_slots(tmp_path, monkeypatch):
    """On a machine with 2 GPUs, a sweep whose points all run on the CPU was held to 2 jobs at once (one per GPU
    slot) whatever array_parallelism said; points that may use a GPU still take one slot each."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    on_cpu = sweep.load_sweep(_sweep_file(tmp_path, [{"name": "a"}, {"name": "b"}],
                                          base={"preset": "test", "device": "cpu"}))
    auto = sweep.load_sweep(_sweep_file(tmp_path / "auto", [{"name": "a"}, {"name": "b", "device": "cpu"}],
                                        base={"preset": "test"}))
    options = slurm.parse_slurm("cluster=local,timeout_min=20,array_parallelism=4")
    assert slurm.local_slots(options, on_cpu) is None
    assert slurm.local_slots(options, auto) == ["0", "1"]
    assert slurm.local_slots(slurm.parse_slurm("cluster=local,timeout_min=20,gpus=1/1"), on_cpu) == ["1", "1"]


def test_local_slots_are_refused_on_slurm_and_checked_like_gpus():
    with pytest.raises(ValueError, match=r"--slurm gpus=0/1 is not accepted with cluster=slurm"):
        slurm.parse_slurm("timeout_min=10,gpus=0/1")
    with pytest.raises(ValueError, match=r"'x' is no device index"):
        slurm.parse_slurm("timeout_min=10,cluster=local,gpus=x")


class _FakeProcess:
    """A started point's process that has already exited 0 (what ``subprocess.Popen`` returns), recording its env."""
    envs: list[dict] = []

    def __init__(self, command, env=None, **kwargs):
        _FakeProcess.envs.append(env)

    def poll(self):
        return 0

    def wait(self, timeout=None):
        return 0


def test_slots_stay_inside_the_devices_and_cores_this_process_was_given(tmp_path, monkeypatch):
    """Inside an allocation (CUDA_VISIBLE_DEVICES=4,5,6,7; affinity 1 core of 8), --gpus 0,1 runs on devices 4
    and 5 with one thread each, and an index the allocation lacks is refused before any process starts."""
    f = _sweep_file(tmp_path, [{"name": n} for n in ("a", "b")], base={"preset": "test"})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(subprocess, "Popen", _FakeProcess)
    _FakeProcess.envs = []
    slots.run_slots(f, "0,1")
    assert sorted(env["CUDA_VISIBLE_DEVICES"] for env in _FakeProcess.envs) == ["4", "5"]
    assert {env["OMP_NUM_THREADS"] for env in _FakeProcess.envs} == {"1"}
    _FakeProcess.envs = []
    with pytest.raises(ValueError, match=r"--gpus=0,4 is not accepted: index 4 is beyond .*indices 0-3"):
        slots.run_slots(f, "0,4")
    assert _FakeProcess.envs == []
    assert sweep.run_shards(f, 2) == 1  # the fake processes ran nothing
    assert {env["OMP_NUM_THREADS"] for env in _FakeProcess.envs} == {"1"}  # 1 usable core: not 8 // 2


def test_a_point_whose_process_cannot_start_fails_alone_and_the_started_ones_stay_tracked(tmp_path, monkeypatch,
                                                                                         capsys):
    """One batch starts a, b and c at once; b's Popen raises (e.g. too many open files). Only b is reported
    failed; a and c were started and are tracked to their end (here: exited 0)."""
    f = _sweep_file(tmp_path, [{"name": n} for n in ("a", "b", "c")], base={"preset": "test"})
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    started = []

    def popen(command, env=None, **kwargs):
        if command[command.index("--point") + 1] == "b":
            raise OSError(24, "Too many open files")
        started.append(command[command.index("--point") + 1])
        return _FakeProcess(command, env)

    monkeypatch.setattr(subprocess, "Popen", popen)
    outcome = slots.run_slots(f, "0,1,2")
    reasons = {name: reason for name, _, reason in outcome["failed"]}
    assert started == ["a", "c"]
    assert reasons["b"].startswith("not started: OSError") and "Too many open files" in reasons["b"]
    assert set(reasons) == {"b"} and sorted(outcome["done"]) == ["a", "c"]  # started: their own outcome (exit 0)


# ---------------------------------------------------------------- --slurm options

@pytest.mark.parametrize("text, message", [
    ("partition=gpu", r"--slurm: timeout_min is required .*; accepted keys: cluster, partition"),
    ("timeout_min=60,gpu=8", r"--slurm: key 'gpu' is not accepted; accepted keys: cluster, partition, account"),
    ("timeout_min=60,partition", r"--slurm='timeout_min=60,partition' is not accepted: 'partition' is no key=value"),
    ("timeout_min=60,,partition=a", r"'' is no key=value pair"),
    ("timeout_min=1h", r"--slurm timeout_min='1h' is not accepted: give an integer \(each job's time limit"),
    ("timeout_min=60,timeout_min=30", r"--slurm: key 'timeout_min' is given twice"),
    ("timeout_min=0", r"--slurm timeout_min=0 is not accepted; it must lie in \[1, inf\]"),
    ("timeout_min=60,mem_gb=-4", r"--slurm mem_gb=-4.0 is not accepted; it must lie in \(0, inf\]"),
    ("timeout_min=60,partition=", r"--slurm partition= is not accepted: give a value"),
    ("timeout_min=60,cluster=lsf", r"--slurm cluster='lsf' is not accepted; choose one of \['slurm', 'local'\]"),
    ("timeout_min=2,signal_delay_s=120", r"--slurm signal_delay_s=120 is not accepted with timeout_min=2"),
])
def test_bad_slurm_options_are_refused_naming_the_key_before_anything_is_submitted(tmp_path, capsys, text, message):
    with pytest.raises(ValueError, match=message):
        slurm.parse_slurm(text)
    f = _sweep_file(tmp_path, [{"name": "a"}])
    assert cli.main(["sweep", str(f), "--slurm", text]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


class _FakeExecutor:
    """submitit's executor where sbatch refuses the array of 2-GPU jobs; the 1-GPU jobs succeed at once."""

    def __init__(self):
        self.gpus, self.submitted = None, []

    def update_parameters(self, gpus_per_node=None, **kwargs):
        self.gpus = gpus_per_node

    @contextlib.contextmanager
    def batch(self):
        yield
        if self.gpus == 2:
            raise RuntimeError("sbatch: error: Batch job submission failed: Requested node configuration is not available")

    def submit(self, job):
        self.submitted.append((self.gpus, job.command[job.command.index("--point") + 1]))
        return types.SimpleNamespace(job_id=str(len(self.submitted)), paths=types.SimpleNamespace(stdout="log"),
                                     done=lambda: True, exception=lambda: None)


def test_an_array_sbatch_refuses_fails_its_points_alone_and_the_submitted_ones_stay_tracked(tmp_path, monkeypatch):
    """One batch holds 1-GPU points (one array) and a 2-GPU point (another); sbatch refuses the second array. Only
    its point is reported failed; the first array's jobs were submitted and end as theirs end."""
    f = _sweep_file(tmp_path, [{"name": "a"}, {"name": "big", "gpus": 2}, {"name": "c"}],
                    base={"preset": "test", "device": "auto"})
    executor = _FakeExecutor()
    monkeypatch.setattr(slurm, "make_executor", lambda options, folder: executor)
    outcome = slurm.run_slurm(f, "timeout_min=60,cluster=local", poll_s=0.01)
    reasons = {name: reason for name, _, reason in outcome["failed"]}
    assert [name for gpus, name in executor.submitted if gpus == 1] == ["a", "c"]
    assert set(reasons) == {"big"} and "Requested node configuration is not available" in reasons["big"]
    assert sorted(outcome["done"]) == ["a", "c"]


def test_slurm_options_map_to_the_job_script_and_are_checked_against_the_points(tmp_path, monkeypatch):
    options = slurm.parse_slurm("partition=gpu, gpus_per_node=8,timeout_min=240,mem_gb=32,cpus_per_task=10")
    assert options == {"cluster": "slurm", "partition": "gpu", "gpus_per_node": 8, "timeout_min": 240,
                       "mem_gb": 32.0, "cpus_per_task": 10, "signal_delay_s": 120, "max_num_timeout": 3}
    points = sweep.load_sweep(_sweep_file(tmp_path, [{"name": "a"}, {"name": "big", "gpus": 4}]))
    with pytest.raises(ValueError, match=r"point 'big': gpus=4 is not accepted with --slurm gpus_per_node=2"):
        slurm.check_points(points, options | {"gpus_per_node": 2})
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(ValueError, match=r"cluster=slurm is not accepted here: SLURM's sbatch and srun are not"):
        slurm.check_points(points, options)
    for command in ("sbatch", "srun"):  # a stand-in SLURM, enough for submitit to write its job script
        (tmp_path / command).write_text("#!/bin/sh\necho Submitted batch job 42\n")
        (tmp_path / command).chmod(0o755)
    slurm.check_points(points, options)
    executor = slurm.make_executor(options, tmp_path / "jobs")
    executor.update_parameters(gpus_per_node=4)  # what a point with gpus: 4 asks for
    script = executor._executor._make_submission_file_text("COMMAND", "uid")
    for line in ("--partition=gpu", "--time=240", "--mem=32GB", "--cpus-per-task=10", "--signal=USR2@120",
                 "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=4", "--job-name=advkit-sweep"):
        assert f"#SBATCH {line}\n" in script, line


# ---------------------------------------------------------------- submitit's local executor: pre-emption

def _tensors(value, where=""):
    """Every tensor in a checkpoint, by its path in it."""
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{where}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{where}/{i}")


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _wait(condition, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.slow
def test_a_preempted_submitit_job_requeues_resumes_and_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch):
    """Two points of one config through submitit's local executor: 'whole' runs through; 'cut' gets the pre-emption
    signal mid-training. LocalJob._interrupt() signals the job's controller, which (submitit 1.5.4) does not pass it
    on, so the test sends USR2 where the controller sends it at a time limit: to the job's task process, and, as
    SLURM may, to the point's processes too (which ignore it). The job stops the run (which writes a checkpoint),
    requeues, and the requeued job resumes."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same threads in both jobs
    base = FAST | {"n_train": 256, "batch_size": 32, "epochs": 2, "lr_decay_epochs": [1], "train_steps": 2,
                   "n_test": 32, "checkpoint_every_steps": 1}
    f = _sweep_file(tmp_path, [{"name": "cut"}, {"name": "whole"}], base=base)
    result = {}
    driver = threading.Thread(target=lambda: result.update(slurm.run_slurm(f, "cluster=local,timeout_min=20")))
    driver.start()
    cut = rundir.RunDir(tmp_path / "runs" / "cut")
    _wait(lambda: cut.last_checkpoint.exists())  # trained a step: mid-run (16 steps in all)
    kernel = int(re.match(r"pid (\d+)", cut.lock_file.read_text()).group(1))
    point = _parent(kernel)  # the point's process (advkit sweep --point), running papermill
    task = _parent(point)  # the job's task: submitit's handler
    assert "submitit.core._submit" in Path(f"/proc/{task}/cmdline").read_text()
    for pid in (kernel, point, task):  # as SLURM signals every process of the job; only the task acts on it
        os.kill(pid, signal.SIGUSR2)
    _wait(lambda: cut.status()["state"] != "running")
    assert cut.status()["state"] == "interrupted"  # the SIGTERM reached training, which wrote a checkpoint
    stopped = rundir.load_checkpoint(cut.path)
    assert 0 < stopped["step"] < 16 and not cut.results_file.exists()
    driver.join(timeout=600)
    assert sorted(result["done"]) == ["cut", "whole"] and not result["failed"], result
    logs = "".join(p.read_text() for p in (tmp_path / "runs" / ".submitit").glob("*_log.*"))
    assert "stopping the run at a checkpoint, then requeueing" in logs and "Requeued job" in logs, logs
    assert "[sweep] run cut (100% adv + 0% clean, norm=bn) resuming" in logs
    got, want = rundir.load_checkpoint(cut.path), rundir.load_checkpoint(tmp_path / "runs" / "whole")
    assert got["step"] == want["step"] == 16
    got_tensors, want_tensors = dict(_tensors(got)), dict(_tensors(want))
    assert got_tensors.keys() == want_tensors.keys() and len(got_tensors) > 50
    differ = [where for where, tensor in got_tensors.items() if not torch.equal(tensor, want_tensors[where])]
    # weights, optimizer, every rank's buffers, the attack's generator and the global random state: all equal
    # (the global one differed while each epoch's DataLoader drew its workers' base seed from it)
    assert differ == [], differ
    columns = ["branch", "attack", "steps", "accuracy", "worst_accuracy", "n", "weights"]
    pd.testing.assert_frame_equal(cut.results()[columns], rundir.RunDir(tmp_path / "runs" / "whole").results()[columns])


# ---------------------------------------------------------------- done when: the same numbers three ways

DEMO_POINTS = [{"name": "standard", "adv_ratio": 0, "clean_ratio": 1}, {"name": "adv0clean", "clean_ratio": 0},
               {"name": "adv100clean", "clean_ratio": 1}, {"name": "adv100clean-mbn", "clean_ratio": 1, "norm": "mbn"},
               {"name": "adv100clean-gn", "clean_ratio": 1, "norm": "gn"}]


def _results(runs: Path) -> pd.DataFrame:
    tables = [rundir.RunDir(runs / p["name"]).results().assign(run=p["name"]) for p in DEMO_POINTS]
    return pd.concat(tables, ignore_index=True)[["run", "branch", "attack", "steps", "accuracy", "worst_accuracy",
                                                 "n", "weights"]]


@pytest.mark.slow
def test_the_demos_five_points_give_the_same_results_serially_in_slots_and_as_submitit_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the serial kernels and the submitit jobs; the slots: threads=1
    files = {way: _sweep_file(tmp_path / way, DEMO_POINTS) for way in ("serial", "slots", "submitit")}
    assert not sweep.run_sweep(files["serial"], progress=False)["failed"]
    assert not slots.run_slots(files["slots"], "0,0", threads=1)["failed"]
    local = "cluster=local,timeout_min=20,array_parallelism=2"
    assert not slurm.run_slurm(files["submitit"], local)["failed"]
    serial = _results(tmp_path / "serial" / "runs")
    assert len(serial) == 12  # clean and PGD-1 for each run, both MBN branches
    pd.testing.assert_frame_equal(_results(tmp_path / "slots" / "runs"), serial)
    pd.testing.assert_frame_equal(_results(tmp_path / "submitit" / "runs"), serial)
    names = [p["name"] for p in DEMO_POINTS]  # sweeps started again: every point finished, nothing runs
    assert slots.run_slots(files["slots"], "0,0")["skipped"] == names
    assert slurm.run_slurm(files["submitit"], local)["skipped"] == names
    assert len(list((tmp_path / "submitit" / "runs" / ".submitit").glob("*_submitted.pkl"))) == 5
