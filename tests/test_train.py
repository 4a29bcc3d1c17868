import dataclasses
import json

import pytest
import torch

from advkit import config, norm, run, rundir, strategy, train
from advkit.config import make_config
from helpers import fmnist_model


def _batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _record_training_inputs(model):
    """Inputs of forward passes made with trainable parameters (i.e. not the attack's passes)."""
    seen = []
    model.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().clone()) if m.net.conv1.weight.requires_grad else None)
    return seen


@pytest.mark.parametrize("clean_ratio, expected_clean", [(0.0, 0), (0.5, 8), (1.0, 16)])
def test_clean_ratio_decides_which_clean_images_are_forwarded(clean_ratio, expected_clean):
    cfg = make_config("test", clean_ratio=clean_ratio, train_steps=2)
    model = fmnist_model().train()
    seen = _record_training_inputs(model)
    x, y = _batch()
    loss, stats = strategy.training_loss(model, x, y, cfg, torch.Generator().manual_seed(0))
    forwarded = torch.cat(seen)
    is_clean = (forwarded.flatten(1)[:, None, :] == x.flatten(1)[None]).all(-1).any(1)
    assert int(is_clean.sum()) == expected_clean == stats["n_clean"]
    assert int((~is_clean).sum()) == 16 == stats["n_adv"]


@pytest.mark.parametrize("overrides", [dict(norm="mbn"), dict(alp_weight=0.5), dict(gpus=8, batch_size=64)])
def test_a_clean_ratio_that_keeps_no_clean_image_per_process_is_refused(overrides):
    """clean_ratio 0.01 of a per-process batch of 16 (or 8) rounds to 0 kept images: the run would train
    "100% adv + 0% clean" under a "1% clean" label (MBN_clean never trained, ALP silently off)."""
    kw = dict(clean_ratio=0.01, batch_size=16) | overrides
    with pytest.raises(ValueError, match=r"clean_ratio=0.01 is not accepted with batch_size=\d+, gpus=\d+: each "
                                         r"process keeps round\(0.01 x \d+\) = 0 clean images"):
        make_config("test", **kw)
    assert make_config("test", clean_ratio=0.04, batch_size=16).clean_ratio == 0.04  # round(0.64) = 1 image


def test_mixture_bn_statistics_move_only_with_their_own_images():
    x, y = _batch()

    def moved(**overrides):
        model = fmnist_model(norm="mbn").train()
        before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
        cfg = dataclasses.replace(make_config("test", norm="mbn", clean_ratio=1), **overrides)  # the config refuses
        strategy.training_loss(model, x, y, cfg, torch.Generator().manual_seed(0))  # one-branch MBN; the loss does not
        after = model.state_dict()
        return {b for b in norm.BRANCHES if any(not torch.equal(after[k], v) for k, v in before.items()
                                                if f".{b}." in k)}

    assert moved(adv_ratio=0, clean_ratio=1) == {"clean"}
    assert moved(clean_ratio=0) == {"adv"}
    assert moved(clean_ratio=1) == {"clean", "adv"}


def test_alp_changes_the_loss_by_exactly_its_penalty():
    model = fmnist_model().eval()  # fixed BN statistics, so both calls see the same function
    x, y = _batch()
    kw = dict(clean_ratio=1.0, train_steps=2)
    plain, _ = strategy.training_loss(model, x, y, make_config("test", **kw), torch.Generator().manual_seed(3))
    with_alp, stats = strategy.training_loss(model, x, y, make_config("test", alp_weight=0.5, **kw),
                                          torch.Generator().manual_seed(3))
    assert stats["alp_penalty"] > 0
    assert with_alp.item() == pytest.approx(plain.item() + stats["alp_penalty"], rel=1e-6)


def test_loss_is_equation_1():
    model = fmnist_model().eval()
    x, y = _batch()
    cfgs = {a: make_config("test", clean_ratio=1.0, alpha=a) for a in (0.0, 0.5, 1.0)}
    losses = {a: strategy.training_loss(model, x, y, c, torch.Generator().manual_seed(1))[0].item() for a, c in cfgs.items()}
    assert losses[0.5] == pytest.approx((losses[0.0] + losses[1.0]) / 2, rel=1e-5)


def test_lr_schedule_matches_the_paper_at_the_decay_epochs():
    cfg = make_config("paper")
    base = 0.1 * 4096 / 256
    assert train.learning_rate(cfg, 2.5) == pytest.approx(base / 2)  # linear warm-up over 5 epochs
    assert train.learning_rate(cfg, 34.99) == pytest.approx(base)
    assert train.learning_rate(cfg, 35) == pytest.approx(base * 0.1)
    assert train.learning_rate(cfg, 70) == pytest.approx(base * 0.01)
    assert train.learning_rate(cfg, 95) == pytest.approx(base * 0.001)
    assert train.learning_rate(cfg, 109.9) == pytest.approx(base * 0.001)
    exp = make_config("test", schedule="exp", exp_decay_rate=0.5, lr_decay_epochs=[])
    assert train.learning_rate(exp, 1.5) == pytest.approx(0.1 * 64 / 256 * 0.5)


