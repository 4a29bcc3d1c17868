"""DistributedDataParallel on the CPU: 2 gloo processes launched by torchrun, against one process."""

import dataclasses
import json
import subprocess
import sys
import warnings

import numpy as np
import papermill
import pandas as pd
import pytest
import torch

from advkit import config, distributed, paths, run, rundir, train
from advkit.config import make_config

TINY = dict(epochs=1, n_train=256, n_test=70, batch_size=64, eval_batch_size=16, eval_checkpoints=[1, 2],
            sanity_n=0, bnstats_channels=0)


def _metrics(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_give_the_losses_and_weights_of_one(tmp_path):
    """Standard training with GroupNorm is deterministic; the global batch of 64 is split 32 + 32."""
    kw = dict(runs_root=str(tmp_path), norm="gn", adv_ratio=0, clean_ratio=1.0, lr_decay_epochs=[], **TINY)
    single = make_config("test", name="single", **kw)
    double = make_config("test", name="double", gpus=2, **kw)
    run.run(single, show_progress=False)
    table = run.run_launched(double, show_progress=False)
    one, two = _metrics(single.run_dir), _metrics(double.run_dir)
    assert two[0]["processes"] == 2 and one[0]["processes"] == 1
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-5)
    w1 = rundir.load_checkpoint(single.run_dir)["model"]
    w2 = rundir.load_checkpoint(double.run_dir)["model"]
    assert all(torch.allclose(w1[k].float(), w2[k].float(), atol=1e-5) for k in w1)
    # distributed evaluation: 70 images in 5 batches of 16 over 2 ranks, each counted once, in order
    assert set(table["n"]) == {70}
    ex1 = np.load(next((single.run_dir / "eval").glob("*/examples.npz")))
    ex2 = np.load(next((double.run_dir / "eval").glob("*/examples.npz")))
    assert np.array_equal(ex1["labels"], ex2["labels"]) and ex2["final"].shape == (2, 70)
    assert np.array_equal(ex1["clean"], ex2["clean"])
    assert len(rundir.load_checkpoint(double.run_dir)["rng"]) == 2  # every rank's random state


def test_experiment_notebook_launches_torchrun_with_mixture_bn(tmp_path):
    nb = paths.project_root() / "notebooks" / "experiment.ipynb"
    params = dict(name="ddp-mbn", runs_root=str(tmp_path), gpus=2, norm="mbn", clean_ratio=0.5, **TINY)
    papermill.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), parameters=params, progress_bar=False)
    results = pd.read_csv(tmp_path / "ddp-mbn" / "results.csv")
    assert set(results["branch"]) == {"clean", "adv"} and set(results["n"]) == {70}
    assert _metrics(tmp_path / "ddp-mbn")[0]["processes"] == 2


def test_a_failing_rank_fails_the_notebook_cell_with_its_traceback(tmp_path):
    nb = paths.project_root() / "notebooks" / "experiment.ipynb"
    params = dict(name="ddp-fail", runs_root=str(tmp_path), gpus=2, dataset="cifar10",
                  data_root=str(tmp_path / "no-cifar"), **TINY)
    with pytest.raises(papermill.PapermillExecutionError, match=r"(?s)distributed run failed.*CIFAR-10"):
        papermill.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), parameters=params, progress_bar=False)


@pytest.mark.parametrize("overrides, message", [
    (dict(norm="mbn", clean_ratio=1.0, sync_bn=True), r"sync_bn=True is not accepted with norm='mbn'"),
    (dict(batch_size=63, gpus=2), r"batch_size=63 is not accepted with gpus=2"),
])
def test_impossible_distributed_combinations_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config("test", **overrides)


