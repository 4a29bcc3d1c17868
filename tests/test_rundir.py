"""Issue 18: a run folder that the user's own workflow cannot corrupt (each test failed on the code before)."""

import fcntl
import json
import os
import threading
import warnings

import pandas as pd
import pytest

from advkit import config, rundir, run
from advkit.config import ResumeConflict, make_config
from advkit.rundir import RunDir, RunLocked
from helpers import locked_by_another_process

TINY = dict(epochs=1, n_train=128, n_test=64, batch_size=32, eval_batch_size=32, eval_checkpoints=[1, 2],
            sanity_n=0, bnstats_channels=0)


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("change, named", [
    (dict(clean_ratio=0.5, lr=0.5, seed=7), ["clean_ratio: 0.0 -> 0.5", "lr: 0.1 -> 0.5", "seed: 0 -> 7"]),
    (dict(norm="mbn", clean_ratio=1.0), ["norm: 'bn' -> 'mbn'"]),  # used to fail later with a raw state-dict error
    (dict(epochs=2, schedule="cosine", lr_decay_epochs=[]), ["schedule: 'step' -> 'cosine'"]),
])
def test_a_resume_that_changes_what_is_trained_is_refused_naming_the_parameters(tmp_path, change, named):
    cfg = make_config("test", **TINY | dict(runs_root=str(tmp_path), checkpoint_every_steps=1))
    run.train_run(cfg, show_progress=False)
    before = _snapshot(cfg.run_dir)
    with pytest.raises(ResumeConflict) as refused:
        run.run(make_config("test", **TINY | dict(runs_root=str(tmp_path), resume=True) | change),
                show_progress=False)
    assert all(text in str(refused.value) for text in named), str(refused.value)
    assert _snapshot(cfg.run_dir) == before  # config.json still describes the model


def test_what_a_resume_may_change_is_only_where_and_how_it_is_evaluated():
    saved = make_config("test").to_dict()
    allowed = make_config("test", epochs=3, eval_eps=8.0, eval_batch_size=7, sanity_n=5, num_workers=1,
                          checkpoint_every_steps=4, resume=True)
    assert config.resume_conflicts(saved, allowed) == []
    shorter = make_config("test", epochs=1, lr_decay_epochs=[1])
    assert config.resume_conflicts(saved, shorter) == ["epochs: 2 -> 1"]
    longer_rs = make_config("test", epochs=3, running_stats_epochs=1)  # the running-statistics window would move
    assert "epochs: 2 -> 3" in config.resume_conflicts(saved | {"running_stats_epochs": 1}, longer_rs)


def test_an_evaluation_resumed_with_another_batch_size_evaluates_every_image(tmp_path, monkeypatch):
    """Item 2: per-batch files were keyed without the batch size: a resumed evaluation with another
    eval_batch_size reported n=32 of 64 images."""
    from advkit import evaluate

    kw = TINY | dict(runs_root=str(tmp_path), eval_batch_size=32)
    real, calls = evaluate.curve_batch, []

    def crash_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed during evaluation")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "curve_batch", crash_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run.run(make_config("test", **kw), show_progress=False)
    monkeypatch.setattr(evaluate, "curve_batch", real)
    table = run.run(make_config("test", **kw | dict(eval_batch_size=16, resume=True)), show_progress=False)
    assert set(table["n"]) == {64}


def test_a_damaged_saved_batch_is_evaluated_again_with_a_warning(tmp_path):
    cfg = make_config("test", **TINY | dict(runs_root=str(tmp_path)))
    first = run.run(cfg, show_progress=False)
    batch = next(cfg.run_dir.glob("eval/*/batches/batch_000001.pt"))
    batch.write_bytes(batch.read_bytes()[:40])
    with pytest.warns(RuntimeWarning, match=r"batch_000001.pt is damaged"):
        again = run.run(make_config("test", **TINY | dict(runs_root=str(tmp_path), resume=True)),
                        show_progress=False)
    assert again["accuracy"].tolist() == first["accuracy"].tolist()


