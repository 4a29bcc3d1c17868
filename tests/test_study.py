import math

import pandas as pd
import pytest

from advkit import config, run, study, train


def test_settings_drop_the_grid_tags_of_seed_and_depth():
    assert study.setting_of("adv-clean0-seed2") == "adv-clean0"
    assert study.setting_of("adv-clean0-archsmall_resnet14-seed0") == "adv-clean0"
    assert study.setting_of("clean0-eps16") == "clean0-eps16"


def test_t_interval_matches_the_textbook_formula():
    mean, low, high = study.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert high - mean == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)  # t(0.975, 2) * sd / sqrt(n)
    assert math.isnan(study.t_interval([5.0])[1])


@pytest.mark.parametrize("low,high,direction,near,expected", [
    (1.0, 3.0, 1, False, "reproduced"),
    (-3.0, -1.0, 1, False, "contradicted"),
    (-3.0, -1.0, -1, False, "reproduced"),
    (-1.0, 1.5, 1, False, "not reproduced at this scale"),
    (-5.0, 6.0, 1, False, "inconclusive"),
    (-1.5, 3.0, 1, True, "reproduced"),
    (-6.0, -3.0, 1, True, "contradicted"),
    (-1.0, 1.5, -1, True, "reproduced"),
    (20.0, 30.0, -1, True, "contradicted"),
    (float("nan"), float("nan"), 1, False, "inconclusive"),
])
def test_one_verdict_rule_for_every_claim(low, high, direction, near, expected):
    assert study.verdict(low, high, direction, near=near) == expected


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
    assert table.loc["C1", "verdict"] == "reproduced"
    assert table.loc["C3", "verdict"] == "not reproduced at this scale"  # GN equals BN within 0.1 point
    assert table.loc["C4", "verdict"] == "not run yet" and table.loc["C4", "seeds"] == 0


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