def test_paper_preset_pipeline_on_a_tiny_generated_imagefolder(tmp_path):
    """A pipeline test only: the `paper` preset (ImageNet, ResNet, targeted PGD, step schedule) end to end on
    a generated ImageFolder of 2 classes, scaled down to seconds. It proves the plumbing, not the science."""
    from PIL import Image

    for split in ("train", "val"):
        for c, cls in enumerate(("n01440764", "n01443537")):
            (tmp_path / "imagenet" / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (256 + 8 * i, 240), (40 * i, 120 * c, 200)).save(
                    tmp_path / "imagenet" / split / cls / f"{i}.png")
    cfg = make_config("paper", name="paper-pipeline", runs_root=str(tmp_path / "runs"),
                      data_root=str(tmp_path / "imagenet"), arch="resnet50", n_train=8, n_test=8, batch_size=4,
                      eval_batch_size=4, epochs=1, warmup_epochs=0, lr_decay_epochs=[1], train_steps=1,
                      eval_checkpoints=[1], num_workers=0, checkpoint_every_steps=0, sanity_n=4, bnstats_channels=4)
    table = run.run(cfg, show_progress=False)
    assert set(table["steps"]) == {0, 1} and set(table["n"]) == {8}
    metrics = _metrics(cfg.run_dir)
    assert metrics[0]["images_per_s"] > 0 and 0 < metrics[0]["attack_share"] < 1
    assert (cfg.run_dir / "bnstats.csv").exists() and (cfg.run_dir / "sanity.csv").exists()


# ---------------------------------------------------------------- BN under DDP: one model evaluated, exact resume

# Adversarial training on 16 images per rank: each rank's BN running statistics follow its own shard (per-replica
# BN, the paper's choice) and drift apart; the training attack uses them, so they also steer training.
DRIFT = dict(epochs=1, n_train=256, batch_size=32, lr=0.4, lr_decay_epochs=[], train_steps=1, n_test=128,
             eval_batch_size=16, eval_checkpoints=[1, 2], sanity_n=0, bnstats_channels=0, device="cpu", gpus=2)
CRASH_SCRIPT = """
import sys
from advkit import run, train

real, seen = train.training_loss, []

def crashing(*args, **kwargs):  # every rank crashes at the same training step, as a killed job would stop
    seen.append(1)
    if len(seen) == int(sys.argv[2]):
        raise RuntimeError("simulated crash")
    return real(*args, **kwargs)

train.training_loss = crashing
raise SystemExit(run.main([sys.argv[1]]))
"""


@pytest.fixture(scope="module")
def bn_ddp_run(tmp_path_factory):
    """An uninterrupted 2-process BN run (checkpoint every 2 steps, which changes nothing in its trajectory)."""
    cfg = make_config("test", name="straight", runs_root=str(tmp_path_factory.mktemp("ddp")), norm="bn",
                      checkpoint_every_steps=2, **DRIFT)
    run.run_launched(cfg, show_progress=False)
    return cfg


def _evaluate_checkpoint_in_one_process(cfg, name):
    """The saved checkpoint's model, evaluated by a single process into a fresh run folder."""
    from advkit.evaluate import evaluate_model

    model = train.build_model(cfg)
    model.load_state_dict(rundir.load_checkpoint(cfg.run_dir)["model"])
    other = dataclasses.replace(cfg, name=name)
    return evaluate_model(model.eval(), other, show_progress=False), other.run_dir


def _assert_same_evaluation(run_dir, other_dir):
    got, want = pd.read_csv(run_dir / "results.csv"), pd.read_csv(other_dir / "results.csv")
    assert got[["branch", "attack", "steps", "n"]].equals(want[["branch", "attack", "steps", "n"]])
    assert list(got["accuracy"]) == list(want["accuracy"]) and list(got["worst_accuracy"]) == list(
        want["worst_accuracy"])
    examples = [sorted((d / "eval").glob("*/examples.npz")) for d in (run_dir, other_dir)]
    assert len(examples[0]) == len(examples[1]) > 0
    for a, b in zip(*examples):
        ea, eb = np.load(a), np.load(b)
        for key in ("clean", "final", "worst", "labels"):
            assert np.array_equal(ea[key], eb[key]), (a.parent.name, key)