def test_a_damaged_metrics_line_is_dropped_with_a_warning_on_resume(tmp_path):
    cfg = make_config("test", **TINY | dict(runs_root=str(tmp_path), epochs=2, lr_decay_epochs=[]))
    run.train_run(make_config("test", **TINY | dict(runs_root=str(tmp_path), lr_decay_epochs=[])),
                  show_progress=False)
    folder = RunDir(cfg.run_dir)
    folder.metrics_file.write_text(folder.metrics_file.read_text() + '{"epoch": 2, "lo')  # a kill mid-line
    with pytest.warns(RuntimeWarning, match=r"damaged file \S*metrics.jsonl: line 2 is not"):
        run.train_run(make_config("test", **TINY | dict(runs_root=str(tmp_path), epochs=2, lr_decay_epochs=[],
                                                         resume=True)), show_progress=False)
    assert [m["epoch"] for m in folder.metrics()] == [1, 2]


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    """Item 3: a second process is refused with the holder named; a killed holder releases the lock."""
    folder = RunDir(tmp_path / "r")
    with locked_by_another_process(folder.path) as pid:
        assert f"pid {pid}" in folder.locked_by_other()
        with pytest.raises(RunLocked, match=rf"is in use by pid {pid} on .*nothing was changed"):
            with folder.lock():
                pass
    assert folder.locked_by_other() is None
    with folder.lock():  # a crashed holder never locks anyone out
        with folder.lock():  # re-entrant in one process (run() holds it around train())
            assert folder.locked_by_other() is None


def test_a_probe_of_the_lock_never_refuses_a_run_in_the_name_of_a_holder_long_gone(tmp_path):
    """locked_by_other() takes the lock for an instant; a run starting in that instant waits it out instead of
    being refused with the name of the last, finished holder."""
    folder = RunDir(tmp_path / "r")
    with folder.lock():
        pass  # the lock file now names this finished holder
    probe = os.open(folder.lock_file, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a probe (another process's locked_by_other) in progress
    threading.Timer(0.1, os.close, [probe]).start()
    with folder.lock():
        assert folder.locked_by_other() is None


def test_a_run_in_use_is_refused_before_anything_is_changed(tmp_path):
    cfg = make_config("test", **TINY | dict(runs_root=str(tmp_path)))
    run.run(cfg, show_progress=False)
    before = _snapshot(cfg.run_dir)
    with locked_by_another_process(cfg.run_dir):
        with pytest.raises(RunLocked):
            run.run(make_config("test", **TINY | dict(runs_root=str(tmp_path), overwrite=True)), show_progress=False)
        assert _snapshot(cfg.run_dir) == before


def test_the_small_files_are_written_atomically(tmp_path, monkeypatch):
    """A kill while writing status.json, config.json or results.csv leaves the old file, never half of one."""
    folder = RunDir(tmp_path)
    folder.write_status("running")
    real = rundir.os.replace

    def killed_before_the_rename(src, dst):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(rundir.os, "replace", killed_before_the_rename)
    with pytest.raises(KeyboardInterrupt):
        folder.write_status("done")
    monkeypatch.setattr(rundir.os, "replace", real)
    assert folder.status()["state"] == "running"


def test_one_rule_for_finished(tmp_path):
    """Item 13: a results.csv alone does not make a run finished; status 'done' and readable results do."""
    folder = RunDir(tmp_path)
    row = dict(branch="-", attack="clean", targeted=True, eps=8.0, step=1.0, step_rule="fixed", restarts=1, steps=0,
               accuracy=0.5, worst_accuracy=0.5, n=2, seed=0)
    folder.write_table(folder.results_file, pd.DataFrame([row]))
    assert not folder.finished()
    folder.write_status("done")
    assert folder.finished()
    whole = folder.results_file.read_text()
    for damaged in (whole[:-4] + "\n",  # a row cut short
                    whole[:-2],  # cut inside the last number: it would read as another number
                    whole.splitlines(keepends=True)[0],  # a header without rows
                    whole.replace(",seed", ",sead")):  # a column missing
        folder.results_file.write_text(damaged)
        assert not folder.finished() and folder.state() == "damaged", damaged


def test_a_done_run_without_results_and_undecodable_metrics_read_as_damaged_not_as_a_crash(tmp_path):
    folder = RunDir(tmp_path)
    folder.write_status("done")  # results.csv lost (deleted, or never copied back)
    assert folder.state() == "damaged" and not folder.finished()
    with pytest.raises(rundir.DamagedFile, match=r"damaged file \S*results.csv: missing, though status.json says 'done'"):
        folder.results()
    folder.write_status("running")
    with pytest.raises(FileNotFoundError):  # not done: a missing table is simply not there yet
        folder.results()
    folder.metrics_file.write_bytes(b'{"epoch": 1}\n\xff\xfe{"epoch": 2}\n')
    with pytest.warns(RuntimeWarning, match=r"damaged file \S*metrics.jsonl: line 2 is not"):
        assert folder.metrics() == [{"epoch": 1}]
