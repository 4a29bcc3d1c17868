"""Issue 14 (numbers you can trust): each test failed on the code before its fix.

Results tied to the weights they were computed from, explicit parameters that always win, Eq. 1's weighting at
intermediate clean ratios, the BN statistics of the run's own training batches and attack, the folded view
leaving the model's flags alone, the exponential schedule's interval, fp32 evaluation, what a run records
about its environment, late-discovered bad inputs, and ``advkit.load_run``.
"""

import dataclasses
import json

import pandas as pd
import pytest
import torch

import advkit
from advkit import bnstats, config, evaluate, fold, models, run, rundir, strategy, train
from advkit.config import make_config

TINY = dict(epochs=1, n_train=128, n_test=48, batch_size=32, eval_batch_size=16, eval_checkpoints=[1, 2],
            sanity_n=0, bnstats_channels=0)


def _fresh_evaluation(run_dir, tmp_path, **overrides) -> pd.DataFrame:
    """The run's last checkpoint evaluated from scratch into another folder (nothing reused)."""
    cfg, model = advkit.load_run(run_dir)
    cfg = config.make_config(None, **cfg.to_dict() | dict(runs_root=str(tmp_path / "fresh"), resume=False,
                                                         overwrite=False) | overrides)
    return evaluate.evaluate_model(model, cfg, show_progress=False)


def test_extending_a_finished_run_evaluates_the_new_weights(tmp_path):
    """Defect 3: saved per-batch results were keyed by the evaluation spec only, so a run extended with
    ``resume=True, epochs=2`` reported the first model's numbers."""
    kw = dict(TINY, runs_root=str(tmp_path), name="extend", lr=0.4, lr_decay_epochs=[])
    run.run(make_config("test", **kw), show_progress=False)
    first = pd.read_csv(tmp_path / "extend" / "results.csv")
    run.run(make_config("test", **kw | dict(epochs=3, resume=True)), show_progress=False)
    extended = pd.read_csv(tmp_path / "extend" / "results.csv")
    fresh = _fresh_evaluation(tmp_path / "extend", tmp_path)
    assert extended["accuracy"].tolist() == fresh["accuracy"].tolist()
    assert extended["worst_accuracy"].tolist() == fresh["worst_accuracy"].tolist()
    assert extended["accuracy"].tolist() != first["accuracy"].tolist()  # the model did change
    _, model = advkit.load_run(tmp_path / "extend")
    assert set(extended["weights"]) == {models.weights_digest(model)} != set(first["weights"])


def test_evaluation_is_fp32_by_default_and_says_so(tmp_path, monkeypatch):
    """Defect 6: evaluation ran under the training's bf16 autocast; it is fp32 unless ``eval_bf16``."""
    cfg = make_config("test", **TINY | dict(runs_root=str(tmp_path), name="bf16", bf16=True, norm="mbn",
                                            clean_ratio=1.0))
    real, autocast_seen = evaluate.curve_batch, []

    def recording(*args, **kwargs):
        autocast_seen.append(torch.is_autocast_enabled("cpu"))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "curve_batch", recording)
    table = run.run(cfg, show_progress=False)
    assert autocast_seen and not any(autocast_seen)
    assert set(table["precision"]) == {"fp32"} and table["device"].str.startswith("cpu").all()
    fresh = _fresh_evaluation(cfg.run_dir, tmp_path, bf16=False)
    assert table["accuracy"].tolist() == fresh["accuracy"].tolist()
    bf16 = _fresh_evaluation(cfg.run_dir, tmp_path / "b", eval_bf16=True)
    assert set(bf16["precision"]) == {"bf16"}


def test_weights_digest_sees_every_parameter_and_buffer():
    model = models.build_model("small_resnet8", 10, "bn", in_channels=1, mean=[0.5], std=[0.5])
    digest = models.weights_digest(model)
    assert models.weights_digest(model) == digest
    model.net.bn1.running_mean[0] += 1e-6  # a buffer
    assert models.weights_digest(model) != digest
    digest = models.weights_digest(model)
    with torch.no_grad():
        model.net.fc.bias[3] = model.net.fc.bias[3].nextafter(torch.tensor(1.0))  # one ulp of one parameter
    assert models.weights_digest(model) != digest


