"""Facts of the paper that several modules use, each in one place: the names of its training strategies, its
PGD checkpoints, how its networks' depth is read, and where its published numbers are. No torch."""

from __future__ import annotations

import re
from pathlib import Path

from .paths import project_root

PGD_CHECKPOINTS = (10, 20, 50, 100, 200, 500, 1000, 2000)  # Figures 2-3: PGD-10 ... PGD-2000
NUMBERS_DIR = project_root() / "data" / "paper"  # table7.csv, clean_training.csv (see its README)


def strategy_label(adv_ratio: float, clean_ratio: float, alp: bool = False, finetune_bn: bool = False) -> str:
    """The paper's name of a training strategy (Section 4.1): '100% adv + 20% clean, ALP', '0% adv + 100% clean'."""
    if adv_ratio == 0:
        text = "0% adv + 100% clean"
    else:
        text = f"100% adv + {clean_ratio * 100:g}% clean" + (", ALP" if alp else "")
    return text + (", BN-only finetuning" if finetune_bn else "")


def depth_of(arch: str) -> int:
    """The depth in an architecture's name: 'resnet152' -> 152, 'small_resnet20' -> 20."""
    match = re.search(r"resnet(\d+)$", arch)
    if match is None:
        raise ValueError(f"arch={arch!r} is not accepted; names end in resnet<depth>, e.g. resnet152")
    return int(match.group(1))


def numbers_file(name: str, folder: str | Path = NUMBERS_DIR) -> Path:
    """A CSV of the paper's published numbers, with a clear error where the repository's data/paper is missing."""
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the paper's numbers ship in the repository's data/paper "
                                "(install the kit editable from its clone: pip install -e .)")
    return path
