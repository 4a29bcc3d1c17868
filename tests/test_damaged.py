"""Run folders as a researcher's workflow leaves them: half-written files, runs that share a name in different
sub-folders, a mistyped folder. Every reader names the damaged file and its run, and the analysis goes on with
the other runs."""

import io
import json
import re
import shutil

import pandas as pd
import pytest

from advkit import cli, config, results, rundir, run, study, train

TINY = dict(epochs=1, n_train=128, n_test=64, train_steps=1, eval_checkpoints=[1, 2], sanity_n=0, bnstats_channels=4)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One real, finished tiny run (its files are copied and damaged by the tests)."""
    root = tmp_path_factory.mktemp("trained")
    cfg = config.make_config("test", name="good", runs_root=str(root), **TINY)
    run.run(cfg, show_progress=False)
    return cfg.run_dir


def _copy_run(source, target, name=None):
    """A copy of the run folder ``source`` at ``target`` (its config renamed to ``name``)."""
    shutil.copytree(source, target)
    cfg = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(cfg | {"name": name or target.name, "run_dir": str(target)}))
    return target


def _cut(path, keep):
    text = path.read_text()
    path.write_text(keep(text))


def _short_row(text):
    lines = text.splitlines(keepends=True)
    lines[1] = ",".join(lines[1].split(",")[:3]) + "\n"
    return "".join(lines)


def _drop_accuracy(text):
    frame = pd.read_csv(io.StringIO(text))
    return frame.drop(columns="accuracy").to_csv(index=False)


def _blank_accuracy(text):
    frame = pd.read_csv(io.StringIO(text))
    frame.loc[1, "accuracy"] = None
    return frame.to_csv(index=False)


DAMAGES = {  # file, how it is damaged, what the message says
    "status-truncated": ("status.json", lambda t: t[: len(t) // 2], "not valid JSON"),
    "status-empty": ("status.json", lambda t: "", "not valid JSON"),
    "status-no-state": ("status.json", lambda t: "{}", "no 'state'"),
    "config-truncated": ("config.json", lambda t: t[: len(t) // 2], "not valid JSON"),
    "results-empty": ("results.csv", lambda t: "", "empty"),
    "results-cut-mid-row": ("results.csv", lambda t: t[:-7], "ends mid-row"),
    "results-cut-in-header": ("results.csv", lambda t: t[:10], "ends mid-row"),
    "results-short-row": ("results.csv", _short_row, r"line 2 has 3 fields, the header \d+"),
    "results-missing-column": ("results.csv", _drop_accuracy, r"missing column\(s\) \['accuracy'\]"),
    "results-header-only": ("results.csv", lambda t: t.splitlines(keepends=True)[0], "a header without rows"),
    "results-no-accuracy": ("results.csv", lambda t: _blank_accuracy(t), "a row without a value"),
    "bnstats-truncated": ("bnstats.csv", lambda t: t[: len(t) // 2], "ends mid-row"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_run_is_named_listed_and_left_out_while_the_others_are_read(finished_run, tmp_path, damage,
                                                                                 capsys):
    file, how, reason = DAMAGES[damage]
    root = tmp_path / "runs"
    _copy_run(finished_run, root / "good")
    bad = _copy_run(finished_run, root / "sweep" / "bad")
    _cut(bad / file, how)
    named = rf"run bad: damaged file {re.escape(str(bad / file))}: .*{reason}"

    with pytest.warns(UserWarning, match=named):
        assert set(results.load_runs(root)["name"]) == {"good"}
    listed = results.unfinished_runs(root).set_index("run_dir")
    assert listed.loc[str(bad), "state"] == "damaged" and re.search(named, listed.loc[str(bad), "error"])
    if file in ("status.json", "results.csv"):  # the run folder's own rule for finished agrees
        assert rundir.RunDir(bad).state() == "damaged" and not rundir.RunDir(bad).finished()
    with pytest.warns(UserWarning, match=named):
        frame = results.analysis_frame(root)
    assert set(frame.loc[frame["source"] == "kit", "run"]) == {"good"}
    with pytest.warns(UserWarning, match=named):
        assert set(results.load_bnstats(root)["run"]) == {"good"}
    with pytest.warns(UserWarning, match=named):
        assert list(results.summary_table(root)["run"]) == ["good"]

    assert cli.main(["summary", str(root)]) == 1  # the table, and the damaged run named on stderr
    out, err = capsys.readouterr()
    assert re.search(r"^\s*good\s", out, re.MULTILINE) and "bad" not in out
    assert re.search(named, err)


def test_reading_the_status_of_a_damaged_run_names_the_file(finished_run, tmp_path):
    bad = _copy_run(finished_run, tmp_path / "bad")
    _cut(bad / "status.json", lambda t: t[:5])
    with pytest.raises(rundir.DamagedFile, match=rf"damaged file {re.escape(str(bad / 'status.json'))}"):
        results.run_status(bad)


def test_a_done_run_without_results_is_damaged(finished_run, tmp_path):
    root = tmp_path / "runs"
    bad = _copy_run(finished_run, root / "bad")
    (bad / "results.csv").unlink()
    with pytest.warns(UserWarning, match=r"run bad: .*results.csv.* missing"):
        assert results.load_runs(root).empty
    assert list(results.unfinished_runs(root)["state"]) == ["damaged"]


def test_a_damaged_metrics_line_leaves_that_run_out_of_the_training_table_and_names_the_line(finished_run, tmp_path):
    root = tmp_path / "runs"
    _copy_run(finished_run, root / "main" / "good")
    bad = _copy_run(finished_run, root / "main" / "bad")
    _cut(bad / "metrics.jsonl", lambda t: t[:-9])
    with pytest.warns(UserWarning, match=rf"run bad: damaged file {re.escape(str(bad / 'metrics.jsonl'))}: "
                                         r"line 1 is not valid JSON"):
        counts = study.export(root, tmp_path / "tables")
    training = pd.read_csv(tmp_path / "tables" / "training.csv")
    assert set(training["run"]) == {"good"} and counts["training"] == len(training)
    assert set(pd.read_csv(tmp_path / "tables" / "runs.csv")["run"]) == {"good", "bad"}  # its results are sound


def test_summary_keeps_runs_that_share_a_name_in_different_folders(finished_run, tmp_path):
    root = tmp_path / "runs"
    for sweep, accuracy in (("first", 0.25), ("second", 0.75)):
        run = _copy_run(finished_run, root / sweep / "adv", name="adv")
        table = pd.read_csv(run / "results.csv").assign(accuracy=accuracy)
        table.to_csv(run / "results.csv", index=False)
    summary = results.summary_table(root).set_index("run")
    assert sorted(summary.index) == ["first/adv", "second/adv"]
    assert summary.loc["first/adv", "clean"] == 25.0 and summary.loc["second/adv", "clean"] == 75.0


def test_summary_of_a_folder_that_does_not_exist_says_so(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    assert cli.main(["summary", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == f"advkit summary: runs root {missing} does not exist"
    with pytest.raises(ValueError, match="does not exist"):
        results.summary_table(missing)
