import json
import re
import sys
import time
import types

import papermill
import pytest

from advkit import config, paths, results, rundir, sweep, train
from helpers import locked_by_another_process, train_until_crash

FAST = {"preset": "test", "epochs": 1, "n_train": 128, "n_test": 64, "train_steps": 1, "eval_checkpoints": [1], "sanity_n": 0, "bnstats_channels": 0}


def _write(path, text):
    path.write_text(text)
    return path


def test_grid_and_points_expand_with_names(tmp_path):
    f = _write(tmp_path / "s.yaml", f"""
runs_root: {tmp_path / 'runs'}
base: {{preset: test}}
grid: {{seed: [0, 1], clean_ratio: [0.5, 1.0]}}
points:
  - {{name: bn}}
  - {{name: mbn, norm: mbn}}
""")
    points = sweep.load_sweep(f)
    names = [p.config.name for p in points]
    assert len(points) == 8 and len(set(names)) == 8
    assert "mbn-seed1-clean_ratio1.0" in names
    point = points[names.index("mbn-seed1-clean_ratio1.0")]
    assert point.config.norm == "mbn" and point.config.seed == 1 and point.config.clean_ratio == 1.0
    assert point.output == tmp_path / "runs" / "mbn-seed1-clean_ratio1.0" / "experiment.ipynb"


