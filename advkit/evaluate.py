"""Evaluation: clean accuracy and accuracy under the paper's targeted PGD, through each Mixture BN branch."""

from __future__ import annotations

import contextlib

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from . import attacks, data, norm
from .config import Config
from .train import autocast, resolve_device, uses_channels_last


def accuracy_under_attack(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    *,
    num_classes: int,
    eps: float = 16.0,
    step: float = 1.0,
    steps: int = 10,
    targeted: bool = True,
    restarts: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
    autocast_ctx: contextlib.AbstractContextManager | None = None,
    show_progress: bool = False,
    desc: str = "eval",
) -> tuple[float, int]:
    """Share of images whose label is still predicted after PGD-``steps`` (``steps=0``: clean accuracy).

    Always a random start (the paper's evaluation protocol); BN uses running statistics.
    """
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(seed)
    autocast_ctx = autocast_ctx if autocast_ctx is not None else contextlib.nullcontext()
    correct = total = 0
    for batch in tqdm(loader, desc=desc, disable=not show_progress, leave=False):
        images, labels = data.to_device(batch, device, channels_last)
        with autocast_ctx:
            if steps > 0:
                images = attacks.pgd(model, images, labels, eps=eps, step=step, steps=steps, targeted=targeted,
                                     num_classes=num_classes, restarts=restarts, generator=generator)
            with torch.no_grad(), attacks.attack_mode(model):
                correct += (model(images).argmax(1) == labels).sum().item()
        total += len(labels)
    return correct / total, total


def evaluate_model(model: nn.Module, cfg: Config, show_progress: bool = True) -> pd.DataFrame:
    """Clean and targeted PGD-``eval_steps`` accuracy on the test subset, per MBN branch; a tidy table."""
    device = resolve_device(cfg)
    loader = data.make_loader(cfg.dataset, "test", cfg.eval_batch_size, n=cfg.n_test, seed=cfg.seed,
                              root=cfg.data_root, num_workers=cfg.num_workers)
    branches = list(norm.BRANCHES) if norm.has_mixture_bn(model) else [None]
    rows = []
    for branch in branches:
        with norm.use_branch(model, branch) if branch else contextlib.nullcontext():
            for steps in (0, cfg.eval_steps):
                acc, n = accuracy_under_attack(
                    model, loader, num_classes=data.DATASETS[cfg.dataset].num_classes, eps=cfg.eval_eps,
                    step=cfg.eval_step, steps=steps, seed=cfg.seed, device=device,
                    channels_last=uses_channels_last(cfg, device), autocast_ctx=autocast(cfg, device),
                    show_progress=show_progress, desc=f"{branch or 'model'} PGD-{steps}")
                rows.append(dict(branch=branch or "-", attack="clean" if steps == 0 else "pgd", targeted=steps > 0,
                                 steps=steps, eps=cfg.eval_eps if steps else 0.0, step=cfg.eval_step if steps else 0.0,
                                 restarts=1, accuracy=acc, n=n, seed=cfg.seed))
    return pd.DataFrame(rows)
