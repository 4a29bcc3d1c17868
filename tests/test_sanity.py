"""Mutation suite for the sanity checks: every deliberately broken attack, patched into :mod:`advkit.attacks`, must
fail at least one check (all the checks named beside it), and the unbroken kit must pass them all. A check that no
mutant fails proves nothing."""

from __future__ import annotations

import contextlib
import copy

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from advkit import attacks, config, data, evaluate, norm


def sanity(model: torch.nn.Module, undefended: bool) -> pd.DataFrame:
    """sanity.csv of ``model`` as a `test`-preset run makes it (32 images, eps 16, step 4, every MBN branch), with
    PGD-1/2/5: on the sampled images PGD-3 at step 4 left the undefended model right on 2 of 32, above the check's
    5%; PGD-5 passes it. A clean-trained run if ``undefended``."""
    strategy = dict(adv_ratio=0, clean_ratio=1.0) if undefended else {}
    return evaluate.sanity_for_run(model, config.make_config("test", name="sanity", eval_checkpoints=[1, 2, 5],
                                                             **strategy))


@pytest.fixture(scope="module")
def mbn_model(clean_trained_model) -> torch.nn.Module:
    """The clean-trained model as Mixture BN, then 8 steps of 100% adv + 100% clean training (Section 4.2): its
    two branches now hold different statistics and weights."""
    model = norm.convert_bn_to_mbn(copy.deepcopy(clean_trained_model))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for batch in data.make_loader("fashion-mnist", "train", 64, n=512, seed=1):
        x, y = data.to_device(batch, "cpu")
        with norm.use_branch(model, "adv"):
            x_adv = attacks.pgd(model, x, y, attacks.Attack(eps=16, step=8, steps=2), num_classes=10, generator=generator)
            model.train()
            loss = F.cross_entropy(model(x_adv), y)
        with norm.use_branch(model, "clean"):
            loss = loss + F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


# ---- the mutants: each replaces one function of advkit.attacks with a broken version ----

def targeted_step_flipped(monkeypatch):
    real = attacks.pgd_iterations

    def mutant(model, images, goal, start, eps, step, steps, targeted, on_logits=None):
        return real(model, images, goal, start, eps, step, steps, False, on_logits)  # ascends the target's loss

    monkeypatch.setattr(attacks, "pgd_iterations", mutant)


def untargeted_step_flipped(monkeypatch):
    real = attacks.pgd_iterations

    def mutant(model, images, goal, start, eps, step, steps, targeted, on_logits=None):
        return real(model, images, goal, start, eps, step, steps, True, on_logits)  # untargeted: descends the loss

    monkeypatch.setattr(attacks, "pgd_iterations", mutant)


def no_projection(monkeypatch):
    real = attacks.pgd_iterations

    def mutant(model, images, goal, start, eps, step, steps, targeted, on_logits=None):
        return real(model, images, goal, start, 1.0, step, steps, targeted, on_logits)  # a ball holding all of [0, 1]

    monkeypatch.setattr(attacks, "pgd_iterations", mutant)


def no_clamp_to_pixel_range(monkeypatch):
    def mutant(model, images, goal, start, eps, step, steps, targeted, on_logits=None):
        x = start.detach()
        for i in range(steps):
            x.requires_grad_(True)
            logits = model(x)
            if on_logits is not None:
                on_logits(i, logits.detach())
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, goal, reduction="sum"), x)
            x = x.detach() + (-step if targeted else step) * grad.sign()
            x = torch.minimum(torch.maximum(x, images - eps), images + eps)  # the eps-cube only
        return x.detach()

    monkeypatch.setattr(attacks, "pgd_iterations", mutant)


def eps_scaled_by(scale: float):
    """attack_once with eps converted from the 0-255 scale by ``scale`` instead of 1/255."""

    def patch(monkeypatch):
        def mutant(model, images, labels, attack, *, num_classes, targets, generator, on_logits=None):
            goal = labels if not attack.targeted else attacks.random_targets(labels, num_classes, generator)
            start = attacks.random_start(images, attack.eps * scale, attack.clean_start_prob, attack.start_per_example,
                                         generator)
            return attacks.pgd_iterations(model, images, goal, start, attack.eps * scale, attack.step_taken / 255.0,
                                          attack.steps, attack.targeted, on_logits)

        monkeypatch.setattr(attacks, "attack_once", mutant)

    return patch


