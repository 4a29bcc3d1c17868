"""Test-session set-up shared by tests/ and the nbval notebook runs.

Outputs (runs, figures) go to a temporary folder. When the analysis notebooks are collected, a small runs
root is produced first by real (tiny, `test`-preset) training runs, so that their kit panels draw real numbers.
"""

import os
import tempfile
from pathlib import Path

import pytest

os.environ["ADVKIT_OUTPUT_BASE"] = tempfile.mkdtemp(prefix="advkit-test-runs-")


@pytest.fixture(autouse=True)
def figures_to_a_temporary_folder(monkeypatch, tmp_path_factory):
    """Figures drawn without a folder go to a temporary one, never over the committed figures/."""
    from advkit import plots

    monkeypatch.setattr(plots, "FIGURES_DIR", tmp_path_factory.mktemp("figures"))

TINY = dict(epochs=1, n_train=128, n_test=64, batch_size=32, eval_checkpoints=[1, 2, 4], sanity_n=0,
            bnstats_channels=4)
ANALYSIS_POINTS = {
    "standard": dict(adv_ratio=0, clean_ratio=1.0),
    "adv0clean": dict(clean_ratio=0.0),
    "adv50clean": dict(clean_ratio=0.5),
    "adv100clean": dict(clean_ratio=1.0),
    "adv100clean-alp": dict(clean_ratio=1.0, alp_weight=0.5),
    "mbn-adv100clean": dict(clean_ratio=1.0, norm="mbn"),
    "gn-adv100clean": dict(clean_ratio=1.0, norm="gn"),
    "adv0clean-rs": dict(clean_ratio=0.0, running_stats_epochs=1),
    "adv0clean-rs-r14": dict(clean_ratio=0.0, running_stats_epochs=1, arch="small_resnet14"),
    "standard-r14": dict(adv_ratio=0, clean_ratio=1.0, arch="small_resnet14"),
}


def make_analysis_runs(root: Path) -> None:
    from advkit import config, run

    for name, point in ANALYSIS_POINTS.items():
        if not (root / name / "results.csv").exists():
            run.run(config.make_config("test", name=name, runs_root=str(root), **TINY | point), show_progress=False)


def pytest_collection_finish(session):
    if any("notebooks/analysis" in str(getattr(item, "path", "")) for item in session.items):
        make_analysis_runs(Path(os.environ["ADVKIT_OUTPUT_BASE"]) / "runs")
