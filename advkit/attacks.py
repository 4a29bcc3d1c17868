"""L-inf projected gradient descent (PGD), targeted or untargeted, in [0, 1] pixel space.

``eps`` and ``step`` are given on the 0-255 scale, as in the paper (eps 16, step 1). The attack runs the
model with BN in running-statistics mode by default (the original pipeline's choice) and leaves the
model exactly as it found it: train/eval flags, BN buffers, ``requires_grad`` flags and ``.grad`` fields.
Parameters never require grad during the attack, so no weight gradient is computed and, under DDP, no
all-reduce is triggered (pass the underlying module, ``ddp.module``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .fold import fold_batch_norms
from .norm import batch_norms
from .validate import check_choice, check_range

BN_MODES = ("running", "batch")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
STEP_RULES = ("fixed", "max_eps_over_steps")


def random_targets(labels: torch.Tensor, num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A target class per example, uniform over the ``num_classes - 1`` classes other than its label."""
    check_range("num_classes", num_classes, 2, integer=True)
    offset = torch.randint(1, num_classes, labels.shape, generator=generator,
                           device=_generator_device(generator, labels)).to(labels.device)
    return (labels + offset) % num_classes


def effective_step(eps: float, step: float, steps: int, step_rule: str = "fixed") -> float:
    """The step actually taken: ``step``, or the original pipeline's ``max(step, eps / steps)``."""
    check_choice("step_rule", step_rule, STEP_RULES)
    return max(step, eps / steps) if step_rule == "max_eps_over_steps" and steps > 0 else step


def compile_mode(compile_attack: bool | str) -> str:
    """'off' or a torch.compile mode from ``compile_attack`` (True: 'default'; 'reduce-overhead': CUDA graphs)."""
    mode = ("default" if compile_attack else "off") if isinstance(compile_attack, bool) else compile_attack
    check_choice("compile_attack", mode, COMPILE_MODES)
    return mode


def compiled(module: nn.Module, mode: str = "default") -> nn.Module:
    """``torch.compile(module, mode=mode)``, once per module and mode (kept in its ``__dict__``, not as a
    submodule): the folded view keeps its parameters (refolded in place), so a training run compiles its
    attack once, on the first step."""
    cache = module.__dict__.setdefault("_advkit_compiled", {})
    if mode not in cache:
        cache[mode] = torch.compile(module, mode=mode)
    return cache[mode]


@contextlib.contextmanager
def attack_mode(model: nn.Module, bn_mode: str = "running", fold_bn: bool = False,
                compile_attack: bool | str = False) -> Iterator[nn.Module]:
    """Run ``model`` for an attack: eval mode ('running') or BNs on batch statistics ('batch'); no parameter grads.

    Yields the module to attack: ``model``, or with ``fold_bn`` in 'running' mode its BN-folded view (the same
    function with every conv -> BN pair as one conv, see :mod:`advkit.fold`; on the CPU in channels_last memory
    format, which ``make bench`` measured faster there), through ``torch.compile`` if ``compile_attack`` (True or
    a mode of :data:`COMPILE_MODES`). The folded view runs the Mixture BN branch selected on entry: select the
    branch before entering, never inside. On exit every module's train flag, every BN buffer (in 'batch' mode, where
    the forward passes would update them) and every parameter's ``requires_grad`` are restored.
    """
    check_choice("bn_mode", bn_mode, BN_MODES)
    mode = compile_mode(compile_attack)
    training = {m: m.training for m in model.modules()}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    saved_buffers = []
    model.eval()
    if bn_mode == "batch":
        for bn in batch_norms(model):
            saved_buffers += [(b, b.clone()) for b in bn.buffers()]
            bn.train()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        attacked = model
        if fold_bn and bn_mode == "running":
            attacked = fold_batch_norms(model, channels_last=next(model.parameters()).device.type == "cpu")
        yield compiled(attacked, mode) if mode != "off" else attacked
    finally:
        for m, flag in training.items():
            m.training = flag
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        with torch.no_grad():
            for buffer, saved in saved_buffers:
                buffer.copy_(saved)