def test_weight_decay_only_on_conv_and_linear_weights():
    model = fmnist_model(norm="mbn")
    opt = train.make_optimizer(make_config("test"), model)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = [n for n, p in model.named_parameters() if id(p) in decayed]
    assert names and all(n.endswith("weight") and ("conv" in n or "fc" in n or "downsample.0" in n) for n in names)
    assert opt.param_groups[1]["weight_decay"] == 0


def test_run_writes_the_run_folder_and_refuses_to_overwrite(tmp_path):
    cfg = make_config("test", name="r1", runs_root=str(tmp_path), norm="mbn", clean_ratio=1.0, epochs=2)
    table = run.run(cfg, show_progress=False)
    run_dir = tmp_path / "r1"
    assert {p.name for p in run_dir.iterdir()} >= {"config.json", "metrics.jsonl", "checkpoints", "results.csv",
                                                   "status.json"}
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["strategy"] == "100% adv + 100% clean" and saved["norm"] == "mbn"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and all(m["images_per_s"] > 0 for m in metrics)
    assert set(table["branch"]) == {"clean", "adv"} and set(table["steps"]) == {0, *cfg.eval_checkpoints}
    assert table["accuracy"].between(0, 1).all()
    ckpt = rundir.load_checkpoint(run_dir)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * (512 // 64)
    files = sorted(p for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock")  # the lock names its holder
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    with pytest.raises(FileExistsError, match="resume=True .* overwrite=True"):
        run.run(cfg, show_progress=False)
    after = sorted(p for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock")
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in after} == before


def test_running_statistics_epochs_freeze_buffers_but_train_affine(tmp_path):
    cfg = make_config("test", name="rs", runs_root=str(tmp_path), running_stats_epochs=2, epochs=2)
    model = run.train_run(cfg, show_progress=False)
    init = train.build_model(cfg)
    for (name, buf), (_, buf0) in zip(model.named_buffers(), init.named_buffers()):
        if "running" in name:
            assert torch.equal(buf, buf0), name
    assert not torch.equal(model.net.bn1.weight, init.net.bn1.weight)
    flags = [json.loads(l)["running_stats"] for l in (tmp_path / "rs" / "metrics.jsonl").read_text().splitlines()]
    assert flags == [True, True]
    cfg1 = make_config("test", name="rs1", runs_root=str(tmp_path), running_stats_epochs=1, epochs=2)
    run.train_run(cfg1, show_progress=False)
    flags = [json.loads(l)["running_stats"] for l in (tmp_path / "rs1" / "metrics.jsonl").read_text().splitlines()]
    assert flags == [False, True]


def test_bn_only_finetuning_changes_nothing_but_bn(tmp_path):
    base = make_config("test", name="base", runs_root=str(tmp_path), epochs=1, train_steps=1)
    run.train_run(base, show_progress=False)
    start = rundir.load_checkpoint(tmp_path / "base")["model"]
    ft = make_config("test", name="ft", runs_root=str(tmp_path), epochs=1, adv_ratio=0, clean_ratio=1,
                     finetune_bn=True,
                     init_checkpoint=str(tmp_path / "base" / "checkpoints" / "last.pt"))  # trained, not evaluated
    model = run.train_run(ft, show_progress=False)
    bn_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, start[k])]
    assert changed
    assert all(k.rsplit(".", 1)[0] in bn_names for k in changed), changed


def test_a_finetuning_run_reads_its_source_checkpoint_once(tmp_path, monkeypatch):
    """Checking the source fits, training from it and (on a resume) checking it still holds the weights the run
    started from take one read: a ResNet-638 checkpoint is large. The code before read it twice, and three times
    on a resume."""
    from advkit import run as run_module
    from advkit import train as train_module

    base = make_config("test", name="base", runs_root=str(tmp_path), epochs=1, train_steps=1)
    run.train_run(base, show_progress=False)
    source = str(tmp_path / "base" / "checkpoints" / "last.pt")  # trained, not evaluated
    reads = []

    def counting(path):
        reads.append(str(path))
        return rundir.load_checkpoint(path)

    monkeypatch.setattr(run_module, "load_checkpoint", counting)
    monkeypatch.setattr(train_module, "load_checkpoint", counting)
    ft = dict(name="ft", runs_root=str(tmp_path), adv_ratio=0, clean_ratio=1, finetune_bn=True, init_checkpoint=source,
              train_steps=1)
    run.train_run(make_config("test", epochs=1, **ft), show_progress=False)
    assert reads.count(source) == 1, reads
    run.train_run(make_config("test", epochs=2, resume=True, **ft), show_progress=False)
    assert reads.count(source) == 2, reads


