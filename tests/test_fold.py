import pytest
import torch

from advkit import attacks, evaluate, fold, models, norm
from helpers import fmnist_model


def _randomize_statistics(model, seed=0):
    """BN statistics and affine values far from their initial 0/1, so a wrong fold cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in norm.batch_norms(model):
            bn.running_mean.copy_(torch.rand(bn.num_features, generator=g) * 2 - 1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 2 + 0.2)
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.rand(bn.num_features, generator=g) - 0.5)
    return model.eval()


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


ARCHITECTURES = [  # arch, norm kind, branch, input channels, image size
    ("small_resnet8", "bn", None, 1, 28),
    ("small_resnet20", "mbn", "adv", 1, 28),
    ("small_resnet20", "mbn", "clean", 1, 28),
    ("resnet50", "bn", None, 3, 64),
]


def _model_and_input(arch, norm_kind, branch, channels, size, dtype=torch.float32):
    torch.manual_seed(0)
    model = _randomize_statistics(models.build_model(arch, 10, norm_kind, in_channels=channels,
                                                     mean=(0.5,) * channels, std=(0.25,) * channels)).to(dtype)
    if branch:
        norm.set_branch(model, branch)
    x = torch.rand(4, channels, size, size, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    return model, x


@pytest.mark.parametrize("arch,norm_kind,branch,channels,size", ARCHITECTURES)
def test_folded_view_computes_the_same_function_and_leaves_the_model_alone(arch, norm_kind, branch, channels, size):
    """In float32 the outputs agree to rounding and the input gradients point the same way; entry by entry they
    differ where rounding moves a pre-activation across a ReLU's kink (resnet50 with these far-from-initial BN
    statistics: 18% of the entries beyond 1e-3 relative with 2 threads on an AMD EPYC, none with 1 thread), so the
    exact comparison of gradients is made in float64 (next test)."""
    model, x = _model_and_input(arch, norm_kind, branch, channels, size)
    before = _snapshot(model)
    view = fold.fold_batch_norms(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in view.modules())  # every conv -> BN pair folded
    out, out_view = model(x), view(x)
    torch.testing.assert_close(out_view, out, rtol=1e-4, atol=1e-4)
    grad, = torch.autograd.grad(out[:, 0].sum(), x)
    grad_view, = torch.autograd.grad(out_view[:, 0].sum(), x)
    assert torch.cosine_similarity(grad_view.flatten(), grad.flatten(), dim=0) > 0.999
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    own = {id(p) for p in model.parameters()}  # layers without a BN (fc) are the model's own, shared
    assert all(not p.requires_grad for p in view.parameters() if id(p) not in own)


@pytest.mark.parametrize("arch,norm_kind,branch,channels,size", ARCHITECTURES)
def test_in_float64_the_folded_outputs_and_gradients_are_exact(arch, norm_kind, branch, channels, size):
    """Exact to float64 rounding (seen: outputs 4e-12, gradients 4e-15 of their largest entry for resnet50): a
    fold that drops BN's eps fails here for every architecture (in float32 above, small_resnet8 lets it pass)."""
    model, x = _model_and_input(arch, norm_kind, branch, channels, size, torch.float64)
    out, out_view = model(x), fold.fold_batch_norms(model)(x)
    grad, = torch.autograd.grad(out[:, 0].sum(), x)
    grad_view, = torch.autograd.grad(out_view[:, 0].sum(), x)
    torch.testing.assert_close(out_view, out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_view, grad, rtol=1e-10, atol=1e-12 * grad.abs().max().item())