@pytest.mark.parametrize("preset, name, value", [
    ("demo", "train_steps", 2),  # equal to the notebook's old default (the test preset's)
    ("paper", "epochs", 2),
    ("demo", "n_train", 512),
    ("demo", "eval_step", 4.0),
    ("demo", "lr_decay_epochs", [1]),
])
def test_an_explicit_notebook_parameter_always_wins(preset, name, value):
    """Defect 4: a value equal to the notebook's default counted as 'not given' and the preset's replaced it."""
    extra = dict(warmup_epochs=1, lr_decay_epochs=[1]) if preset == "paper" else {}
    if name == "lr_decay_epochs":
        extra["schedule"] = "step"  # the demo preset's cosine schedule would ignore lr_decay_epochs (refused)
    cfg = config.config_from_parameters({"preset": preset, name: value, "dataset": "fashion-mnist",
                                         "arch": "small_resnet8", "batch_size": 64, **extra})
    assert getattr(cfg, name) == value


def test_list_parameters_given_as_text_are_parsed_and_bad_text_is_explained():
    cfg = config.config_from_parameters({"preset": "test", "lr_decay_epochs": "[2]", "epochs": 3})
    assert cfg.lr_decay_epochs == [2]
    assert config.config_from_parameters({"eval_checkpoints": "[1, 5]"}).eval_checkpoints == [1, 5]
    with pytest.raises(ValueError, match=r"lr_decay_epochs='two' is not accepted; give a list .* -y"):
        config.config_from_parameters({"lr_decay_epochs": "two"})


def test_all_images_can_be_asked_for_explicitly():
    assert config.config_from_parameters({"preset": "demo", "n_test": "all"}).n_test is None


def test_the_notebook_parameters_cell_defaults_to_the_preset_and_shows_each_presets_value():
    cell = config.parameters_cell()
    lines = [line for line in cell.splitlines()[1:]]
    assert all(" = None  # " in line for line in lines)
    epochs = next(line for line in lines if line.startswith("epochs:"))
    shown = ", ".join(f"{name} {values.get('epochs', config.Config().epochs)}" for name, values in config.PRESETS.items())
    assert f"[None: {shown}]" in epochs and "=" not in epochs.split("#", 1)[1]
    assert "study 8" in epochs and "paper 110" in epochs


def _losses(weighting: str, alpha: float, clean_ratio: float) -> float:
    cfg = make_config("test", clean_ratio=clean_ratio, alpha=alpha, eq1_weighting=weighting)
    torch.manual_seed(0)
    model = models.build_model("small_resnet8", 10, "bn", in_channels=1, mean=[0.5], std=[0.5]).train()
    images, labels = torch.rand(16, 1, 28, 28), torch.arange(16) % 10
    loss, _ = strategy.training_loss(model, images, labels, cfg, torch.Generator().manual_seed(3))
    return loss.item()


def test_eq1_weightings_agree_on_full_pairs_and_differ_as_stated_otherwise():
    """Defect 5: with X% clean, 'share' gives the kept clean images alpha of the loss however many they are;
    'per_image' weighs each image alike (alpha = 0.5: one mean over the concatenated batch)."""
    assert _losses("share", 0.5, 1.0) == pytest.approx(_losses("per_image", 0.5, 1.0), rel=1e-6)
    clean, adv = _losses("share", 1.0, 0.25), _losses("share", 0.0, 0.25)  # J(clean) and J(adv) alone
    assert _losses("share", 0.5, 0.25) == pytest.approx(0.5 * clean + 0.5 * adv, rel=1e-5)
    assert _losses("per_image", 0.5, 0.25) == pytest.approx((4 * clean + 16 * adv) / 20, rel=1e-5)
    assert strategy.eq1_loss(torch.tensor(1.0), torch.tensor(3.0), 4, 16, 0.3, "per_image").item() == pytest.approx(
        (0.3 * 4 * 1 + 0.7 * 16 * 3) / (0.3 * 4 + 0.7 * 16))
    with pytest.raises(ValueError, match=r"eq1_weighting='mean' is not accepted; choose one of \['share', 'per_image'\]"):
        make_config("test", eq1_weighting="mean")


