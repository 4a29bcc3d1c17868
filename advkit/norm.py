"""Normalization layers of the paper: Mixture BN (and BN -> MBN for any model), GroupNorm, running-statistics mode,
BN-only finetuning.

Mixture BN (Section 4.2) keeps one BatchNorm for clean and one for adversarial batches in every norm
position. The branch is a property of the whole model, selected with :func:`set_branch` or the
:func:`use_branch` context manager, and it applies in training *and* evaluation mode, so that either
MBN_clean or MBN_adv can be trained, evaluated and attacked.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from .validate import check_choice, check_range

BRANCHES = ("clean", "adv")
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class MixtureBatchNorm2d(nn.Module):
    """Two BatchNorm2d layers, ``clean`` and ``adv``; ``branch`` says which one normalises the input.

    state_dict keys are ``<prefix>.clean.{weight,bias,running_mean,running_var,num_batches_tracked}`` and the
    same under ``<prefix>.adv``. A plain BatchNorm2d state dict (``<prefix>.weight`` ...) loads by copying
    into both branches, so a BN checkpoint can start an MBN model.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, **kwargs) -> None:
        super().__init__()
        self.num_features = num_features
        self.clean = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, **kwargs)
        self.adv = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, **kwargs)
        self.branch = "adv"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adv(x) if self.branch == "adv" else self.clean(x)

    def branches(self) -> dict[str, nn.BatchNorm2d]:
        return {"clean": self.clean, "adv": self.adv}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        plain = [k for k in list(state_dict) if k.startswith(prefix) and "." not in k[len(prefix):]]
        if plain and not any(k.startswith(prefix + "clean.") for k in state_dict):
            for key in plain:
                value = state_dict.pop(key)
                name = key[len(prefix):]
                state_dict[f"{prefix}clean.{name}"] = value
                state_dict[f"{prefix}adv.{name}"] = value.clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, branch={self.branch!r}"


def set_branch(model: nn.Module, branch: str) -> None:
    """Route every MixtureBatchNorm2d of ``model`` through ``branch`` ('clean' or 'adv')."""
    check_choice("branch", branch, BRANCHES)
    for module in model.modules():
        if isinstance(module, MixtureBatchNorm2d):
            module.branch = branch


def get_branch(model: nn.Module) -> str | None:
    """The branch selected in ``model``'s Mixture BN layers, or None when it has none."""
    for module in model.modules():
        if isinstance(module, MixtureBatchNorm2d):
            return module.branch
    return None


@contextlib.contextmanager
def use_branch(model: nn.Module, branch: str) -> Iterator[nn.Module]:
    """Temporarily route ``model`` through one Mixture BN branch; restores the previous branch on exit."""
    check_choice("branch", branch, BRANCHES)
    previous = {m: m.branch for m in model.modules() if isinstance(m, MixtureBatchNorm2d)}
    set_branch(model, branch)
    try:
        yield model
    finally:
        for module, old in previous.items():
            module.branch = old


def has_mixture_bn(model: nn.Module) -> bool:
    return any(isinstance(m, MixtureBatchNorm2d) for m in model.modules())


NO_BRANCH = "-"  # the branch column of a model without Mixture BN


def evaluated_branches(model: nn.Module) -> list[str]:
    """The branches a model is evaluated through: both Mixture BN branches, or ``NO_BRANCH`` without MBN."""
    return list(BRANCHES) if has_mixture_bn(model) else [NO_BRANCH]


def through_branch(model: nn.Module, branch: str) -> contextlib.AbstractContextManager:
    """:func:`use_branch`, or nothing for ``NO_BRANCH``."""
    return contextlib.nullcontext(model) if branch == NO_BRANCH else use_branch(model, branch)


