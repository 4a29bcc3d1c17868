import pytest
import torch
from torch import nn

from advkit import models, norm
from advkit.norm import MixtureBatchNorm2d


@pytest.mark.parametrize("depth", sorted(models.IMAGENET_BLOCKS))
def test_imagenet_resnets_have_the_paper_depth(depth):
    with torch.device("meta"):
        net = models.resnet(depth, 1000)
    assert models.count_layers(net) == depth
    assert sum(models.IMAGENET_BLOCKS[depth]) == (depth - 2) // 3


def test_resnet200_and_deep_block_totals_follow_the_paper():
    assert models.IMAGENET_BLOCKS[200] == [3, 24, 36, 3]
    assert {d: sum(models.IMAGENET_BLOCKS[d]) for d in (338, 518, 638)} == {338: 112, 518: 172, 638: 212}


def test_explicit_block_list_is_used():
    with torch.device("meta"):
        net = models.resnet(0, 10, blocks=[1, 2, 3, 1])
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == [1, 2, 3, 1]
    with pytest.raises(ValueError, match="blocks"):
        models.resnet(0, 10, blocks=[1, 2, 3])


@pytest.mark.parametrize("depth", models.SMALL_DEPTHS)
def test_small_resnets_have_their_depth(depth):
    with torch.device("meta"):
        net = models.small_resnet(depth, 10, in_channels=1)
    assert models.count_layers(net) == depth


@pytest.mark.parametrize("norm_name, kind", [("bn", nn.BatchNorm2d), ("mbn", MixtureBatchNorm2d), ("gn", nn.GroupNorm)])
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_small_resnet_forward_any_channels_and_norm(norm_name, kind, channels, size):
    model = models.build_model("small_resnet8", 10, norm_name, in_channels=channels,
                               mean=[0.5] * channels, std=[0.25] * channels)
    out = model(torch.rand(4, channels, size, size))
    assert out.shape == (4, 10)
    assert any(isinstance(m, kind) for m in model.modules())
    if norm_name != "bn":
        assert not any(type(m) is nn.BatchNorm2d for m in model.net.children())


@pytest.mark.parametrize("norm_name", models.NORMS)
def test_imagenet_resnet50_forward(norm_name):
    model = models.build_model("resnet50", 7, norm_name)
    model.eval()
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 7)


def test_normalize_is_the_first_layer_and_uses_mean_std():
    model = models.build_model("small_resnet8", 10, in_channels=1, mean=(0.25,), std=(0.5,))
    first = next(iter(model.children()))
    assert isinstance(first, models.Normalize)
    assert torch.allclose(first(torch.full((1, 1, 2, 2), 0.75)), torch.ones(1, 1, 2, 2))


def test_residual_branches_start_at_zero_scale():
    model = models.build_model("small_resnet8", 10, "mbn", in_channels=1, mean=(0.5,), std=(0.5,))
    block = model.net.layer1[0]
    assert torch.all(block.bn2.clean.weight == 0) and torch.all(block.bn2.adv.weight == 0)
    assert torch.all(block.bn1.clean.weight == 1)


@pytest.mark.parametrize("kwargs, param", [
    (dict(arch="resnet51", num_classes=10), "arch"),
    (dict(arch="resnet50", num_classes=10, norm="ln"), "norm"),
    (dict(arch="small_resnet20", num_classes=10, blocks=[1, 1, 1, 1]), "blocks"),
    (dict(arch="small_resnet20", num_classes=10, in_channels=1), "mean/std"),
])
def test_bad_model_arguments_name_the_parameter(kwargs, param):
    with pytest.raises(ValueError, match=param):
        models.build_model(**kwargs)


def test_small_resnet_unknown_depth_lists_accepted_values():
    with pytest.raises(ValueError, match=r"depth=21 .*\[8, 14, 20"):
        models.small_resnet(21)


@pytest.mark.parametrize("arch, dataset, setting, zero", [
    ("small_resnet8", "fashion-mnist", None, False),  # the small ResNets: off unless asked for
    ("small_resnet8", "fashion-mnist", True, True),
    ("resnet50", "imagenet", None, True),  # the ImageNet ResNets: on, as the original pipeline
    ("resnet50", "imagenet", False, False),
])
def test_zero_init_of_the_last_norm_in_each_block_follows_the_config(arch, dataset, setting, zero):
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from advkit import config, train

    cfg = config.make_config("test", arch=arch, dataset=dataset, zero_init_residual=setting)
    model = train.build_model(cfg)
    lasts = [b.bn3 if isinstance(b, Bottleneck) else b.bn2 for b in model.modules()
             if isinstance(b, (Bottleneck, BasicBlock))]
    assert lasts and cfg.zero_init is zero
    assert all(bool((bn.weight == 0).all()) is zero for bn in lasts)


def test_an_imagenet_resnets_replaced_first_conv_gets_kaiming_init():
    """in_channels != 3 replaced conv1 after torchvision's init: it kept PyTorch's default (std ~0.08)."""
    torch.manual_seed(0)
    net = models.resnet(50, 10, in_channels=1, zero_init_residual=False)
    expected = (2 / (64 * 7 * 7)) ** 0.5  # Kaiming normal, fan_out, ReLU
    assert abs(net.conv1.weight.std().item() - expected) < 0.1 * expected


def test_width_multiplier_is_refused_for_the_imagenet_resnets():
    with pytest.raises(ValueError, match=r"width_multiplier=2 applies to the small ResNets only"):
        models.build_model("resnet50", 10, width_multiplier=2)
