"""The explorer's callbacks, driven headlessly: set widget values, check what was selected and drawn."""

import matplotlib

matplotlib.use("Agg")

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import advkit
from advkit import examples, explore, plots, results
from advkit.paths import project_root

PROJECT = project_root()


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


# ---------------------------------------------------------------- threat models, BN panels, viewer, claims

def _kit_rows(run: str, norm: str = "bn", branch: str = "-", **columns) -> list[dict]:
    base = dict(source="kit", run=run, run_dir=f"/runs/{run}", dataset="fashion-mnist", arch="small_resnet8",
                batch_size=64, train_steps=2, eps=16.0, adv_ratio=1.0, clean_ratio=0.0, norm=norm, branch=branch,
                alp=False, running_stats=False, finetune_bn=False, seed=0, strategy="100% adv + 0% clean", n=64)
    rows = [base | dict(attack="clean", targeted=True, steps=0, accuracy=80.0)]
    for targeted, curve in ((True, [(1, 60.0), (2, 50.0), (4, 45.0)]), (False, [(1, 30.0), (2, 20.0), (4, 11.0)])):
        rows += [base | dict(attack="pgd", targeted=targeted, steps=s, accuracy=a) for s, a in curve]
    rows += [base | dict(attack=a, targeted=a == "apgd-t", steps=100, accuracy=v)
             for a, v in [("apgd-ce", 9.0), ("apgd-t", 8.0), ("autoattack", 7.0)]]
    return [r | columns for r in rows]


def _frame() -> pd.DataFrame:
    kit = pd.DataFrame(_kit_rows("r-bn") + _kit_rows("r-mbn", "mbn", "adv", clean_ratio=1.0,
                                                     strategy="100% adv + 100% clean")
                       + _kit_rows("r-mbn", "mbn", "clean", clean_ratio=1.0, strategy="100% adv + 100% clean"))
    return pd.concat([results.paper_results(), kit], ignore_index=True)


def _bnstats() -> pd.DataFrame:
    rows = []
    for run, layers in (("r-bn", ["net.layer2.0.bn1", "net.layer3.0.bn1"]), ("r-mbn", ["net.layer2.0.bn1"])):
        for layer in layers:
            value = 1.0 if layer.startswith("net.layer2") else 3.0
            for c in (3, 7, 11):
                for statistic in ("mean", "var", "var_biased"):
                    for source in ("batch1", "batch2", "running"):
                        rows.append(dict(run=run, run_dir=f"/runs/{run}", figure=6, layer=layer, branch="-",
                                         channel=c, source=source, statistic=statistic, value=value + c / 100))
                    if run == "r-mbn" and statistic != "var_biased":
                        rows += [dict(run=run, run_dir=f"/runs/{run}", figure=5, layer=layer, branch=b, channel=c,
                                      source="running", statistic=statistic, value=value + (b == "adv"))
                                 for b in ("clean", "adv")]
    return pd.DataFrame(rows)


def _legend_outside(fig) -> bool:
    fig.canvas.draw()
    legends = [(ax, ax.get_legend()) for ax in fig.axes if ax.get_legend() is not None]
    return bool(legends) and all(legend.get_window_extent().x0 >= ax.get_window_extent().x1 for ax, legend in legends)


def _grey(color) -> bool:
    r, g, b, _ = matplotlib.colors.to_rgba(color)
    return r == g == b


