"""The sweep review's defects: finetuning from an unfinished source, a finished run skipped although the file now
asks for more, a killed kernel leaving no record, and CLI input that gave tracebacks or rc 0."""

import dataclasses
import json
import re
import shutil
import subprocess
import sys

import nbformat
import pytest

from advkit import cli, config, run, rundir, sweep

FAST = {"preset": "test", "epochs": 1, "n_train": 128, "n_test": 64, "train_steps": 1, "eval_checkpoints": [1],
        "sanity_n": 0, "bnstats_channels": 0}
RESULTS = ("branch,attack,targeted,eps,step,step_rule,restarts,steps,accuracy,worst_accuracy,n,seed\n"
           "-,clean,True,8,1,fixed,1,0,0.5,0.5,2,0\n")
# a notebook that only records a finished run (the parameters papermill injects name its folder)
STAND_IN = f"""import pathlib
from advkit.rundir import RunDir
run = pathlib.Path(runs_root) / name
(run / "results.csv").write_text({RESULTS!r})
RunDir(run).write_status("done")
"""


def _notebook(path, *cells):
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = [nbformat.v4.new_code_cell(cell) for cell in cells]
    nbformat.write(notebook, path)
    return path


def _sweep_file(tmp_path, points, notebook=None, base=None):
    spec = {"runs_root": str(tmp_path / "runs"), "base": base or {"preset": "test"}, "points": points}
    if notebook is not None:
        spec["notebook"] = str(notebook)
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(spec))
    return path


def _finished_folder(cfg, **changed):
    """A run folder that holds a finished run of ``cfg`` (with ``changed`` parameters in its config.json)."""
    folder = rundir.RunDir(cfg.run_dir)
    folder.path.mkdir(parents=True, exist_ok=True)
    (folder.path / "config.json").write_text(json.dumps(cfg.to_dict() | changed, default=str))
    folder.results_file.write_text(RESULTS)
    folder.write_status("done")
    return folder


