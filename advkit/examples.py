"""Adversarial examples of a finished run, as the explorer's viewer shows them: clean image, perturbation,
adversarial image, true / target / predicted class, and the prediction along the PGD iterations.

The attack is the run's own evaluation attack (Section 3's protocol: targeted PGD with a random target other
than the label, random start, the run's eval eps and step), on the first images of the run's first evaluation
batch, with that batch's random draws (:func:`advkit.evaluate.batch_generator`). The examples shown are
therefore the ones the evaluation counted: their final predictions are the final-iterate results of
``results.csv`` at the longest PGD checkpoint (first restart). Experiment tier: it needs torch; the explorer
receives :func:`adversarial_examples` from the notebook and does not import this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets

from . import attacks, data, evaluate
from .run import load_run
from .validate import check_range

CLASS_NAMES = {
    "fashion-mnist": list(datasets.FashionMNIST.classes),
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}
MAX_STORED_VALUES = 2**24  # iterates kept for the slider only below this many values (Fashion-MNIST: always)


@dataclass
class AdversarialExamples:
    """Adversarial examples of one run and MBN branch; images are (k, C, H, W) arrays in [0, 1].

    ``iterates[i]`` is PGD iterate i (0: the random start, ``steps``: the final adversarial image), None when
    the images are too large to keep every iterate; ``probabilities[i]`` (k, classes) is the softmax of the
    model on iterate i. ``targets`` is None for an untargeted attack."""

    run: str
    branch: str
    eps: float  # 0-255 scale, as the paper's eps 16
    step: float
    steps: int
    targeted: bool
    class_names: list[str]
    clean: np.ndarray
    adversarial: np.ndarray
    iterates: np.ndarray | None
    labels: np.ndarray
    targets: np.ndarray | None
    clean_predictions: np.ndarray
    probabilities: np.ndarray

    @property
    def predictions(self) -> np.ndarray:
        """Predicted class per iterate and image, (steps + 1, k)."""
        return self.probabilities.argmax(-1)

    def image_at(self, iteration: int) -> np.ndarray:
        """The adversarial images at ``iteration`` (the final ones where iterates were not kept)."""
        check_range("iteration", iteration, 0, self.steps, integer=True)
        return self.iterates[iteration] if self.iterates is not None else self.adversarial

    def goal_probability(self) -> np.ndarray:
        """Per iterate and image: the target's probability (targeted) or the true class's (untargeted)."""
        goal = self.targets if self.targeted else self.labels
        return np.take_along_axis(self.probabilities, goal[None, :, None], axis=-1)[..., 0]


def class_names(dataset: str, num_classes: int) -> list[str]:
    """Readable class names of ``dataset`` (torchvision's for Fashion-MNIST), else 'class i'."""
    names = CLASS_NAMES.get(dataset)
    if names is not None and len(names) == num_classes:
        return list(names)
    return [f"class {i}" for i in range(num_classes)]


class _Recorder:
    """Calls the attacked model and keeps the softmax (and, if asked, the input) of the first ``k`` images of
    every forward pass: PGD's iterates 0 .. steps - 1, then the final one."""

    def __init__(self, attacked: torch.nn.Module, k: int, keep_inputs: bool) -> None:
        self.attacked, self.k, self.keep_inputs = attacked, k, keep_inputs
        self.channels_last = getattr(getattr(attacked, "_orig_mod", attacked), "channels_last", False)
        self.inputs: list[torch.Tensor] = []
        self.probabilities: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.attacked(x)
        self.probabilities.append(logits.detach()[: self.k].float().softmax(-1).cpu())
        if self.keep_inputs:
            self.inputs.append(x.detach()[: self.k].float().cpu().contiguous())
        return logits


def adversarial_examples(run_dir: str | Path, branch: str | None = None, n_images: int = 6,
                         device: str | torch.device = "cpu") -> AdversarialExamples:
    """The first ``n_images`` test images of the run at ``run_dir`` under its evaluation attack (Section 3),
    through MBN ``branch`` ('clean' or 'adv'; None for a model without Mixture BN), with the prediction and
    the target's probability at every PGD iteration up to the run's longest checkpoint. Seconds on a CPU for the
    kit's small networks: the whole first evaluation batch is attacked, so that the draws equal the evaluation's."""
    check_range("n_images", n_images, 1, integer=True)
    cfg, model = load_run(run_dir, branch, device)
    num_classes = data.DATASETS[cfg.dataset].num_classes
    loader = data.make_loader(cfg.dataset, "test", cfg.eval_batch_size, n=cfg.n_test, seed=cfg.evaluation_seed,
                              root=cfg.data_root)
    images, labels = data.to_device(next(iter(loader)), device)
    if n_images > len(labels):
        raise ValueError(f"n_images={n_images} is not accepted: the run's first evaluation batch holds "
                         f"{len(labels)} images; choose 1 to {len(labels)}")
    attack = cfg.evaluation_attack
    steps, step = attack.steps, attack.step_taken
    generator = evaluate.batch_generator(cfg.evaluation_seed, 0, device)  # the evaluation's draws for batch 0
    targets = attacks.random_targets(labels, num_classes, generator) if cfg.eval_targeted else None
    keep_inputs = n_images * (steps + 1) * images[0].numel() <= MAX_STORED_VALUES
    with torch.no_grad(), attacks.attack_mode(model):  # as the evaluation: the whole batch, BN not folded
        clean_predictions = model(images).argmax(1)[:n_images]
    with attacks.attack_mode(model, "running", cfg.attack_fold_bn) as attacked:
        recorder = _Recorder(attacked, n_images, keep_inputs)
        final = attacks.attack_once(recorder, images, labels, attack, num_classes=num_classes, targets=targets,
                                    generator=generator)
        with torch.no_grad():
            recorder(final)
    k = slice(0, n_images)
    return AdversarialExamples(
        run=Path(run_dir).name, branch=branch or "-", eps=cfg.eval_eps, step=step, steps=steps,
        targeted=cfg.eval_targeted, class_names=class_names(cfg.dataset, num_classes),
        clean=images[k].cpu().numpy(), adversarial=final[k].float().cpu().contiguous().numpy(),
        iterates=torch.stack(recorder.inputs).numpy() if keep_inputs else None, labels=labels[k].cpu().numpy(),
        targets=targets[k].cpu().numpy() if targets is not None else None,
        clean_predictions=clean_predictions.cpu().numpy(), probabilities=torch.stack(recorder.probabilities).numpy())
