"""TensorBoard event files beside ``metrics.jsonl`` (``tensorboard=True``), so that ``tensorboard --logdir runs/``
shows every run of a sweep: per epoch the scalars ``metrics.jsonl`` records (loss, training accuracies, lr,
images/s, attack share) at the run's optimisation step, and after the evaluation the robustness curve (accuracy
against PGD iterations, per MBN branch; Figures 2-3's axes) and AutoAttack's accuracies. Rank 0 writes; the
folders are :class:`advkit.rundir.RunDir`'s. Accuracies are fractions, as in ``metrics.jsonl`` and
``results.csv``.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from typing import Any

import pandas as pd

from .rundir import RunDir

# the keys of a metrics.jsonl line written as train/<key>
TRAIN_SCALARS = ("loss", "train_adv_accuracy", "train_clean_accuracy", "lr", "images_per_s", "attack_share")


def require_tensorboard() -> None:
    """ImportError saying how to install TensorBoard, raised before any compute when ``tensorboard=True``."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
    except ImportError:
        raise ImportError("tensorboard=True needs the tensorboard package: pip install tensorboard "
                          "(or pip install -e . in the kit's clone)") from None


@contextlib.contextmanager
def training_writer(run: RunDir, enabled: bool, resumed_step: int | None) -> Iterator[Any]:
    """A ``SummaryWriter`` on ``<run>/tensorboard/train/`` while training (None when ``enabled`` is False). A run
    resumed from the checkpoint at ``resumed_step`` purges the events logged after it (epochs logged before a kill
    and trained again), as ``metrics.jsonl`` drops their lines, so no step is shown twice."""
    if not enabled:
        yield None
        return
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(run.tensorboard_train, purge_step=None if resumed_step is None else resumed_step + 1)
    try:
        yield writer
    finally:
        writer.close()


def log_epoch(writer: Any, record: dict[str, Any]) -> None:
    """One ``metrics.jsonl`` line as ``train/<key>`` scalars at its optimisation step (keys without a value, such
    as the clean accuracy of a run without clean images, are left out), flushed so that a kill keeps them."""
    for key in TRAIN_SCALARS:
        if record.get(key) is not None:
            writer.add_scalar(f"train/{key}", record[key], global_step=record["step"])
    writer.flush()


def evaluation_tag(branch: str, attack: str) -> str:
    """The tag of a ``results.csv`` row: ``eval/pgd_accuracy`` (clean and PGD rows, x = PGD iterations, 0: clean),
    ``eval/apgd-ce`` ... for AutoAttack's; MBN branches under ``eval/MBN_<branch>/``."""
    prefix = "eval" if branch == "-" else f"eval/MBN_{branch}"
    return f"{prefix}/{'pgd_accuracy' if attack in ('clean', 'pgd') else attack}"


def log_evaluation(run: RunDir, results: pd.DataFrame) -> None:
    """``results.csv``'s rows into ``<run>/tensorboard/eval/``, replaced whole at every evaluation (a run evaluated
    again shows its latest numbers once): final-iterate accuracy per tag of :func:`evaluation_tag` at the row's
    iteration count, and the worst-iterate accuracy of the PGD curve as ``.../pgd_worst_accuracy``."""
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(run.tensorboard_eval, ignore_errors=True)
    with SummaryWriter(run.tensorboard_eval) as writer:
        for row in results.itertuples(index=False):
            tag = evaluation_tag(row.branch, row.attack)
            writer.add_scalar(tag, row.accuracy, global_step=int(row.steps))
            if tag.endswith("pgd_accuracy"):
                writer.add_scalar(tag.replace("pgd_accuracy", "pgd_worst_accuracy"), row.worst_accuracy,
                                  global_step=int(row.steps))