@pytest.fixture
def held():
    """Hold a folder's run lock from another process for ``seconds`` (as a sweep training that run would)."""
    processes = []

    def hold(folder, seconds):
        folder.mkdir(parents=True, exist_ok=True)
        code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                "fcntl.flock(fd, fcntl.LOCK_EX); os.pwrite(fd, b'the holder', 0); print('held', flush=True); "
                "time.sleep(float(sys.argv[2]))")
        process = subprocess.Popen([sys.executable, "-c", code, str(folder / ".lock"), str(seconds)],
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "held"
        processes.append(process)

    yield hold
    for process in processes:
        process.kill()
        process.wait()


# ---------------------------------------------------------------- 1. finetuning from an unfinished source

FT = {"finetune_bn": True, "adv_ratio": 0, "clean_ratio": 1}


def test_run_refuses_to_start_from_a_run_folder_that_is_not_finished(tmp_path, held):
    tiny = {k: v for k, v in FAST.items() if k != "preset"} | {"runs_root": str(tmp_path)}
    source = config.make_config("test", name="src", **tiny)
    run.train_run(source, show_progress=False)  # trained, never evaluated: status 'running', no results.csv
    ft = config.make_config("test", name="ft", init_checkpoint=str(tmp_path / "src"), **tiny | FT)
    with pytest.raises(ValueError, match=r"init_checkpoint='.*src' is not accepted: .*not finished.*'running'"):
        run.run(ft, show_progress=False)
    assert not (tmp_path / "ft").exists()
    rundir.RunDir(tmp_path / "src").write_status("failed", error="boom")
    with pytest.raises(ValueError, match=r"init_checkpoint='.*src' is not accepted: .*'failed'"):
        run.run(ft, show_progress=False)
    _finished_folder(source)  # finished, but another process holds it (it may be training it further)
    held(tmp_path / "src", 60)
    with pytest.raises(ValueError, match=r"init_checkpoint='.*src' is not accepted: .*in use by the holder"):
        run.run(ft, show_progress=False)
    assert not (tmp_path / "ft").exists()


def test_a_finetuning_point_waits_for_a_source_held_by_another_process(tmp_path, capsys, held):
    notebook = _notebook(tmp_path / "stand-in.ipynb", STAND_IN)
    f = _sweep_file(tmp_path, [{"name": "src"}, {"name": "ft", "init_checkpoint": "run:src", **FT}], notebook)
    held(tmp_path / "runs" / "src", 3)
    outcome = sweep.run_sweep(f, progress=False)
    out = capsys.readouterr().out
    assert outcome["done"] == ["src", "ft"] and not outcome["failed"], out
    assert out.index("[sweep] src: done") < out.index("[sweep] run ft")  # never from an in-progress source


def test_a_finetuning_point_is_not_run_when_its_source_failed_or_is_unfinished(tmp_path, capsys):
    notebook = _notebook(tmp_path / "stand-in.ipynb", STAND_IN)
    f = _sweep_file(tmp_path, [{"name": "src", "lr": 0.05}, {"name": "ft", "init_checkpoint": "run:src", **FT}],
                    notebook)
    points = sweep.load_sweep(f)
    _finished_folder(points[0].config, lr=0.1)  # finished with another lr: the file was edited since
    outcome = sweep.run_points(points, progress=False)
    failed = {name: reason for name, _, reason in outcome["failed"]}
    assert "lr: 0.1 -> 0.05" in failed["src"]
    assert failed["ft"].startswith("not run: the point it starts from, src, failed")
    assert not (tmp_path / "runs" / "ft").exists() and outcome["done"] == []
    rundir.RunDir(tmp_path / "runs" / "src").write_status("interrupted")  # alone, as --point runs it
    outcome = sweep.run_points(points[1:], progress=False)
    assert re.fullmatch(r"not run: the point it starts from, src: init_checkpoint='.*src' is not accepted: the "
                        r"run in that folder is not finished \(state 'interrupted'\); .*", outcome["failed"][0][2])
    shutil.rmtree(tmp_path / "runs" / "src")  # never run at all
    outcome = sweep.run_points(points[1:], progress=False)
    assert "is not finished (state 'unknown')" in outcome["failed"][0][2], outcome
    assert not (tmp_path / "runs" / "ft").exists()


def test_a_finished_finetuning_run_is_refused_once_its_source_holds_other_weights(tmp_path, capsys):
    f = _sweep_file(tmp_path, [{"name": "src"}, {"name": "ft", "init_checkpoint": "run:src", **FT}], base=FAST)
    assert sweep.run_sweep(f, progress=False)["done"] == ["src", "ft"]
    ft = rundir.RunDir(tmp_path / "runs" / "ft")
    results = ft.results_file.read_bytes()
    assert sweep.run_sweep(f, progress=False)["skipped"] == ["src", "ft"]  # the same source: nothing to do
    f = _sweep_file(tmp_path, [{"name": "src", "epochs": 2}, {"name": "ft", "init_checkpoint": "run:src", **FT}],
                    base=FAST)
    outcome = sweep.run_sweep(f, progress=False)
    assert outcome["done"] == ["src"], capsys.readouterr().out  # extended: its weights changed
    assert "now holds other weights" in outcome["failed"][0][2] and outcome["failed"][0][0] == "ft"
    assert ft.results_file.read_bytes() == results and ft.finished()  # the earlier result stays as it was
    point = sweep.load_sweep(f)[1]
    with pytest.raises(config.ResumeConflict, match=r"init_checkpoint='.*src' now holds other weights"):
        run.run(dataclasses.replace(point.config, resume="auto"), show_progress=False)


# ---------------------------------------------------------------- 2. a finished run the file now asks more of

@pytest.mark.parametrize("changed", [{"epochs": 2}, {"sanity_n": 8}, {"bnstats_channels": 2},
                                     {"bnstats_layer": "layer1"}, {"tensorboard": True}])
def test_a_finished_run_is_not_up_to_date_when_the_file_asks_for_other_outputs(tmp_path, changed):
    point = sweep.load_sweep(_sweep_file(tmp_path, [{"name": "a"}], base=FAST))[0]
    folder = _finished_folder(point.config)
    assert sweep.up_to_date(point) and run._unchanged_and_finished(point.config, folder)
    moved = _finished_folder(point.config, runs_root="somewhere/else", data_root="/elsewhere", num_workers=3)
    assert sweep.up_to_date(point) and run._unchanged_and_finished(point.config, moved)  # where, not what
    edited = sweep.load_sweep(_sweep_file(tmp_path, [{"name": "a"}], base=FAST | changed))[0]
    assert not sweep.up_to_date(edited) and not run._unchanged_and_finished(edited.config, folder)


def test_a_sweep_extends_a_finished_run_when_the_file_asks_for_more_epochs(tmp_path, capsys):
    f = _sweep_file(tmp_path, [{"name": "a"}], base=FAST)
    assert sweep.run_sweep(f, progress=False)["done"] == ["a"]
    f = _sweep_file(tmp_path, [{"name": "a"}], base=FAST | {"epochs": 2})
    outcome = sweep.run_sweep(f, progress=False)
    assert outcome["done"] == ["a"], capsys.readouterr().out
    folder = tmp_path / "runs" / "a"
    epochs = [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2] and json.loads((folder / "config.json").read_text())["epochs"] == 2
    assert rundir.RunDir(folder).finished()
    assert sweep.run_sweep(f, progress=False)["skipped"] == ["a"]  # the saved config is what the file gives


# ---------------------------------------------------------------- 3. a killed kernel

def test_a_kernel_killed_after_its_run_started_leaves_its_notebook_as_the_runs_record(tmp_path, capsys):
    notebook = _notebook(tmp_path / "dies.ipynb",
                         "from advkit.rundir import RunDir\nRunDir(runs_root + '/' + name).write_status('running')",
                         "import os\nos.kill(os.getpid(), 9)")
    outcome = sweep.run_sweep(_sweep_file(tmp_path, [{"name": "a"}], notebook), progress=False)
    folder = tmp_path / "runs" / "a"
    assert [name for name, _, _ in outcome["failed"]] == ["a"]
    assert (folder / "experiment.ipynb").is_file() and not list(folder.glob(".attempts/*"))
    assert f"FAILED a: see {folder / 'experiment.ipynb'}" in capsys.readouterr().out


# another process finishes the run while this attempt's kernel starts; this attempt is then refused, or finds
# the run finished and does nothing: either way the finished run's record is not this attempt's notebook
OTHER_FINISHES = "import pathlib\n(pathlib.Path(runs_root) / name / 'status.json').write_text('{\"state\": \"done\"}')"


@pytest.mark.parametrize("then", ["raise ValueError('refused: the run is in use')", "pass"])
def test_a_status_written_by_another_process_does_not_make_this_attempt_the_runs_record(tmp_path, then):
    notebook = _notebook(tmp_path / "other.ipynb", OTHER_FINISHES, then)
    point = sweep.load_sweep(_sweep_file(tmp_path, [{"name": "a"}], notebook))[0]
    folder = rundir.RunDir(point.config.run_dir)
    folder.path.mkdir(parents=True)
    folder.notebook.write_text("the other process's record")
    if then == "pass":
        sweep.execute(notebook, point.config, progress=False)
    else:
        with pytest.raises(sweep.RunRefused, match="refused: the run is in use"):
            sweep.execute(notebook, point.config, progress=False)
    assert folder.notebook.read_text() == "the other process's record"
    assert not (folder.path / ".attempts").exists()


# ---------------------------------------------------------------- 4. the command line

@pytest.mark.parametrize("where", ["missing.yaml", "."])
def test_a_sweep_file_that_cannot_be_read_is_a_clear_error(tmp_path, capsys, where):
    path = tmp_path / where
    assert cli.main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"sweep file {path}" in err and "Traceback" not in err


@pytest.mark.parametrize("value", [5, ["a", "b"]])
def test_runs_root_that_is_no_path_is_refused_naming_it(tmp_path, value):
    with pytest.raises(ValueError, match=r"runs_root=.* is not accepted"):
        config.make_config("test", runs_root=value)
    (tmp_path / "s.yaml").write_text(json.dumps({"runs_root": value, "base": {"preset": "test"}}))
    assert cli.main(["sweep", str(tmp_path / "s.yaml"), "--check"]) == 2


def test_check_with_an_unknown_point_is_refused_listing_the_points(tmp_path, capsys):
    f = _sweep_file(tmp_path, [{"name": "a"}, {"name": "b"}])
    assert cli.main(["sweep", str(f), "--check", "--point", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--point='nope'" in err and "['a', 'b']" in err
    assert cli.main(["sweep", str(f), "--check", "--point", "b"]) == 0
    out = capsys.readouterr().out
    assert "b:" in out and "a:" not in out


# ---------------------------------------------------------------- 5. --check runs the preflight of every mode

def test_check_refuses_a_point_the_sweep_would_refuse_before_its_compute(tmp_path, capsys):
    f = _sweep_file(tmp_path, [{"name": "a", "lr": 0.05}, {"name": "b"}])
    assert cli.main(["sweep", str(f), "--check"]) == 0
    _finished_folder(sweep.load_sweep(f)[0].config, lr=0.1)  # trained with another lr than the file now gives
    assert cli.main(["sweep", str(f), "--check"]) == 2
    err = capsys.readouterr().err
    assert "point 'a'" in err and "lr: 0.1 -> 0.05" in err
    f = _sweep_file(tmp_path, [{"name": "c", "dataset": "cifar10", "data_root": str(tmp_path / "no-data")}])
    assert cli.main(["sweep", str(f), "--check"]) == 2
    err = capsys.readouterr().err
    assert "point 'c'" in err and "data_root=" in err and "no-data" in err
