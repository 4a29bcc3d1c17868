"""The paper's training objectives (Section 4): standard training, "100% adv + X% clean" with Eq. 1 (Section
4.1), adversarial logit pairing, and the routing of clean and adversarial images through Mixture BN (Section
4.2), as the loss of one training batch."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import attacks, data, norm
from .config import Config, kept_clean


class TrainingForward(nn.Module):
    """The forward pass of one training step in a single call (DDP needs exactly one per backward).

    ``forward(adversarial, clean)`` returns their logits (either may be None). Plain BN/GN see both in one batch
    (BN statistics of the mixture, the paper's baseline); Mixture BN forwards adversarial images through
    MBN_adv and clean ones through MBN_clean, so their statistics never mix.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.mixture = norm.has_mixture_bn(model)

    def forward(self, adversarial: torch.Tensor | None, clean: torch.Tensor | None):
        if self.mixture:
            outputs = []
            for images, branch in ((adversarial, "adv"), (clean, "clean")):
                with norm.use_branch(self.model, branch):
                    outputs.append(self.model(images) if images is not None else None)
            return tuple(outputs)
        parts = [t for t in (adversarial, clean) if t is not None]
        logits = self.model(torch.cat(parts) if len(parts) > 1 else parts[0])
        n_adv = len(adversarial) if adversarial is not None else 0
        return (logits[:n_adv] if adversarial is not None else None,
                logits[n_adv:] if clean is not None else None)

def eq1_loss(loss_clean: torch.Tensor, loss_adv: torch.Tensor, n_clean: int, n_adv: int, alpha: float,
             weighting: str = "share") -> torch.Tensor:
    """Eq. 1 (Section 4.1) from the mean losses of the clean and adversarial images of a batch.

    The paper defines ``alpha * J(clean) + (1 - alpha) * J(adv)`` for full clean/adversarial pairs. With only X%
    of the clean images kept, two readings differ: ``'share'`` (the kit's default) gives the kept clean images
    together a share alpha of the loss however many they are (at X = 0.2 each weighs about 5 adversarial
    images); ``'per_image'`` weighs every clean image alpha and every adversarial one 1 - alpha, normalised by
    the total weight (one mean over the concatenated batch for alpha = 0.5). At X = 100% both are Eq. 1."""
    if weighting == "share":
        return alpha * loss_clean + (1 - alpha) * loss_adv
    if weighting == "per_image":
        total = alpha * n_clean + (1 - alpha) * n_adv
        return (alpha * n_clean * loss_clean + (1 - alpha) * n_adv * loss_adv) / total
    raise ValueError(f"eq1_weighting={weighting!r} is not accepted; choose one of ['share', 'per_image']")

def training_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: Config,
    generator: torch.Generator,
    forward: nn.Module | None = None,
    autocast_ctx: contextlib.AbstractContextManager | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The loss of one batch under the configured strategy, and batch statistics for the logs.

    ``100% adv + X% clean``: every image is attacked (targeted PGD through MBN_adv); a random X of the clean
    images is kept; loss = alpha * J(clean) + (1 - alpha) * J(adv) (J(adv) alone when X = 0; see :func:`eq1_loss`
    for the weighting when X < 100%), plus the ALP penalty. ``model`` is the plain model, which the attack runs on (under DDP it never triggers an
    all-reduce); ``forward`` is its :class:`TrainingForward`, possibly wrapped by DDP or torch.compile.
    """
    forward = forward if forward is not None else TrainingForward(model)
    autocast_ctx = autocast_ctx if autocast_ctx is not None else contextlib.nullcontext()
    stats: dict[str, Any] = {}
    if cfg.adv_ratio == 0:
        with autocast_ctx:
            _, logits = forward(None, images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        stats.update(n_clean=len(labels), correct_clean=(logits.argmax(1) == labels).sum().item(), n_adv=0)
        return loss, stats

    sync = (lambda: torch.cuda.synchronize(images.device)) if images.is_cuda else (lambda: None)
    sync()  # CUDA runs asynchronously: without it the clock would time the kernels' launch, not their work
    t0 = time.perf_counter()
    with norm.use_branch(model, "adv") if norm.has_mixture_bn(model) else contextlib.nullcontext(), autocast_ctx:
        adversarial = attacks.pgd(model, images, labels, cfg.training_attack,
                                  num_classes=data.DATASETS[cfg.dataset].num_classes, generator=generator)
    sync()
    stats["attack_seconds"] = time.perf_counter() - t0
    n_keep = kept_clean(cfg.clean_ratio, len(labels))
    keep = torch.randperm(len(labels), generator=generator, device=generator.device)[:n_keep].to(labels.device)
    with autocast_ctx:
        logits_adv, logits_clean = forward(adversarial, images[keep] if n_keep else None)
    loss_adv = F.cross_entropy(logits_adv.float(), labels, label_smoothing=cfg.label_smoothing)
    stats.update(n_adv=len(labels), correct_adv=(logits_adv.argmax(1) == labels).sum().item(), n_clean=n_keep)
    if logits_clean is None:
        return loss_adv, stats
    loss_clean = F.cross_entropy(logits_clean.float(), labels[keep], label_smoothing=cfg.label_smoothing)
    loss = eq1_loss(loss_clean, loss_adv, n_keep, len(labels), cfg.alpha, cfg.eq1_weighting)
    if cfg.alp_weight > 0:
        penalty = cfg.alp_weight * (logits_clean.float() - logits_adv[keep].float()).pow(2).mean()
        stats["alp_penalty"] = penalty.item()
        loss = loss + penalty
    stats["correct_clean"] = (logits_clean.argmax(1) == labels[keep]).sum().item()
    return loss, stats
