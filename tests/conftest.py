"""Shared fixtures: small real data and a briefly trained undefended model (trained once per test session)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from advkit import data
from helpers import fmnist_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fmnist_test() -> tuple[torch.Tensor, torch.Tensor]:
    """256 Fashion-MNIST test images in [0, 1] and their labels."""
    images, labels = data.load_tensors("fashion-mnist", "test")
    keep = data.subset_indices(len(labels), 256, seed=1)
    return images[keep].float() / 255, labels[keep]


@pytest.fixture(scope="session")
def clean_trained_model() -> torch.nn.Module:
    """small_resnet8 trained on clean images only (16384 images, 2 epochs of Adam): no defence, ~75% accuracy."""
    model = fmnist_model()
    loader = data.make_loader("fashion-mnist", "train", 128, n=16384, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for epoch in range(2):
        loader.sampler.sampler.set_epoch(epoch)
        for batch in loader:
            x, y = data.to_device(batch, "cpu")
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def explorer_runs():
    """Two real tiny finished runs for the explorer's tests, made once per session: 'bn' (100% adv + 0% clean,
    evaluated with untargeted PGD) and 'mbn' (100% adv + 100% clean, Mixture BN, targeted PGD)."""
    from advkit import config, paths, run

    root = paths.runs_base() / "explorer-runs"
    tiny = dict(epochs=1, n_train=128, n_test=64, batch_size=32, eval_checkpoints=[1, 2, 4], sanity_n=0,
                bnstats_channels=8)
    for name, point in {"bn": dict(clean_ratio=0.0, eval_targeted=False),
                        "mbn": dict(clean_ratio=1.0, norm="mbn")}.items():
        if not (root / name / "results.csv").exists():
            run.run(config.make_config("test", name=name, runs_root=str(root), **tiny | point), show_progress=False)
    return root