@pytest.mark.parametrize("norm_layer", ["bn", "mbn"])
def test_a_two_process_run_evaluates_exactly_its_saved_checkpoint(tmp_path, bn_ddp_run, norm_layer):
    """results.csv of a 2-process run = one process's evaluation of the checkpoint it saved, with per-replica
    BN statistics during training (BN; MBN, whose two branches each keep per-rank statistics)."""
    if norm_layer == "bn":
        cfg = bn_ddp_run
    else:
        cfg = make_config("test", name="mbn", runs_root=str(tmp_path), norm="mbn", clean_ratio=0.5, **DRIFT)
        run.run_launched(cfg, show_progress=False)
    ranks = rundir.load_checkpoint(cfg.run_dir)["rank_buffers"]  # per-replica BN kept: the ranks' statistics differ
    assert any(not torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0] if k.endswith("running_mean"))
    table, other_dir = _evaluate_checkpoint_in_one_process(cfg, "reevaluated")
    table.to_csv(other_dir / "results.csv", index=False)
    _assert_same_evaluation(cfg.run_dir, other_dir)


def test_a_killed_and_resumed_two_process_bn_run_equals_an_uninterrupted_one(tmp_path, bn_ddp_run):
    cfg = dataclasses.replace(bn_ddp_run, name="crashed", runs_root=str(tmp_path))
    config_path = tmp_path / "launch.json"
    cfg.save(config_path)
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(config_path), "6"]  # crashes at step 6 of 8, after the checkpoint of step 4
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode != 0 and "simulated crash" in proc.stdout + proc.stderr
    assert rundir.load_checkpoint(cfg.run_dir)["step"] == 4 and not (cfg.run_dir / "results.csv").exists()

    run.run_launched(dataclasses.replace(cfg, resume=True), show_progress=False)
    got, want = rundir.load_checkpoint(cfg.run_dir), rundir.load_checkpoint(bn_ddp_run.run_dir)
    assert got["step"] == want["step"] == 8
    for name in want["model"]:  # weights, and rank 0's BN buffers
        assert torch.equal(got["model"][name], want["model"][name]), name
    assert pd.read_csv(cfg.run_dir / "results.csv").equals(pd.read_csv(bn_ddp_run.run_dir / "results.csv"))
    assert len(got["rank_buffers"]) == len(want["rank_buffers"]) == 2
    for mine, theirs in zip(got["rank_buffers"], want["rank_buffers"]):  # every rank's BN buffers
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[name], theirs[name]) for name in theirs)


def test_resume_takes_each_rank_its_own_buffers_and_warns_on_an_older_checkpoint_under_ddp():
    model = train.build_model(make_config("test", norm="bn"))
    state = model.state_dict()
    own = {name: torch.full_like(value, 7) for name, value in train._buffers(model).items()}
    assert own and set(own) < set(state) and "net.bn1.running_mean" in own  # buffers only, not weights
    ckpt = {"model": state, "rank_buffers": [train._buffers(model), own]}
    two = distributed.Context(rank=1, world_size=2)
    resumed = train._resumed_state(ckpt, model, two)
    assert all(torch.equal(resumed[k], own[k]) for k in own)
    assert resumed["net.conv1.weight"] is state["net.conv1.weight"]
    older = {"model": state}  # no rank_buffers: rank 0's on every rank, as before, said under DDP
    with pytest.warns(RuntimeWarning, match="holds rank 0's buffers only .* will not equal an uninterrupted one"):
        assert train._resumed_state(older, model, two) is state
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train._resumed_state(older, model, distributed.Context()) is state  # one process: nothing lost


def test_each_cuda_process_makes_its_own_gpu_current_before_joining_the_group(monkeypatch):
    """NCCL's all_gather_object (the checkpoint's RNG states) puts its tensors on the current CUDA device: without
    set_device every rank used GPU 0. Shown without a GPU by recording the calls torchrun's environment causes."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    distributed.init_from_env()
    assert calls == [("set_device", 1), ("init", "nccl")]