def test_exponential_schedule_decays_every_interval():
    """Defect 6: ALP's schedule decays 0.94 every 2 epochs, not every epoch."""
    cfg = make_config("test", schedule="exp", exp_decay_rate=0.5, exp_decay_epochs=2, epochs=8, lr_decay_epochs=[])
    base = cfg.lr * cfg.batch_size / 256
    got = [train.learning_rate(cfg, e) for e in (0.0, 1.9, 2.0, 3.5, 4.0, 6.0)]
    assert got == pytest.approx([base, base, base / 2, base / 2, base / 4, base / 8])


def test_folding_leaves_the_models_own_train_flags_alone():
    """Defect 6: the folded view's ``eval()`` reached the model's own (shared) submodules."""
    model = models.build_model("small_resnet8", 10, "bn", in_channels=1, mean=[0.5], std=[0.5]).eval()
    model.net.fc.train()  # a leaf module of the traced graph in train mode; the BNs (eval mode) still fold
    flags = {name: m.training for name, m in model.named_modules()}
    view = fold.fold_batch_norms(model)
    assert view is not model
    assert {name: m.training for name, m in model.named_modules()} == flags


def test_bn_statistics_use_the_runs_own_training_batches_and_attack(tmp_path, monkeypatch):
    """Defect 6: Figures 5-6 were computed on another training subset (seed + 1) with a plain random-start
    attack, not the run's clean-start probability and attack BN mode."""
    from advkit import data

    cfg = make_config("test", **TINY | dict(runs_root=str(tmp_path), bnstats_channels=4, train_clean_start_prob=0.7,
                                            attack_bn_mode="batch", seed=5))
    seen = {}

    def capture(model, batches, **kwargs):
        seen.update(batches=batches, **kwargs)
        return pd.DataFrame()

    monkeypatch.setattr(bnstats, "figure_statistics", capture)
    model = train.build_model(cfg)
    bnstats.bnstats_for_run(model, cfg)
    assert seen["attack"].clean_start_prob == 0.7 and seen["attack"].bn_mode == "batch"
    assert seen["attack"] == dataclasses.replace(cfg.training_attack, compile=False)  # the run's training attack
    images, labels = data.load_tensors("fashion-mnist", "train")
    subset = images[data.subset_indices(len(labels), cfg.n_train, cfg.seed)]
    own = {bytes(image.flatten().tolist()) for image in subset}
    batch = (seen["batches"][0][0] * 255).round().to(torch.uint8)
    assert all(bytes(image.flatten().tolist()) in own for image in batch)  # every image is one of the run's


def test_a_sync_bn_runs_bn_statistics_are_those_of_its_plain_bn_model(tmp_path):
    """A sync_bn run's model holds SyncBatchNorm layers, which the BN tools did not see: Figures 5-6 raised
    'no BN layer in a stage called layer2' after training (and under torchrun rank 0 alone would have waited on
    SyncBatchNorm's all-reduce)."""
    import copy

    import torch.nn as nn

    cfg = make_config("test", **TINY | dict(runs_root=str(tmp_path), bnstats_channels=4))
    model = train.build_model(cfg).eval()
    expected = bnstats.bnstats_for_run(model, cfg)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    pd.testing.assert_frame_equal(bnstats.bnstats_for_run(synced, cfg), expected)
    assert len(expected) and any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())


@pytest.mark.parametrize("overrides, message", [
    (dict(bnstats_layer="net.layer9.0.bn1"), r"bnstats_layer='net.layer9.0.bn1' is not accepted; the BN layers of "
                                             r"small_resnet8 with norm='bn' are: net.bn1, "),
    (dict(train_step=0.0), r"train_step=0.0, .* is not accepted for adversarial training"),
    (dict(train_steps=0), r"train_steps=0 is not accepted for adversarial training"),
    (dict(eval_step=0.0), r"eval_step=0 is not accepted with eval_eps=16.0"),
])
def test_late_failing_parameters_are_refused_before_anything_is_written(tmp_path, overrides, message):
    """Defect 8: a misspelt bnstats_layer failed after the whole training; train_step=0 trained with an attack
    that never moves."""
    with pytest.raises(ValueError, match=message):
        run.run(make_config(None, **make_config("test").to_dict() | TINY | dict(bnstats_channels=4,
                                                                                  runs_root=str(tmp_path)) | overrides),
                  show_progress=False)
    assert not any(tmp_path.iterdir())


