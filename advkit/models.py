"""ResNets of the paper built from torchvision's blocks, with a pluggable norm layer (BN, Mixture BN, GroupNorm).

Two families:

* ``resnet{50,101,152,200,338,518,638}``: the ImageNet bottleneck ResNets (7x7 stem, max-pool, 4 stages) of
  the paper's Section 5, "exploring the impact of network capacity". The paper gives only block totals for the deep ones (ResNet-338/518/638 have 112/172/212 blocks,
  depth = 3 x blocks + 2). **Assumption of this kit**: stages 1 and 4 keep 3 blocks, and the rest is
  split between stages 2 and 3 in ResNet-200's 2:3 ratio: 338 = [3, 42, 64, 3], 518 = [3, 66, 100, 3],
  638 = [3, 82, 124, 3]. Pass ``blocks=[...]`` to build another split.
* ``small_resnet{8,14,20,26,32,44,56,110}``: the 6n+2 basic-block ResNets for 28-32 px images (3x3 stem,
  no max-pool, 3 stages of widths 16/32/64 x ``width_multiplier``), for any number of input channels.

Every model starts with a :class:`Normalize` layer: it takes images in [0, 1], so attacks work in pixel space.
``zero_init_residual``: the last norm layer of every residual block starts with a zero scale (the original
pipeline's choice for 110-epoch ImageNet runs, which keeps very deep networks trainable); the kit's config turns
it on for the ImageNet ResNets and off for the small ones, where on a short run it cost about 10 points of clean
accuracy (issue 15's measurement).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet, conv1x1, conv3x3

from .norm import MixtureBatchNorm2d, group_norm
from .validate import check_choice, check_range

IMAGENET_BLOCKS: dict[int, list[int]] = {
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
    200: [3, 24, 36, 3],
    338: [3, 42, 64, 3],
    518: [3, 66, 100, 3],
    638: [3, 82, 124, 3],
}
SMALL_DEPTHS = (8, 14, 20, 26, 32, 44, 56, 110)
NORMS = ("bn", "mbn", "gn")
ARCHS = tuple(f"resnet{d}" for d in IMAGENET_BLOCKS) + tuple(f"small_resnet{d}" for d in SMALL_DEPTHS)


class Normalize(nn.Module):
    """(x - mean) / std per channel: the model's first layer, so inputs stay in [0, 1] pixel space."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def norm_layer(norm: str, gn_groups: int = 32) -> Callable[[int], nn.Module]:
    """A factory ``channels -> norm module`` for ``norm`` in ('bn', 'mbn', 'gn')."""
    check_choice("norm", norm, NORMS)
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "mbn":
        return MixtureBatchNorm2d
    check_range("gn_groups", gn_groups, 1, integer=True)
    return lambda channels: group_norm(channels, gn_groups)


def _zero_init_last_norm(model: nn.Module) -> None:
    for block in model.modules():
        last = getattr(block, "bn3", None) if isinstance(block, Bottleneck) else (
            getattr(block, "bn2", None) if isinstance(block, BasicBlock) else None)
        if last is None:
            continue
        for m in last.modules():
            if getattr(m, "weight", None) is not None:
                nn.init.zeros_(m.weight)


def resnet(
    depth: int,
    num_classes: int = 1000,
    norm: str = "bn",
    *,
    blocks: Sequence[int] | None = None,
    in_channels: int = 3,
    gn_groups: int = 32,
    zero_init_residual: bool = True,
) -> ResNet:
    """ImageNet bottleneck ResNet-``depth`` (torchvision's ResNet with our norm layer), without input normalisation."""
    if blocks is None:
        check_choice("depth", depth, list(IMAGENET_BLOCKS))
        blocks = IMAGENET_BLOCKS[depth]
    else:
        blocks = list(blocks)
        if len(blocks) != 4 or any(not isinstance(b, int) or b < 1 for b in blocks):
            raise ValueError(f"blocks={blocks!r} is not accepted; give 4 positive block counts, one per stage")
    net = ResNet(Bottleneck, list(blocks), num_classes=num_classes, norm_layer=norm_layer(norm, gn_groups))
    if in_channels != 3:  # torchvision initialised the replaced conv1 (Kaiming); the new one alike
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    if zero_init_residual:
        _zero_init_last_norm(net)
    return net