def batch_norms(model: nn.Module, branch: str | None = None) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``model``; with ``branch``, only that branch of each Mixture BN (plain BNs kept)."""
    if branch is not None:
        check_choice("branch", branch, BRANCHES)
    excluded: set[int] = set()
    if branch is not None:
        for module in model.modules():
            if isinstance(module, MixtureBatchNorm2d):
                other = module.adv if branch == "clean" else module.clean
                excluded.add(id(other))
    return [m for m in model.modules() if isinstance(m, _BN_TYPES) and id(m) not in excluded]


def _replace_modules(model: nn.Module, convert) -> nn.Module:
    """Return ``convert(model)`` if it converts, else convert the children in place and return ``model``."""
    new = convert(model)
    if new is not model:
        return new
    for name, child in model.named_children():
        setattr(model, name, _replace_modules(child, convert))
    return model


def _like(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` (to receive ``old``'s state) on ``old``'s device, in its dtype and train mode, its parameters frozen
    where ``old``'s are."""
    reference = next(old.parameters(), None)
    if reference is not None:
        new.to(device=reference.device, dtype=reference.dtype)
        for p in new.parameters():
            p.requires_grad_(reference.requires_grad)
    elif (buffer := next(old.buffers(), None)) is not None:
        new.to(buffer.device)
    return new.train(old.training)


def convert_bn_to_mbn(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a MixtureBatchNorm2d whose two branches start as copies of it."""

    def convert(module: nn.Module) -> nn.Module:
        if type(module) is not nn.BatchNorm2d:
            return module
        mbn = MixtureBatchNorm2d(
            module.num_features, eps=module.eps, momentum=module.momentum,
            affine=module.affine, track_running_stats=module.track_running_stats,
        )
        _like(mbn, module).load_state_dict(module.state_dict())
        return mbn

    return _replace_modules(model, convert)


def without_sync_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` itself when it has no SyncBatchNorm, else a copy in which each SyncBatchNorm is a BatchNorm2d
    holding its state (the inverse of ``nn.SyncBatchNorm.convert_sync_batchnorm``): a copy that one process can
    run on batch statistics without waiting for the others' all-reduce, and that the BN tools recognise."""
    if not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
        return model

    def convert(module: nn.Module) -> nn.Module:
        if not isinstance(module, nn.SyncBatchNorm):
            return module
        plain = nn.BatchNorm2d(module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
                               track_running_stats=module.track_running_stats)
        _like(plain, module).load_state_dict(module.state_dict())
        return plain

    return _replace_modules(copy.deepcopy(model), convert)


def group_count(num_channels: int, groups: int = 32) -> int:
    """The largest number of groups <= ``groups`` that divides ``num_channels`` (GN needs an exact split)."""
    check_range("groups", groups, 1, integer=True)
    for g in range(min(groups, num_channels), 0, -1):
        if num_channels % g == 0:
            return g
    return 1


def group_norm(num_channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with 32 groups by default, fewer where the channel count demands."""
    return nn.GroupNorm(group_count(num_channels, groups), num_channels)


def use_running_stats(model: nn.Module, enabled: bool = True) -> None:
    """Running-statistics mode (Section 4.3): BNs normalise with their running statistics and stop updating them.

    Affine parameters and every other layer keep training. Call it after ``model.train()``, which resets it
    (``model.train()`` puts BNs back into batch-statistics mode).
    """
    for bn in batch_norms(model):
        bn.train(not enabled and model.training)


def bn_parameters(model: nn.Module, branch: str | None = None) -> list[nn.Parameter]:
    """Affine parameters of every BN (of one Mixture BN ``branch`` if given)."""
    return [p for bn in batch_norms(model, branch) for p in bn.parameters(recurse=False)]


def freeze_all_but_bn(model: nn.Module, branch: str | None = None) -> list[nn.Parameter]:
    """BN-only finetuning (Section 4.4): only BN affine parameters (of ``branch``) keep ``requires_grad``.

    Returns the trainable parameters, to hand to the optimizer.
    """
    trainable = {id(p) for p in bn_parameters(model, branch)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return [p for p in model.parameters() if p.requires_grad]


def norm_layer_names(model: nn.Module) -> list[str]:
    """Module names of the BN and Mixture BN layers (an MBN counts once, not its two branches)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.BatchNorm2d, MixtureBatchNorm2d)) and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return names

def default_layer(model: nn.Module) -> str:
    """The paper's res3 (stem = stage 1, so torchvision's ``layer2``): first norm of its middle block."""
    names = [n for n in norm_layer_names(model) if ".layer2." in f".{n}"]
    if not names:
        raise ValueError("the model has no BN layer in a stage called 'layer2'; pass bnstats_layer explicitly")
    blocks = sorted({n.split("layer2.", 1)[1].split(".", 1)[0] for n in names}, key=int)
    middle = blocks[len(blocks) // 2]
    return next(n for n in names if f"layer2.{middle}." in n)
