import io
import math

import pandas as pd
import pytest

from advkit import config, paths, run, study, sweep, train


def test_settings_drop_the_grid_tags_of_seed_and_depth():
    assert study.setting_of("adv-clean0-seed2") == "adv-clean0"
    assert study.setting_of("adv-clean0-archsmall_resnet14-seed0") == "adv-clean0"
    assert study.setting_of("clean0-eps16") == "clean0-eps16"


def test_t_interval_matches_the_textbook_formula():
    mean, low, high = study.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert high - mean == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)  # t(0.975, 2) * sd / sqrt(n)
    assert math.isnan(study.t_interval([5.0])[1])


def test_seeds_that_all_give_the_same_difference_decide_nothing():
    """Accuracies on the fixed set move in 0.05-point steps: two seeds at -3.0 give sd 0, not a decided claim."""
    assert study.t_interval([-3.0, -3.0])[0] == -3.0 and math.isnan(study.t_interval([-3.0, -3.0])[1])
    assert math.isnan(study.t_interval([89.55 - 80.95, 61.0 - 52.4])[1])  # equal differences, read back from a CSV
    varied = pd.Series([5.0, 5.5, 6.0, 6.5])
    assert not study._row("C1", "x", varied, (18.3, "18.3"))["decided"]  # 4 seeds: preliminary, not decided
    assert study._row("C1", "x", pd.concat([varied, pd.Series([6.0])]), (18.3, "18.3"))["decided"]
    row = study._row("C3b", "x", pd.Series([-3.0, -3.0]), (-0.2, "-0.2"), near=True)
    assert row["verdict"] == "undecided" and row["kit"] == "-3.0 (n=2, every seed the same: no interval)"
    assert row["paper_size"] == ""
    assert study._row("C3b", "x", pd.Series([-3.0, -3.05]), (-0.2, "-0.2"), near=True)["verdict"] == "reversed"


@pytest.mark.parametrize("low,high,direction,near,expected", [
    (1.0, 3.0, 1, False, "holds"),
    (-3.0, -1.0, 1, False, "reversed"),
    (-3.0, -1.0, -1, False, "holds"),
    (-1.0, 1.5, 1, False, "no effect larger than 2 points"),
    (-5.0, 6.0, 1, False, "undecided"),
    (0.5, 6.0, 1, False, "holds"),
    (-1.5, 1.0, 1, True, "holds"),
    (-1.5, 3.0, 1, True, "undecided"),
    (-6.0, -3.0, 1, True, "reversed"),
    (2.0, 5.0, 1, True, "reversed"),
    (float("nan"), float("nan"), 1, False, "undecided"),
])
def test_one_verdict_rule_for_every_claim(low, high, direction, near, expected):
    assert study.verdict(low, high, direction, near=near) == expected


@pytest.mark.parametrize("low,high,paper,expected", [
    (-2.0, 10.0, 18.3, "the paper's +18.3 is ruled out (here at most +10.0)"),
    (-2.0, 10.0, 4.0, "the paper's +4.0 lies inside the interval"),
    (-2.0, 10.0, -5.0, "the paper's -5.0 is ruled out (here at least -2.0)"),
    (-2.0, 10.0, float("nan"), ""),
])
def test_verdicts_say_whether_the_papers_effect_size_is_ruled_out(low, high, paper, expected):
    assert study.paper_size(low, high, paper) == expected


def _runs(values):
    """A runs table: {(setting, branch): [accuracy at PGD-100 per seed]} plus clean = accuracy + 10."""
    rows = []
    for (setting, branch), accuracies in values.items():
        for seed, acc in enumerate(accuracies):
            for steps, value in ((0, acc + 10), (10, acc + 3), (100, acc)):
                rows.append(dict(sweep="main", run=f"{setting}-seed{seed}", setting=setting, seed=seed,
                                 arch="small_resnet8", branch=branch, steps=steps, accuracy=value))
    return pd.DataFrame(rows)


def test_claims_are_paired_differences_over_seeds():
    runs = _runs({("adv-clean0", "-"): [60.0, 61.0, 62.0], ("adv-clean100", "-"): [55.0, 55.5, 57.0],
                  ("adv-clean100-gn", "-"): [55.0, 55.4, 57.1]})
    table = study.claims(runs, pd.DataFrame(columns=study.BNSTATS_COLUMNS)).set_index("claim")
    mean, low, high = study.t_interval([5.0, 5.5, 5.0])
    assert table.loc["C1", "mean"] == pytest.approx(mean) and table.loc["C1", "low"] == pytest.approx(low)
    assert table.loc["C1", "verdict"] == "holds" and not table.loc["C1", "decided"]  # 3 seeds: the rule applies from 5
    assert table.loc["C3", "verdict"] == "no effect larger than 2 points"  # GN equals BN within 0.1 point
    assert table.loc["C4", "verdict"] == "not run yet" and table.loc["C4", "seeds"] == 0