def small_resnet(
    depth: int,
    num_classes: int = 10,
    norm: str = "bn",
    *,
    in_channels: int = 3,
    width_multiplier: int = 1,
    gn_groups: int = 32,
    zero_init_residual: bool = True,
) -> nn.Sequential:
    """6n+2 basic-block ResNet for small images: stem, 3 stages (stride 1, 2, 2), global pool, linear."""
    check_choice("depth", depth, SMALL_DEPTHS)
    check_range("width_multiplier", width_multiplier, 1, integer=True)
    check_range("in_channels", in_channels, 1, integer=True)
    make_norm = norm_layer(norm, gn_groups)
    n = (depth - 2) // 6
    widths = [16 * width_multiplier, 32 * width_multiplier, 64 * width_multiplier]
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=conv3x3(in_channels, widths[0]), bn1=make_norm(widths[0]), relu=nn.ReLU(inplace=True))
    inplanes = widths[0]
    for stage, (planes, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
        stage_blocks = []
        for i in range(n):
            s = stride if i == 0 else 1
            downsample = None
            if s != 1 or inplanes != planes:
                downsample = nn.Sequential(conv1x1(inplanes, planes, s), make_norm(planes))
            stage_blocks.append(BasicBlock(inplanes, planes, s, downsample, norm_layer=make_norm))
            inplanes = planes
        layers[f"layer{stage}"] = nn.Sequential(*stage_blocks)
    layers.update(avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(inplanes, num_classes))
    net = nn.Sequential(layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if zero_init_residual:
        _zero_init_last_norm(net)
    return net


def build_model(
    arch: str,
    num_classes: int,
    norm: str = "bn",
    *,
    in_channels: int = 3,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    width_multiplier: int = 1,
    blocks: Sequence[int] | None = None,
    gn_groups: int = 32,
    zero_init_residual: bool = True,
) -> nn.Sequential:
    """``Normalize(mean, std)`` followed by the ResNet named ``arch`` (see :data:`ARCHS`)."""
    check_choice("arch", arch, ARCHS)
    check_choice("norm", norm, NORMS)
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries; in_channels={in_channels} needs one each")
    depth = int(arch.rsplit("resnet", 1)[1])
    if arch.startswith("small_"):
        if blocks is not None:
            raise ValueError(f"blocks={blocks!r} applies to the ImageNet ResNets only, not arch={arch!r}")
        net = small_resnet(depth, num_classes, norm, in_channels=in_channels, width_multiplier=width_multiplier,
                           gn_groups=gn_groups, zero_init_residual=zero_init_residual)
    else:
        if width_multiplier != 1:
            raise ValueError(f"width_multiplier={width_multiplier} applies to the small ResNets only, not "
                             f"arch={arch!r}")
        net = resnet(depth, num_classes, norm, blocks=blocks, in_channels=in_channels, gn_groups=gn_groups,
                     zero_init_residual=zero_init_residual)
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=net))


def count_layers(model: nn.Module) -> int:
    """Weighted layers (convolutions + linear) on the main path, the way ResNet depths are counted."""
    convs = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    shortcuts = sum(1 for name, m in model.named_modules() if name.endswith("downsample.0"))
    return convs - shortcuts


def weights_digest(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of every parameter and buffer: names, dtypes, shapes and values. It names the
    exact state a number was computed from, so saved evaluation results are reused only for the same weights."""
    return state_digest(model.state_dict())


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """:func:`weights_digest` of a state dict (a checkpoint's ``model``), without building the model."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]
