"""AutoAttack (APGD-CE + APGD-T, torchattacks) beside the paper's PGD: seeded per batch, resumable, in
results.csv for every MBN branch, checked against untargeted PGD by a check that can fail."""

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: E402

import numpy as np
import pandas as pd
import pytest
import torch

from advkit import attacks, autoattack, evaluate, explore, norm, plots, results, run
from advkit.config import Config, make_config
from helpers import fmnist_model

N_ITER = 4  # the tests' APGD budget; runs use the reference 100


def _loader(x, y, batch_size):
    """A loader over in-memory [0, 1] images, as uint8 batches like the real ones."""
    u8 = (x * 255).round().to(torch.uint8)
    return [(u8[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]


# ---------------------------------------------------------------- one batch

def test_batch_is_seeded_and_leaves_model_and_global_rng_as_found(fmnist_test):
    x, y = fmnist_test[0][:16], fmnist_test[1][:16]
    model = fmnist_model(norm="mbn").train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with norm.use_branch(model, "adv"):
        a = autoattack.autoattack_batch(model, x, y, eps=16, num_classes=10, seed=5, n_iter=N_ITER)
        b = autoattack.autoattack_batch(model, x, y, eps=16, num_classes=10, seed=5, n_iter=N_ITER)
    assert torch.equal(torch.get_rng_state(), rng)  # torchattacks reseeds torch's global RNG: restored
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())  # eval mode: BN buffers untouched
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert set(a) == {"clean", "apgd-ce", "apgd-t", "autoattack"} and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["autoattack"], a["apgd-ce"] & a["apgd-t"])


def test_images_outside_the_eps_ball_are_refused(fmnist_test, monkeypatch):
    torchattacks = autoattack.require_torchattacks()

    class Overshooting:  # an attack that leaves the eps-ball (a broken or changed library)
        def __init__(self, model, eps, **kwargs):
            self.eps = eps

        def __call__(self, images, labels):
            return (images + 2 * self.eps).clamp(0, 1)

    monkeypatch.setattr(torchattacks, "APGD", Overshooting)
    x, y = fmnist_test[0][:4], fmnist_test[1][:4]
    with pytest.raises(RuntimeError, match="outside the eps-ball"):
        autoattack.autoattack_batch(fmnist_model(), x, y, eps=8, num_classes=10, n_iter=1)


def test_missing_torchattacks_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import torchattacks now raises ImportError
    with pytest.raises(ImportError, match="pip install --no-deps torchattacks==3.5.1"):
        make_config("test", eval_autoattack_n=8)
    make_config("test")  # AutoAttack off: torchattacks not needed


# ---------------------------------------------------------------- the check against PGD

def _correct(n_both, n_only_aa, n_only_pgd, n_neither):
    aa = [1] * n_both + [1] * n_only_aa + [0] * n_only_pgd + [0] * n_neither
    pgd = [1] * n_both + [0] * n_only_aa + [1] * n_only_pgd + [0] * n_neither
    return np.array(aa, bool), np.array(pgd, bool)


@pytest.mark.parametrize("counts, weaker_passes, masking_passes", [
    ((30, 0, 3, 67), True, True),      # AutoAttack stronger by 3 points: both pass
    ((30, 3, 1, 66), True, True),      # AutoAttack above PGD by 2 points: sampling noise
    ((30, 25, 0, 45), False, True),    # AutoAttack far weaker: broken or misconfigured
    ((30, 0, 10, 60), True, False),    # PGD 10 points above AutoAttack: gradient masking flagged
])
def test_autoattack_vs_pgd_check_can_fail_both_ways(counts, weaker_passes, masking_passes):
    table = evaluate.autoattack_vs_pgd_check(*_correct(*counts))
    assert list(table.columns) == ["check", "passed", "value", "expected"]
    assert table["passed"].tolist() == [weaker_passes, masking_passes]


def test_autoattack_vs_pgd_check_refuses_unpaired_arrays():
    with pytest.raises(ValueError, match="per-example arrays"):
        evaluate.autoattack_vs_pgd_check(np.ones(5, bool), np.ones(6, bool))