def no_random_start(monkeypatch):
    monkeypatch.setattr(attacks, "random_start", lambda images, eps, *args, **kwargs: images.clone())


def other_mbn_branch(monkeypatch):
    real = attacks.attack_mode

    @contextlib.contextmanager
    def mutant(model, *args, **kwargs):
        other = {"clean": "adv", "adv": "clean"}[norm.get_branch(model)]
        with norm.use_branch(model, other), real(model, *args, **kwargs) as attacked:
            yield attacked

    monkeypatch.setattr(attacks, "attack_mode", mutant)


def train_mode(monkeypatch):
    @contextlib.contextmanager
    def mutant(model, bn_mode="running", fold_bn=False, compile_attack=False):
        training = {m: m.training for m in model.modules()}
        model.train()  # BN on batch statistics, and every forward pass updates the running ones
        try:
            yield model
        finally:
            for m, flag in training.items():
                m.training = flag

    monkeypatch.setattr(attacks, "attack_mode", mutant)


EPS_BALL, PIXEL_RANGE, BUDGET = ("adversarial examples lie in the eps-ball", "adversarial examples lie in [0, 1]",
                                "the perturbation uses the budget")
START = "random start: the documented uniform draw in the eps-cube"
TARGETED = "targeted: the target's log-probability rises"
SAME_MODEL, UNCHANGED, EPS_0 = ("the attack runs the evaluated model", "the model is left unchanged",
                                "eps 0 gives clean accuracy")
ORACLE = "agrees with a plain targeted PGD (same targets, starts)"
TORCHATTACKS = "agrees with torchattacks (untargeted)"
UNDEFENDED = "undefended model falls to ~0% (untargeted)"

# name: (mutant, model, the checks that must all fail on it); together they name every check
MUTANTS = {
    "targeted-step-flipped": (targeted_step_flipped, "bn", {TARGETED, ORACLE}),
    "untargeted-step-flipped": (untargeted_step_flipped, "bn", {TORCHATTACKS, UNDEFENDED}),
    "no-projection-onto-eps-ball": (no_projection, "bn", {EPS_BALL, EPS_0}),
    "no-clamp-to-0-1": (no_clamp_to_pixel_range, "bn", {PIXEL_RANGE}),
    "eps-not-divided-by-255": (eps_scaled_by(1.0), "bn", {EPS_BALL, START}),
    "eps-divided-by-255-twice": (eps_scaled_by(1 / 255**2), "bn", {BUDGET, START}),
    "no-random-start": (no_random_start, "bn", {START}),
    "attack-through-other-mbn-branch": (other_mbn_branch, "mbn", {SAME_MODEL}),
    "model-in-train-mode": (train_mode, "bn", {SAME_MODEL, UNCHANGED}),
    "model-in-train-mode-mbn": (train_mode, "mbn", {SAME_MODEL, UNCHANGED}),
}


@pytest.fixture
def models(clean_trained_model, mbn_model) -> dict[str, torch.nn.Module]:
    return {"bn": clean_trained_model, "mbn": mbn_model}


@pytest.mark.parametrize("kind", ["bn", "mbn"])
def test_the_unbroken_kit_passes_every_check(models, kind):
    table = sanity(models[kind], undefended=kind == "bn")
    assert table["passed"].all(), table.to_string()
    assert set(table["branch"]) == ({"-"} if kind == "bn" else {"clean", "adv"})
    if kind == "bn":  # every check is one that some mutant must fail
        assert set(table["check"]) == set().union(*(checks for _, _, checks in MUTANTS.values()))


@pytest.mark.parametrize("name", list(MUTANTS))
def test_every_mutant_fails_a_check(models, monkeypatch, name):
    mutate, kind, catchers = MUTANTS[name]
    model = models[kind]
    state = copy.deepcopy(model.state_dict())
    mutate(monkeypatch)
    try:
        table = sanity(model, undefended=kind == "bn")
    finally:
        model.load_state_dict(state)  # a mutant may have changed the shared model's buffers
    failed = set(table.loc[table["passed"] == False, "check"])  # noqa: E712
    assert failed, f"no check caught {name}:\n{table.to_string()}"
    assert catchers <= failed, f"{name}: {sorted(catchers - failed)} passed; failed: {sorted(failed)}"