def test_threat_model_selector_and_the_papers_curves_greyed():
    explorer = explore.make_explorer(_frame(), show=False)
    threat = explorer.controls["threat model"]
    assert list(threat.options) == ["targeted PGD", "untargeted PGD", "AutoAttack"]
    explorer.filters["training PGD-N"].value = 2  # the kit runs only: the paper trained with PGD-5 .. PGD-30
    lines = {l.get_label(): l for l in explorer.drawn["curves"].axes[0].lines}
    assert [list(l.get_ydata()) for k, l in lines.items() if "r-bn" in k or "bn, small" in k] == [[60.0, 50.0, 45.0]]
    explorer.filters["training PGD-N"].value = explore.ALL
    explorer.filters["norm"].value = "bn"  # the paper's BN models and the kit's BN run
    ax = explorer.drawn["curves"].axes[0]
    paper = [l for l in ax.lines if l.get_label().startswith("paper")]
    kit = [l for l in ax.lines if l.get_label().startswith("kit")]
    assert paper and kit and all(_grey(l.get_color()) for l in paper) and not any(_grey(l.get_color()) for l in kit)
    assert _legend_outside(explorer.drawn["curves"])
    before = explorer.images["curves"].value
    threat.value = "untargeted PGD"
    ax = explorer.drawn["curves"].axes[0]
    assert [list(l.get_ydata()) for l in ax.lines] == [[30.0, 20.0, 11.0]]  # the paper has no untargeted curve
    assert explorer.images["curves"].value != before and explorer.error is None
    threat.value = "AutoAttack"
    points = sorted(float(p.get_offsets()[0][1]) for p in explorer.drawn["curves"].axes[0].collections
                    if isinstance(p, matplotlib.collections.PathCollection))
    assert points == [7.0, 8.0, 9.0] and _legend_outside(explorer.drawn["curves"])


def test_threat_models_of_results_rows():
    attack = pd.Series(["clean", "pgd", "pgd", "apgd-t", "autoattack"])
    targeted = pd.Series([True, True, False, True, False])
    assert list(explore.threat_model_of(attack, targeted)) == ["clean", "targeted PGD", "untargeted PGD",
                                                               "AutoAttack", "AutoAttack"]
    frame = explore.with_threat_models(results.paper_results())  # no attack/targeted columns: the paper's protocol
    assert set(frame["threat_model"]) == {"clean", "targeted PGD"}


def test_bn_statistics_one_run_and_layer_at_a_time():
    explorer = explore.make_explorer(_frame(), _bnstats(), show=False)
    run, layer = explorer.controls["BN run"], explorer.controls["BN layer"]
    assert [value for _, value in run.options] == ["/runs/r-bn", "/runs/r-mbn"]
    assert run.value == "/runs/r-bn" and list(layer.options) == ["net.layer2.0.bn1", "net.layer3.0.bn1"]
    fig = explorer.drawn["statistics"]
    assert len(fig.axes) == 2  # plain BN: Figure 6 only (mean, variance)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["3", "7", "11"]
    assert sorted(l.get_label() for l in fig.axes[1].lines) == ["mini-batch 1", "mini-batch 2", "running"]
    assert _legend_outside(fig)
    first = explorer.images["statistics"].value
    layer.value = "net.layer3.0.bn1"
    values = explorer.drawn["statistics"].axes[0].lines[0].get_ydata()
    assert min(values) >= 3.0 and explorer.images["statistics"].value != first
    run.value = "/runs/r-mbn"
    assert list(layer.options) == ["net.layer2.0.bn1"]
    fig = explorer.drawn["statistics"]
    assert len(fig.axes) == 4 and "Figure 5" in fig.axes[0].get_title(loc="left")  # MBN: Figures 5 and 6
    assert sorted(l.get_label() for l in fig.axes[0].lines) == ["MBN_adv", "MBN_clean"]
    assert explorer.error is None


def test_bn_panel_follows_the_filters():
    explorer = explore.make_explorer(_frame(), _bnstats(), show=False)
    before = explorer.images["statistics"].value
    explorer.filters["norm"].value = "mbn"
    assert [value for _, value in explorer.controls["BN run"].options] == ["/runs/r-mbn"]
    assert len(explorer.drawn["statistics"].axes) == 4 and explorer.images["statistics"].value != before
    explorer.filters["source"].value = "paper"
    assert explorer.drawn["statistics"] is None and explorer.images["statistics"].layout.display == "none"
    assert "no BN statistics" in explorer.notes["statistics"].value


def test_bn_panel_refuses_several_layers():
    with pytest.raises(ValueError, match="several layers"):
        plots.bn_statistics_panel(_bnstats()[lambda t: t["run"] == "r-bn"])


