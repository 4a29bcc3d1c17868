"""AutoAttack's gradient attacks beside the paper's PGD: APGD-CE and APGD-T (Croce & Hein, ICML 2020).

The paper evaluates against targeted PGD with a random target (Section 3), a weaker threat model than the
field's usual one. Here an example counts as robust only if it survives both of AutoAttack's white-box attacks
at the reference settings of its "standard" L-inf version: APGD with the cross-entropy loss (one run) and
targeted APGD with the DLR loss against the ``min(num_classes - 1, 9)`` highest-scoring other classes, each
100 iterations, untargeted threat model (any misclassification counts). FAB-T and Square, the standard
version's last two attacks, are left out: the accuracy here is an upper bound on full AutoAttack's.

The attacks are torchattacks' (pinned, 3.5.1), not re-written. torchattacks seeds torch's global RNG itself;
each call here seeds it with the batch's seed and restores the caller's RNG state afterwards.
"""

from __future__ import annotations

import torch
from torch import nn

from . import attacks
from .validate import check_range

ATTACKS = ("apgd-ce", "apgd-t")
WORST_CASE = "autoattack"
REFERENCE_ITERATIONS = 100  # AutoAttack's standard version: n_iter = 100 for APGD-CE and APGD-T
MAX_TARGET_CLASSES = 9  # ... and APGD-T against at most 9 target classes
INSTALL_HINT = "pip install --no-deps torchattacks==3.5.1"


def require_torchattacks():
    """The torchattacks module, or an ImportError saying how to install it."""
    try:
        import torchattacks
    except ImportError as exc:
        raise ImportError(f"AutoAttack (eval_autoattack_n > 0) needs torchattacks; install it with "
                          f"`{INSTALL_HINT}` (make setup does)") from exc
    return torchattacks


def check_autoattack_arguments(eps: float, num_classes: int, n_iter: int) -> None:
    check_range("eps", eps, 0, 255)
    check_range("num_classes", num_classes, 4, integer=True)  # APGD-T's DLR loss reads the 4th-largest logit
    check_range("n_iter", n_iter, 1, integer=True)


def _check_in_ball(adv: torch.Tensor, images: torch.Tensor, eps: float, name: str) -> None:
    """Refuse adversarial images outside the eps-ball or [0, 1]: a number from them would be meaningless."""
    distance = (adv - images).abs().max().item() if adv.numel() else 0.0
    if distance > eps / 255 + 1e-6 or adv.min().item() < 0 or adv.max().item() > 1:
        raise RuntimeError(f"{name} returned images outside the eps-ball or [0, 1] (L-inf distance "
                           f"{distance * 255:.4f}/255 for eps {eps}/255): torchattacks is not behaving as pinned")


def autoattack_batch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    num_classes: int,
    seed: int = 0,
    n_iter: int = REFERENCE_ITERATIONS,
    fold_bn: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-example correctness (bool, shape (B,)) under 'clean', 'apgd-ce', 'apgd-t' and their worst case
    'autoattack' (robust only if it survives both), ``eps`` on the 0-255 scale.

    The model runs in eval mode on BN running statistics (:func:`advkit.attacks.attack_mode`, which restores it
    afterwards; ``fold_bn``: through its BN-folded view, the same function). Correctness is the model's
    prediction on the adversarial images each attack returns. ``seed`` seeds both attacks' random starts (pass
    the batch's own seed); torch's global RNG state is the same after the call as before.
    """
    torchattacks = require_torchattacks()
    check_autoattack_arguments(eps, num_classes, n_iter)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images and labels disagree on the batch size ({images.shape[0]} vs {labels.shape[0]})")
    cuda = [images.device] if images.device.type == "cuda" else []
    n_targets = min(num_classes - 1, MAX_TARGET_CLASSES)
    with attacks.attack_mode(model, "running", fold_bn) as attacked, torch.random.fork_rng(devices=cuda):
        made = {
            "apgd-ce": torchattacks.APGD(attacked, norm="Linf", eps=eps / 255, steps=n_iter, n_restarts=1, seed=seed,
                                         loss="ce"),
            "apgd-t": torchattacks.APGDT(attacked, norm="Linf", eps=eps / 255, steps=n_iter, n_restarts=1, seed=seed,
                                         n_classes=n_targets + 1),
        }
        with torch.no_grad():
            correct = {"clean": attacked(images).argmax(1) == labels}
        for name, attack in made.items():
            adv = attack(images, labels)
            _check_in_ball(adv, images, eps, name)
            with torch.no_grad():
                correct[name] = attacked(adv).argmax(1) == labels
    correct[WORST_CASE] = correct["apgd-ce"] & correct["apgd-t"]
    return correct
