"""The explorer's callbacks, driven headlessly: set widget values, check what was selected and drawn."""

import matplotlib

matplotlib.use("Agg")

import pandas as pd

from advkit import explore, results


def _explorer():
    frame = results.paper_results()
    return explore.make_explorer(frame, show=False)


def test_filters_change_the_selection_and_the_plot():
    explorer = _explorer()
    assert explorer.error is None and len(explorer.selection) == len(explorer.frame)
    explorer.filters["norm"].value = "gn"  # the observer calls update
    assert explorer.error is None
    assert set(explorer.selection["norm"]) == {"gn"} and explorer.selection["run"].nunique() == 1
    assert "1 models selected" in explorer.status.value
    explorer.filters["norm"].value = explore.ALL
    explorer.filters["training PGD-N"].value = 5
    explorer.filters["MBN branch"].value = "adv"
    assert set(explorer.selection["train_steps"]) == {5} and set(explorer.selection["branch"]) == {"adv"}
    assert explorer.selection["run"].nunique() == 4  # MBN_adv, with/without ALP and running statistics
    lines = [l for l in explorer.drawn["curves"].axes[0].lines if len(l.get_xdata()) == 5]
    assert len(lines) == 4 and all(list(l.get_xdata()) == [10, 20, 100, 500, 2000] for l in lines)
    expected = explorer.selection[explorer.selection["steps"] == 2000]["accuracy"]
    assert sorted(l.get_ydata()[-1] for l in lines) == sorted(expected)


def test_empty_selection_is_said_not_raised():
    explorer = _explorer()
    explorer.filters["norm"].value = "gn"
    explorer.filters["training PGD-N"].value = 5  # no GN model trained with PGD-5
    assert explorer.error is None and explorer.selection.empty
    assert "0 models selected" in explorer.status.value


def test_an_exception_in_the_callback_is_recorded():
    explorer = _explorer()
    explorer.frame = explorer.frame.drop(columns=["strategy"])
    explore.update(explorer)
    assert explorer.error is not None and "strategy" in explorer.error
    assert "error" in explorer.status.value


def test_bn_statistics_follow_the_selected_runs():
    frame = pd.concat([results.paper_results(),
                       pd.DataFrame([dict(source="kit", run="r1", dataset="fashion-mnist", arch="small_resnet8",
                                          batch_size=64, train_steps=2, adv_ratio=1.0, clean_ratio=0.0, norm="bn",
                                          branch="-", alp=False, running_stats=False, finetune_bn=False, seed=0,
                                          strategy="100% adv + 0% clean", steps=s, accuracy=a, worst_accuracy=a,
                                          n=64) for s, a in [(0, 80.0), (2, 50.0), (4, 40.0)]])])
    stats = pd.DataFrame([dict(figure=6, layer="net.layer2.0.bn1", branch="-", channel=c, source=src,
                               statistic=st, value=v, convention="x", run="r1")
                          for c in range(3) for src in ("batch1", "running") for st, v in (("mean", 0.1), ("var", 1.0))])
    explorer = explore.make_explorer(frame, stats, show=False)
    explorer.filters["source"].value = "kit"
    assert explorer.error is None and set(explorer.selection["run"]) == {"r1"}
    assert explorer.drawn["statistics"] is not None and len(explorer.drawn["statistics"].axes) >= 2
    explorer.filters["source"].value = "paper"
    assert explorer.drawn["statistics"] is None
