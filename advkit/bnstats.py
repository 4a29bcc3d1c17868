"""BN statistics of Figures 5 and 6, as tidy tables.

- Figure 5: running mean and variance of MBN_clean against MBN_adv on sampled channels of one norm layer.
- Figure 6: batch mean and variance of two random mini-batches of adversarial images (BNs on batch statistics,
  as in training) against the running statistics of the same layer.

Variance convention: PyTorch keeps the *unbiased* batch variance in ``running_var`` but normalises with the
*biased* one. Batch variances are reported both ways (``var`` unbiased, comparable with ``running_var``;
``var_biased``, what the layer divides by); the ``convention`` column says which.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pandas as pd
import torch
from torch import nn

from . import attacks, data, distributed, norm
from .device import resolve_rank_device
from .norm import MixtureBatchNorm2d, default_layer, norm_layer_names

_NORMS = (nn.BatchNorm2d, MixtureBatchNorm2d)


def _layer(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if layer not in modules or not isinstance(modules[layer], _NORMS):
        raise ValueError(f"bnstats_layer={layer!r} is not accepted; BN layers of this model: "
                         f"{norm_layer_names(model)[:6]} ... ({len(norm_layer_names(model))} in all)")
    return modules[layer]


def sample_channels(num_features: int, k: int, seed: int = 0) -> list[int]:
    """``k`` channels drawn without replacement (seeded), sorted."""
    k = min(k, num_features)
    return sorted(torch.randperm(num_features, generator=torch.Generator().manual_seed(seed))[:k].tolist())


def _bn_of(module: nn.Module, branch: str) -> nn.BatchNorm2d:
    return module.branches()[branch] if isinstance(module, MixtureBatchNorm2d) else module


def running_statistics(model: nn.Module, layer: str, channels: list[int]) -> pd.DataFrame:
    """Running mean and (unbiased) variance of ``layer`` on ``channels``, per MBN branch (Figure 5)."""
    module = _layer(model, layer)
    branches = list(norm.BRANCHES) if isinstance(module, MixtureBatchNorm2d) else ["-"]
    rows = []
    for branch in branches:
        bn = _bn_of(module, branch)
        for c in channels:
            rows.append(dict(branch=branch, channel=c, source="running", statistic="mean",
                             value=bn.running_mean[c].item(), convention="running"))
            rows.append(dict(branch=branch, channel=c, source="running", statistic="var",
                             value=bn.running_var[c].item(), convention="unbiased"))
    return pd.DataFrame(rows).assign(layer=layer)


def batch_statistics(model: nn.Module, layer: str, images: torch.Tensor, channels: list[int],
                     source: str = "batch") -> pd.DataFrame:
    """Mean and variance (unbiased and biased) of ``layer``'s input over one batch, every BN on batch statistics
    as in training; running buffers are left untouched."""
    module = _layer(model, layer)
    captured = {}
    handle = module.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0].detach().float()))
    try:
        with torch.no_grad(), attacks.attack_mode(model, "batch"):
            model(images)
    finally:
        handle.remove()
    x = captured["x"].transpose(0, 1).flatten(1)  # channels x (N*H*W)
    mean, var, var_biased = x.mean(1), x.var(1, unbiased=True), x.var(1, unbiased=False)
    rows = []
    for c in channels:
        rows += [dict(channel=c, source=source, statistic="mean", value=mean[c].item(), convention="batch"),
                 dict(channel=c, source=source, statistic="var", value=var[c].item(), convention="unbiased"),
                 dict(channel=c, source=source, statistic="var_biased", value=var_biased[c].item(),
                      convention="biased")]
    return pd.DataFrame(rows).assign(layer=layer)


def figure_statistics(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    num_classes: int,
    layer: str | None = None,
    channels: int = 20,
    seed: int = 0,
    attack: attacks.Attack = attacks.Attack(),
) -> pd.DataFrame:
    """Figures 5 and 6 for ``model``: one tidy table with a ``figure`` column.

    ``batches`` are (images in [0, 1], labels) mini-batches; each is attacked with ``attack`` (through MBN_adv
    for Mixture BN: give the run's training attack) and its BN input statistics recorded as ``batch1``, ``batch2``, ... beside
    the running statistics of the branch that normalised it.
    """
    layer = layer or default_layer(model)
    module = _layer(model, layer)
    chosen = sample_channels(module.num_features, channels, seed)
    mixture = isinstance(module, MixtureBatchNorm2d)
    tables = []
    if mixture:
        tables.append(running_statistics(model, layer, chosen).assign(figure=5))
    generator = torch.Generator(batches[0][0].device).manual_seed(seed)
    with norm.use_branch(model, "adv") if mixture else contextlib.nullcontext():
        for i, (images, labels) in enumerate(batches, start=1):
            adversarial = attacks.pgd(model, images, labels, attack, num_classes=num_classes, generator=generator)
            tables.append(batch_statistics(model, layer, adversarial, chosen, source=f"batch{i}")
                          .assign(branch="adv" if mixture else "-", figure=6))
    running = running_statistics(model, layer, chosen)
    if mixture:
        running = running[running["branch"] == "adv"]
    tables.append(running.assign(figure=6))
    columns = ["figure", "layer", "branch", "channel", "source", "statistic", "value", "convention"]
    return pd.concat(tables, ignore_index=True)[columns]


def bnstats_for_run(model: nn.Module, cfg) -> pd.DataFrame:
    """Figures 5-6 statistics of a trained run: two mini-batches (at most 256 images) of the run's own training
    images (its seeded subset, in its first epoch's order, without augmentation), attacked with the run's
    training attack (eps, step, steps, clean-start probability, BN mode). A ``sync_bn`` run's model is measured
    as a plain-BN copy: only rank 0 measures, so SyncBatchNorm's all-reduce on batch statistics would wait forever."""
    model = norm.without_sync_batchnorm(model)
    if not norm.batch_norms(model):
        return pd.DataFrame()
    device = resolve_rank_device(cfg, distributed.context())
    loader = data.make_loader(cfg.dataset, "train", min(cfg.batch_size, 256), n=cfg.n_train, seed=cfg.seed,
                              root=cfg.data_root, augment=False)
    batches = []
    for batch in loader:
        batches.append(data.to_device(batch, device))
        if len(batches) == 2:
            break
    return figure_statistics(model, batches, num_classes=data.DATASETS[cfg.dataset].num_classes,
                             layer=cfg.bnstats_layer, channels=cfg.bnstats_channels, seed=cfg.seed,
                             attack=dataclasses.replace(cfg.training_attack, compile=False))
