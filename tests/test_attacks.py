import pytest
import torch
import torchattacks

from advkit import attacks, norm
from helpers import accuracy, fmnist_model


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_random_targets_are_uniform_over_the_other_classes():
    labels = torch.arange(10).repeat(2000)
    targets = attacks.random_targets(labels, 10, _gen())
    assert not torch.any(targets == labels)
    counts = torch.bincount((targets - labels) % 10, minlength=10)
    assert counts[0] == 0
    assert counts[1:].min() > 0.8 * len(labels) / 9  # each of the 9 offsets ~ 1/9


def test_perturbation_stays_in_the_eps_cube_and_pixel_range(fmnist_test):
    x, y = fmnist_test
    model = fmnist_model()
    adv = attacks.pgd(model, x[:32], y[:32], attacks.Attack(eps=16, step=4, steps=5), num_classes=10, generator=_gen())
    assert (adv - x[:32]).abs().max() <= 16 / 255 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x[:32]).abs().max() > 15 / 255  # it does move


@pytest.mark.parametrize("bn_mode", attacks.BN_MODES)
@pytest.mark.parametrize("norm_name", ["bn", "mbn"])
def test_attack_leaves_the_model_exactly_as_it_was(fmnist_test, bn_mode, norm_name):
    x, y = fmnist_test
    model = fmnist_model(norm=norm_name)
    model.train()
    model(x[:64])  # non-trivial running statistics
    model.net.layer1.eval()  # a mixed train/eval state must survive too
    frozen = model.net.fc.weight
    frozen.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: m.training for n, m in model.named_modules()}
    attacks.pgd(model, x[:16], y[:16], attacks.Attack(steps=3, bn_mode=bn_mode), num_classes=10, generator=_gen())
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not frozen.requires_grad and model.net.conv1.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("fold_bn", [False, True])
def test_parameters_get_no_gradient_work_during_the_attack(fmnist_test, fold_bn):
    x, y = fmnist_test
    model = fmnist_model()
    seen = []
    hook = lambda module, args: seen.append(any(p.requires_grad for p in module.parameters()))
    model.net.fc.register_forward_pre_hook(hook)  # fc has no BN to fold: the view runs the model's own layer
    attacks.pgd(model, x[:8], y[:8], attacks.Attack(steps=2, fold_bn=fold_bn), num_classes=10, generator=_gen())
    assert len(seen) == 2 and not any(seen)


def test_batch_mode_uses_batch_statistics(fmnist_test):
    x, y = fmnist_test
    model = fmnist_model()
    model.eval()  # running stats are the init (mean 0, var 1): batch statistics give other gradients
    kw = dict(num_classes=10, targets=(y[:32] + 1) % 10)
    a = attacks.pgd(model, x[:32], y[:32], attacks.Attack(eps=16, step=1, steps=3, bn_mode="running"), generator=_gen(), **kw)
    b = attacks.pgd(model, x[:32], y[:32], attacks.Attack(eps=16, step=1, steps=3, bn_mode="batch"), generator=_gen(), **kw)
    assert not torch.equal(a, b)


def test_mixture_bn_attack_runs_through_the_selected_branch(fmnist_test):
    x, y = fmnist_test
    model = fmnist_model(norm="mbn").eval()
    with torch.no_grad():
        for bn in norm.batch_norms(model, "clean"):
            bn.running_var.fill_(4.0)
    kw = dict(num_classes=10, targets=(y[:32] + 3) % 10)
    with norm.use_branch(model, "clean"):
        a_clean = attacks.pgd(model, x[:32], y[:32], attacks.Attack(steps=3), generator=_gen(), **kw)
        assert norm.get_branch(model) == "clean"
    with norm.use_branch(model, "adv"):
        a_adv = attacks.pgd(model, x[:32], y[:32], attacks.Attack(steps=3), generator=_gen(), **kw)
    assert not torch.equal(a_clean, a_adv)


def test_a_targeted_attack_refuses_the_label_as_target():
    model = fmnist_model("small_resnet8", "bn")
    images, labels = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="targets equal to the labels are not accepted"):
        attacks.pgd(model, images, labels, attacks.Attack(steps=1), targets=torch.tensor([1, 1, 3, 4]))
    attacks.pgd(model, images, labels, attacks.Attack(steps=1), targets=torch.tensor([1, 2, 3, 4]))  # all differ
    attacks.pgd(model, images, labels, attacks.Attack(steps=1, targeted=False), targets=labels)  # not targeted


def test_matches_torchattacks_pgd_untargeted_from_the_same_start(clean_trained_model, fmnist_test):
    x, y = fmnist_test
    model = clean_trained_model
    ours = attacks.pgd(model, x, y, attacks.Attack(eps=16, step=2, steps=7, targeted=False, clean_start_prob=1.0), generator=_gen())
    theirs = torchattacks.PGD(model, eps=16 / 255, alpha=2 / 255, steps=7, random_start=False)(x, y)
    diff = (ours - theirs).abs()
    # identical up to float rounding of the projection; a rare pixel may take the other sign where the
    # gradient is ~0, which moves it by one step
    assert (diff > 1e-5).float().mean() < 1e-3
    assert accuracy(model, ours, y) == pytest.approx(accuracy(model, theirs, y), abs=1 / len(y))