@pytest.fixture(scope="module")
def eps8(clean_trained_model, fmnist_test):
    """AutoAttack (10 iterations) and PGD-10 at eps 8 on 32 test images of the undefended model, where PGD
    breaks about half of the correct ones (neither 0 nor all)."""
    x, y = fmnist_test[0][:32], fmnist_test[1][:32]
    loader = _loader(x, y, 16)
    result = evaluate.autoattack_curve(clean_trained_model, loader, attacks.Attack(eps=8, step=2, steps=10, targeted=False), num_classes=10, n=32, seed=1)
    targeted = evaluate.robustness_curve(clean_trained_model, loader, attacks.Attack(eps=8, step=2), num_classes=10, checkpoints=[10], seed=1)
    return x, y, result, targeted


def test_autoattack_is_at_least_as_strong_as_pgd_on_the_same_images(eps8):
    _, _, result, targeted = eps8
    assert np.array_equal(result["labels"], targeted["labels"]) and np.array_equal(result["clean"], targeted["clean"])
    aa = result["autoattack"].mean()
    assert 0 < result["pgd_untargeted"].mean() < result["clean"].mean()  # the comparison is not 0 vs 0
    assert aa <= result["pgd_untargeted"].mean() and aa <= targeted["worst"][0].mean()
    assert aa <= min(result["apgd-ce"].mean(), result["apgd-t"].mean())
    assert evaluate.autoattack_vs_pgd_check(result["autoattack"], result["pgd_untargeted"])["passed"].all()


def test_check_catches_autoattack_on_the_wrong_eps_scale(clean_trained_model, eps8):
    x, y, result, _ = eps8
    wrong = autoattack.autoattack_batch(clean_trained_model, x, y, eps=8 / 255, num_classes=10, n_iter=10)
    check = evaluate.autoattack_vs_pgd_check(wrong["autoattack"].numpy(), result["pgd_untargeted"])
    assert not check["passed"][0]


# ---------------------------------------------------------------- resume

