import copy

import pytest
import torch
from torch import nn

from advkit import models, norm
from advkit.norm import MixtureBatchNorm2d


def _mbn_with_different_branches():
    mbn = MixtureBatchNorm2d(3)
    with torch.no_grad():
        mbn.clean.running_mean.fill_(1.0)
        mbn.adv.running_mean.fill_(-1.0)
    return mbn


def test_branch_selection_works_in_eval_and_train_mode():
    mbn = _mbn_with_different_branches().eval()
    x = torch.zeros(2, 3, 4, 4)
    with norm.use_branch(mbn, "clean"):
        assert torch.allclose(mbn(x), torch.full_like(x, -1.0), atol=1e-4)
    with norm.use_branch(mbn, "adv"):
        assert torch.allclose(mbn(x), torch.full_like(x, 1.0), atol=1e-4)
    # training mode: only the selected branch's statistics move
    mbn.train()
    before = {k: v.clone() for k, v in mbn.state_dict().items()}
    norm.set_branch(mbn, "clean")
    mbn(torch.randn(8, 3, 4, 4) + 5)
    after = mbn.state_dict()
    assert not torch.equal(after["clean.running_mean"], before["clean.running_mean"])
    assert torch.equal(after["adv.running_mean"], before["adv.running_mean"])
    assert after["clean.num_batches_tracked"] == 1 and after["adv.num_batches_tracked"] == 0


def test_use_branch_restores_previous_branch_and_rejects_unknown():
    model = models.build_model("small_resnet8", 10, "mbn", in_channels=1, mean=(0.5,), std=(0.5,))
    norm.set_branch(model, "clean")
    with norm.use_branch(model, "adv"):
        assert norm.get_branch(model) == "adv"
    assert norm.get_branch(model) == "clean"
    with pytest.raises(ValueError, match=r"branch='mixed'.*\['clean', 'adv'\]"):
        norm.set_branch(model, "mixed")


def test_state_dict_keys_are_stable():
    keys = list(MixtureBatchNorm2d(4).state_dict())
    assert keys == [f"{b}.{k}" for b in ("clean", "adv")
                    for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def test_plain_bn_checkpoint_loads_into_both_branches():
    torch.manual_seed(0)
    bn_model = models.build_model("small_resnet8", 10, "bn", in_channels=1, mean=(0.5,), std=(0.5,))
    bn_model.train()
    bn_model(torch.rand(16, 1, 28, 28))  # move running statistics away from their init
    for p in bn_model.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    mbn_model = models.build_model("small_resnet8", 10, "mbn", in_channels=1, mean=(0.5,), std=(0.5,))
    mbn_model.load_state_dict(bn_model.state_dict())
    bn_model.eval(), mbn_model.eval()
    x = torch.rand(4, 1, 28, 28)
    for branch in norm.BRANCHES:
        with norm.use_branch(mbn_model, branch):
            assert torch.allclose(mbn_model(x), bn_model(x), atol=1e-5)
    sd = mbn_model.state_dict()
    assert torch.equal(sd["net.bn1.clean.running_var"], sd["net.bn1.adv.running_var"])
    assert sd["net.bn1.clean.running_var"].data_ptr() != sd["net.bn1.adv.running_var"].data_ptr()


def test_convert_bn_to_mbn_keeps_the_function():
    torch.manual_seed(0)
    model = models.build_model("small_resnet8", 10, "bn", in_channels=1, mean=(0.5,), std=(0.5,))
    model.train()
    model(torch.rand(16, 1, 28, 28))
    model.eval()
    x = torch.rand(4, 1, 28, 28)
    expected = model(x)
    converted = norm.convert_bn_to_mbn(model)
    assert norm.has_mixture_bn(converted)
    assert not any(type(m) is nn.BatchNorm2d and not isinstance(p, MixtureBatchNorm2d)
                   for p in converted.modules() for m in p.children())
    for branch in norm.BRANCHES:
        with norm.use_branch(converted, branch):
            assert torch.allclose(converted(x), expected, atol=1e-5)



def test_converted_layers_keep_the_dtype_and_frozen_parameters():
    """BN -> MBN and SyncBN -> BN keep a float64 model float64 (it used to become float32 and fail in the forward)
    and keep frozen parameters frozen."""
    model = models.build_model("small_resnet8", 10, "bn", in_channels=1, mean=(0.5,), std=(0.5,)).double().eval()
    model.net.bn1.weight.requires_grad_(False)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    expected = model(x)
    mbn = norm.convert_bn_to_mbn(model)
    assert {p.dtype for p in mbn.parameters()} == {torch.float64}
    assert not any(p.requires_grad for p in mbn.net.bn1.parameters())
    assert all(p.requires_grad for p in mbn.net.layer1.parameters())
    torch.testing.assert_close(mbn(x), expected)


def test_without_sync_batchnorm_gives_a_plain_copy_and_leaves_the_model_alone():
    model = models.build_model("small_resnet8", 10, "bn", in_channels=1, mean=(0.5,), std=(0.5,)).train()
    model(torch.rand(16, 1, 28, 28))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()  # converts in place
    plain = norm.without_sync_batchnorm(synced)
    assert norm.without_sync_batchnorm(model) is model  # nothing to convert: no copy
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in plain.modules())
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())  # the run's own model keeps its layers
    assert norm.norm_layer_names(plain) == norm.norm_layer_names(model.eval())
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(plain(x), synced(x))
    assert all(torch.equal(v, synced.state_dict()[k]) for k, v in plain.state_dict().items())


