"""Helpers the tests import by name (fixtures live in conftest.py): a seeded Fashion-MNIST model, accuracy, and
a training run crashed at a given step."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from advkit import data, models



def fmnist_model(arch: str = "small_resnet8", norm: str = "bn", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    info = data.DATASETS["fashion-mnist"]
    return models.build_model(arch, info.num_classes, norm, in_channels=info.channels, mean=info.mean, std=info.std)

def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(images).argmax(1) == labels).float().mean().item()
    model.train(was_training)
    return acc

def train_until_crash(cfg, calls: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train ``cfg`` in this process and crash it (KeyboardInterrupt) at its ``calls``-th training step."""
    from advkit import run, train

    real, seen = train.training_loss, []

    def crashing(*args, **kwargs):
        seen.append(1)
        if len(seen) == calls:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "training_loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        run.train_run(cfg, show_progress=False)
    monkeypatch.setattr(train, "training_loss", real)


@contextlib.contextmanager
def locked_by_another_process(run_dir: str | Path) -> Iterator[int]:
    """Hold ``run_dir``'s lock from a child process (as a second driver or notebook would) and yield its pid;
    the child is killed on exit, which releases the lock."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from advkit.rundir import RunDir\n"
        f"with RunDir({str(run_dir)!r}).lock():\n    print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()