def test_eps_zero_leaves_clean_accuracy(clean_trained_model, fmnist_test):
    x, y = fmnist_test
    adv = attacks.pgd(clean_trained_model, x, y, attacks.Attack(eps=0, steps=5), num_classes=10, generator=_gen())
    assert torch.equal(adv, x)
    assert accuracy(clean_trained_model, adv, y) == accuracy(clean_trained_model, x, y)


def test_undefended_model_falls_to_about_zero_at_eps_16(clean_trained_model, fmnist_test):
    x, y = fmnist_test
    clean = accuracy(clean_trained_model, x, y)
    assert clean > 0.7
    untargeted = attacks.pgd(clean_trained_model, x, y, attacks.Attack(eps=16, step=2, steps=20, targeted=False), generator=_gen())
    targeted = attacks.pgd(clean_trained_model, x, y, attacks.Attack(eps=16, step=1, steps=20), num_classes=10, generator=_gen())
    assert accuracy(clean_trained_model, untargeted, y) < 0.06
    # a random target is not always reachable at eps 16 on Fashion-MNIST, but the true class is lost far more often
    assert accuracy(clean_trained_model, targeted, y) < 0.6 * clean


def test_targeted_success_rises_with_steps(clean_trained_model, fmnist_test):
    x, y = fmnist_test
    targets = attacks.random_targets(y, 10, _gen(5))
    success = []
    for steps in (1, 3, 10, 30):
        adv = attacks.pgd(clean_trained_model, x, y, attacks.Attack(eps=16, step=1, steps=steps), targets=targets, generator=_gen())
        with torch.no_grad():
            success.append((clean_trained_model(adv).argmax(1) == targets).float().mean().item())
    assert all(b >= a - 0.02 for a, b in zip(success, success[1:])), success
    assert success[-1] > success[0] + 0.3, success


def test_restarts_keep_each_examples_worst_case(clean_trained_model, fmnist_test):
    x, y = fmnist_test
    one = attacks.pgd(clean_trained_model, x, y, attacks.Attack(eps=4, step=1, steps=3, restarts=1), num_classes=10,
                      generator=_gen(7))
    many = attacks.pgd(clean_trained_model, x, y, attacks.Attack(eps=4, step=1, steps=3, restarts=4), num_classes=10,
                       generator=_gen(7))
    with torch.no_grad():
        fooled_one = clean_trained_model(one).argmax(1) != y
        fooled_many = clean_trained_model(many).argmax(1) != y
    assert torch.all(fooled_many[fooled_one])  # a restart never un-fools an example
    assert fooled_many.sum() > fooled_one.sum()


def test_clean_start_probability_per_batch_and_per_example(fmnist_test):
    x, _ = fmnist_test
    starts = [attacks.random_start(x[:8], 16 / 255, 0.2, generator=_gen(s)) for s in range(200)]
    clean = sum(torch.equal(s, x[:8]) for s in starts)
    assert 20 <= clean <= 60  # ~40 of 200 batches start clean
    start = attacks.random_start(x, 16 / 255, 0.5, per_example=True, generator=_gen())
    per_example_clean = (start == x).flatten(1).all(1).float().mean()
    assert 0.35 < per_example_clean < 0.65
    assert attacks.random_start(x, 16 / 255, 1.0).equal(x)


def test_step_rule_of_the_original_pipeline():
    assert attacks.effective_step(16, 1, 5, "max_eps_over_steps") == pytest.approx(3.2)
    assert attacks.effective_step(16, 1, 30, "max_eps_over_steps") == 1
    assert attacks.effective_step(16, 1, 5) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(eps=300), r"eps=300 .*\[0, 255\]"),
    (dict(eps=-1), r"eps=-1"),
    (dict(steps=-2), r"steps=-2"),
    (dict(steps=2.5), r"steps=2.5 .*integer"),
    (dict(clean_start_prob=1.5), r"clean_start_prob=1.5 .*\[0, 1\]"),
    (dict(bn_mode="train"), r"bn_mode='train'.*\['running', 'batch'\]"),
    (dict(step_rule="adaptive"), r"step_rule='adaptive'"),
    (dict(restarts=0), r"restarts=0"),
    (dict(num_classes=None), r"num_classes=None"),
])
def test_bad_attack_arguments_are_rejected_before_compute(kwargs, message):
    model = fmnist_model()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    call = dict(num_classes=kwargs.pop("num_classes", 10))
    with pytest.raises(ValueError, match=message):
        attacks.pgd(model, torch.rand(2, 1, 28, 28), torch.tensor([0, 1]), attacks.Attack(**kwargs), **call)
    assert not calls