@pytest.mark.parametrize("text, message", [
    ("base: {preset: test\n  grid: [", r"not valid YAML at line \d+"),
    ("bases: {}", r"unknown key\(s\) \['bases'\]"),
    ("base: {preset: test}\npoints:\n  - {name: a, clean_ratio: 2}", r"point 'a': clean_ratio=2"),
    ("base: {preset: test}\ngrid: {seed: []}", r"grid: seed=\[\] is not accepted; give a non-empty list"),
    ("base: {preset: test}\npoints:\n  - {name: a}\n  - {name: a}", r"share the run name"),
    ("base: {preset: tiny}", r"preset='tiny'"),
    ("base: {preset: test}\norder: seeds", r"order='seeds' is not accepted.*'points', 'grid'"),
    ("base: {preset: test}\ngrid: {seed: [0, 1]}\npoints:\n  - {name: a, seed: 7}",
     r"points\[0\] sets \['seed'\], which the grid sets too"),
    ("runs_root: a\nbase: {preset: test, runs_root: b}", r"runs_root is given twice"),
    ("notebook: nowhere.ipynb\nbase: {preset: test}", r"notebook='.*nowhere.ipynb' is not accepted: no such file"),
])
def test_malformed_sweeps_are_reported_before_anything_runs(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        sweep.load_sweep(_write(tmp_path / "bad.yaml", text))
    assert [p.name for p in tmp_path.iterdir()] == ["bad.yaml"]


def test_sweep_runs_skips_finished_points_and_lists_failures(tmp_path, capsys):
    runs = tmp_path / "runs"
    (tmp_path / "bad-cifar" / "cifar-10-batches-py").mkdir(parents=True)  # there, but empty: fails when read
    f = _write(tmp_path / "s.yaml", json.dumps({
        "runs_root": str(runs), "base": FAST,
        "points": [{"name": "ok"},
                   {"name": "broken", "dataset": "cifar10", "data_root": str(tmp_path / "bad-cifar")}]}))
    outcome = sweep.run_sweep(f, progress=False)
    assert outcome["done"] == ["ok"] and [b[0] for b in outcome["failed"]] == ["broken"]
    assert "CIFAR-10" in outcome["failed"][0][2]
    out = capsys.readouterr().out
    assert f"FAILED broken: see {runs / 'broken' / 'experiment.ipynb'}" in out  # accepted, then failed reading
    assert (runs / "ok" / "experiment.ipynb").exists() and (runs / "ok" / "results.csv").exists()
    assert results.run_status(runs / "broken") == "failed"
    assert list(results.kit_results(runs)["run"].unique()) == ["ok"]  # failed runs are not mixed in
    assert list(results.unfinished_runs(runs)["state"]) == ["failed"]
    again = sweep.run_sweep(f, progress=False)
    assert again["skipped"] == ["ok"]


def test_a_sweep_rerun_resumes_a_point_killed_before_its_results(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    f = _write(tmp_path / "s.yaml", json.dumps({"runs_root": str(runs), "base": FAST | {"checkpoint_every_steps": 1},
                                                "points": [{"name": "cut"}]}))
    train_until_crash(sweep.load_sweep(f)[0].config, calls=2, monkeypatch=monkeypatch)  # checkpoint at step 1
    assert rundir.load_checkpoint(runs / "cut")["step"] == 1 and not (runs / "cut" / "results.csv").exists()
    outcome = sweep.run_sweep(f, progress=False)
    assert outcome["done"] == ["cut"]
    assert "[sweep] run cut (100% adv + 0% clean, norm=bn) resuming" in capsys.readouterr().out
    assert 'resume = \\"auto\\"' in (runs / "cut" / "experiment.ipynb").read_text()  # the injected parameters (JSON-escaped)
    assert rundir.load_checkpoint(runs / "cut")["step"] == 2 and (runs / "cut" / "results.csv").exists()
    assert results.run_status(runs / "cut") == "done"


def _kernel_dying_first(tmp_path, monkeypatch, deaths: int) -> str:
    """A kernelspec whose process exits at once on its first ``deaths`` starts, as a kernel whose TCP port another
    kernel took in the meantime ("Address already in use"), then runs ipykernel."""
    folder = tmp_path / "jupyter" / "kernels" / "dying"
    folder.mkdir(parents=True)
    script = folder / "start.py"
    script.write_text(f"""import pathlib, runpy, sys
count = pathlib.Path({str(folder / "starts")!r})
starts = int(count.read_text()) if count.exists() else 0
count.write_text(str(starts + 1))
if starts < {deaths}:
    sys.exit("zmq.error.ZMQError: Address already in use")
sys.argv = ["ipykernel_launcher", *sys.argv[1:]]
runpy.run_module("ipykernel_launcher", run_name="__main__")
""")
    (folder / "kernel.json").write_text(json.dumps({"argv": [sys.executable, str(script), "-f", "{connection_file}"],
                                                    "display_name": "dying", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "dying"


def test_a_kernel_that_dies_as_it_starts_is_started_again_and_the_run_finishes(tmp_path, monkeypatch, capsys):
    """Two notebooks starting at once (--jobs, device slots) can pick the same free port for their kernels; one
    kernel died ('Address already in use') and its point failed before its run started, in a CI run."""
    kernel = _kernel_dying_first(tmp_path, monkeypatch, deaths=1)
    f = _write(tmp_path / "s.yaml", json.dumps({"runs_root": str(tmp_path / "runs"), "base": FAST,
                                                "points": [{"name": "a"}]}))
    assert sweep.run_sweep(f, kernel=kernel, progress=False)["done"] == ["a"]
    assert "a: its notebook's kernel did not start (Kernel died before replying to kernel_info); starting it " \
           "again (try 2 of 3)" in capsys.readouterr().out
    assert (tmp_path / "jupyter" / "kernels" / "dying" / "starts").read_text() == "2"
    assert results.run_status(tmp_path / "runs" / "a") == "done"


def test_a_kernel_that_never_starts_fails_the_point_after_three_tries_and_leaves_no_run(tmp_path, monkeypatch):
    kernel = _kernel_dying_first(tmp_path, monkeypatch, deaths=5)
    f = _write(tmp_path / "s.yaml", json.dumps({"runs_root": str(tmp_path / "runs"), "base": FAST,
                                                "points": [{"name": "a"}]}))
    failed = sweep.run_sweep(f, kernel=kernel, progress=False)["failed"]
    assert [name for name, *_ in failed] == ["a"] and "Kernel died before replying" in failed[0][2]
    assert (tmp_path / "jupyter" / "kernels" / "dying" / "starts").read_text() == "3"
    assert not (tmp_path / "runs" / "a").exists()  # no cell ran: nothing of a run, as for a refused one


def test_experiment_notebook_rejects_unknown_parameters(tmp_path):
    with pytest.raises(papermill.PapermillExecutionError, match=r"unknown parameter\(s\) \['clean_ratoi'\]"):
        papermill.execute_notebook(str(paths.project_root() / "notebooks" / "experiment.ipynb"),
                                   str(tmp_path / "out.ipynb"), parameters={"clean_ratoi": 0.5}, progress_bar=False)


def test_experiment_notebook_parameters_are_the_config_and_default_to_the_preset():
    import nbformat
    from typing import Optional, Union

    from papermill.translators import PythonTranslator

    nb = nbformat.read(paths.project_root() / "notebooks" / "experiment.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert cell.source == config.parameters_cell()  # regenerate it with config.parameters_cell() after a change
    namespace: dict = {"Optional": Optional, "Union": Union}
    exec(cell.source, namespace)
    namespace = {k: v for k, v in namespace.items() if not k.startswith("__") and k not in ("Optional", "Union")}
    assert namespace.pop("preset") == "test"
    assert set(namespace.values()) == {None}  # every parameter: the preset's value
    assert config.config_from_parameters(namespace) == config.make_config("test")
    documented = {p.name: p.help for p in PythonTranslator.inspect(cell)}  # what papermill --help-notebook shows
    assert set(documented) == {"preset", *namespace}
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed stripped


@pytest.mark.parametrize("path", sorted((paths.project_root() / "notebooks" / "sweeps").glob("**/*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_sweep_file_is_valid(path):
    points = sweep.load_sweep(path)
    assert points
    for p in points:
        if p.config.finetune_bn:
            assert any(q.config.run_dir == config.Path(p.config.init_checkpoint) for q in points)


FINETUNING_SWEEP = """
runs_root: {runs}
base: {{preset: test}}
grid: {{seed: [0, 1]}}
points:
  - {{name: adv, clean_ratio: 0}}
  - {{name: ft, finetune_bn: true, init_checkpoint: "run:adv", adv_ratio: 0, clean_ratio: 1}}
"""  # a point and its finetuning over two seeds


def test_finetuning_points_start_from_an_earlier_point_with_the_same_grid_values(tmp_path):
    f = _write(tmp_path / "ft.yaml", FINETUNING_SWEEP.format(runs=tmp_path / "runs"))
    points = {p.config.name: p.config for p in sweep.load_sweep(f)}
    assert points["ft-seed1"].init_checkpoint == str(tmp_path / "runs" / "adv-seed1")
    bad = _write(tmp_path / "bad.yaml", "base: {preset: test}\npoints:\n"
                 "  - {name: ft, finetune_bn: true, init_checkpoint: 'run:nothing', adv_ratio: 0, clean_ratio: 1}\n")
    with pytest.raises(ValueError, match=r"init_checkpoint='run:nothing' names no earlier point"):
        sweep.load_sweep(bad)


def test_order_grid_runs_every_point_of_one_seed_before_the_next_seed(tmp_path):
    text = FINETUNING_SWEEP.format(runs=tmp_path / "runs")
    by_point = [p.config.name for p in sweep.load_sweep(_write(tmp_path / "p.yaml", text))]
    by_grid = sweep.load_sweep(_write(tmp_path / "g.yaml", text + "order: grid\n"))
    assert by_point == ["adv-seed0", "adv-seed1", "ft-seed0", "ft-seed1"]
    assert [p.config.name for p in by_grid] == ["adv-seed0", "ft-seed0", "adv-seed1", "ft-seed1"]
    assert by_grid[3].config.init_checkpoint == str(tmp_path / "runs" / "adv-seed1")


def test_shards_split_the_points_and_keep_finetuning_with_its_source(tmp_path):
    f = _write(tmp_path / "ft.yaml", f"""
runs_root: {tmp_path / 'runs'}
base: {{preset: test}}
grid: {{seed: [0, 1, 2]}}
points:
  - {{name: adv, clean_ratio: 0}}
  - {{name: ft, finetune_bn: true, init_checkpoint: "run:adv", adv_ratio: 0, clean_ratio: 1}}
""")
    points = sweep.load_sweep(f)
    shards = [[p.config.name for p in sweep.shard_points(points, i, 2)] for i in range(2)]
    assert shards == [["adv-seed0", "adv-seed2", "ft-seed0", "ft-seed2"], ["adv-seed1", "ft-seed1"]]
    assert sorted(shards[0] + shards[1]) == sorted(p.config.name for p in points)
    for bad in [(2, 2), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError, match="shard"):
            sweep.shard_points(points, *bad)


def test_jobs_run_the_shards_at_once_and_fail_when_a_point_fails(tmp_path):
    from advkit import cli

    runs = tmp_path / "runs"
    f = _write(tmp_path / "s.yaml", json.dumps({"runs_root": str(runs), "base": FAST,
                                                 "points": [{"name": "a"}, {"name": "b", "norm": "gn"}]}))
    assert cli.main(["sweep", str(f), "--jobs", "2"]) == 0
    assert (runs / "a" / "results.csv").exists() and (runs / "b" / "results.csv").exists()
    assert json.loads((runs / "a" / "config.json").read_text())["name"] == "a"
    broken = _write(tmp_path / "broken.yaml", json.dumps({
        "runs_root": str(runs), "base": FAST,
        "points": [{"name": "a"}, {"name": "c", "dataset": "cifar10", "data_root": str(tmp_path / "no-cifar")}]}))
    assert cli.main(["sweep", str(broken), "--jobs", "2"]) == 1


# ---------------------------------------------------------------- sweeps that never lie about failures

STAND_IN = """import os, pathlib, signal
from advkit.rundir import RunDir
run = pathlib.Path(runs_root) / name
if name == "die":  # the shard process that executes this notebook is killed, as by the OOM killer
    os.kill(os.getppid(), signal.SIGKILL)
    os._exit(0)
(run / "results.csv").write_text("branch,attack,targeted,eps,step,step_rule,restarts,steps,accuracy,worst_accuracy,n,seed\\n-,clean,True,8,1,fixed,1,0,0.5,0.5,2,0\\n")
RunDir(run).write_status("done")
"""


def _stand_in_sweep(tmp_path, names, **extra):
    """A sweep whose notebook only writes a finished run's ``results.csv`` and status (a point named 'die' kills the
    process running it)."""
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = [nbformat.v4.new_code_cell(STAND_IN)]
    nbformat.write(notebook, tmp_path / "stand-in.ipynb")
    return _write(tmp_path / "s.yaml", json.dumps({
        "notebook": str(tmp_path / "stand-in.ipynb"), "runs_root": str(tmp_path / "runs"), "base": {"preset": "test"},
        "points": [{"name": n} for n in names], **extra}))


def test_jobs_fail_and_list_the_unfinished_points_when_a_shard_is_killed(tmp_path, capfd):
    from advkit import cli

    f = _stand_in_sweep(tmp_path, ["a", "die"])
    assert cli.main(["sweep", str(f), "--jobs", "2"]) == 1
    out = capfd.readouterr().out
    assert "[sweep] shard 1/2 was killed by signal 9 (SIGKILL)" in out
    assert "[sweep] 1 point(s) did not finish: die" in out
    assert (tmp_path / "runs" / "a" / "results.csv").exists()


def test_an_exception_in_one_points_setup_does_not_stop_the_sweep(tmp_path, capsys):
    f = _stand_in_sweep(tmp_path, ["a", "b", "c"])
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "b").write_text("a file where the run folder of b should be")
    outcome = sweep.run_sweep(f, progress=False)
    assert outcome["done"] == ["a", "c"] and [b[0] for b in outcome["failed"]] == ["b"]
    assert "FileExistsError" in outcome["failed"][0][2]
    assert "[sweep] FAILED b before its run started:" in capsys.readouterr().out


@pytest.mark.parametrize("name, message", [
    ("x" * 300, r"name='x{40}\.\.\.' is 300 bytes long \(UTF-8\); at most 100 are accepted"),
    ("a\\0b", r"name='a\\x00b' is not accepted: it holds the control character '\\x00'"),
    ("a\\tb", r"name='a\\tb' is not accepted: it holds the control character '\\t'"),
    ("a\\\\b", r"name='a\\\\b' is not accepted: it holds '\\\\'"),
])
def test_run_names_a_filesystem_refuses_are_refused_before_anything_runs(tmp_path, name, message, capsys):
    from advkit import cli

    f = _write(tmp_path / "s.yaml", f'runs_root: {tmp_path / "runs"}\nbase: {{preset: test}}\n'
                                    f'points:\n  - {{name: ok}}\n  - {{name: "{name}"}}\n')
    with pytest.raises(ValueError, match=r"sweep file .*, points\[1\]: " + message):
        sweep.load_sweep(f)
    assert cli.main(["sweep", str(f), "--check"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_run_names_that_differ_only_in_case_are_refused(tmp_path):
    f = _write(tmp_path / "s.yaml", "base: {preset: test}\ngrid: {seed: [0, 1]}\npoints:\n"
                                    "  - {name: Adv}\n  - {name: adv}\n")
    with pytest.raises(ValueError, match=r"run names that differ only in case \(one folder on a case-insensitive "
                                         r"file system\): \['Adv-seed0', 'adv-seed0'\], \['Adv-seed1', 'adv-seed1'\]"):
        sweep.load_sweep(f)


@pytest.mark.parametrize("text, message", [
    ("base: {preset: test}\ngrid: {seed: [0]}\ngrid: {seed: [1]}\n",
     r"not valid YAML at line 3, column 1: key 'grid' given twice \(first at line 2\)"),
    ("base: {preset: test}\npoints:\n  - {name: a, seed: 1, seed: 2}\n",
     r"not valid YAML at line 3, column 24: key 'seed' given twice \(first at line 3\)"),
    ("points: [a, b]\n", r"points\[0\]='a' is not accepted; each point must be a mapping of parameters"),
    ("points: {a: 1}\n", r"points=\{'a': 1\} is not accepted; give a list of mappings"),
    ("base: [1, 2]\n", r"base=\[1, 2\] is not accepted; give a mapping of parameter names to values"),
    ("points:\n  - {name: 1}\n", r"points\[0\]: name=1 is not accepted; give a non-empty string"),
    ("points:\n  - {name: null}\n", r"points\[0\]: name=None is not accepted; give a non-empty string"),
    ("grid: {seed: 3}\n", r"grid: seed=3 is not accepted; give a non-empty list of values"),
    ("grid: [seed]\n", r"grid=\['seed'\] is not accepted; give a mapping of parameter names to lists"),
    ("base: {1: 2}\n", r"base: parameter name 1 is not accepted; parameter names are strings"),
    ("notebook: 1\n", r"notebook=1 is not accepted; give a path"),
    ("base: {preset: test, seed: x}\n", r"point 'run': seed='x' is not accepted"),
])
def test_malformed_entries_give_one_line_messages_naming_the_entry(tmp_path, text, message, capsys):
    from advkit import cli

    f = _write(tmp_path / "s.yaml", text)
    with pytest.raises(ValueError, match=message):
        sweep.load_sweep(f)
    for argv in (["sweep", str(f)], ["sweep", str(f), "--check"], ["sweep", str(f), "--jobs", "2"]):
        assert cli.main(argv) == 2
        out, err = capsys.readouterr()
        assert re.fullmatch(r"advkit sweep: sweep file [^\n]+\n", err) and re.search(message, err), err
        assert out == ""


@pytest.mark.parametrize("options, message", [
    (["--jobs", "2", "--shard", "1/2"], r"--jobs and --shard are not accepted together"),
    (["--jobs", "2", "--check"], r"--jobs is not accepted with --check or --plan"),
    (["--jobs", "2", "--plan"], r"--jobs is not accepted with --check or --plan"),
])
def test_sweep_options_that_would_be_ignored_are_refused(tmp_path, capsys, options, message):
    from advkit import cli

    f = _write(tmp_path / "s.yaml", json.dumps({"runs_root": str(tmp_path / "runs"), "base": FAST}))
    with pytest.raises(SystemExit) as refused:
        cli.main(["sweep", str(f)] + options)
    assert refused.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_resolving_finetuning_sources_is_linear_in_the_number_of_points(tmp_path, monkeypatch):
    f = _write(tmp_path / "ft.yaml", f"""
runs_root: {tmp_path / 'runs'}
base: {{preset: test}}
grid: {{seed: {list(range(150))}}}
points:
  - {{name: adv, clean_ratio: 0}}
  - {{name: ft, finetune_bn: true, init_checkpoint: "run:adv", adv_ratio: 0, clean_ratio: 1}}
""")
    real, calls = config.resolve_output, []
    monkeypatch.setattr(config, "resolve_output", lambda path: calls.append(1) or real(path))
    points = sweep.load_sweep(f)
    assert len(points) == 300 and points[-1].config.init_checkpoint == str(tmp_path / "runs" / "adv-seed149")
    assert len(calls) <= 2 * len(points)  # one run folder per point (quadratic: every earlier point per source)


def test_the_readmes_experiment_command_runs_on_a_new_run_folder(tmp_path):
    """Issue 18, item 11: the README's first experiment command, as a new user types it (with the test preset and
    tiny sizes swapped in), runs from the repository on a run folder that does not exist yet."""
    import os
    import subprocess

    readme = (paths.project_root() / "README.md").read_text()
    block = re.search(r"## One experiment\n.*?```bash\n(.*?)```", readme, re.DOTALL).group(1)
    command = block.splitlines()[0].split("  #")[0]
    assert command.startswith(".venv/bin/advkit run") and "-p preset demo" in command
    command = command.replace("-p preset demo", "-p preset test") + (
        " -p epochs 1 -p n_train 128 -p n_test 64 -p train_steps 1 -p sanity_n 0 -p bnstats_channels 0"
        " -p eval_checkpoints '[1]'")
    env = os.environ | {"ADVKIT_OUTPUT_BASE": str(tmp_path)}  # run folders land in tmp_path, not the repository
    done = subprocess.run(["bash", "-ec", command], cwd=paths.project_root(), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "runs" / "my-run" / "experiment.ipynb").exists()
    assert results.run_status(tmp_path / "runs" / "my-run") == "done"


def test_advkit_run_refused_again_keeps_the_runs_record(tmp_path, capfd):
    """Issue 18, item 4: re-running a finished experiment command used to replace its executed notebook with a
    two-cell traceback; the refusal now leaves it as it was (papermill writes into .attempts first)."""
    from advkit import cli

    args = ["run", "-p", "name", "rec", "-p", "runs_root", str(tmp_path)] + [
        a for k, v in FAST.items() if k != "preset" for a in ("-p", k, json.dumps(v))]
    assert cli.main(args) == 0
    assert "without encryption" not in capfd.readouterr().err  # the kernel's log noise is silenced (issue 16)
    record = tmp_path / "rec" / "experiment.ipynb"
    before = record.read_bytes()
    assert cli.main(args) == 1
    assert "FileExistsError" in capfd.readouterr().err
    assert record.read_bytes() == before
    assert cli.main(args + ["-p", "epochs", "x"]) == 2  # refused before papermill starts
    assert record.read_bytes() == before
    (tmp_path / "empty").mkdir()
    missing_data = ["-p", "dataset", "cifar10", "-p", "data_root", str(tmp_path / "empty")]
    assert cli.main(args + ["-p", "overwrite", "true"] + missing_data) == 1  # refused inside the notebook
    assert "data_root=" in capfd.readouterr().err
    assert record.read_bytes() == before and not (tmp_path / "rec" / ".attempts").exists()
    fresh = [a if a != "rec" else "fresh" for a in args]
    assert cli.main(fresh + missing_data) == 1
    assert not (tmp_path / "fresh").exists()  # no folder made for a run that never started


@pytest.mark.parametrize("file_text, option, message", [
    (None, ["-f", "{tmp}/missing.yaml"], r"-f .*missing.yaml is not accepted: .*No such file"),
    ("epochs: 1\nepochs: 2\n", ["-f", "{tmp}/p.yaml"], r"-f .*p.yaml is not accepted: key 'epochs' given twice"),
    ("- 1\n- 2\n", ["-f", "{tmp}/p.yaml"], r"-f .*p.yaml is not accepted: it must hold a mapping .* not a list"),
    (None, ["-p", "epochs", "[1"], r"-p epochs '\[1' is not accepted: not a YAML value"),
])
def test_advkit_run_refuses_unreadable_parameters_naming_the_option(tmp_path, capsys, file_text, option, message):
    from advkit import cli

    if file_text is not None:
        (tmp_path / "p.yaml").write_text(file_text)
    option = [o.replace("{tmp}", str(tmp_path)) for o in option]
    assert cli.main(["run", "-p", "name", "x", "-p", "runs_root", str(tmp_path / "runs")] + option) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_two_sweeps_of_one_file_at_once_train_every_point_once(tmp_path):
    """Issue 18, item 3: two `advkit sweep` processes on the same file used to train the same point twice, the
    second deleting the first one's files; now the run folder's lock keeps each point to one process, the other
    waits for it, and both finish with one consistent metrics.jsonl per point."""
    import subprocess
    import sys

    f = _write(tmp_path / "s.yaml", json.dumps({"runs_root": str(tmp_path / "runs"), "base": FAST | {"epochs": 2},
                                                "points": [{"name": "a"}, {"name": "b"}]}))
    command = [sys.executable, "-m", "advkit.cli", "sweep", str(f)]
    first, second = (subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                     for _ in range(2))
    outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    for name in ("a", "b"):
        run_dir = tmp_path / "runs" / name
        epochs = [json.loads(l)["epoch"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [1, 2] and results.run_status(run_dir) == "done"
    steps = FAST["n_train"] // config.PRESETS["test"]["batch_size"] * 2  # two epochs, trained once, not again
    for name in ("a", "b"):
        assert rundir.load_checkpoint(tmp_path / "runs" / name)["step"] == steps
        assert any(f"[sweep] {name}: done" in out or f"skip {name}" in out for out in outputs)
    assert not any("FAILED" in out for out in outputs), outputs


def test_the_decisive_studys_later_seeds_train_exactly_main_yamls_points():
    """more-seeds.yaml adds seeds 5+ to main.yaml's runs: the same folder, and for every point it repeats the
    same configuration apart from the seed (a drifted recipe would pair unlike runs)."""
    folder = paths.project_root() / "notebooks" / "sweeps" / "decisive"
    strip = lambda point: point.config.to_dict() | {"seed": None, "name": re.sub(r"-seed\d+$", "", point.config.name)}
    main = {strip(p)["name"]: strip(p) for p in sweep.load_sweep(folder / "main.yaml")}
    later = sweep.load_sweep(folder / "more-seeds.yaml")
    assert {p.config.seed for p in later} == set(range(5, 10))  # stopped by the rule after seed 9
    for point in later:
        assert strip(point) == main[strip(point)["name"]], point.config.name


def test_standard_trainings_autoattack_runs_repeat_main_yamls_standard_point():
    """standard-autoattack.yaml gives C7c its AutoAttack baseline: main.yaml's standard runs (seeds 0-4) trained
    again, differing only in that AutoAttack is evaluated (and in name and folder)."""
    folder = paths.project_root() / "notebooks" / "sweeps" / "decisive"
    standard = {p.config.seed: p.config.to_dict() for p in sweep.load_sweep(folder / "main.yaml")
                if p.config.name.startswith("standard-")}
    again = sweep.load_sweep(folder / "standard-autoattack.yaml")
    assert {p.config.seed for p in again} == set(standard) == set(range(5))
    ignored = {"name", "runs_root", "run_dir", "eval_autoattack_n"}
    for point in again:
        values = point.config.to_dict()
        assert values["eval_autoattack_n"] >= 1000 and standard[point.config.seed]["eval_autoattack_n"] == 0
        assert {k: v for k, v in values.items() if k not in ignored} == \
            {k: v for k, v in standard[point.config.seed].items() if k not in ignored}, point.config.name


@pytest.mark.parametrize("four_groups, groups_32, seeds", [("gn-groups", "main", range(5)),
                                                            ("gn-groups-more", "more-seeds", range(5, 7))])
def test_the_4_group_groupnorm_runs_repeat_main_yamls_groupnorm_point_apart_from_the_groups(four_groups, groups_32,
                                                                                           seeds):
    """gn-groups.yaml (added after C3's seeds 0-4) trains main.yaml's GroupNorm point with gn_groups 4 on the same
    seeds, and gn-groups-more.yaml (C3-g4 undecided at 5 seeds) more-seeds.yaml's on seeds 5-6 (where the stopping
    rule ended it); anything else drifting would pair unlike runs."""
    folder = paths.project_root() / "notebooks" / "sweeps" / "decisive"
    gn = {p.config.seed: p.config.to_dict() for p in sweep.load_sweep(folder / f"{groups_32}.yaml")
          if p.config.name.startswith("adv-clean100-gn-") and p.config.seed in seeds}
    four = sweep.load_sweep(folder / f"{four_groups}.yaml")
    assert {p.config.seed for p in four} == set(gn) == set(seeds)
    assert {p.config.runs_root for p in four} == {"runs/decisive/gn-groups"}  # beside seeds 0-4: one setting
    for point in four:
        values, reference = point.config.to_dict(), gn[point.config.seed]
        assert values["gn_groups"] == 4 and reference["gn_groups"] == 32
        differ = {k for k in values if values[k] != reference[k]}
        assert differ == {"name", "runs_root", "gn_groups"}, (point.config.name, differ)


def _run_direct():
    """notebooks/sweeps/decisive/run_direct.py (a script beside the sweep files) as a module."""
    import importlib.util

    path = paths.project_root() / "notebooks" / "sweeps" / "decisive" / "run_direct.py"
    spec = importlib.util.spec_from_file_location("run_direct", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_direct_runs_points_without_papermill_waits_for_starting_runs_and_skips_finished_ones(tmp_path, capsys):
    runs = tmp_path / "runs"
    f = _write(tmp_path / "s.yaml", json.dumps({"runs_root": str(runs), "base": FAST, "points": [
        {"name": "a", "clean_ratio": 0},
        {"name": "b", "init_checkpoint": "run:a", "finetune_bn": True, "clean_ratio": 0, "warmup_epochs": 0}]}))
    direct = _run_direct()
    assert direct.main([str(f), "--jobs", "2", "--logs", str(tmp_path / "logs")]) == 0
    out = capsys.readouterr().out
    assert out.index("a: done") < out.index("b: started")  # b starts from a's weights
    assert rundir.RunDir(runs / "a").finished() and rundir.RunDir(runs / "b").finished()
    assert not (runs / "a" / "experiment.ipynb").exists()  # no notebook: papermill never ran
    assert direct.main([str(f), "--logs", str(tmp_path / "logs")]) == 0
    assert "skipped: 2" in capsys.readouterr().out


def test_run_direct_skips_a_point_another_process_runs_and_leaves_its_log_alone(tmp_path, capsys):
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    f = _write(tmp_path / "s.yaml", json.dumps({"runs_root": str(runs), "base": FAST, "points": [{"name": "a"}]}))
    logs.mkdir()
    (logs / "a.log").write_text("the other driver's log\n")
    with locked_by_another_process(runs / "a") as pid:
        assert _run_direct().main([str(f), "--logs", str(logs)]) == 0
    out = capsys.readouterr().out
    assert f"a: skipped, in use by pid {pid}" in out and "failed: 0" in out and "a: started" not in out
    assert (logs / "a.log").read_text() == "the other driver's log\n"
    assert not rundir.RunDir(runs / "a").has_checkpoint()


def test_run_direct_starts_nothing_after_its_deadline_and_refuses_bad_input_before_running(tmp_path, capsys):
    f = _write(tmp_path / "s.yaml", json.dumps({"runs_root": str(tmp_path / "runs"), "base": FAST,
                                                 "points": [{"name": "a"}]}))
    direct = _run_direct()
    assert direct.main([str(f), "--deadline", "0", "--logs", str(tmp_path / "logs")]) == 0
    assert "not started: 1 (a)" in capsys.readouterr().out and not (tmp_path / "runs" / "a").exists()
    with pytest.raises(SystemExit):
        direct.main([str(f), "--jobs", "0"])
    assert "--jobs=0 is not accepted" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        direct.main([str(f), "--deadline", "60", "--stop", "30"])
    assert "--stop=30 is not accepted: give at least --deadline=60" in capsys.readouterr().err
    bad = _write(tmp_path / "bad.yaml", "base: {preset: test}\npoints:\n  - {name: a, clean_ratio: 2}")
    with pytest.raises(ValueError, match="clean_ratio=2"):
        direct.main([str(f), str(bad)])
    assert not (tmp_path / "runs" / "a").exists()


def test_run_direct_skips_the_points_a_study_table_records_and_refuses_a_table_without_them(tmp_path, capsys):
    """A new machine has none of the study's run folders: the committed table says which points are done."""
    runs = tmp_path / "runs"
    f = _write(tmp_path / "s.yaml", json.dumps({"runs_root": str(runs), "base": FAST, "points": [
        {"name": "a"}, {"name": "b"}]}))
    table = _write(tmp_path / "runs.csv", "sweep,run,accuracy\nruns,a,50.0\nother,b,50.0\n")
    direct = _run_direct()
    assert direct.main([str(f), "--deadline", "0", "--logs", str(tmp_path / "logs"), "--recorded", str(table)]) == 0
    out = capsys.readouterr().out
    assert "skipped: 1 (a)" in out and "not started: 1 (b)" in out  # a: recorded; b: only another sweep's b is
    for bad, why in ((_write(tmp_path / "bad.csv", "run,accuracy\na,50\n"), "has no sweep and run columns"),
                     (tmp_path / "missing.csv", "No such file")):
        with pytest.raises(SystemExit):
            direct.main([str(f), "--recorded", str(bad)])
        assert f"--recorded={str(bad)!r} is not accepted" in (err := capsys.readouterr().err) and why in err, err
    assert not runs.exists()


@pytest.mark.parametrize("name", ["main", "ablations", "depth"])
def test_the_gpu_sweeps_train_the_cpu_sweeps_points_in_fp32_on_seeds_the_cpu_never_uses(name):
    """gpu-<name>.yaml repeats <name>.yaml's points on seeds 16+ (the CPU's sweeps use 0-15) with bf16 off; only
    standard training adds AutoAttack (C7c's baseline). A drifted recipe would pool unlike runs."""
    folder = paths.project_root() / "notebooks" / "sweeps" / "decisive"
    key = lambda point: re.sub(r"-seed\d+", "", point.config.name)
    cpu_files = [folder / f"{name}.yaml"] + ([folder / "more-seeds.yaml"] if name == "main" else [])
    cpu = {key(p): p.config.to_dict() for f in cpu_files for p in sweep.load_sweep(f)}
    gpu = sweep.load_sweep(folder / f"gpu-{name}.yaml")
    assert min(p.config.seed for p in gpu) >= 16 > max(p.config.seed for f in cpu_files for p in sweep.load_sweep(f))
    assert {key(p) for p in gpu} == {key(p) for p in sweep.load_sweep(folder / f"{name}.yaml")}
    for point in gpu:
        values, reference = point.config.to_dict(), cpu[key(point)]
        assert values["bf16"] is False and reference["bf16"] is None
        differ = {k for k in values if values[k] != reference[k]} - {"name", "runs_root", "seed", "bf16",
                                                                    "init_checkpoint"}
        assert differ == ({"eval_autoattack_n"} if key(point) == "standard" and name == "main" else set()), \
            (point.config.name, differ)


def test_run_direct_stops_the_runs_still_going_at_stop_and_never_counts_them_done(tmp_path, capsys):
    runs = tmp_path / "runs"  # 400 epochs: far more than any machine trains in the 3 s before the stop
    f = _write(tmp_path / "s.yaml", json.dumps({"runs_root": str(runs), "base": FAST | {"epochs": 400},
                                                 "points": [{"name": "a"}, {"name": "b"}]}))
    assert _run_direct().main([str(f), "--deadline", "0.5", "--stop", "3", "--logs", str(tmp_path / "logs")]) == 0
    out = capsys.readouterr().out
    assert "stopped: 1 (a)" in out and "not started: 1 (b)" in out and "done: 0" in out
    assert not rundir.RunDir(runs / "a").finished()


def test_run_direct_counts_a_run_that_finished_just_before_the_stop_signal_as_done(tmp_path, capsys):
    """The race CI met: the child has written its finished folder but not yet exited when --stop comes. Here the
    child sleeps after its work and the driver's one-second pause lasts until the folder is finished, so the
    signal always finds a finished run that is still alive."""
    runs = tmp_path / "runs"
    f = _write(tmp_path / "s.yaml", json.dumps({"runs_root": str(runs), "base": FAST, "points": [{"name": "a"}]}))
    direct = _run_direct()
    direct.CHILD = direct.CHILD.replace("raise SystemExit(main(", "code = (main(") + "; import time; time.sleep(120)"

    def pause_until_finished(seconds):
        for _ in range(1200):
            if rundir.RunDir(runs / "a").finished():
                break
            time.sleep(0.1)
        time.sleep(0.1)

    direct.time = types.SimpleNamespace(monotonic=time.monotonic, sleep=pause_until_finished)
    # seconds of margin: a busy machine may pause the driver before it starts "a"; the stop then waits for the run
    assert direct.main([str(f), "--deadline", "1", "--stop", "1.5", "--logs", str(tmp_path / "logs")]) == 0
    out = capsys.readouterr().out
    assert "a: done at stop" in out and "done: 1 (a)" in out and "stopped: 0" in out, out
    assert rundir.RunDir(runs / "a").finished()