def _fake_examples(run_dir, branch, n_images, steps=4, targeted=True):
    classes = 10
    probabilities = np.full((steps + 1, n_images, classes), 0.5 / (classes - 1))
    labels, targets = np.arange(n_images) % classes, (np.arange(n_images) + 1) % classes
    for i in range(steps + 1):  # the target's probability rises; from iteration 2 on it is predicted
        share = 0.1 + 0.2 * i
        probabilities[i, np.arange(n_images), targets] = share
        probabilities[i, np.arange(n_images), labels] = 1 - share - 0.5 * (classes - 2) / (classes - 1)
    clean = np.random.default_rng(0).random((n_images, 1, 28, 28))
    iterates = np.clip(clean[None] + np.linspace(0, 16 / 255, steps + 1)[:, None, None, None, None], 0, 1)
    return examples.AdversarialExamples(
        run=Path(run_dir).name, branch=branch or "-", eps=16.0, step=4.0, steps=steps, targeted=targeted,
        class_names=[f"name{c}" for c in range(classes)], clean=clean, adversarial=iterates[-1], iterates=iterates,
        labels=labels, targets=targets if targeted else None, clean_predictions=labels, probabilities=probabilities)


def _viewer(calls: list, fail: bool = False):
    def attack(run_dir, branch, n_images):
        calls.append((run_dir, branch, n_images))
        if fail:
            raise RuntimeError("no checkpoint")
        return _fake_examples(run_dir, branch, n_images)

    return explore.make_explorer(_frame(), _bnstats(), show=False, attack=attack)


def test_viewer_attacks_on_demand_and_the_slider_moves_along_the_attack():
    calls = []
    explorer = _viewer(calls)
    controls = explorer.controls
    assert calls == [] and explorer.drawn["examples"] is None and "press 'attack'" in explorer.notes["examples"].value
    controls["attack"].click()
    assert calls == [("/runs/r-bn", None, 6)] and explorer.error is None
    assert controls["iteration"].max == 4 and controls["iteration"].value == 4
    fig = explorer.drawn["examples"]
    assert "iteration 4 of 4" in fig._suptitle.get_text()
    assert fig.axes[0].get_title() == "true: name0\ntarget: name1"
    assert fig.axes[2 * 6].get_title().startswith("predicted: name1")  # row 3: the adversarial images
    image = explorer.images["examples"].value
    controls["iteration"].value = 0
    fig = explorer.drawn["examples"]
    assert len(calls) == 1 and "iteration 0 of 4" in fig._suptitle.get_text()
    assert fig.axes[2 * 6].get_title().startswith("predicted: name0") and explorer.images["examples"].value != image
    assert fig.axes[6].images[0].get_array().max() == 0  # the perturbation at iteration 0 (these fakes: none)
    controls["images"].value = 3
    assert calls[-1] == ("/runs/r-bn", None, 3) and len(explorer.drawn["examples"].axes) == 4 * 3


def test_viewer_follows_the_filters_and_caches():
    calls = []
    explorer = _viewer(calls)
    explorer.controls["attack"].click()
    image = explorer.images["examples"].value
    explorer.filters["norm"].value = "mbn"  # the BN run leaves the selection: the viewer shows the MBN run
    assert explorer.controls["run"].value == "/runs/r-mbn"
    assert list(explorer.controls["branch"].options) == ["adv", "clean"]
    assert calls[-1] == ("/runs/r-mbn", "adv", 6) and explorer.images["examples"].value != image
    explorer.controls["branch"].value = "clean"
    assert calls[-1] == ("/runs/r-mbn", "clean", 6)
    explorer.controls["branch"].value = "adv"
    assert len(calls) == 3  # computed once per run, branch and image count
    explorer.filters["source"].value = "paper"
    assert explorer.drawn["examples"] is None and "no kit run" in explorer.notes["examples"].value


