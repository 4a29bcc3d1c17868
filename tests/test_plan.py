"""``advkit sweep FILE --plan``: core-minutes per run, measured for finished runs and estimated for the rest."""

import json
import os

import pytest

from advkit import cli, plan, sweep
from advkit.rundir import RunDir


def _finished_run(folder, epoch_seconds, evaluation_seconds, threads=1):
    """A finished run folder whose metrics, checkpoint and results say how long it took."""
    run = RunDir(folder)
    folder.mkdir(parents=True)
    run.config_file.write_text("{}")
    run.environment_file.write_text(json.dumps({"torch_threads": threads}))
    run.write_metrics([{"epoch": i + 1, "seconds": s, "processes": 1} for i, s in enumerate(epoch_seconds)])
    run.checkpoints.mkdir()
    run.last_checkpoint.write_bytes(b"weights")
    run.results_file.write_text("branch,attack,targeted,eps,step,step_rule,restarts,steps,accuracy,worst_accuracy,n,seed\n-,clean,True,8,1,fixed,1,0,0.9,0.9,10,0\n")
    run.write_status("done")
    os.utime(run.environment_file, (0.0, 0.0))  # the attempt began before training
    os.utime(run.last_checkpoint, (1000.0, 1000.0))
    os.utime(run.results_file, (1000.0 + evaluation_seconds, 1000.0 + evaluation_seconds))
    return run


@pytest.fixture
def sweep_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(f"""
runs_root: {tmp_path / 'runs'}
base: {{preset: test}}
grid: {{seed: [0, 1, 2]}}
points:
  - {{name: cheap}}
  - {{name: dear}}
""")
    return path


def test_finished_runs_are_measured_and_the_others_take_the_median_of_their_point(sweep_file, tmp_path, capsys):
    runs = tmp_path / "runs"
    _finished_run(runs / "cheap-seed0", [60, 60, 6000], 60, threads=2)  # the 6000 s epoch was paused
    _finished_run(runs / "cheap-seed2", [120, 120, 120], 120)
    rows = {r["run"]: r for r in plan.plan(sweep.load_sweep(sweep_file))}
    assert rows["cheap-seed0"]["minutes"] == pytest.approx((60 * 3 + 60) * 2 / 60)  # 8
    assert rows["cheap-seed2"]["minutes"] == pytest.approx(8.0)
    assert rows["cheap-seed1"] == dict(run="cheap-seed1", state="not started", minutes=pytest.approx(8.0),
                                       source="median of 2")
    assert rows["dear-seed0"]["minutes"] is None  # no finished run of this point: no estimate from another point

    assert cli.main(["sweep", str(sweep_file), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "finished: 2 runs, 0.3 core-hours measured" in out
    assert "left: 4 runs, about 0.1 core-hours" in out and "no estimate yet for dear" in out


def test_a_run_evaluated_again_later_counts_that_evaluation_not_the_days_between(sweep_file, tmp_path):
    """A finished run evaluated again a day later (other eval_* in the sweep file): its new attempt writes
    environment.json, reuses the checkpoint and writes results.csv. The code before counted the whole day."""
    run = _finished_run(tmp_path / "runs" / "cheap-seed0", [60, 60, 60], 60)
    os.utime(run.environment_file, (1000.0 + 86400, 1000.0 + 86400))
    os.utime(run.results_file, (1000.0 + 86400 + 90, 1000.0 + 86400 + 90))
    assert plan.measured_minutes(run) == pytest.approx((3 * 60 + 90) / 60)


def test_a_run_that_is_not_finished_is_not_measured(sweep_file, tmp_path):
    runs = tmp_path / "runs"
    _finished_run(runs / "cheap-seed0", [60], 60)
    RunDir(runs / "cheap-seed0").write_status("running")
    rows = {r["run"]: r for r in plan.plan(sweep.load_sweep(sweep_file))}
    assert rows["cheap-seed0"]["state"] == "running" and rows["cheap-seed0"]["minutes"] is None


def test_plan_and_check_together_are_refused(sweep_file, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["sweep", str(sweep_file), "--plan", "--check"])
    assert exc.value.code == 2 and "--check and --plan" in capsys.readouterr().err


@pytest.mark.parametrize("run, key", [("adv-seed3", "adv"), ("adv-seed3-archsmall_resnet20", "adv-archsmall_resnet20"),
                                      ("seed3", ""), ("seed3-lr0.1", "-lr0.1"), ("reseed3", "reseed3")])
def test_seeds_of_one_point_share_its_key_also_in_a_sweep_of_seeds_alone(run, key):
    assert plan.point_key(run) == key



def test_a_sweep_of_more_seeds_takes_its_estimate_from_the_same_points_runs_beside_it(sweep_file, tmp_path):
    """more-seeds.yaml adds seeds to main.yaml's points in main.yaml's folder: before any of its own runs finished,
    the code before gave no estimate for any of them, though five seeds of each point had finished beside them."""
    runs = tmp_path / "runs"
    _finished_run(runs / "cheap-seed0", [60, 60, 60], 60)
    _finished_run(runs / "cheap-seed2", [120, 120, 120], 120)
    _finished_run(runs / "other-seed0", [6000], 6000)  # another point's run beside them counts for nothing
    more = tmp_path / "more.yaml"
    more.write_text(sweep_file.read_text().replace("seed: [0, 1, 2]", "seed: [3, 4]"))
    rows = {r["run"]: r for r in plan.plan(sweep.load_sweep(more))}
    assert rows["cheap-seed3"]["minutes"] == pytest.approx(6.0) and rows["cheap-seed3"]["source"] == "median of 2 beside it"
    assert rows["dear-seed4"]["minutes"] is None and rows["dear-seed4"]["source"] is None
    _finished_run(runs / "cheap-seed4", [30, 30, 30], 30)  # once a run of its own finished, its own runs decide
    rows = {r["run"]: r for r in plan.plan(sweep.load_sweep(more))}
    assert rows["cheap-seed3"]["minutes"] == pytest.approx(2.0) and rows["cheap-seed3"]["source"] == "median of 1"