def test_a_checkpoint_of_another_architecture_is_refused_before_the_run_folder(tmp_path):
    run.train_run(make_config("test", **TINY | dict(runs_root=str(tmp_path), name="r8")), show_progress=False)
    start = str(tmp_path / "r8" / "checkpoints" / "last.pt")  # trained, not evaluated: a file, not a run folder
    with pytest.raises(ValueError, match=r"init_checkpoint=.* does not fit arch='small_resnet14'"):
        run.train_run(make_config("test", **TINY | dict(runs_root=str(tmp_path), name="r14", arch="small_resnet14",
                                                      init_checkpoint=start)), show_progress=False)
    assert not (tmp_path / "r14").exists()


def test_a_run_records_what_decides_its_numbers(tmp_path):
    cfg = make_config("test", **TINY | dict(runs_root=str(tmp_path)))
    run.run(cfg, show_progress=False)
    env = json.loads((cfg.run_dir / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"].startswith("cpu: ")
    assert env["torch_threads"] == torch.get_num_threads() and env["eval_precision"] == "fp32"
    assert env["attack_fold_bn"] is True and len(env["code"].split("+")[0]) in (40, 7)  # a git commit (or unknown)


def test_load_run_gives_the_config_and_the_evaluated_model(tmp_path):
    cfg = make_config("test", **TINY | dict(runs_root=str(tmp_path), norm="mbn", clean_ratio=1.0))
    table = run.run(cfg, show_progress=False)
    loaded_cfg, model = advkit.load_run(cfg.run_dir, branch="adv")
    assert loaded_cfg.to_dict() == cfg.to_dict() and not model.training
    assert set(table["weights"]) == {models.weights_digest(model)}
    from advkit import norm

    assert norm.get_branch(model) == "adv"
    with pytest.raises(FileNotFoundError, match="is not a run folder"):
        advkit.load_run(tmp_path / "nothing")


def test_a_sweep_point_and_the_same_config_run_directly_give_identical_weights(tmp_path, monkeypatch):
    """Defect 7: same configuration, same numbers on one machine (the sweep runs the point through papermill in
    a fresh kernel; the direct run is this process). The kernel gets this process's thread count: with
    OMP_NUM_THREADS=1 in the shell it ran on 1 thread against this process's 2, and its sums rounded otherwise."""
    from advkit import sweep

    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))

    point = dict(TINY, preset="test", name="p", clean_ratio=0.5, norm="mbn")
    (tmp_path / "s.yaml").write_text(json.dumps({"runs_root": str(tmp_path / "swept"), "points": [point]}))
    assert sweep.run_sweep(tmp_path / "s.yaml", progress=False)["done"] == ["p"]
    direct = make_config("test", **{k: v for k, v in point.items() if k != "preset"} | dict(runs_root=str(tmp_path)))
    run.run(direct, show_progress=False)
    swept = rundir.load_checkpoint(tmp_path / "swept" / "p")["model"]
    mine = rundir.load_checkpoint(direct.run_dir)["model"]
    assert swept.keys() == mine.keys() and all(torch.equal(swept[k], mine[k]) for k in mine)
    assert pd.read_csv(tmp_path / "swept" / "p" / "results.csv")["accuracy"].tolist() == \
        pd.read_csv(direct.run_dir / "results.csv")["accuracy"].tolist()


def test_cosine_schedule_runs_from_the_warm_up_to_zero():
    cfg = make_config("test", schedule="cosine", epochs=10, warmup_epochs=2, lr_decay_epochs=[])
    base = cfg.lr * cfg.batch_size / 256
    got = [train.learning_rate(cfg, e) for e in (1.0, 2.0, 6.0, 10.0)]
    assert got == pytest.approx([base / 2, base, base / 2, 0.0], abs=1e-12)