def test_saved_batches_are_reused_and_only_missing_ones_recomputed(fmnist_test, tmp_path, monkeypatch):
    x, y = fmnist_test[0][:24], fmnist_test[1][:24]
    model = fmnist_model()
    kw = dict(num_classes=10, n=20, seed=3, save_dir=tmp_path)
    reference = attacks.Attack(eps=16, step=4, steps=2, targeted=False)
    first = evaluate.autoattack_curve(model, _loader(x, y, 8), reference, **kw)
    assert len(first["labels"]) == 20 and sorted(p.name for p in tmp_path.iterdir()) == [
        "batch_000000.pt", "batch_000001.pt", "batch_000002.pt"]  # the third batch holds the last 4 images

    real, calls = autoattack.autoattack_batch, []
    monkeypatch.setattr(autoattack, "autoattack_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = evaluate.autoattack_curve(model, _loader(x, y, 8), reference, **kw)
    assert calls == [] and all(np.array_equal(first[k], again[k]) for k in first)
    (tmp_path / "batch_000001.pt").unlink()
    resumed = evaluate.autoattack_curve(model, _loader(x, y, 8), reference, **kw)
    assert calls == [1] and all(np.array_equal(first[k], resumed[k]) for k in first)  # seeded per batch


# ---------------------------------------------------------------- a run

@pytest.fixture(scope="module")
def mbn_run(tmp_path_factory):
    """A tiny MBN run with AutoAttack on its 32 evaluation images (and the reference budget cut to N_ITER)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(autoattack, "REFERENCE_ITERATIONS", N_ITER)
    cfg = make_config("test", name="aa-mbn", runs_root=str(tmp_path_factory.mktemp("runs")), norm="mbn",
                      clean_ratio=1.0, n_train=128, epochs=1, lr_decay_epochs=[], n_test=32, eval_batch_size=16,
                      eval_autoattack_n=32, sanity_n=0, bnstats_channels=0)
    table = run.run(cfg, show_progress=False)
    yield cfg, table
    mp.undo()


def test_run_writes_autoattack_rows_for_every_branch(mbn_run):
    cfg, table = mbn_run
    saved = pd.read_csv(cfg.run_dir / "results.csv")
    assert len(saved) == len(table)
    for branch in ("clean", "adv"):
        rows = saved[saved["branch"] == branch].set_index("attack")
        assert {"apgd-ce", "apgd-t", "autoattack"} <= set(rows.index)
        aa = rows.loc[["apgd-ce", "apgd-t", "autoattack"]]
        assert set(aa["n"]) == {cfg.eval_autoattack_n} and set(aa["steps"]) == {N_ITER}
        assert set(aa["eps"]) == {cfg.eval_eps} and (aa["accuracy"] == aa["worst_accuracy"]).all()
        pgd = saved[(saved["branch"] == branch) & (saved["attack"] == "pgd")]
        # n_test == eval_autoattack_n: the same images; AutoAttack is at least as strong as the paper's PGD
        assert rows.loc["autoattack", "accuracy"] <= pgd["worst_accuracy"].min()
        examples = np.load(next((cfg.run_dir / "eval" / "autoattack").glob(f"{branch}-*/examples.npz")))
        assert examples["autoattack"].mean() == pytest.approx(rows.loc["autoattack", "accuracy"])
    sanity = pd.read_csv(cfg.run_dir / "sanity.csv")
    assert set(sanity["branch"]) == {"clean", "adv"} and len(sanity) == 4
    assert sanity[sanity["check"].str.startswith("AutoAttack not weaker")]["passed"].all()


def test_resumed_run_reuses_its_autoattack_batches(mbn_run, monkeypatch):
    cfg, table = mbn_run

    def refuse(*args, **kwargs):
        raise AssertionError("AutoAttack recomputed a saved batch")

    monkeypatch.setattr(autoattack, "autoattack_batch", refuse)
    again = run.run(make_config(**(cfg.to_dict() | {"resume": True})), show_progress=False)
    pd.testing.assert_frame_equal(again, table)


def test_analysis_layer_shows_autoattack_beside_pgd(mbn_run, tmp_path):
    cfg, _ = mbn_run
    summary = results.summary_table(cfg.run_dir.parent)
    assert list(summary.columns[-3:]) == ["apgd-ce", "apgd-t", "autoattack"]
    assert summary["autoattack"].notna().all() and len(summary) == 2
    frame = results.analysis_frame(cfg.run_dir.parent)
    kit = frame[frame["source"] == "kit"]
    assert set(kit["attack"]) == {"clean", "pgd", "apgd-ce", "apgd-t", "autoattack"}
    assert set(frame[frame["source"] == "paper"]["attack"]) == {"clean", "pgd"}
    assert set(results.paper_protocol(kit)["attack"]) == {"clean", "pgd"}
    fig = plots.figure3(frame, tmp_path)  # the kit panel: the PGD curves only, at the PGD checkpoints
    kit_x = {x for line in fig.axes[1].lines for x in line.get_xdata()}
    assert kit_x and kit_x <= set(cfg.eval_checkpoints)
    explorer = explore.make_explorer(explore.explorer_frame(cfg.run_dir.parent), show=False)
    explorer.controls["threat model"].value = "AutoAttack"  # its markers beside the targeted PGD curves
    ax = explorer.drawn["curves"].axes[0]
    drawn = {x for points in ax.collections for x, _ in points.get_offsets()}
    assert explorer.error is None and N_ITER in drawn
    matplotlib.pyplot.close("all")


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("value", [-1, 1.5, True, "32", 129])
def test_bad_eval_autoattack_n_is_refused_naming_it(value):
    with pytest.raises(ValueError, match="eval_autoattack_n"):
        make_config("test", eval_autoattack_n=value)  # the test preset evaluates n_test=128 images


def test_bad_eval_autoattack_n_is_refused_before_the_run_folder_is_written(tmp_path):
    cfg = Config(name="aa-bad", runs_root=str(tmp_path), n_test=16, eval_autoattack_n=17)
    with pytest.raises(ValueError, match="eval_autoattack_n=17 .* n_test=16"):
        run.run(cfg, show_progress=False)
    assert not cfg.run_dir.exists()
    assert make_config("test", n_test=None, eval_autoattack_n=5000).eval_autoattack_n == 5000  # no n_test: any