def test_the_4_group_groupnorm_claims_pair_gn4_runs_with_main_yamls_bn_and_adv_only_runs():
    runs = _runs({("adv-clean0", "-"): [60.0, 61.0, 62.0], ("adv-clean100", "-"): [55.0, 56.0, 57.0],
                  ("adv-clean100-gn", "-"): [50.0, 51.0, 52.0], ("adv-clean100-gn4", "-"): [58.0, 59.0, 60.0]})
    table = study.claims(runs, pd.DataFrame(columns=study.BNSTATS_COLUMNS)).set_index("claim")
    assert table.loc["C3", "mean"] == pytest.approx(-5.0) and table.loc["C3-g4", "mean"] == pytest.approx(3.0)
    assert table.loc["C3b-g4", "mean"] == pytest.approx(-2.0) and table.loc["C3b-g4", "near"]
    assert table.loc["C3-g4", "paper_effect"] == table.loc["C3", "paper_effect"]


def test_the_readme_titles_say_how_many_channels_per_group_the_studys_groupnorm_has():
    """CLAIM_TITLES describe the GroupNorm of the runs (32 groups: 1-2 channels each; 4 groups: 4-16): measured
    on small_resnet8 built as the study's sweeps build it."""
    import torch.nn as nn
    from advkit import models
    folder = paths.project_root() / "notebooks" / "sweeps" / "decisive"
    built = {}
    for file, setting in (("main.yaml", "adv-clean100-gn-seed0"), ("gn-groups.yaml", "adv-clean100-gn4-seed0")):
        cfg = next(p.config for p in sweep.load_sweep(folder / file) if p.config.name == setting)
        model = models.build_model(cfg.arch, norm=cfg.norm, gn_groups=cfg.gn_groups, num_classes=10, in_channels=1,
                                   mean=(0.5,), std=(0.5,))
        built[setting] = sorted({m.num_channels // m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)})
    assert built["adv-clean100-gn-seed0"] == [1, 2] and "1-2 channels each" in study.CLAIM_TITLES["C3"]
    assert built["adv-clean100-gn4-seed0"] == [4, 8, 16] and "4-16 channels each" in study.CLAIM_TITLES["C3-g4"]


def test_looking_after_every_seed_raises_the_error_and_the_sequential_level_brings_it_back_to_5_percent():
    assert study.sequential_error(looks=(5,)) == pytest.approx(0.05, abs=0.006)  # one look: the interval's own 5%
    assert study.sequential_error() > 0.12  # twelve looks, after 5, 6, ..., 16 seeds
    level = study.sequential_level()
    assert 0.975 < level < 0.995
    # on other simulated studies than those the level was found on, it holds the error at 5%
    assert study.sequential_error(level=level, seed=1) == pytest.approx(0.05, abs=0.006)


def test_decided_verdicts_from_five_seeds_say_whether_they_survive_the_sequential_level():
    base = [50.0] * 5
    runs = _runs({("adv-clean100", "-"): base,
                  ("adv-clean0", "-"): [50 + e for e in (0.5, 1.5, 2.5, 3.5, 4.5)],  # t = 3.5: 95% only
                  ("adv-clean100-gn", "-"): [50 + e for e in (5.0, 5.5, 6.0, 6.5, 7.0)]})  # t = 17
    table = study.claims(runs, pd.DataFrame(columns=study.BNSTATS_COLUMNS)).set_index("claim")
    level = f"{study.sequential_level():.1%}"
    assert table.loc["C1", "verdict"] == "holds" and table.loc["C1", "sequential"] == f"not at {level}"
    assert table.loc["C3", "sequential"] == f"excludes zero at {level} too"
    assert table.loc["C3b", "sequential"] == ""  # a nearness claim: the sequential bound is about zero
    assert "1 of the 2 intervals with 5+ seeds that exclude zero still do" in study._sequential_text(table.reset_index())
    varied = [60.0, 61.0, 62.0, 63.0]  # an interval far from zero: only the seed count keeps the column empty
    four = study.claims(_runs({("adv-clean100", "-"): base[:4], ("adv-clean0", "-"): varied}),
                        pd.DataFrame(columns=study.BNSTATS_COLUMNS)).set_index("claim")
    assert four.loc["C1", "verdict"] == "holds" and four.loc["C1", "sequential"] == ""  # checked from 5 seeds on


def test_export_writes_tidy_tables_and_keeps_earlier_rows(tmp_path):
    runs_root = tmp_path / "runs"
    cfg = config.make_config("test", name="adv-clean100-mbn-seed0", runs_root=str(runs_root / "main"), norm="mbn",
                             clean_ratio=1.0, n_train=128, epochs=1, train_steps=1, eval_checkpoints=[1, 2], n_test=32,
                             sanity_n=0)
    run.run(cfg, show_progress=False)
    out = tmp_path / "tables"
    counts = study.export(runs_root, out)
    runs, bnstats = study.load(out)
    assert set(runs["branch"]) == {"clean", "adv"} and set(runs["steps"]) == {0, 1, 2}
    assert set(runs["sweep"]) == {"main"} and set(runs["setting"]) == {"adv-clean100-mbn"}
    assert set(bnstats["figure"]) == {5, 6} and (bnstats["setting"] == "adv-clean100-mbn").all()
    assert counts["runs"] == len(runs) == 6
    again = study.export(tmp_path / "elsewhere", out)  # a later session without those run folders
    assert again == counts and len(study.load(out)[0]) == 6


def test_claims_compare_the_base_network_unless_they_are_about_depth():
    values = {("adv-clean0", "-"): [60.0, 61.0, 62.0], ("adv-clean100", "-"): [55.0, 55.5, 57.0],
              ("standard", "-"): [20.0, 21.0, 22.0]}
    base = _runs(values)
    deeper = _runs({k: [v + 8 for v in vs] for k, vs in values.items()}).assign(arch="small_resnet20", sweep="depth")
    table = study.claims(pd.concat([base, deeper]), pd.DataFrame(columns=study.BNSTATS_COLUMNS)).set_index("claim")
    assert table.loc["C1", "mean"] == pytest.approx(study.t_interval([5.0, 5.5, 5.0])[0])  # the base runs only
    assert table.loc["C8", "mean"] == pytest.approx(0.0)  # +8 robust and +8 clean from depth: no difference
    assert "small_resnet20" in table.loc["C8", "measured"]
    # small_resnet20's standard training finished, its adversarial training not yet: C8 reads small_resnet14 meanwhile
    # (the code before chose the deepest network with any run, and C8 read "not run yet")
    r14 = _runs({k: [v + 4 for v in vs] for k, vs in values.items()}).assign(arch="small_resnet14", sweep="depth")
    half = deeper[deeper["setting"] == "standard"]
    table = study.claims(pd.concat([base, r14, half]), pd.DataFrame(columns=study.BNSTATS_COLUMNS)).set_index("claim")
    assert table.loc["C8", "mean"] == pytest.approx(0.0) and "small_resnet14" in table.loc["C8", "measured"]


def test_the_papers_effects_are_computed_from_its_tables(tmp_path):
    """The claims table quotes the paper from data/paper, not from strings: a changed number in a copy of the
    tables changes the quoted effect, and a table without the row a claim needs is refused by name."""
    import shutil

    from advkit import paper

    effects = study.paper_effects()
    assert effects["C1"][0] == pytest.approx(39.2 - 20.9) and "39.2 - 20.9" in effects["C1"][1]
    assert effects["C7a"][0] == pytest.approx(73.0 - 62.3)
    for name in ("table7.csv", "clean_training.csv", "section_numbers.csv"):
        shutil.copy(paper.NUMBERS_DIR / name, tmp_path / name)
    table7 = pd.read_csv(tmp_path / "table7.csv")
    mixed = (table7["network"] == "resnet152") & (table7["batch_size"] == 4096) & (table7["train_pgd_steps"] == 30) \
        & (table7["clean_ratio"] == 1.0) & (table7["norm"] == "bn") & (table7["alp"] == 0)
    table7.loc[mixed, "pgd2000"] = 30.0
    table7.to_csv(tmp_path / "table7.csv", index=False)
    changed = study.paper_effects(tmp_path)
    assert changed["C1"][0] == pytest.approx(9.2) and changed["C3"][0] == pytest.approx(9.0)
    assert effects["C7c"][0] == 0.0
    section = pd.read_csv(tmp_path / "section_numbers.csv")
    section.loc[section["finetuning"] == "BN-only on adversarial images", "value"] = 4.0
    section.to_csv(tmp_path / "section_numbers.csv", index=False)
    assert study.paper_effects(tmp_path)["C7c"][0] == pytest.approx(4.0)
    table7[~mixed].to_csv(tmp_path / "table7.csv", index=False)
    with pytest.raises(ValueError, match=r"table7.csv holds 0 rows for resnet152, PGD-30, 1 clean, bn"):
        study.paper_effects(tmp_path)


def test_claims_under_autoattack_use_its_rows_and_the_scale_axis_fits_a_slope_per_seed():
    """Each threat model reads its own rows; C1's slope over log2(training-set size) is fitted per seed."""
    rows = []
    sizes = {"-n6k": 1.0, "-n12k": 2.0, "": 3.0}  # C1 grows by 1 point per doubling under AutoAttack
    for suffix, c1 in sizes.items():
        for seed in range(3):
            for setting, aa in ((f"adv-clean0{suffix}", 40.0 + c1 + seed), (f"adv-clean100{suffix}", 40.0 + seed)):
                for attack, steps, value in (("clean", 0, 80.0), ("pgd", 100, 70.0), ("autoattack", 100, aa)):
                    rows.append(dict(sweep="main", run=f"{setting}-seed{seed}", setting=setting, seed=seed,
                                     arch="small_resnet8", branch="-", attack=attack, steps=steps, accuracy=value))
    runs = pd.DataFrame(rows)
    table = study.all_claims(runs, pd.DataFrame(columns=study.BNSTATS_COLUMNS)).set_index(["claim", "threat_model"])
    assert table.loc[("C1", "targeted PGD"), "mean"] == pytest.approx(0.0)
    assert table.loc[("C1", "AutoAttack"), "mean"] == pytest.approx(3.0)
    assert table.loc[("C1@6k", "AutoAttack"), "mean"] == pytest.approx(1.0)
    assert table.loc[("C1-scale", "AutoAttack"), "mean"] == pytest.approx(1.0)
    assert table.loc[("C1-scale", "targeted PGD"), "mean"] == pytest.approx(0.0)
    assert ("C5", "AutoAttack") not in table.index  # no curve under AutoAttack
    with pytest.raises(ValueError, match="threat_model='untargeted'"):
        study.claims(runs, pd.DataFrame(columns=study.BNSTATS_COLUMNS), "untargeted")


def test_c7c_under_autoattack_compares_with_the_standard_runs_trained_again_with_autoattack():
    """main.yaml's standard runs skip AutoAttack; standard-autoattack.yaml's (setting standard-aa) give C7c under
    AutoAttack its baseline, while targeted PGD keeps main.yaml's standard runs."""
    rows = []
    for seed in range(3):
        for setting, pgd, aa in (("ft-adv", 70.0 + seed, 30.0), ("standard", 1.0, None), ("standard-aa", 5.0, 0.5)):
            for attack, value in (("clean", 90.0), ("pgd", pgd), ("autoattack", aa)):
                if value is not None:
                    rows.append(dict(sweep="main", run=f"{setting}-seed{seed}", setting=setting, seed=seed,
                                     arch="small_resnet8", branch="-", attack=attack,
                                     steps=0 if attack == "clean" else 100, accuracy=value))
    # a GPU seed (16): its standard run is evaluated under AutoAttack itself (gpu-main.yaml)
    for setting, attack, value in (("ft-adv", "autoattack", 31.0), ("ft-adv", "pgd", 72.0), ("standard", "pgd", 1.0),
                                   ("standard", "autoattack", 0.0)):
        rows.append(dict(sweep="main", run=f"{setting}-seed16", setting=setting, seed=16, arch="small_resnet8",
                         branch="-", attack=attack, steps=100, accuracy=value))
    table = study.all_claims(pd.DataFrame(rows), pd.DataFrame(columns=study.BNSTATS_COLUMNS))
    table = table.set_index(["claim", "threat_model"])
    assert table.loc[("C7c", "targeted PGD"), "mean"] == pytest.approx((69 + 70 + 71 + 71) / 4)  # minus 1, not 5
    assert table.loc[("C7c", "AutoAttack"), "mean"] == pytest.approx((29.5 * 3 + 31.0) / 4)
    assert table.loc[("C7c", "AutoAttack"), "seeds"] == 4
    assert table.loc[("C7c", "AutoAttack"), "verdict"] == "reversed"


@pytest.mark.parametrize("retrained,expected", [
    (["w0", "w1", "w2"], "weights equal standard's (checked for 3 seeds)"),
    (["w0", "x1", "w2"], "weights differ from standard's for seeds [1]"),
])
def test_c7c_under_autoattack_says_whether_the_retrained_baseline_is_the_model_ft_adv_was_finetuned_from(
        retrained, expected):
    rows = []
    for seed in range(3):
        for setting, weights in (("ft-adv", f"f{seed}"), ("standard", f"w{seed}"), ("standard-aa", retrained[seed])):
            for attack in ("pgd", "autoattack"):
                rows.append(dict(sweep="main", run=f"{setting}-seed{seed}", setting=setting, seed=seed,
                                 arch="small_resnet8", branch="-", attack=attack, steps=100, accuracy=50.0 + seed,
                                 weights=weights))
    table = study.all_claims(pd.DataFrame(rows), pd.DataFrame(columns=study.BNSTATS_COLUMNS))
    table = table.set_index(["claim", "threat_model"])
    assert expected in table.loc[("C7c", "AutoAttack"), "measured"]
    assert "standard-aa" not in table.loc[("C7c", "targeted PGD"), "measured"]  # PGD pairs with standard itself


def test_a_setting_run_twice_for_one_seed_is_refused_not_averaged():
    runs = _runs({("adv-clean0", "-"): [60.0, 61.0], ("adv-clean100", "-"): [55.0, 56.0]})
    again = runs[runs["run"] == "adv-clean0-seed1"].assign(sweep="other", accuracy=0.0)
    with pytest.raises(ValueError, match=r"setting 'adv-clean0' .* seed\(s\) \[1\]: \['main/adv-clean0-seed1', "
                                         r"'other/adv-clean0-seed1'\]"):
        study.claims(pd.concat([runs, again]), pd.DataFrame(columns=study.BNSTATS_COLUMNS))


def test_the_robustness_curves_plot_targeted_pgd_only_not_autoattack_rows_at_the_same_step_count():
    runs = _runs({("adv-clean0", "-"): [60.0, 62.0]}).assign(attack=lambda f: f["steps"].map({0: "clean"})
                                                              .fillna("pgd"))
    autoattack = runs[runs["steps"] == 100].assign(attack="autoattack", accuracy=10.0)
    fig = study.plot_curves(pd.concat([runs, autoattack]))
    line = next(l for l in fig.axes[0].lines if l.get_label().startswith("100% adv + 0% clean"))
    assert list(line.get_xdata()) == [10, 100] and list(line.get_ydata()) == [pytest.approx(64.0), pytest.approx(61.0)]


def test_the_committed_claims_files_are_what_the_committed_tables_give():
    """figures/study_claims.md/.csv and study_settings.csv are written by notebooks/analysis/study.ipynb (make
    figures); they must be rewritten whenever the tables change."""
    from advkit.paths import project_root

    claims = study.all_claims(*study.load())
    figures = project_root() / "figures"
    assert (figures / "study_claims.md").read_text() == study.findings_markdown(claims) + "\n"
    # the numbers to 1e-9 relative: a least-squares slope's last digits differ between BLAS builds
    for name, table in (("study_claims.csv", claims), ("study_settings.csv", study.settings_summary(study.load()[0]))):
        pd.testing.assert_frame_equal(pd.read_csv(figures / name), pd.read_csv(io.StringIO(table.to_csv(index=False))),
                                      rtol=1e-9, atol=0, check_exact=False, obj=name)


def test_a_gpus_seeds_pool_with_the_cpus_and_the_readme_says_which_device_ran_which(tmp_path):
    rows = []
    for sweep, seeds, device in (("main", (0, 1), "cpu: AMD EPYC, 1 threads"), ("gpu-main", (16,), "cuda: H100")):
        for seed in seeds:
            for setting, value in (("adv-clean0", 60.0 + seed), ("adv-clean100", 55.0 + seed)):
                rows.append(dict(sweep=sweep, run=f"{setting}-seed{seed}", setting=setting, seed=seed,
                                 arch="small_resnet8", branch="-", attack="pgd", steps=100, accuracy=value,
                                 device=device, precision="fp32"))
    pd.DataFrame(rows).reindex(columns=study.RUN_COLUMNS).to_csv(tmp_path / "runs.csv", index=False)
    runs, _ = study.load(tmp_path)
    assert set(runs["sweep"]) == {"main"}
    table = study.claims(runs, pd.DataFrame(columns=study.BNSTATS_COLUMNS)).set_index("claim")
    assert table.loc["C1", "seeds"] == 3 and table.loc["C1", "mean"] == pytest.approx(5.0)
    assert study._devices_text(runs) == ("Devices: cpu (fp32) trained 4 runs (seeds 0-1); "
                                        "cuda (fp32) trained 2 runs (seed 16).")
    assert study._devices_text(runs[runs["device"].str.startswith("cpu")]) == (
        "Devices: cpu (fp32) trained all 4 runs (seeds 0-1).")
    clash = pd.DataFrame(rows + [dict(rows[0], sweep="gpu-main", device="cuda: H100")])
    clash.reindex(columns=study.RUN_COLUMNS).to_csv(tmp_path / "runs.csv", index=False)
    with pytest.raises(ValueError, match=r"\['adv-clean0-seed0'\] of sweep \['main'\] exist on both devices"):
        study.load(tmp_path)


def test_c9b_is_zero_in_expectation_under_sampling_noise_alone():
    """Batch variances drawn around the running one: |batch - running| and |batch1 - batch2| / sqrt(2) agree (the
    statistic without the sqrt(2) sits far below zero); a shifted running variance moves it above zero."""
    import numpy as np

    rng = np.random.default_rng(0)

    def table(shift: float) -> pd.DataFrame:
        rows = []
        for seed in range(3):
            for channel in range(4000):
                b1, b2 = 1.0 + rng.normal(0, 0.1, 2)
                for source, value in (("batch1", b1), ("batch2", b2), ("running", 1.0 + shift)):
                    rows.append(dict(sweep="main", run=f"adv-clean0-seed{seed}", setting="adv-clean0", seed=seed,
                                     figure=6, layer="l", branch="-", channel=channel, source=source,
                                     statistic="var", value=value))
        return pd.DataFrame(rows)

    noise = study.threat_free_claims(pd.DataFrame(columns=["setting", "branch", "arch", "steps", "seed", "accuracy"]),
                                     table(0.0)).set_index("claim")
    assert abs(noise.loc["C9b", "mean"]) < 0.3  # percent of the running variance
    shifted = study.threat_free_claims(pd.DataFrame(columns=["setting", "branch", "arch", "steps", "seed",
                                                             "accuracy"]), table(0.3)).set_index("claim")
    assert shifted.loc["C9b", "mean"] > 10


def test_the_study_command_exports_into_the_tables_it_is_given_and_prints_the_stopping_rule(tmp_path, capsys):
    from advkit import cli

    cfg = config.make_config("test", name="adv-clean0-seed0", runs_root=str(tmp_path / "runs" / "main"),
                             clean_ratio=0.0, n_train=128, epochs=1, train_steps=1, eval_checkpoints=[1], n_test=32,
                             sanity_n=0, bnstats_channels=0)
    run.run(cfg, show_progress=False)
    assert cli.main(["study", "--runs", str(tmp_path / "runs"), "--tables", str(tmp_path / "tables")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "tables" / "runs.csv").exists() and "undecided (the stopping rule)" in out
    runs, _ = study.load(tmp_path / "tables")
    assert set(runs["setting"]) == {"adv-clean0"} and runs["code"].notna().all()  # the commit that trained it


def test_the_settings_summary_keeps_pgd_and_autoattack_apart():
    """Both are evaluated at 100 iterations: the summary must not average them (it did before this test)."""
    rows = [dict(sweep="main", run=f"adv-clean0-seed{seed}", setting="adv-clean0", seed=seed, arch="small_resnet8",
                 branch="-", attack=attack, steps=steps, accuracy=value)
            for seed in range(2) for attack, steps, value in (("clean", 0, 88.0), ("pgd", 100, 86.0),
                                                              ("apgd-ce", 100, 70.0), ("autoattack", 100, 69.0))]
    summary = study.settings_summary(pd.DataFrame(rows)).set_index("metric")
    assert summary.loc["clean", "mean"] == 88.0 and summary.loc["PGD-100", "mean"] == 86.0
    assert summary.loc["AutoAttack", "mean"] == 69.0


def test_the_readmes_study_section_is_what_the_committed_tables_give():
    """Every number in the README's study section is recomputed from data/results/decisive; after new runs are
    exported, `advkit study --readme README.md` rewrites it."""
    from advkit.paths import project_root

    assert study.readme_block(project_root() / "README.md") == study.readme_section(study.TABLES_DIR)


def test_a_changed_table_changes_the_readme_section_so_the_check_above_can_fail(tmp_path):
    import shutil

    tables = tmp_path / "tables"
    shutil.copytree(study.TABLES_DIR, tables)
    before = study.readme_section(tables)
    runs = pd.read_csv(tables / "runs.csv")
    hit = (runs["setting"] == "adv-clean0") & (runs["attack"] == "autoattack")
    assert hit.any()
    runs.loc[hit, "accuracy"] -= 5.0
    runs.to_csv(tables / "runs.csv", index=False)
    after = study.readme_section(tables)
    assert after != before
    c1 = lambda text: next(line for line in text.splitlines() if line.startswith("| C1 |")).split("|")[4]
    assert float(c1(after).split()[0]) == pytest.approx(float(c1(before).split()[0]) - 5.0)


def test_the_readme_section_is_written_between_its_markers_and_a_file_without_them_is_refused(tmp_path, capsys):
    from advkit import cli

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{study.README_BEGIN}\nold numbers\n{study.README_END}\n\nafter\n")
    study.write_readme_section(readme, "new numbers")
    assert readme.read_text() == f"# title\n\n{study.README_BEGIN}\nnew numbers\n{study.README_END}\n\nafter\n"
    assert study.readme_block(readme) == "new numbers"

    plain = tmp_path / "PLAIN.md"
    plain.write_text("# no markers\n")
    tables = tmp_path / "tables"
    code = cli.main(["study", "--runs", str(tmp_path / "runs"), "--tables", str(tables), "--readme", str(plain)])
    assert code == 2 and "--readme" in capsys.readouterr().err
    assert not tables.exists() and plain.read_text() == "# no markers\n"  # refused before anything was written


def test_the_scale_figure_plots_c1_per_training_set_size_with_its_interval():
    rows = [dict(claim=claim, threat_model=threat, mean=mean, low=mean - 1, high=mean + 1, seeds=3)
            for threat in ("targeted PGD", "AutoAttack")
            for claim, mean in (("C1@6k", 1.0), ("C1@12k", 2.0), ("C1", 4.0), ("C1-scale", 1.5))]
    fig = study.plot_scale(pd.DataFrame(rows))
    lines = [container.lines[0] for container in fig.axes[0].containers]  # each errorbar's data line
    assert [list(line.get_xdata()) for line in lines] == [[6144, 12288, 24576]] * 2
    assert list(lines[0].get_ydata()) == [1.0, 2.0, 4.0]


def test_the_papers_effects_at_the_kits_training_attack_come_from_its_pgd5_rows(tmp_path):
    """The kit trains with PGD-5, step 4: the paper's PGD-5 rows of Table 7 give the effects in that regime."""
    import shutil

    from advkit import paper

    effects = study.paper_effects_at_kit_attack()
    assert effects["C1"] == pytest.approx(35.9 - 0.0) and effects["C2a"] == pytest.approx(31.2 - 0.0)
    assert effects["C5"] == pytest.approx((41.5 - 0.0) - (54.0 - 35.9))
    shutil.copytree(paper.NUMBERS_DIR, tmp_path, dirs_exist_ok=True)
    table7 = pd.read_csv(tmp_path / "table7.csv")
    adv_only_pgd5 = ((table7["train_pgd_steps"] == 5) & (table7["clean_ratio"] == 0.0) & (table7["alp"] == 0)
                     & (table7["running_stats"] == 0) & (table7["norm"] == "bn"))
    table7.loc[adv_only_pgd5, "pgd2000"] = 30.0
    table7.to_csv(tmp_path / "table7.csv", index=False)
    assert study.paper_effects_at_kit_attack(tmp_path)["C1"] == pytest.approx(30.0)
    assert study.paper_effects(tmp_path)["C1"] == study.paper_effects()["C1"]  # the PGD-30 effect is untouched


def test_the_depth_figure_shows_gains_paired_per_seed():
    """Seed effects shared across depths cancel in the paired panel: its interval is narrower than the means'."""
    rows = []
    for seed, shift in enumerate((-4.0, 0.0, 4.0)):  # a large seed effect, the same at every depth
        for arch, gain in (("small_resnet8", 0.0), ("small_resnet14", 2.0), ("small_resnet20", 3.0 + 0.1 * seed)):
            sweep = "main" if arch == "small_resnet8" else "depth"
            rows += [dict(sweep=sweep, run=f"adv-clean0-seed{seed}", setting="adv-clean0", seed=seed, arch=arch,
                          branch="-", attack="pgd", steps=100, accuracy=60 + shift + gain),
                     dict(sweep=sweep, run=f"standard-seed{seed}", setting="standard", seed=seed, arch=arch,
                          branch="-", attack="clean", steps=0, accuracy=90 + shift + gain / 3)]
    fig = study.plot_depth(pd.DataFrame(rows))
    paired_adv = fig.axes[1].containers[0]
    assert list(paired_adv.lines[0].get_ydata()) == pytest.approx([0.0, 2.0, 3.1])
    half_width = lambda container: max(abs(seg[1][1] - seg[0][1]) / 2 for seg in container.lines[2][0].get_segments())
    assert half_width(paired_adv) < 0.5 < half_width(fig.axes[0].containers[0])
    assert [t.get_text() for t in fig.axes[0].texts] == ["n=3"] * 6  # 3 depths x 2 trainings
    fig.canvas.draw()  # the legend sits under the panels: it covers neither an interval nor an axis label
    legend = fig.legends[0].get_window_extent()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [label for *_, label in study.DEPTH_CURVES]
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent()) and not legend.overlaps(ax.xaxis.label.get_window_extent())

    one_seed_deeper = pd.DataFrame(rows).query("not (arch == 'small_resnet20' and seed > 0)")
    fig = study.plot_depth(one_seed_deeper)  # a point without a bar: its label says it rests on one seed
    assert [t.get_text() for t in fig.axes[1].texts] == ["n=3", "n=3", "n=1"] * 2


def test_the_validity_gate_is_the_runs_clean_accuracy_on_every_test_image(tmp_path, capsys):
    """`advkit study --gate RUN` records the run's accuracy on the full test set (not its n_test subset), with its
    weights' digest and code commit; an unfinished run is refused before anything is written."""
    import torch

    from advkit import cli, data
    from advkit.run import load_run

    cfg = config.make_config("test", name="standard-seed0", runs_root=str(tmp_path / "runs"), adv_ratio=0.0,
                             clean_ratio=1.0, n_train=256, epochs=1, n_test=32, sanity_n=0, bnstats_channels=0)
    run.run(cfg, show_progress=False)
    tables = tmp_path / "tables"
    assert cli.main(["study", "--no-export", "--gate", str(cfg.run_dir), "--tables", str(tables)]) == 0
    gate = pd.read_csv(tables / "gates.csv").iloc[0]
    _, model = load_run(cfg.run_dir)
    images, labels = data.load_tensors("fashion-mnist", "test")
    with torch.no_grad():
        want = (model(images.float() / 255).argmax(1) == labels).float().mean().item() * 100
    assert gate["images"] == len(labels) == 10_000 and gate["clean_acc_full_test"] == pytest.approx(want, abs=0.006)
    assert gate["run"] == "standard-seed0" and gate["gate"] == ">= 89" and isinstance(gate["code"], str)

    unfinished = config.make_config("test", name="half", runs_root=str(tmp_path / "runs"))
    unfinished.run_dir.mkdir(parents=True)
    capsys.readouterr()
    assert cli.main(["study", "--no-export", "--gate", str(unfinished.run_dir), "--tables", str(tmp_path / "t2")]) == 2
    assert "--gate" in capsys.readouterr().err and not (tmp_path / "t2").exists()


def test_verdicts_from_fewer_seeds_than_the_rule_needs_are_marked_preliminary_in_the_readme_and_figure():
    def row(effects):
        return pd.Series(study._row("C3", "x", pd.Series(effects, dtype=float), (18.1, "+18.1")))
    assert study._verdict_cell(row([-3.0, -3.2])).startswith("reversed (preliminary: 2 seeds, the rule applies from 5)")
    assert study._verdict_cell(row([-3.0, -3.2, -3.1, -2.9, -3.3])).startswith("reversed,")  # 5 seeds: the rule's
    assert study._verdict_cell(row([-3.0, 3.2])) == "undecided"  # nothing decided, nothing to qualify
    assert not row([]).preliminary  # not run yet
    figure = study.plot_claims(pd.DataFrame([row([-3.0, -3.2]), row([-3.0, -3.2, -3.1, -2.9, -3.3])]))
    labels = [t.get_text() for t in figure.axes[0].texts]
    assert labels == ["reversed (n=2, preliminary)", "reversed"]


def test_the_readme_names_every_gated_run_and_the_ones_below_the_gate():
    gates = pd.DataFrame([dict(run=f"standard-seed{k}", clean_acc_full_test=acc, images=10000, weights=f"w{k}",
                               precision="fp32", device="cpu", code="3527c8e7332a", gate=">= 89")
                          for k, acc in enumerate((91.09, 90.46))])
    text = study.gates_text(gates)
    assert "standard-seed0 **91.09%** (weights w0), standard-seed1 **90.46%** (weights w1); all 2 meet it." in text
    below = study.gates_text(gates.assign(clean_acc_full_test=[91.09, 88.99]))
    assert below.endswith("; 1 of 2 below it (standard-seed1).")
    assert study.gates_text(gates.iloc[:1]).endswith("; it is met.")
    assert study.gates_text(gates.assign(clean_acc_full_test=[91.09, 89.0])).endswith("all 2 meet it.")  # >= 89


def test_the_longer_training_check_flags_claims_whose_16_epoch_effect_leaves_the_studys_interval(tmp_path):
    def rows(sweep, run, setting, seed, acc_pgd, acc_aa=60.0, branch="-", epochs=8):
        return [dict(sweep=sweep, run=run, setting=setting, seed=seed, arch="small_resnet8", branch=branch,
                     attack=attack, steps=steps, accuracy=value, epochs=epochs)
                for attack, steps, value in (("clean", 0, 90.0), ("pgd", 100, acc_pgd), ("autoattack", 100, acc_aa))]

    table = []
    for seed, gap in enumerate((1.0, 2.0, 3.0)):  # the study: C1 = +1, +2, +3 -> interval about [-0.5, 4.5]
        table += rows("main", f"adv-clean0-seed{seed}", "adv-clean0", seed, 80.0 + gap, 60.0 + gap / 10)
        table += rows("main", f"adv-clean100-seed{seed}", "adv-clean100", seed, 80.0)
    for epochs, c1 in ((8, 2.0), (16, 9.0)):  # at 16 epochs C1 is +9: outside
        table += rows("longer", f"adv-clean0-epochs{epochs}", f"adv-clean0-epochs{epochs}", 101, 80.0 + c1, 60.2,
                      epochs=epochs)
        table += rows("longer", f"adv-clean100-epochs{epochs}", f"adv-clean100-epochs{epochs}", 101, 80.0,
                      epochs=epochs)
    runs = pd.DataFrame(table)
    claims = study.all_claims(runs, pd.DataFrame(columns=study.BNSTATS_COLUMNS))
    check = study.longer_training(runs, claims).set_index(["claim", "threat_model"])
    pgd = check.loc[("C1", "targeted PGD")]
    assert (pgd["effect_8"], pgd["effect_16"], pgd["within"]) == (2.0, 9.0, False)
    assert check.loc[("C1", "AutoAttack"), "within"] == True  # noqa: E712  (+0.2 -> +0.2, inside [-0.05, +0.45])
    assert ("C1", "targeted PGD") in {(c, t) for c, t in check.index}  # the longer runs stay out of the study:
    assert claims.set_index(["claim", "threat_model"]).loc[("C1", "targeted PGD"), "seeds"] == 3
    tables = tmp_path / "tables"
    tables.mkdir()
    runs.to_csv(tables / "runs.csv", index=False)
    c1 = next(line for line in study.readme_section(tables).splitlines() if line.startswith("| C1 |"))
    pgd_verdict, aa_verdict = c1.split(" | ")[-1].split("; ")
    assert "depends on training length" in pgd_verdict and "depends" not in aa_verdict, c1
    assert "8 epochs too" not in pgd_verdict  # +2 at 8 epochs lay inside: the rule's reading stands unqualified
    assert "C1 targeted PGD +2.00 -> +9.00 (study [-0.48, +4.48]: outside at 16 epochs, inside at 8 epochs)" \
        in study.readme_section(tables)

    # the pilot seed already outside at 8 epochs (+8): the flag stays (pre-registered) and says so
    pilot_8 = (runs["run"] == "adv-clean0-epochs8") & (runs["attack"] == "pgd")
    runs.loc[pilot_8, "accuracy"] = 88.0
    runs.to_csv(tables / "runs.csv", index=False)
    assert study.longer_training(runs, claims).set_index(["claim", "threat_model"]).loc[
        ("C1", "targeted PGD"), "within_8"] == False  # noqa: E712
    section = study.readme_section(tables)
    c1 = next(line for line in section.splitlines() if line.startswith("| C1 |"))
    assert c1.split(" | ")[-1].split("; ")[0].endswith(
        "depends on training length (the pilot seed lies outside at 8 epochs too)"), c1
    assert "+8.00 -> +9.00 (study [-0.48, +4.48]: outside at 16 epochs, and at 8 epochs already)" in section
    assert "Where the pilot lies outside at 8 epochs as well (C1 targeted PGD)" in section
