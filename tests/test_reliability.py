"""Reliability: checksummed checkpoints with fallback, kill/SIGTERM and resume in real subprocesses (bitwise on
the CPU), bad inputs refused before anything is written, untrusted files refused, non-finite losses."""

import hashlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from advkit import config, data, paths, run, rundir, sweep, train
from advkit.config import make_config
from helpers import train_until_crash

# 2 epochs of 8 batches; deterministic on the CPU. Evaluation kept tiny: the subprocess runs train + evaluation.
SMALL = dict(n_train=256, batch_size=32, epochs=2, lr_decay_epochs=[1], norm="mbn", clean_ratio=0.5, device="cpu",
             n_test=32, eval_checkpoints=[1], sanity_n=0, bnstats_channels=0)
STEPS = 2 * 256 // 32


# ---------------------------------------------------------------- helpers

def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _damage(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    else:  # flip one byte at a fraction of the file
        i = int(len(raw) * float(how))
        raw[i] ^= 0xFF
        path.write_bytes(raw)


def _start(config_path: Path, log: Path, resume: bool = True) -> subprocess.Popen:
    """``python -m advkit.run [--resume] CONFIG`` in a fresh process: one thread (deterministic, and gentle
    with a small machine), this checkout's package."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                        "PYTHONPATH": os.pathsep.join([str(paths.project_root()), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "advkit.run", *(["--resume"] if resume else []), str(config_path)]
    with open(log, "ab") as stderr:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 180) -> bool:
    """Poll until ``condition()`` holds (True) or the process ended (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise TimeoutError("the training subprocess made no progress")


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _saved_config(tmp_path: Path, name: str, **overrides) -> Path:
    cfg = make_config("test", name=name, runs_root=str(tmp_path / "runs"), **SMALL | overrides)
    path = tmp_path / f"{name}.json"
    cfg.save(path)
    return path


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of SMALL through the same command line, in a subprocess like the killed ones."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = _start(_saved_config(tmp, "straight"), tmp / "log.txt", resume=False)
    assert proc.wait(timeout=300) == 0, (tmp / "log.txt").read_text()[-3000:]
    return tmp / "runs" / "straight"


def _assert_matches_reference(run_dir: Path, reference: Path) -> None:
    got, want = rundir.load_checkpoint(run_dir), rundir.load_checkpoint(reference)
    assert (got["epoch"], got["step"]) == (2, STEPS)
    _assert_same_weights(got["model"], want["model"])
    _assert_same_weights(got["optimizer"]["state"][0], want["optimizer"]["state"][0])
    assert [m["loss"] for m in _metrics(run_dir)] == [m["loss"] for m in _metrics(reference)]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
    assert (run_dir / "results.csv").read_text() == (reference / "results.csv").read_text()


# ---------------------------------------------------------------- checkpoint files

def test_checkpoints_keep_the_previous_one_and_leave_no_temporary_file(tmp_path):
    folder = rundir.RunDir(tmp_path)
    for value in range(3):
        folder.save_checkpoint({"w": torch.full((3,), float(value)), "step": value})
    assert rundir.load_checkpoint(folder.last_checkpoint)["step"] == 2
    assert rundir.load_checkpoint(folder.previous_checkpoint)["step"] == 1
    assert sorted(p.name for p in folder.checkpoints.iterdir()) == ["last.pt", "prev.pt"]


@pytest.mark.parametrize("how", ["truncate", "0.2", "0.5", "0.8"])
def test_a_truncated_or_corrupt_checkpoint_is_an_error_naming_the_file(tmp_path, how):
    path = rundir.RunDir(tmp_path).last_checkpoint
    rundir.RunDir(tmp_path).save_checkpoint({"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(0))})
    rundir.load_checkpoint(path)
    _damage(path, how)
    with pytest.raises(rundir.CheckpointError,
                       match=rf"checkpoint {re.escape(str(path))} is (truncated or corrupt|corrupt: the SHA)"):
        rundir.load_checkpoint(path)


def test_a_flipped_byte_in_the_weights_is_caught_by_the_checksum(tmp_path):
    """A flip inside the tensor data: the archive still reads, only the SHA-256 can tell."""
    path = rundir.RunDir(tmp_path).last_checkpoint
    weights = torch.zeros(4096, dtype=torch.uint8)
    rundir.RunDir(tmp_path).save_checkpoint({"w": weights})
    wrapper = torch.load(path, weights_only=True)
    payload = bytearray(wrapper["payload"].numpy().tobytes())
    payload[payload.find(bytes(4096)) + 100] = 1  # inside the zeros of "w"
    wrapper["payload"] = torch.frombuffer(payload, dtype=torch.uint8)
    torch.save(wrapper, path)
    assert torch.load(io.BytesIO(bytes(payload)), weights_only=True)["w"].sum() == 1  # readable, but wrong
    with pytest.raises(rundir.CheckpointError, match=rf"checkpoint {re.escape(str(path))} is corrupt: the SHA-256"):
        rundir.load_checkpoint(path)


@pytest.mark.parametrize("drop", ["payload", "sha256"])
def test_a_checksum_wrapper_without_its_payload_or_checksum_is_a_checkpoint_error(tmp_path, drop):
    """Not a KeyError: resume falls back to prev.pt only on a CheckpointError."""
    folder = rundir.RunDir(tmp_path)
    folder.save_checkpoint({"w": torch.ones(3)})
    folder.save_checkpoint({"w": torch.zeros(3)})
    wrapper = torch.load(folder.last_checkpoint, weights_only=True)
    del wrapper[drop]
    torch.save(wrapper, folder.last_checkpoint)
    with pytest.raises(rundir.CheckpointError, match=r"is corrupt: its .* wrapper lacks the payload tensor or its"):
        rundir.load_checkpoint(folder.last_checkpoint)
    with pytest.warns(RuntimeWarning, match="resuming from the previous checkpoint"):
        assert folder.load_resume_checkpoint()["w"].sum() == 3


def test_resume_falls_back_to_the_previous_checkpoint_and_ends_bitwise_equal(tmp_path, monkeypatch):
    kw = dict(runs_root=str(tmp_path), checkpoint_every_steps=3, **SMALL)
    straight = run.train_run(make_config("test", name="straight", **kw), show_progress=False)
    train_until_crash(make_config("test", name="crashed", **kw), calls=11, monkeypatch=monkeypatch)
    folder = tmp_path / "crashed" / "checkpoints"
    assert [rundir.load_checkpoint(folder / n)["step"] for n in ("last.pt", "prev.pt")] == [9, 8]
    _damage(folder / "last.pt", "truncate")
    with pytest.warns(RuntimeWarning, match=rf"{re.escape(str(folder / 'last.pt'))} is truncated .*resuming from "
                                            rf"the previous checkpoint {re.escape(str(folder / 'prev.pt'))}"):
        resumed = run.train_run(make_config("test", name="crashed", resume=True, **kw), show_progress=False)
    _assert_same_weights(straight.state_dict(), resumed.state_dict())
    assert [m["loss"] for m in _metrics(tmp_path / "crashed")] == [m["loss"] for m in _metrics(tmp_path / "straight")]


def test_resume_without_any_good_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    cfg = make_config("test", name="crashed", runs_root=str(tmp_path), checkpoint_every_steps=2, **SMALL)
    train_until_crash(cfg, calls=5, monkeypatch=monkeypatch)
    folder = tmp_path / "crashed" / "checkpoints"
    _damage(folder / "last.pt", "truncate")
    (folder / "prev.pt").unlink()
    with pytest.raises(rundir.CheckpointError, match=rf"no good checkpoint to resume from in {re.escape(str(folder))}: "
                                                    rf"checkpoint {re.escape(str(folder / 'last.pt'))} is truncated"
                                                    r".*prev\.pt"):
        run.train_run(make_config("test", name="crashed", resume=True, runs_root=str(tmp_path),
                                checkpoint_every_steps=2, **SMALL), show_progress=False)


class Payload:
    """Unpickling it would run code: it touches a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain-file", "inside-a-valid-checksum"])
def test_a_checkpoint_carrying_code_is_refused(tmp_path, wrapped):
    marker, path = tmp_path / "code-ran", tmp_path / "evil.pt"
    state = {"model": {"w": torch.zeros(2)}, "extra": Payload(marker)}
    if wrapped:  # a file that passes the checksum: the inner load must refuse it too
        buffer = io.BytesIO()
        torch.save(state, buffer)
        state = {"format": rundir.CHECKPOINT_FORMAT, "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
                 "payload": torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)}
    torch.save(state, path)
    with pytest.raises(rundir.CheckpointError, match=rf"checkpoint {re.escape(str(path))} is refused: it refers to "
                                                    r"\S+, not only to tensors.*weights_only=True"):
        rundir.load_checkpoint(path)
    assert not marker.exists()


def test_a_sweep_file_with_a_python_tag_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    f = tmp_path / "evil.yaml"
    f.write_text(f"base: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n")
    with pytest.raises(ValueError, match=r"not valid YAML at line 1"):
        sweep.load_sweep(f)
    assert not marker.exists()


# ---------------------------------------------------------------- non-finite loss

def test_a_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    cfg = make_config("test", name="nan", runs_root=str(tmp_path), checkpoint_every_steps=2, **SMALL)
    real, seen = train.training_loss, []

    def nan_at_step_11(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        seen.append(1)
        return (loss * float("nan") if len(seen) == 11 else loss), stats

    monkeypatch.setattr(train, "training_loss", nan_at_step_11)
    last = tmp_path / "nan" / "checkpoints" / "last.pt"
    with pytest.raises(FloatingPointError, match=rf"non-finite loss \(nan.*epoch 2, batch 3 of 8 \(step 11\).*"
                                                 rf"{re.escape(str(last))}"):
        run.train_run(cfg, show_progress=False)
    ckpt = rundir.load_checkpoint(last)  # loads: its checksum verifies
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]) == (1, 2, 10)
    assert json.loads((tmp_path / "nan" / "status.json").read_text())["state"] == "failed"


# ---------------------------------------------------------------- real processes: SIGKILL and SIGTERM

@pytest.mark.slow
def test_sigkill_at_random_points_then_the_same_command_ends_bitwise_equal(tmp_path, reference):
    """Kill `python -m advkit.run --resume CONFIG` with SIGKILL three times, each at a seeded random moment after
    it wrote a new checkpoint (mid-step, mid-write or mid-epoch), then run the same command to the end."""
    config_path = _saved_config(tmp_path, "killed", checkpoint_every_steps=1)
    run_dir, log = tmp_path / "runs" / "killed", tmp_path / "log.txt"
    last = run_dir / "checkpoints" / "last.pt"
    rng = random.Random(8)
    kills = 0
    for _ in range(3):
        before = _inode(last)
        proc = _start(config_path, log)
        if _wait_for(lambda: _inode(last) not in (None, before), proc):
            time.sleep(rng.uniform(0, 0.3))
            kills += proc.poll() is None
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert kills == 3
    assert json.loads((run_dir / "status.json").read_text())["state"] == "running"  # what a kill leaves
    proc = _start(config_path, log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    _assert_matches_reference(run_dir, reference)


@pytest.mark.slow
def test_sigterm_checkpoints_where_it_is_exits_cleanly_and_resumes_bitwise_equal(tmp_path, reference):
    config_path = _saved_config(tmp_path, "termed", checkpoint_every_steps=0)  # only SIGTERM writes mid-epoch
    run_dir, log = tmp_path / "runs" / "termed", tmp_path / "log.txt"
    proc = _start(config_path, log)
    assert _wait_for(lambda: (run_dir / "status.json").exists(), proc)  # the handler is in place
    time.sleep(random.Random(15).uniform(0, 0.3))  # a moment within the first epoch (8 steps of ~0.1 s)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    assert "SIGTERM: training stopped at epoch" in log.read_text() and "--resume" in log.read_text()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted" and "resume=True" in status["error"]
    ckpt = rundir.load_checkpoint(run_dir)
    assert ckpt["batch_in_epoch"] > 0 and ckpt["step"] == 8 * ckpt["epoch"] + ckpt["batch_in_epoch"] < STEPS
    assert not (run_dir / "results.csv").exists()
    proc = _start(config_path, log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    _assert_matches_reference(run_dir, reference)


def test_the_sigterm_handler_lives_only_while_training(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with train.sigterm_flag() as received:
        assert signal.getsignal(signal.SIGTERM) is not before
        os.kill(os.getpid(), signal.SIGTERM)
        assert received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before


def test_resume_auto_resumes_restarts_or_starts_as_the_folder_says(tmp_path, monkeypatch):
    cfg = make_config("test", name="r", runs_root=str(tmp_path), checkpoint_every_steps=2, resume="auto", **SMALL)
    train_until_crash(cfg, calls=1, monkeypatch=monkeypatch)  # no folder yet: started; killed before a checkpoint
    assert not rundir.RunDir(cfg.run_dir).has_checkpoint()
    train_until_crash(cfg, calls=4, monkeypatch=monkeypatch)  # started again; killed after the checkpoint at step 2
    assert rundir.load_checkpoint(cfg.run_dir)["step"] == 2
    steps = []
    real = train.training_loss
    monkeypatch.setattr(train, "training_loss", lambda *a, **k: steps.append(1) or real(*a, **k))
    run.train_run(cfg, show_progress=False)  # resumed from step 2
    assert len(steps) == rundir.load_checkpoint(cfg.run_dir)["step"] - 2


# ---------------------------------------------------------------- bad input: refused before anything is written

BAD_INPUTS = [
    # out-of-range numbers
    (dict(clean_ratio=1.5), r"clean_ratio=1.5 .*\[0, 1\]"),
    (dict(clean_ratio=-0.1), r"clean_ratio=-0.1 .*\[0, 1\]"),
    (dict(alpha=1.2), r"alpha=1.2 .*\[0, 1\]"),
    (dict(train_eps=-1.0), r"train_eps=-1.0 .*\[0, 255\]"),
    (dict(train_eps=300), r"train_eps=300 .*\[0, 255\]"),
    (dict(eval_eps=300), r"eval_eps=300 .*\[0, 255\]"),
    (dict(train_step=256.0), r"train_step=256.0 .*\[0, 255\]"),
    (dict(eval_step=-2.0), r"eval_step=-2.0"),
    (dict(train_steps=-1), r"train_steps=-1 .*\[0, inf\]"),
    (dict(train_steps=2.5), r"train_steps=2.5 .*integer"),
    (dict(train_clean_start_prob=1.5), r"train_clean_start_prob=1.5 .*\[0, 1\]"),
    (dict(label_smoothing=-0.1), r"label_smoothing=-0.1"),
    (dict(lr=0), r"lr=0 .*\(0, inf\]"),
    (dict(lr=-0.1), r"lr=-0.1 .*\(0, inf\]"),
    (dict(lr=float("nan")), r"lr=nan .*finite"),
    (dict(epochs=0), r"epochs=0 .*\[1, inf\]"),
    (dict(running_stats_epochs=3), r"running_stats_epochs=3 .*epochs=2"),
    (dict(warmup_epochs=3.0), r"warmup_epochs=3.0 .*\[0, 2\]"),
    (dict(lr_decay_epochs=[5]), r"lr_decay_epochs=\[5\] .*epochs=2"),
    (dict(eval_checkpoints=[10, -1]), r"eval_checkpoints=\[10, -1\]"),
    (dict(eval_restarts=0), r"eval_restarts=0 .*\[1, inf\]"),
    # unknown names
    (dict(strategy="madry"), r"unknown parameter\(s\) \['strategy'\]; valid parameters: .*'adv_ratio'"),
    (dict(clean_ratoi=0.5), r"unknown parameter\(s\) \['clean_ratoi'\]; valid parameters: .*'clean_ratio'"),
    (dict(adv_ratio=0.5), r"adv_ratio=0.5 .*\[0, 1\]"),
    (dict(norm="batchnorm"), r"norm='batchnorm' .*\['bn', 'mbn', 'gn'\]"),
    (dict(arch="small_resnet9"), r"arch='small_resnet9' .*'small_resnet8'"),
    (dict(arch="resnet19"), r"arch='resnet19' .*'resnet50'"),
    (dict(dataset="mnist"), r"dataset='mnist' .*'fashion-mnist'"),
    (dict(optimizer="adam"), r"optimizer='adam' .*\['sgd', 'rmsprop'\]"),
    (dict(schedule="linear"), r"schedule='linear' .*\['step', 'exp', 'cosine'\]"),
    (dict(device="tpu"), r"device='tpu'"),
    (dict(eval_step_rule="linear"), r"eval_step_rule='linear' .*'fixed'"),
    # impossible combinations
    (dict(alp_weight=0.5, clean_ratio=0.0), r"alp_weight=0.5 .*clean_ratio=0.0"),
    (dict(adv_ratio=0, clean_ratio=0.5), r"clean_ratio=0.5 .*adv_ratio=0"),
    (dict(sync_bn=True), r"sync_bn=True .*norm='mbn'"),
    (dict(norm="bn", sync_bn=True, gpus=2, device="cpu"), r"sync_bn=True is not accepted with device='cpu' and gpus=2"),
    (dict(clean_ratio=0.0), r"norm='mbn' is not accepted with adv_ratio=1.0, clean_ratio=0.0: .*\(adv_ratio=1, clean_ratio > 0\)"),
    (dict(norm="mbn", adv_ratio=0, clean_ratio=1.0), r"norm='mbn' is not accepted with adv_ratio=0"),
    (dict(norm="gn", running_stats_epochs=1), r"running_stats_epochs=1 is not accepted with norm='gn'"),
    (dict(norm="gn", attack_bn_mode="batch"), r"attack_bn_mode='batch' is not accepted with norm='gn'"),
    (dict(adv_ratio=True), r"adv_ratio=True is not accepted; choose one of \[0, 1\]"),
    (dict(resume=1), r"resume=1 is not accepted; choose one of \[False, True, 'auto'\]"),
    (dict(batch_size=32, gpus=3), r"batch_size=32 .*gpus=3"),
    (dict(batch_size=512), r"batch_size=512 .*n_train=256"),
    (dict(finetune_bn=True), r"finetune_bn=True needs init_checkpoint"),
    (dict(resume=True, overwrite=True), r"resume=True and overwrite=True"),
    (dict(resume=True), r"resume=True but .*checkpoints"),
    # missing or unreadable paths
    (dict(data_root="{tmp}/nowhere"), r"data_root='.*/nowhere' .*Fashion-MNIST"),
    (dict(data_root="{tmp}/empty"), r"data_root='.*/empty' .*Fashion-MNIST"),
    (dict(dataset="cifar10", arch="small_resnet8", data_root="{tmp}/empty"), r"data_root='.*/empty' .*CIFAR-10"),
    (dict(init_checkpoint="{tmp}/nowhere.pt"), r"init_checkpoint='.*/nowhere.pt' does not exist"),
    (dict(init_checkpoint="{tmp}/empty"), r"init_checkpoint='.*/empty' .*no checkpoints/last.pt"),
    (dict(init_checkpoint="{tmp}/garbage.pt"), r"checkpoint .*/garbage.pt is truncated or corrupt"),
]


@pytest.mark.parametrize("overrides, message", BAD_INPUTS, ids=[
    "-".join(f"{k}={v}" for k, v in o.items()).replace("{tmp}/", "") for o, _ in BAD_INPUTS])
def test_bad_inputs_name_the_parameter_and_write_nothing(tmp_path, monkeypatch, overrides, message):
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-copy")  # as on a machine without it
    runs = tmp_path / "runs"
    other = runs / "other"
    other.mkdir(parents=True)
    for name, text in (("config.json", "{}"), ("results.csv", "accuracy\n0.5\n"), ("status.json", '{"state": "done"}')):
        (other / name).write_text(text)
    snapshot = {p: p.read_bytes() for p in other.iterdir()}
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    overrides = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in overrides.items()}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run.run(make_config("test", name="bad", runs_root=str(runs), **SMALL | overrides), show_progress=False)
    assert [p.name for p in runs.iterdir()] == ["other"]
    assert {p: p.read_bytes() for p in other.iterdir()} == snapshot


def _typo_through_cli(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"name": "typo", "runs_root": str(tmp_path / "runs"), "clean_ratoi": 0.5}))
    run.main([str(path)])


def _typo_through_notebook(tmp_path):
    config.config_from_parameters({"clean_ratoi": 0.5})


def _typo_through_sweep(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(f"runs_root: {tmp_path / 'runs'}\nbase: {{preset: test}}\n"
                    "points:\n  - {name: a, clean_ratoi: 0.5}\n")
    sweep.load_sweep(path)


@pytest.mark.parametrize("entry", [_typo_through_cli, _typo_through_notebook, _typo_through_sweep],
                         ids=["python -m advkit.run", "experiment notebook", "sweep file"])
def test_every_entry_point_rejects_a_typo_with_the_valid_names(tmp_path, entry):
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['clean_ratoi'\]; valid parameters: \[.*"
                                         r"'clean_ratio'.*\]"):
        entry(tmp_path)
    assert not (tmp_path / "runs").exists()