def test_convert_bn_to_mbn_gives_a_torchvision_model_two_branches_that_train_apart():
    import torchvision

    model = norm.convert_bn_to_mbn(torchvision.models.resnet18(num_classes=10))
    assert norm.has_mixture_bn(model) and len(norm.batch_norms(model, "adv")) == 20  # resnet18's 20 BNs
    first = model.bn1
    with norm.use_branch(model, "clean"):
        model.train()(torch.rand(4, 3, 32, 32))
    assert not torch.equal(first.clean.running_mean, first.adv.running_mean)  # only MBN_clean saw the batch


def test_group_norm_takes_the_largest_group_count_that_divides_the_channels():
    assert norm.group_count(64) == 32 and norm.group_count(16) == 16 and norm.group_count(48) == 24
    model = models.build_model("small_resnet8", 10, "gn", in_channels=1, mean=(0.5,), std=(0.5,))
    gns = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert gns and not norm.batch_norms(model)
    assert all(g.num_channels % g.num_groups == 0 and g.num_groups <= 32 for g in gns)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_running_stats_mode_freezes_statistics_but_trains_affine():
    torch.manual_seed(0)
    model = models.build_model("small_resnet8", 10, "mbn", in_channels=1, mean=(0.5,), std=(0.5,))
    model.train()
    model(torch.rand(16, 1, 28, 28))  # non-trivial running statistics
    norm.use_running_stats(model)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    x = torch.rand(8, 1, 28, 28)
    out = model(x)
    out.sum().backward()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in buffers.items())
    assert model.net.bn1.adv.weight.grad is not None and model.net.conv1.weight.grad is not None
    model.eval()
    assert torch.allclose(model(x), out, atol=1e-6)  # same as inference
    model.train()
    assert all(bn.training for bn in norm.batch_norms(model))  # train() switches back to batch statistics


def test_freeze_all_but_bn_and_per_branch():
    model = models.build_model("small_resnet8", 10, "mbn", in_channels=1, mean=(0.5,), std=(0.5,))
    trainable = norm.freeze_all_but_bn(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(names) > 0
    assert all(".clean." in n or ".adv." in n for n in names)
    norm.freeze_all_but_bn(model, branch="clean")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".clean." in n for n in names)
    assert len(norm.bn_parameters(model, "adv")) == len(norm.bn_parameters(model, "clean"))