def test_viewer_failure_is_shown_not_raised():
    explorer = _viewer([], fail=True)
    explorer.controls["attack"].click()
    assert "RuntimeError: no checkpoint" in explorer.error and "no checkpoint" in explorer.notes["examples"].value
    assert explorer.drawn["examples"] is None
    assert "attack=advkit.examples" in explore.make_explorer(_frame(), show=False).notes["examples"].value


def _claims(threat: bool) -> pd.DataFrame:
    table = pd.read_csv(PROJECT / "figures" / "study_claims.csv").drop(columns=["threat_model"], errors="ignore")
    table = table.drop_duplicates("claim")  # one row per claim, as a table written before threat models
    if threat:
        table = pd.concat([table.assign(threat_model="targeted PGD"),
                           table.head(2).assign(threat_model="AutoAttack", mean=-3.0, low=-5.0, high=-1.0)])
    return table


def test_paper_effect_is_read_from_the_papers_text():
    assert explore.paper_effect("PGD-2000: 39.2 - 20.9 = +18.3") == 18.3
    assert explore.paper_effect("PGD-2000: 0.0 - 39.2 = -39.2") == -39.2
    assert np.isnan(explore.paper_effect("adversarial larger (Figure 5, no number)"))
    assert np.isnan(explore.paper_effect("ResNet-152 to 638, PGD-2000: +4.5; clean training 152 to 338: +0.5"))


def test_claims_view_without_threat_models(tmp_path):
    path = tmp_path / "claims.csv"
    _claims(False).to_csv(path, index=False)
    table = explore.claims_table(path)
    explorer = explore.make_explorer(_frame(), show=False, claims=table)
    assert explorer.controls["claims threat model"].layout.display == "none"
    ax = explorer.drawn["claims"].axes[0]
    assert len(ax.get_yticklabels()) == len(table) and ax.get_yticklabels()[0].get_text().startswith("C1: ")
    diamonds = [l for l in ax.lines if l.get_marker() == "D" and len(l.get_xdata()) == 1]
    assert sorted(float(l.get_xdata()[0]) for l in diamonds) == sorted(table["paper_effect"].dropna())
    assert "C1" in explorer.claims_text.value and explorer.error is None
    table.drop(columns="verdict").to_csv(path, index=False)
    with pytest.raises(ValueError, match="verdict"):
        explore.claims_table(path)


def test_claims_view_filters_by_threat_model():
    explorer = explore.make_explorer(_frame(), show=False, claims=_claims(True).assign(paper_effect=1.0))
    threat = explorer.controls["claims threat model"]
    assert threat.layout.display is None and list(threat.options) == [explore.ALL, "AutoAttack", "targeted PGD"]
    rows = len(explorer.drawn["claims"].axes[0].get_yticklabels())
    threat.value = "AutoAttack"
    ax = explorer.drawn["claims"].axes[0]
    assert len(ax.get_yticklabels()) == 2 < rows and "C3" not in explorer.claims_text.value
    assert [float(l.get_xdata()[0]) for l in ax.lines if l.get_marker() == "o"] == [-3.0, -3.0]


# ---------------------------------------------------------------- against real runs

def test_explorer_frame_carries_the_threat_model_of_real_runs(explorer_runs):
    frame = explore.explorer_frame(explorer_runs)
    kit = frame[frame["source"] == "kit"]
    assert set(kit.loc[kit["run"] == "bn", "threat_model"]) == {"clean", "untargeted PGD"}
    assert set(kit.loc[kit["run"] == "mbn", "threat_model"]) == {"clean", "targeted PGD"}
    assert all((Path(d) / "results.csv").exists() for d in kit["run_dir"])
    explorer = explore.make_explorer(frame, results.load_bnstats(explorer_runs), show=False, runs_root=explorer_runs)
    assert [label for label, _ in explorer.controls["BN run"].options] == ["bn", "mbn"]
    assert list(explorer.controls["threat model"].options) == ["targeted PGD", "untargeted PGD"]
    explorer.controls["BN run"].value = str(explorer_runs / "mbn")
    assert len(explorer.drawn["statistics"].axes) == 4 and explorer.error is None


