import numpy as np
import pandas as pd
import pytest
import torch

from advkit import attacks, bnstats, data, evaluate, norm, train
from advkit.config import make_config
from helpers import fmnist_model


def _loader(x, y, batch_size=64):
    """A loader over in-memory [0, 1] images, as uint8 batches like the real ones."""
    u8 = (x * 255).round().to(torch.uint8)
    return [(u8[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]


def _separate_accuracy(model, loader, steps, seed=0, **kw):
    correct = 0
    for b, batch in enumerate(loader):
        x, y = data.to_device(batch, "cpu")
        adv = attacks.pgd(model, x, y, attacks.Attack(steps=steps, **kw), num_classes=10,
                          generator=evaluate.batch_generator(seed, b, "cpu"))
        with torch.no_grad(), attacks.attack_mode(model):
            correct += (model(adv).argmax(1) == y).sum().item()
    return correct / sum(len(b[1]) for b in loader)


@pytest.mark.parametrize("step_rule", ["fixed", "max_eps_over_steps"])
def test_one_pass_curve_equals_separate_pgd_runs(clean_trained_model, fmnist_test, step_rule):
    x, y = fmnist_test
    loader = _loader(x[:128], y[:128])
    checkpoints = [1, 2, 5, 12]
    curve = evaluate.robustness_curve(clean_trained_model, loader, attacks.Attack(eps=16, step=1, step_rule=step_rule), num_classes=10, checkpoints=checkpoints, seed=3)
    one_pass = curve["final"].mean(1)
    separate = [_separate_accuracy(clean_trained_model, loader, n, seed=3, eps=16, step=1, step_rule=step_rule)
                for n in checkpoints]
    assert one_pass.tolist() == pytest.approx(separate, abs=1e-12)
    assert len(set(separate)) > 1  # the curve actually moves


def test_worst_iterate_never_rises_and_never_exceeds_final(clean_trained_model, fmnist_test):
    x, y = fmnist_test
    curve = evaluate.robustness_curve(clean_trained_model, _loader(x, y), attacks.Attack(eps=8, step=1), num_classes=10, checkpoints=[1, 3, 10, 30])
    worst, final = curve["worst"].mean(1), curve["final"].mean(1)
    assert np.all(np.diff(worst) <= 0) and np.all(worst <= final)
    assert np.all(curve["worst"] <= curve["final"])  # per example too
    assert np.all(curve["worst"][1:] <= curve["worst"][:-1])


def test_restarts_never_raise_accuracy_per_example(clean_trained_model, fmnist_test):
    x, y = fmnist_test
    loader = _loader(x, y)
    one = evaluate.robustness_curve(clean_trained_model, loader, attacks.Attack(eps=4, step=1), num_classes=10, checkpoints=[3])
    many = evaluate.robustness_curve(clean_trained_model, loader, attacks.Attack(eps=4, step=1, restarts=4), num_classes=10, checkpoints=[3])
    assert np.all(many["final"] <= one["final"]) and many["final"].sum() < one["final"].sum()


def test_interrupted_evaluation_resumes_from_saved_batches(clean_trained_model, fmnist_test, tmp_path):
    x, y = fmnist_test
    loader = _loader(x, y)
    kw = dict(num_classes=10, checkpoints=[2, 4], seed=1)
    reference = evaluate.robustness_curve(clean_trained_model, loader, attacks.Attack(eps=16, step=2), **kw)

    def interrupted():
        yield from loader[:2]
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        evaluate.robustness_curve(clean_trained_model, interrupted(), attacks.Attack(eps=16, step=2), save_dir=tmp_path, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch_000000.pt", "batch_000001.pt"]
    calls = []
    fc = clean_trained_model.net.fc  # the classifier has no BN: the model and its BN-folded view share it
    fc.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        resumed = evaluate.robustness_curve(clean_trained_model, loader, attacks.Attack(eps=16, step=2), save_dir=tmp_path, **kw)
    finally:
        fc._forward_pre_hooks.clear()
    for key in ("clean", "final", "worst", "labels"):
        assert np.array_equal(resumed[key], reference[key])
    per_batch = 1 + 4 + 1  # clean forward, 4 attack steps, final forward
    assert len(calls) == per_batch * (len(loader) - 2)  # the saved batches were not recomputed


def test_mixture_bn_models_are_evaluated_through_each_branch(tmp_path):
    cfg = make_config("test", name="mbn-eval", runs_root=str(tmp_path), norm="mbn", clean_ratio=1.0, n_test=64, eval_checkpoints=[2])
    model = train.build_model(cfg).eval()
    with torch.no_grad():
        for bn in norm.batch_norms(model, "clean"):
            bn.running_var.fill_(9.0)
    cfg.run_dir.mkdir(parents=True)
    table = evaluate.evaluate_model(model, cfg, show_progress=False)
    assert set(table["branch"]) == {"clean", "adv"}
    logits = {}  # the branches really compute different functions
    xb, _ = data.to_device(next(iter(data.make_loader("fashion-mnist", "test", 64, n=64))), "cpu")
    for b in norm.BRANCHES:
        with norm.use_branch(model, b), torch.no_grad():
            logits[b] = model(xb)
    assert not torch.allclose(logits["clean"], logits["adv"])
    assert {"branch", "attack", "targeted", "steps", "restarts", "accuracy", "worst_accuracy", "n", "seed"} <= set(table)
    assert len(list((tmp_path / "mbn-eval" / "eval").glob("*/examples.npz"))) == 2


def test_sanity_checks_pass_on_a_real_model(clean_trained_model, fmnist_test):
    """On a longer curve than the mutation suite's (tests/test_sanity.py), every check passes."""
    x, y = fmnist_test
    table = evaluate.sanity_checks(clean_trained_model, x[:128], y[:128], attacks.Attack(eps=16, step=2), num_classes=10, checkpoints=[1, 5, 20], undefended=True)
    assert table["passed"].all(), table.to_string()
    assert len(table) == 11 and table["check"].is_unique


def test_variance_convention_compares_like_with_like():
    model = fmnist_model().train()
    layer = bnstats.default_layer(model)
    bn = dict(model.named_modules())[layer]
    bn.momentum = 1.0  # running statistics := the last batch's statistics
    images = torch.rand(32, 1, 28, 28)
    table = bnstats.batch_statistics(model, layer, images, list(range(bn.num_features)))
    model(images)  # a real training-mode forward updates the buffers
    var = table[table["statistic"] == "var"].sort_values("channel")["value"].to_numpy()
    biased = table[table["statistic"] == "var_biased"].sort_values("channel")["value"].to_numpy()
    mean = table[table["statistic"] == "mean"].sort_values("channel")["value"].to_numpy()
    assert np.allclose(var, bn.running_var.numpy(), rtol=1e-4)  # PyTorch keeps the unbiased variance
    assert np.allclose(mean, bn.running_mean.numpy(), rtol=1e-4, atol=1e-6)
    n = 32 * 14 * 14  # elements per channel at that layer
    assert np.allclose(biased, var * (n - 1) / n, rtol=1e-5)
    assert set(table.loc[table["statistic"] == "var", "convention"]) == {"unbiased"}


def test_figure_statistics_for_mixture_bn_leave_the_model_unchanged():
    model = fmnist_model(norm="mbn").train()
    model(torch.rand(16, 1, 28, 28))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(2)]
    table = bnstats.figure_statistics(model, batches, num_classes=10, channels=5, attack=attacks.Attack(steps=2, step=8))
    assert bnstats.default_layer(model) == "net.layer2.0.bn1"
    fig5 = table[table["figure"] == 5]
    assert set(fig5["branch"]) == {"clean", "adv"} and fig5["channel"].nunique() == 5
    fig6 = table[table["figure"] == 6]
    assert set(fig6["source"]) == {"batch1", "batch2", "running"} and set(fig6["branch"]) == {"adv"}
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.training and norm.get_branch(model) == "adv"
    with pytest.raises(ValueError, match="bnstats_layer='net.fc'"):
        bnstats.figure_statistics(model, batches, num_classes=10, layer="net.fc")


def test_a_fixed_eval_seed_evaluates_the_same_images_with_the_same_draws_whatever_the_training_seed(tmp_path):
    """eval_seed fixes the test subset, the targets and the starts: two training seeds are then compared per image
    (the study's paired design). Without it, each seed draws its own subset (the mutant this catches: a
    evaluation that ignores eval_seed)."""
    model = train.build_model(make_config("test")).eval()

    def examples(name: str, **overrides) -> dict:
        cfg = make_config("test", name=name, runs_root=str(tmp_path), n_test=32, eval_checkpoints=[2],
                          eval_batch_size=16, **overrides)
        cfg.run_dir.mkdir(parents=True)
        table = evaluate.evaluate_model(model, cfg, show_progress=False)
        assert set(table["eval_seed"]) == {cfg.evaluation_seed} and set(table["seed"]) == {cfg.seed}
        return dict(np.load(next((cfg.run_dir / "eval").glob("*/examples.npz"))))

    fixed = [examples(f"fixed{s}", seed=s, eval_seed=7) for s in (0, 1)]
    for key in ("labels", "clean", "worst"):
        assert np.array_equal(fixed[0][key], fixed[1][key])
    free = [examples(f"free{s}", seed=s) for s in (0, 1)]
    assert not np.array_equal(free[0]["labels"], free[1]["labels"])
    assert make_config("test", seed=3).evaluation_seed == 3
    with pytest.raises(ValueError, match="eval_seed"):
        make_config("test", eval_seed=-1)


def test_numbers_labelled_fp32_are_computed_without_tf32_even_where_it_is_switched_on(tmp_path):
    """PyTorch leaves cuDNN's TF32 on by default: evaluation and the validity gate switch it off (and back)."""
    from advkit import device

    cfg = make_config("test", name="tf32", runs_root=str(tmp_path), n_test=32, eval_checkpoints=[2])
    model = train.build_model(cfg).eval()
    tf32_seen = []
    model.register_forward_pre_hook(
        lambda *_: tf32_seen.append(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32))
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert device.fp32_name(torch.device("cuda")) == "tf32" and device.fp32_name(torch.device("cpu")) == "fp32"
        cfg.run_dir.mkdir(parents=True)
        table = evaluate.evaluate_model(model, cfg, show_progress=False)
        gate = evaluate.full_test_accuracy(model, cfg)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # given back
        with device.exact_fp32():
            assert device.fp32_name(torch.device("cuda")) == "fp32"
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert tf32_seen and not any(tf32_seen)
    assert set(table["precision"]) == {"fp32"} and gate["precision"] == "fp32"


def test_autoattack_and_the_sanity_checks_sample_the_evaluation_set_not_its_first_classes(monkeypatch):
    """A test set in class order (ImageNet's validation folders): the first 100 images were all class 0. The
    subset is a seeded sample inside the evaluation set (n_test images) and covers the classes."""
    from advkit import config, data, evaluate

    index = torch.arange(1000)
    images = torch.zeros(1000, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = (index % 256).to(torch.uint8), (index // 256).to(torch.uint8)
    labels = index // 100  # 100 images of class 0, then class 1, ...
    monkeypatch.setattr(data, "load_tensors", lambda *args, **kwargs: (images, labels))
    identity = lambda batch: set((batch[:, 0, 0, 0].long() + 256 * batch[:, 0, 0, 1].long()).tolist())
    for n_test in (None, 500):
        cfg = config.make_config("test", n_test=n_test, eval_batch_size=50)
        evaluation = set().union(*(identity(x) for x, _ in data.make_loader("fashion-mnist", "test", 50, n=n_test,
                                                                            seed=cfg.evaluation_seed)))
        sample = [(identity(x), y) for x, y in evaluate.subset_loader(cfg, 100, 50)]
        chosen = set().union(*(ids for ids, _ in sample))
        assert len(chosen) == 100 and chosen <= evaluation
        assert len(set(torch.cat([y for _, y in sample]).tolist())) >= 8  # not one or two classes
    assert len(list(evaluate.subset_loader(config.make_config("test", n_test=40), 100, 50))[0][1]) == 40
