"""The plotting functions on the paper's own numbers: every panel present, plotted values equal the CSV's."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402

import numpy as np
import pandas as pd
import pytest
import torch

from advkit import attacks, bnstats, plots, results
from helpers import fmnist_model

TABLE7 = pd.read_csv(results.PAPER_DIR / "table7.csv")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    matplotlib.pyplot.close("all")


@pytest.fixture(scope="module")
def paper():
    return results.paper_results()


def _paper_rows(**where):
    rows = TABLE7
    for k, v in where.items():
        rows = rows[rows[k] == v]
    return rows


def test_paper_numbers_load_into_the_analysis_schema(paper):
    assert list(paper.columns) == results.SCHEMA
    assert len(paper) == len(TABLE7) * 6 + 4
    assert set(paper["source"]) == {"paper"} and paper["accuracy"].between(0, 100).all()


def test_figure1_plots_pgd2000_against_clean_ratio(paper, tmp_path):
    fig = plots.figure1(paper, tmp_path)
    expected = _paper_rows(network="resnet152", batch_size=4096, train_pgd_steps=30, norm="bn", alp=0,
                           running_stats=0).sort_values("clean_ratio")
    line = fig.axes[0].lines[0]
    assert np.allclose(line.get_xdata(), expected["clean_ratio"] * 100)
    assert np.allclose(line.get_ydata(), expected["pgd2000"])
    assert "sweeps/fmnist/figure1.yaml" in fig.axes[1].texts[0].get_text()  # the kit panel says how to fill it
    assert (tmp_path / "figure1.png").stat().st_size > 0 and (tmp_path / "figure1.pdf").exists()


@pytest.mark.parametrize("figure, norm, n_lines", [(plots.figure2, "bn", 3), (plots.figure3, "mbn_adv", 2)])
def test_figures_2_3_plot_the_curves(paper, tmp_path, figure, norm, n_lines):
    fig = figure(paper, tmp_path)
    lines = [l for l in fig.axes[0].lines if len(l.get_xdata()) == 5]
    assert len(lines) == n_lines
    expected = _paper_rows(network="resnet152", batch_size=4096, train_pgd_steps=30, norm=norm, running_stats=0)
    if norm == "bn":
        expected = expected[expected["clean_ratio"].isin([0.0, 1.0])]
    curves = {tuple(np.round(l.get_ydata(), 1)) for l in lines}
    assert curves == {tuple(r) for r in expected[["pgd10", "pgd20", "pgd100", "pgd500", "pgd2000"]].to_numpy()}
    assert all(list(l.get_xdata()) == [10, 20, 100, 500, 2000] for l in lines)
    assert fig.axes[0].get_xscale() == "log"


def test_figure7_depth(paper, tmp_path):
    fig = plots.figure7(paper, tmp_path)
    ys = sorted((tuple(l.get_xdata()), tuple(l.get_ydata())) for ax in fig.axes for l in ax.lines
                if len(l.get_xdata()) > 1)
    assert ((152, 200, 338, 518, 638), (42.2, 43.8, 44.6, 46.2, 46.7)) in ys
    assert ((152, 338), (78.9, 79.4)) in ys


def test_tables_rebuild_the_papers_differences(paper, tmp_path):
    tables = plots.all_tables(paper, tmp_path)
    t1 = tables["table1_paper"]
    assert t1["accuracy"].tolist() == [78.9, 79.3, 78.4, 39.2, 38.3, 35.3]
    assert t1["difference"].tolist() == [0.0, 0.4, -0.5, 0.0, -0.9, -3.9]
    t2 = tables["table2_paper"].set_index("setting")["difference"]
    assert t2.to_dict() == {"100% adv + 0% clean": 3.0, "MBN_adv, 100% adv + 100% clean": 1.6,
                            "MBN_adv, 100% adv + 100% clean, ALP": 2.8}
    t4 = tables["table4_paper"].set_index("train_steps")
    assert t4.loc[20, "100% adv + 100% clean"] == 13.6 and t4.loc[5, "MBN_adv, 100% adv + 100% clean, ALP"] == 32.9
    t6 = tables["table6_paper"].set_index("batch_size").iloc[:, 0].to_dict()
    assert t6 == {512: 42.0, 1024: 43.1, 2048: 43.3, 4096: 42.2, 8192: 41.9}
    t7 = tables["table7_paper"]
    assert t7["PGD-2000"].notna().sum() == len(TABLE7)  # plus the clean-only rows of Table 1 and Section 5
    assert t7["PGD-2000"].sum() == pytest.approx(TABLE7["pgd2000"].sum())
    assert (tmp_path / "table7_paper.md").read_text().startswith("| arch")


def test_figures_5_6_from_real_bn_statistics(tmp_path):
    model = fmnist_model(norm="mbn").train()
    model(torch.rand(32, 1, 28, 28))
    batches = [(torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(2)]
    table = bnstats.figure_statistics(model, batches, num_classes=10, channels=6, attack=attacks.Attack(steps=2, step=8))
    fig5 = plots.figure5(table, tmp_path)
    assert len(fig5.axes[0].patches) >= 12  # 6 channels x 2 branches
    heights = sorted(round(p.get_height(), 5) for p in fig5.axes[1].patches if p.get_height())
    expected = sorted(round(v, 5) for v in table[(table["figure"] == 5) & (table["statistic"] == "var")]["value"])
    assert heights == expected
    plots.figure6(table, tmp_path)
    empty = plots.figure6(pd.DataFrame(), tmp_path)
    assert "no kit results" in empty.axes[0].texts[0].get_text()


def test_figures_5_6_draw_one_run_where_several_sampled_their_own_channels(tmp_path):
    """Each run samples its BN channels with its own seed: pooling channel c over seeds pooled unrelated features
    (the decisive study's five seeds gave 32 channels on the axis instead of 20)."""
    model = fmnist_model(norm="mbn").train()
    model(torch.rand(32, 1, 28, 28))
    batches = [(torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(2)]
    one = bnstats.figure_statistics(model, batches, num_classes=10, channels=6, attack=attacks.Attack(steps=2, step=8))
    runs = pd.concat([one.assign(channel=one["channel"] + 100 * seed, run=f"r{seed}", run_dir=f"/runs/r{seed}",
                                 seed=seed, strategy="100% adv + 100% clean", norm="mbn", dataset="fmnist",
                                 arch="small_resnet8", running_stats=False) for seed in (2, 1)], ignore_index=True)
    fig5 = plots.figure5(runs, tmp_path)
    labels = {int(t.get_text()) for t in fig5.axes[0].get_xticklabels()}
    assert labels == set(one[one["figure"] == 5]["channel"] + 100), labels  # seed 1's channels alone
    assert "run r1, one of 2" in fig5._suptitle.get_text()
    means_only = runs[(runs["figure"] == 6) & (runs["statistic"] == "mean")]
    fig6 = plots.figure6(means_only, tmp_path)  # raised ZeroDivisionError
    assert "no kit results" in fig6.axes[1].texts[0].get_text()


def test_saved_pdfs_carry_no_creation_date_so_a_redrawn_figure_is_the_same_file(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png, pdf = plots.save(fig, "line", tmp_path)
    first = pdf.read_bytes()
    assert b"CreationDate" not in first
    plots.save(fig, "line", tmp_path)
    assert pdf.read_bytes() == first


def test_figures_drawn_in_tests_without_a_folder_never_touch_the_committed_figures():
    import matplotlib.pyplot as plt

    from advkit.paths import project_root

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png, pdf = plots.save(fig, "study_claims")  # the name of a committed figure, no folder given
    assert png.exists() and png.parent != project_root() / "figures"


# ---------------------------------------------------------------- kit runs written as run.run writes them

KIT_CONFIG = dict(strategy="100% adv + 0% clean", norm="bn", adv_ratio=1.0, clean_ratio=0.0, alp_weight=0.0,
                  running_stats_epochs=0, finetune_bn=False, arch="small_resnet8", dataset="fashion-mnist",
                  train_steps=2, train_eps=16.0, batch_size=64, epochs=1, seed=0, n_train=128)


def _kit_run(root, folder, curve, targeted=True, eps=16.0, branches=("-",), **config):
    """A finished run folder (config.json, status.json, results.csv) with ``curve`` [(steps, accuracy 0-1)]."""
    import json

    run_dir = root / folder
    run_dir.mkdir(parents=True)
    name = config.pop("name", folder)
    (run_dir / "config.json").write_text(json.dumps(KIT_CONFIG | dict(name=name) | config | dict(run_dir=str(run_dir))))
    (run_dir / "status.json").write_text(json.dumps({"state": "done"}))
    pd.DataFrame([dict(branch=b, attack="clean" if s == 0 else "pgd", targeted=targeted, eps=eps, step=2.0,
                       step_rule="fixed", restarts=1, steps=s, accuracy=a, worst_accuracy=a, n=64, seed=0)
                  for b in branches for s, a in curve]).to_csv(run_dir / "results.csv", index=False)
    return run_dir


def test_untargeted_pgd_runs_are_not_mixed_into_the_papers_targeted_protocol(tmp_path):
    runs = tmp_path / "runs"
    _kit_run(runs, "targeted", [(0, 0.8), (10, 0.6), (20, 0.5)], targeted=True)
    _kit_run(runs, "untargeted", [(0, 0.8), (10, 0.2), (20, 0.1)], targeted=False, seed=1)
    frame = results.analysis_frame(runs)
    kit = results.paper_protocol(frame)
    kit = kit[kit["source"] == "kit"]
    assert set(kit.loc[kit["steps"] > 0, "run"]) == {"targeted"}
    table = plots.all_tables(frame, tmp_path / "figures")["table7_kit"]
    assert table["PGD-20"].tolist() == [50.0]  # not 30.0, the mean of targeted 50 and untargeted 10
    fig = plots.figure1(frame, tmp_path / "figures")
    assert [list(line.get_ydata()) for line in fig.axes[1].lines] == [[50.0]]


def test_table1_reads_every_pgd_row_at_the_pgd_n_its_metric_names(tmp_path):
    runs = tmp_path / "runs"
    _kit_run(runs, "madry", [(0, 0.8), (10, 0.6), (100, 0.5)])
    _kit_run(runs, "mbn", [(0, 0.7), (10, 0.55)], norm="mbn", clean_ratio=1.0, strategy="100% adv + 100% clean",
             branches=("clean", "adv"))  # evaluated to PGD-10 only
    table = plots.all_tables(results.analysis_frame(runs), tmp_path / "figures")["table1_kit"].set_index("strategy")
    assert table.loc["100% adv + 0% clean", "metric"] == "PGD-100"
    assert table.loc["100% adv + 0% clean", "accuracy"] == 50.0
    mbn_adv = table.loc["MBN_adv, 100% adv + 100% clean"]
    assert mbn_adv["metric"] == "PGD-100" and np.isnan(mbn_adv["accuracy"])  # not its PGD-10 (55.0) labelled PGD-100


def test_tables_keep_runs_of_other_eps_and_data_sets_apart(tmp_path):
    runs = tmp_path / "runs"
    _kit_run(runs, "eps16", [(0, 0.8), (10, 0.6)])
    _kit_run(runs, "eps16-seed1", [(0, 0.8), (10, 0.6)], seed=1)
    _kit_run(runs, "eps4", [(0, 0.9), (10, 0.2)], eps=4.0, train_eps=4.0)
    _kit_run(runs, "cifar", [(0, 0.5), (10, 0.1)], dataset="cifar10")
    tables = plots.all_tables(results.analysis_frame(runs), tmp_path / "figures")
    t7 = tables["table7_kit"].set_index(["dataset", "eps"])["PGD-10"]
    assert t7.to_dict() == {("cifar10", 16.0): 10.0, ("fashion-mnist", 4.0): 20.0, ("fashion-mnist", 16.0): 60.0}
    assert tables["table4_kit"]["100% adv + 0% clean"].tolist() == [60.0]  # the runs most share, not a mean of all
    assert "dataset" not in tables["table7_paper"]  # one data set and eps: the paper's table keeps its columns


def test_runs_of_another_recipe_are_another_model_never_a_seed(tmp_path):
    """Runs that differ in what the schema has no column for (epochs here; n_train, lr, alpha, eval_step ...) were
    averaged as seeds of one model. They are now labelled by what they change and kept apart."""
    runs = tmp_path / "runs"
    _kit_run(runs, "short", [(0, 0.8), (10, 0.6)])
    _kit_run(runs, "short-seed1", [(0, 0.8), (10, 0.4)], seed=1)
    _kit_run(runs, "long", [(0, 0.9), (10, 0.1)], epochs=16, eval_step=0.5)
    frame = results.analysis_frame(runs)
    kit = frame[frame["source"] == "kit"].drop_duplicates("run").set_index("run")["recipe"]
    assert kit.to_dict() == {"short": "", "short-seed1": "", "long": "epochs=16, eval_step=0.5"}
    tables = plots.all_tables(frame, tmp_path / "figures")
    assert tables["table4_kit"]["100% adv + 0% clean"].tolist() == [50.0]  # not 36.7 with the long run's 10
    assert tables["table7_kit"].set_index("recipe")["PGD-10"].to_dict() == {"": 50.0, "epochs=16, eval_step=0.5": 10.0}
    fig = plots.figure1(frame, tmp_path / "figures")
    assert [list(line.get_ydata()) for line in fig.axes[1].lines] == [[50.0]]


def test_panels_choose_their_setting_among_their_own_runs(tmp_path):
    """Three standard-training runs carry an unused train PGD-2 in their configs; the one adversarial run trained
    with PGD-5. The mode over all runs (PGD-2) left Figure 1's kit panel and Table 1's adversarial row empty."""
    runs = tmp_path / "runs"
    for seed in range(3):
        _kit_run(runs, f"standard-seed{seed}", [(0, 0.9), (10, 0.0)], adv_ratio=0.0, clean_ratio=1.0, seed=seed,
                 strategy="0% adv + 100% clean")
    _kit_run(runs, "madry", [(0, 0.8), (10, 0.6)], train_steps=5)
    frame = results.analysis_frame(runs)
    fig = plots.figure1(frame, tmp_path / "figures")
    assert [list(line.get_ydata()) for line in fig.axes[1].lines] == [[60.0]]
    table = plots.all_tables(frame, tmp_path / "figures")["table1_kit"].set_index("strategy")["accuracy"]
    assert table["100% adv + 0% clean"] == 60.0 and table["0% adv + 100% clean"] == 90.0


def test_table1_chooses_its_recipe_among_the_adversarial_runs(tmp_path):
    """Three standard-training runs of 16 epochs outnumber the two adversarial runs of 1 epoch (and make 16 epochs
    the common recipe). Chosen over all rows, Table 1 read its adversarial row at the one 16-epoch adversarial run
    (10.0) instead of the two of the adversarial recipe most runs share (mean 50.0)."""
    runs = tmp_path / "runs"
    for seed in range(3):
        _kit_run(runs, f"standard-seed{seed}", [(0, 0.9), (10, 0.0)], adv_ratio=0.0, clean_ratio=1.0, seed=seed,
                 strategy="0% adv + 100% clean", epochs=16)
    _kit_run(runs, "madry-seed0", [(0, 0.8), (10, 0.6)])
    _kit_run(runs, "madry-seed1", [(0, 0.8), (10, 0.4)], seed=1)
    _kit_run(runs, "madry-long", [(0, 0.85), (10, 0.1)], epochs=16)
    table = plots.all_tables(results.analysis_frame(runs), tmp_path / "figures")["table1_kit"].set_index("strategy")
    assert table.loc["100% adv + 0% clean", "accuracy"] == 50.0
    assert np.isnan(table.loc["0% adv + 100% clean", "accuracy"])  # no standard run of that recipe: not a 16-epoch one


def test_recipe_labels_name_what_differs_from_the_common_recipe():
    base = dict(KIT_CONFIG, lr=0.1, run_dir="/r/a")
    labels = results.recipe_labels([base, base | dict(seed=3, name="b", run_dir="/r/b", init_checkpoint="/r/x"),
                                    base | dict(lr=0.05), {k: v for k, v in base.items() if k != "n_train"}])
    assert labels == ["", "", "lr=0.05", "n_train unset"]


def test_what_is_no_part_of_a_recipe_covers_where_and_how_a_run_ran():
    from advkit import config

    assert set(config.WHERE_AND_HOW) <= results.NOT_RECIPE
    assert {"epochs", "n_train", "lr", "alpha", "eq1_weighting", "width_multiplier", "eval_step", "bf16",
            "zero_init_residual"}.isdisjoint(results.NOT_RECIPE)


def test_figures_refuses_a_runs_root_that_does_not_exist_before_running_a_notebook(tmp_path, capsys):
    from advkit import cli, figures

    missing = tmp_path / "rnus"  # a typo of runs
    with pytest.raises(ValueError, match="runs_root=.*rnus.*does not exist"):
        figures.run_analysis_notebooks(str(missing), str(tmp_path / "figures"))
    assert not missing.exists() and not (tmp_path / "figures").exists()
    assert cli.main(["figures", "--runs", str(missing), "--out", str(tmp_path / "figures")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_tables_of_a_runs_root_holding_only_bn_finetuning_runs(tmp_path):
    runs = tmp_path / "runs"
    _kit_run(runs, "ft-bn-clean", [(0, 0.8), (10, 0.3)], finetune_bn=True, adv_ratio=0.0, clean_ratio=1.0,
             strategy="0% adv + 100% clean, BN-only finetuning")
    tables = plots.all_tables(results.analysis_frame(runs), tmp_path / "figures")
    assert tables["table7_kit"].empty and not tables["table7_paper"].empty


def test_training_curves_returns_its_figure():
    metrics = pd.DataFrame(dict(epoch=[1, 2], loss=[2.0, 1.5], train_adv_accuracy=[0.3, 0.4],
                                train_clean_accuracy=[0.6, 0.7]))
    fig = plots.training_curves(metrics)
    assert list(fig.axes[1].lines[0].get_ydata()) == [30.0, 40.0]