def test_a_finetuning_run_hashes_its_source_weights_once(tmp_path, monkeypatch):
    """A finished finetuning run asked again (resume='auto') after its source was trained again is refused. The code
    before hashed the source's weights twice on the way (the finished-run check, then the resume check)."""
    from advkit import models

    base = make_config("test", name="base", runs_root=str(tmp_path), epochs=1, train_steps=1)
    run.train_run(base, show_progress=False)
    source = str(tmp_path / "base" / "checkpoints" / "last.pt")
    digests, plain = [], models.state_digest

    def counting(state):
        digests.append(plain(state))
        return digests[-1]

    monkeypatch.setattr(models, "state_digest", counting)
    ft = make_config("test", name="ft", runs_root=str(tmp_path), epochs=1, adv_ratio=0, clean_ratio=1,
                     finetune_bn=True, init_checkpoint=source, train_steps=1)
    run.run(ft, show_progress=False)
    first = plain(rundir.load_checkpoint(source)["model"])
    assert digests.count(first) == 1, digests
    run.train_run(dataclasses.replace(base, overwrite=True, seed=1), show_progress=False)  # the source changes
    now = plain(rundir.load_checkpoint(source)["model"])
    with pytest.raises(config.ResumeConflict, match="now holds other weights"):
        run.run(dataclasses.replace(ft, resume="auto"), show_progress=False)
    assert digests.count(now) == 1, digests


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    cfg = make_config("test", name="res", runs_root=str(tmp_path), epochs=1)
    run.train_run(cfg, show_progress=False)
    more = make_config("test", name="res", runs_root=str(tmp_path), epochs=2, resume=True, lr_decay_epochs=[1])
    run.train_run(more, show_progress=False)
    lines = (tmp_path / "res" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2]
    assert rundir.load_checkpoint(tmp_path / "res")["step"] == 2 * (512 // 64)


def test_bf16_autocast_and_channels_last_run_on_cpu(tmp_path):
    cfg = make_config("test", name="amp", runs_root=str(tmp_path), epochs=1, bf16=True, channels_last=True,
                      norm="mbn", clean_ratio=0.5)
    table = run.run(cfg, show_progress=False)
    assert len(table) == 2 * (1 + len(cfg.eval_checkpoints)) and table["accuracy"].between(0, 1).all()


def test_notebook_parameters_mean_preset_plus_changes():
    cfg = config.config_from_parameters({"preset": "demo", "clean_ratio": 0.5, "n_train": None})
    assert cfg.clean_ratio == 0.5 and cfg.epochs == config.PRESETS["demo"]["epochs"]
    assert cfg.n_train == config.PRESETS["demo"]["n_train"]  # left at the notebook default (None): the preset's value
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['epoch'\]; valid parameters: \['preset'"):
        config.config_from_parameters({"epoch": 3})


def test_resume_mid_epoch_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, monkeypatch):
    kw = dict(runs_root=str(tmp_path), epochs=2, checkpoint_every_steps=3, norm="mbn", clean_ratio=0.5)
    reference = run.train_run(make_config("test", name="straight", **kw), show_progress=False)

    real_loss, calls = train.training_loss, []

    def crash_at_step_11(*args, **kwargs):
        calls.append(1)
        if len(calls) == 11:  # epoch 2, batch 3 (8 batches per epoch); last checkpoint after step 9
            raise KeyboardInterrupt("simulated kill")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train, "training_loss", crash_at_step_11)
    with pytest.raises(KeyboardInterrupt):
        run.train_run(make_config("test", name="crashed", **kw), show_progress=False)
    ckpt = rundir.load_checkpoint(tmp_path / "crashed")
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]) == (1, 1, 9)
    assert json.loads((tmp_path / "crashed" / "status.json").read_text())["state"] == "failed"
    monkeypatch.setattr(train, "training_loss", real_loss)
    resumed = run.train_run(make_config("test", name="crashed", resume=True, **kw), show_progress=False)
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    # every random state too: the global one (before the loaders had their own generator, the resumed epoch's
    # DataLoader drew its workers' base seed from it once more) and the attack's
    got, want = (rundir.load_checkpoint(tmp_path / name)["rng"][0] for name in ("crashed", "straight"))
    assert torch.equal(got["torch"], want["torch"]) and torch.equal(got["generator"], want["generator"])


def test_compiled_training_matches_eager(tmp_path):
    """compile=True (torch.compile of the training forward, opt-in) trains the same function on the CPU. Compiled
    kernels round differently; with zero-initialised residual scales the 4 steps amplify that least."""
    kw = dict(runs_root=str(tmp_path), epochs=1, n_train=128, batch_size=32, norm="mbn", clean_ratio=0.5,
              zero_init_residual=True)
    eager = run.train_run(make_config("test", name="eager", **kw), show_progress=False)
    compiled = run.train_run(make_config("test", name="compiled", compile=True, **kw), show_progress=False)
    loss = [json.loads((tmp_path / n / "metrics.jsonl").read_text())["loss"] for n in ("eager", "compiled")]
    assert loss[1] == pytest.approx(loss[0], rel=1e-3)
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), atol=1e-3), name