def test_adversarial_examples_are_the_ones_the_evaluation_counted(explorer_runs):
    run = explorer_runs / "mbn"
    shown = examples.adversarial_examples(run, "adv", n_images=32)
    evaluated = np.load(next((run / "eval").glob("adv-*/examples.npz")))
    assert shown.steps == evaluated["checkpoints"][-1] == 4 and shown.targeted
    assert np.array_equal(shown.labels, evaluated["labels"][:32])
    assert np.array_equal(shown.clean_predictions == shown.labels, evaluated["clean"][:32])
    assert np.array_equal(shown.predictions[-1] == shown.labels, evaluated["final"][-1][:32])
    assert (shown.targets != shown.labels).all() and shown.class_names[0] == "T-shirt/top"
    assert np.abs(shown.adversarial - shown.clean).max() <= 16 / 255 + 1e-6
    assert np.array_equal(shown.iterates[-1], shown.adversarial) and shown.iterates.shape == (5, 32, 1, 28, 28)
    assert np.allclose(shown.probabilities.sum(-1), 1, atol=1e-5)
    _, model = advkit.load_run(run, "adv")
    with torch.no_grad():
        again = model(torch.from_numpy(shown.adversarial)).softmax(-1).numpy()
    assert np.allclose(again, shown.probabilities[-1], atol=1e-4)


def test_adversarial_examples_of_an_untargeted_run_and_bad_input(explorer_runs, monkeypatch):
    monkeypatch.setattr(examples, "MAX_STORED_VALUES", 0)  # images too large to keep every iterate
    shown = examples.adversarial_examples(explorer_runs / "bn", None, n_images=2)
    assert not shown.targeted and shown.targets is None and shown.iterates is None
    assert np.array_equal(shown.image_at(1), shown.adversarial)
    assert np.allclose(shown.goal_probability()[-1], shown.probabilities[-1][np.arange(2), shown.labels])
    fig = plots.adversarial_examples_panel(shown, 1)
    assert "(untargeted)" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="n_images=65"):
        examples.adversarial_examples(explorer_runs / "bn", None, n_images=65)
    with pytest.raises(ValueError, match="n_images=0"):
        examples.adversarial_examples(explorer_runs / "bn", None, n_images=0)
    with pytest.raises(ValueError, match="branch='adv'"):
        examples.adversarial_examples(explorer_runs / "bn", "adv")


def test_runs_of_two_data_sets_or_eps_are_two_curves_not_one_models_seeds():
    kit = pd.DataFrame(_kit_rows("fm") + _kit_rows("cifar", dataset="cifar10", run_dir="/runs/cifar")
                       + _kit_rows("fm-eps4", eps=4.0, run_dir="/runs/fm-eps4"))
    explorer = explore.make_explorer(kit, show=False)
    ax = explorer.drawn["curves"].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(labels) == 3 and any("cifar10" in l for l in labels) and any("eps 4" in l for l in labels)


def test_runs_of_another_recipe_are_another_curve_not_a_seed():
    kit = pd.DataFrame(_kit_rows("a", recipe="") + _kit_rows("a-seed1", seed=1, run_dir="/runs/a-seed1", recipe="")
                       + _kit_rows("long", run_dir="/runs/long", recipe="epochs=16"))
    explorer = explore.make_explorer(kit, show=False)
    labels = [t.get_text() for t in explorer.drawn["curves"].axes[0].get_legend().get_texts()]
    assert len(labels) == 2 and any(l.endswith("epochs=16") for l in labels), labels
    assert any(l.endswith("the recipe most runs share") for l in labels), labels


def test_the_status_counts_run_folders_not_run_names():
    kit = pd.DataFrame(_kit_rows("adv", run_dir="/runs/figure1/adv") + _kit_rows("adv", run_dir="/runs/mbn/adv", seed=1))
    explorer = explore.make_explorer(pd.concat([results.paper_results(), kit], ignore_index=True), show=False)
    explorer.filters["source"].value = "kit"
    assert "2 models selected (2 kit runs)" in explorer.status.value
    assert len(explorer.controls["run"].options) == 2