def test_the_view_follows_later_weight_changes_and_the_selected_branch():
    model = _randomize_statistics(fmnist_model("small_resnet8", "mbn"))
    x = torch.rand(4, 1, 28, 28)
    norm.set_branch(model, "adv")
    first = fold.fold_batch_norms(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
        model.net.bn1.adv.running_var.mul_(3)
    again = fold.fold_batch_norms(model)
    assert again is first  # the trace is reused; only the weights are folded again
    torch.testing.assert_close(again(x), model(x), rtol=1e-4, atol=1e-4)
    norm.set_branch(model, "clean")
    clean_view = fold.fold_batch_norms(model)
    torch.testing.assert_close(clean_view(x), model(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(clean_view(x), first(x))  # the branches differ, and each view follows its own


def test_the_view_follows_the_model_to_another_dtype():
    """``model.to`` replaces buffers and casts parameters in place: the cached trace must not keep the old ones
    (it raised a dtype error after ``.double()``)."""
    model = _randomize_statistics(fmnist_model("small_resnet8", "bn"))
    fold.fold_batch_norms(model)(torch.rand(2, 1, 28, 28))
    model.double()
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(fold.fold_batch_norms(model)(x), model(x))


def test_nothing_is_folded_for_group_norm_or_batch_statistics():
    gn = fmnist_model("small_resnet8", "gn").eval()
    assert fold.fold_batch_norms(gn) is gn
    bn = fmnist_model("small_resnet8", "bn")
    with attacks.attack_mode(bn, "batch", fold_bn=True) as attacked:
        assert attacked is bn
    with attacks.attack_mode(bn, "running", fold_bn=True) as attacked:
        assert attacked is not bn
    assert bn.training  # attack_mode restored the flag


@pytest.mark.parametrize("branch", [None, "adv", "clean"])
def test_folded_and_unfolded_attacks_agree_on_a_trained_model(clean_trained_model, fmnist_test, branch):
    """Adversarial images are identical except for the few examples where a gradient entry is so close to zero that
    float rounding flips its sign; that example's path then drifts (seen: 2-3 of 128 examples, 1-55 of their
    784 pixels). A fold of the wrong branch moves all 128. Accuracy agrees exactly here."""
    x, y = fmnist_test[0][:128], fmnist_test[1][:128]
    model = clean_trained_model
    if branch:  # an MBN model started from the trained BN weights, its branches made different
        state = model.state_dict()
        model = fmnist_model("small_resnet8", "mbn")
        model.load_state_dict(state)
        with torch.no_grad():
            model.net.bn1.clean.running_var.mul_(2)
        norm.set_branch(model.eval(), branch)
    kw = dict(eps=16, step=1, steps=10)
    folded = attacks.pgd(model, x, y, attacks.Attack(fold_bn=True, **kw), num_classes=10,
                         generator=torch.Generator().manual_seed(0))
    plain = attacks.pgd(model, x, y, attacks.Attack(fold_bn=False, **kw), num_classes=10,
                        generator=torch.Generator().manual_seed(0))
    drifted = ((folded - plain).abs() >= 1e-6).flatten(1).any(1)
    assert drifted.float().mean().item() <= 0.05
    with torch.no_grad():
        assert torch.equal(model(folded).argmax(1) == y, model(plain).argmax(1) == y)
    final_folded, _ = evaluate.curve_batch(model, x, y, attacks.Attack(eps=16, step=1), checkpoints=[3, 10], num_classes=10)
    final_plain, _ = evaluate.curve_batch(model, x, y, attacks.Attack(eps=16, step=1, fold_bn=False), checkpoints=[3, 10], num_classes=10)
    assert torch.equal(final_folded.float().mean(1), final_plain.float().mean(1))


def test_a_compiled_attack_matches_and_follows_weight_changes(fmnist_test):
    x, y = fmnist_test[0][:32], fmnist_test[1][:32]
    model = _randomize_statistics(fmnist_model())
    attack = lambda **extra: attacks.pgd(model, x, y, attacks.Attack(eps=16, step=1, steps=3, **extra), num_classes=10,
                                         generator=torch.Generator().manual_seed(0))
    same = lambda a, b: ((a - b).abs() < 1e-6).float().mean().item()
    first = attack(compile=True)
    assert same(first, attack()) > 0.999
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.05)
    changed = attack(compile=True)  # the compiled view reads the refolded weights
    assert same(changed, attack()) > 0.999 and same(changed, first) < 0.99