def _generator_device(generator: torch.Generator | None, like: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else like.device


def random_start(
    images: torch.Tensor,
    eps: float,
    clean_start_prob: float = 0.0,
    per_example: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A start point drawn uniformly in the eps-cube around each image (eps in [0, 1] units), then clamped to [0, 1]
    (pixels near 0 or 1 therefore start on the boundary more often than a uniform draw would put them).

    With probability ``clean_start_prob`` the start is the clean image instead: one draw for the whole
    batch (the original pipeline) or one per example (``per_example=True``).
    """
    device = _generator_device(generator, images)
    noise = (torch.rand(images.shape, generator=generator, device=device).to(images.device) * 2 - 1) * eps
    if clean_start_prob > 0:
        shape = (images.shape[0],) + (1,) * (images.dim() - 1) if per_example else (1,) * images.dim()
        keep_noise = torch.rand(shape, generator=generator, device=device).to(images.device) >= clean_start_prob
        noise = noise * keep_noise
    return (images + noise).clamp_(0, 1)


def pgd_iterations(
    model: nn.Module,
    images: torch.Tensor,
    goal: torch.Tensor,
    start: torch.Tensor,
    eps: float,
    step: float,
    steps: int,
    targeted: bool,
    on_logits: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """``steps`` signed-gradient steps from ``start`` (eps and step in [0, 1] units), each projected onto the
    eps-cube and [0, 1]. ``on_logits(i, logits)`` sees the logits of iterate i (0 = the start) for free, from
    the forward pass that computes its gradient; the final iterate's logits need one more forward pass.
    The model must already be in attack mode (see :func:`attack_mode`)."""
    folded_channels_last = getattr(getattr(model, "_orig_mod", model), "channels_last", False)
    convert = folded_channels_last and not images.is_contiguous(memory_format=torch.channels_last)
    if convert:  # a BN-folded view with channels_last weights: feed it channels_last, hand back the caller's layout
        images, start = (t.contiguous(memory_format=torch.channels_last) for t in (images, start))
    lower = (images - eps).clamp_(min=0)
    upper = (images + eps).clamp_(max=1)
    sign = -step if targeted else step  # targeted: descend the target's loss; untargeted: ascend the label's
    x_adv = start.detach()
    for i in range(steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        if on_logits is not None:
            on_logits(i, logits.detach())
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, goal, reduction="sum"), x_adv)
        x_adv = torch.clamp(x_adv.detach() + sign * grad.sign(), lower, upper)
    return x_adv.detach().contiguous() if convert else x_adv.detach()


@dataclass(frozen=True)
class Attack:
    """One L-inf PGD attack as the paper defines it (Section 3), validated on creation.

    ``eps`` and ``step`` on the 0-255 scale; ``steps`` iterations from a random start in the eps-cube, towards
    a random target class (``targeted``, the paper's protocol) or away from the label. ``restarts``: an example
    must survive every one. ``step_rule``: 'fixed', or the original pipeline's ``max(step, eps / steps)``.
    ``clean_start_prob``: the chance that a batch (or, ``start_per_example``, an example) starts at the clean
    image (training: 0.2, as the original pipeline; evaluation: 0). ``bn_mode``: BN on running ('running', the
    original pipeline's choice) or batch statistics during the attack; ``fold_bn``: attack the BN-folded view
    (the same function, fewer operations, see :mod:`advkit.fold`); ``compile``: through ``torch.compile`` (True
    or a mode of :data:`COMPILE_MODES`; 'reduce-overhead' uses CUDA graphs; the first call pays the compile).
    """

    eps: float = 16.0
    step: float = 1.0
    steps: int = 10
    targeted: bool = True
    restarts: int = 1
    step_rule: str = "fixed"
    clean_start_prob: float = 0.0
    start_per_example: bool = False
    bn_mode: str = "running"
    fold_bn: bool = True
    compile: bool | str = False

    def __post_init__(self) -> None:
        check_pgd_arguments(self.eps, self.step, self.steps, self.clean_start_prob, self.restarts, self.step_rule,
                            self.bn_mode)
        compile_mode(self.compile)

    @property
    def step_taken(self) -> float:
        """The step actually taken (see :func:`effective_step`)."""
        return effective_step(self.eps, self.step, self.steps, self.step_rule)


def attack_once(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: Attack,
    *,
    num_classes: int | None,
    targets: torch.Tensor | None,
    generator: torch.Generator | None,
    on_logits: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """One run of ``attack`` (its effective step, no restarts): draw the targets, then the start, then iterate.
    :func:`pgd` and the one-pass robustness curve share it, so they draw the same numbers."""
    goal = labels if not attack.targeted else (
        targets if targets is not None else random_targets(labels, num_classes, generator))
    start = random_start(images, attack.eps / 255.0, attack.clean_start_prob, attack.start_per_example, generator)
    return pgd_iterations(model, images, goal, start, attack.eps / 255.0, attack.step_taken / 255.0, attack.steps,
                          attack.targeted, on_logits)


def check_pgd_arguments(eps: float, step: float, steps: int, clean_start_prob: float = 0.0, restarts: int = 1,
                        step_rule: str = "fixed", bn_mode: str = "running") -> None:
    check_range("eps", eps, 0, 255)
    check_range("step", step, 0, 255)
    check_range("steps", steps, 0, integer=True)
    check_range("clean_start_prob", clean_start_prob, 0, 1)
    check_range("restarts", restarts, 1, integer=True)
    check_choice("step_rule", step_rule, STEP_RULES)
    check_choice("bn_mode", bn_mode, BN_MODES)


def pgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: Attack = Attack(),
    *,
    num_classes: int | None = None,
    targets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Adversarial examples for ``images`` (in [0, 1]) under ``attack`` (Section 3: L-inf PGD, eps and step on
    the 0-255 scale).

    Targeted attacks (the paper's protocol) draw a random target other than the label for every example on
    every call (and restart) unless ``targets`` is given; they need ``num_classes``. Each restart starts afresh;
    an example keeps the first restart's result that the model misclassifies (its worst case), else the last.
    """
    if attack.targeted and targets is None and num_classes is None:
        raise ValueError("num_classes=None is not accepted for a targeted attack without targets; give the class count")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images and labels disagree on the batch size ({images.shape[0]} vs {labels.shape[0]})")
    if attack.targeted and targets is not None and bool((targets == labels).any()):
        raise ValueError("targets equal to the labels are not accepted for a targeted attack: it would push those "
                         "examples toward their true class; give a target other than the label for every example")
    images = images.detach()
    best = None
    with attack_mode(model, attack.bn_mode, attack.fold_bn, attack.compile) as attacked:
        for _ in range(attack.restarts):
            x_adv = attack_once(attacked, images, labels, attack, num_classes=num_classes, targets=targets,
                                generator=generator)
            if best is None:
                best = x_adv
            else:
                with torch.no_grad():
                    still_correct = attacked(best).argmax(1) == labels
                best = torch.where(still_correct.view(-1, *[1] * (images.dim() - 1)), x_adv, best)
    return best
