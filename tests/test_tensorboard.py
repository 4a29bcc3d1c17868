"""TensorBoard event files (issue 17, part 5): the scalars equal metrics.jsonl's and results.csv's numbers, a
resumed run shows no step twice, and tensorboard=False writes nothing."""

import sys

import numpy as np
import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from advkit import config, run, tblog, train
from advkit.rundir import RunDir

TINY = dict(epochs=2, n_train=128, n_test=64, batch_size=32, eval_checkpoints=[1, 2], sanity_n=0,
            bnstats_channels=0, clean_ratio=0.5)


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a TensorBoard folder as (step, value) pairs, as TensorBoard shows them."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _metrics_as_scalars(folder: RunDir) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as the train/<key> series tblog writes (float32, as TensorBoard stores them)."""
    return {f"train/{key}": [(r["step"], float(np.float32(r[key]))) for r in folder.metrics()]
            for key in tblog.TRAIN_SCALARS}


def test_training_scalars_equal_metrics_jsonl_and_a_resumed_run_shows_no_step_twice(tmp_path, monkeypatch):
    cfg = config.make_config("test", name="tb", runs_root=str(tmp_path), tensorboard=True, **TINY)
    real_save = train._save

    def killed_before_the_last_checkpoint(loop, epoch, batch_in_epoch):
        if epoch == 2 and batch_in_epoch == 0:  # epoch 2 is logged (metrics and TensorBoard), not checkpointed
            raise KeyboardInterrupt("simulated kill")
        real_save(loop, epoch, batch_in_epoch)

    monkeypatch.setattr(train, "_save", killed_before_the_last_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run.train_run(cfg, show_progress=False)
    folder = RunDir(cfg.run_dir)
    assert len(folder.metrics()) == 2 and len(_scalars(folder.tensorboard_train)["train/loss"]) == 2
    monkeypatch.setattr(train, "_save", real_save)
    run.train_run(config.make_config("test", name="tb", runs_root=str(tmp_path), tensorboard=True, resume=True,
                                     **TINY), show_progress=False)  # epoch 2 trained again from epoch 1's end
    metrics = folder.metrics()
    assert [r["epoch"] for r in metrics] == [1, 2]
    assert _scalars(folder.tensorboard_train) == _metrics_as_scalars(folder)  # one value per step, the new one


def test_the_evaluation_is_logged_as_results_csv_says_and_replaced_when_evaluated_again(tmp_path):
    cfg = config.make_config("test", name="tb-eval", runs_root=str(tmp_path), tensorboard=True, **TINY | {"epochs": 1})
    results = run.run(cfg, show_progress=False)
    folder = RunDir(cfg.run_dir)
    scalars = _scalars(folder.tensorboard_eval)
    expected = [(int(s), float(np.float32(a))) for s, a in zip(results["steps"], results["accuracy"])]
    assert scalars["eval/pgd_accuracy"] == expected  # step 0: clean, then PGD-1, PGD-2
    worst = [(int(s), float(np.float32(a))) for s, a in zip(results["steps"], results["worst_accuracy"])]
    assert scalars["eval/pgd_worst_accuracy"] == worst
    assert _scalars(folder.tensorboard_train) == _metrics_as_scalars(folder)
    again = config.make_config("test", name="tb-eval", runs_root=str(tmp_path), tensorboard=True, resume=True,
                               **TINY | {"epochs": 1, "eval_checkpoints": [1, 3]})
    results = run.run(again, show_progress=False)
    assert [s for s, _ in _scalars(folder.tensorboard_eval)["eval/pgd_accuracy"]] == [0, 1, 3]  # not 0, 1, 2, 0, 1, 3


def test_tensorboard_off_writes_no_folder(tmp_path):
    cfg = config.make_config("test", name="no-tb", runs_root=str(tmp_path), **TINY | {"epochs": 1})
    assert cfg.tensorboard is False
    run.train_run(cfg, show_progress=False)
    folder = RunDir(cfg.run_dir)
    assert folder.metrics() and not folder.tensorboard_dir.exists()


def test_log_evaluation_tags_mixture_bn_branches_and_autoattack(tmp_path):
    rows = [dict(branch=b, attack=a, steps=s, accuracy=acc, worst_accuracy=acc - 0.01)
            for b in ("clean", "adv") for a, s, acc in
            (("clean", 0, 0.9), ("pgd", 10, 0.5), ("pgd", 20, 0.4), ("apgd-ce", 100, 0.3), ("autoattack", 100, 0.2))]
    folder = RunDir(tmp_path / "run")
    tblog.log_evaluation(folder, pd.DataFrame(rows))
    scalars = _scalars(folder.tensorboard_eval)
    assert scalars["eval/MBN_adv/pgd_accuracy"] == [(0, float(np.float32(0.9))), (10, 0.5), (20, float(np.float32(0.4)))]
    assert scalars["eval/MBN_clean/autoattack"] == [(100, float(np.float32(0.2)))]
    assert scalars["eval/MBN_adv/apgd-ce"] == [(100, float(np.float32(0.3)))]
    assert len(scalars) == 8  # per branch: pgd_accuracy, pgd_worst_accuracy, apgd-ce, autoattack


def test_tensorboard_is_checked_before_any_compute_and_may_change_on_resume(monkeypatch):
    with pytest.raises(ValueError, match="tensorboard='yes'"):
        config.make_config("test", tensorboard="yes")
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install tensorboard"):
        config.make_config("test", tensorboard=True)
    monkeypatch.undo()
    saved = config.make_config("test").to_dict()
    assert config.resume_conflicts(saved, config.make_config("test", tensorboard=True)) == []  # logging only
