"""The trainer: every strategy of the paper in one loop (standard, 100% adv + X% clean, ALP, MBN, GN,
running statistics in the last epochs, BN-only finetuning).

A run lives in ``<runs_root>/<name>/``: ``config.json``, ``metrics.jsonl`` (one line per epoch),
``checkpoints/last.pt`` (model, optimizer, every RNG state, epoch and step), ``results.csv`` and
``status.json``. ``run(cfg)`` trains, evaluates and writes them; ``train(cfg)`` only trains.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import attacks, data, models, norm
from .config import Config, validate


def resolve_device(cfg: Config) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' is not accepted: no CUDA device is visible; use 'cpu' or 'auto'")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def uses_bf16(cfg: Config, device: torch.device) -> bool:
    return device.type == "cuda" if cfg.bf16 is None else cfg.bf16


def uses_channels_last(cfg: Config, device: torch.device) -> bool:
    return device.type == "cuda" if cfg.channels_last is None else cfg.channels_last


def autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where switched on (CUDA by default; CPU autocast works too, for the tests)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(cfg, device))


def build_model(cfg: Config) -> nn.Module:
    info = data.DATASETS[cfg.dataset]
    return models.build_model(cfg.arch, info.num_classes, cfg.norm, in_channels=info.channels, mean=info.mean,
                              std=info.std, width_multiplier=cfg.width_multiplier, gn_groups=cfg.gn_groups)


def learning_rate(cfg: Config, epoch: float) -> float:
    """lr at fractional ``epoch``: lr * batch / 256, linear warm-up, then step or exponential decay."""
    base = cfg.lr * cfg.batch_size / 256
    if epoch < cfg.warmup_epochs:
        return base * (epoch + 1e-12) / cfg.warmup_epochs
    if cfg.schedule == "exp":
        return base * cfg.exp_decay_rate ** math.floor(epoch)
    return base * cfg.lr_decay_factor ** sum(epoch >= e for e in cfg.lr_decay_epochs)


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (or RMSProp) with weight decay on conv and linear weights only (not on BN/GN or biases)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim > 1]
    no_decay = [p for n, p in trainable if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr = learning_rate(cfg, 0.0)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=cfg.momentum, alpha=0.9, eps=1.0)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def training_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: Config,
    generator: torch.Generator,
    attack_model: nn.Module | None = None,
    autocast_ctx: contextlib.AbstractContextManager | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The loss of one batch under the configured strategy, and batch statistics for the logs.

    ``100% adv + X% clean``: every image is attacked (targeted PGD through MBN_adv); a random X of the clean
    images is kept; loss = alpha * J(clean) + (1 - alpha) * J(adv) (J(adv) alone when X = 0), plus the ALP
    penalty. Plain BN/GN see adversarial and clean images in one batch (BN statistics of the mixture); Mixture
    BN forwards them separately, clean through MBN_clean and adversarial through MBN_adv.
    ``attack_model`` is the unwrapped model (under DDP: ``ddp.module``), so attacks never trigger all-reduce.
    """
    attack_model = attack_model if attack_model is not None else model
    autocast_ctx = autocast_ctx if autocast_ctx is not None else contextlib.nullcontext()
    mixture = norm.has_mixture_bn(attack_model)
    branch = (lambda name: norm.use_branch(attack_model, name)) if mixture else (lambda name: contextlib.nullcontext())
    stats: dict[str, Any] = {}
    if cfg.adv_ratio == 0:
        with branch("clean"), autocast_ctx:
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        stats.update(n_clean=len(labels), correct_clean=(logits.argmax(1) == labels).sum().item(), n_adv=0)
        return loss, stats

    t0 = time.perf_counter()
    with branch("adv"), autocast_ctx:
        adversarial = attacks.pgd(
            attack_model, images, labels, eps=cfg.train_eps, step=cfg.train_step, steps=cfg.train_steps,
            targeted=True, num_classes=data.DATASETS[cfg.dataset].num_classes,
            clean_start_prob=cfg.train_clean_start_prob, bn_mode=cfg.attack_bn_mode, generator=generator)
    stats["attack_seconds"] = time.perf_counter() - t0
    n_keep = round(cfg.clean_ratio * len(labels))
    keep = torch.randperm(len(labels), generator=generator, device=generator.device)[:n_keep].to(labels.device)
    with autocast_ctx:
        if mixture:
            with branch("adv"):
                logits_adv = model(adversarial)
            logits_clean = None
            if n_keep:
                with branch("clean"):
                    logits_clean = model(images[keep])
        else:
            logits = model(torch.cat([adversarial, images[keep]]) if n_keep else adversarial)
            logits_adv, logits_clean = logits[: len(labels)], (logits[len(labels):] if n_keep else None)
    loss_adv = F.cross_entropy(logits_adv.float(), labels, label_smoothing=cfg.label_smoothing)
    stats.update(n_adv=len(labels), correct_adv=(logits_adv.argmax(1) == labels).sum().item(), n_clean=n_keep)
    if logits_clean is None:
        return loss_adv, stats
    loss_clean = F.cross_entropy(logits_clean.float(), labels[keep], label_smoothing=cfg.label_smoothing)
    loss = cfg.alpha * loss_clean + (1 - cfg.alpha) * loss_adv
    if cfg.alp_weight > 0:
        penalty = cfg.alp_weight * (logits_clean.float() - logits_adv[keep].float()).pow(2).mean()
        stats["alp_penalty"] = penalty.item()
        loss = loss + penalty
    stats["correct_clean"] = (logits_clean.argmax(1) == labels[keep]).sum().item()
    return loss, stats


# ---------------------------------------------------------------- run folder and checkpoints

def prepare_run_dir(cfg: Config) -> Path:
    """Create the run folder; refuse to touch an existing run unless resume or overwrite is asked for."""
    run_dir = cfg.run_dir
    existing = (run_dir / "config.json").exists()
    if existing and not (cfg.resume or cfg.overwrite):
        raise FileExistsError(f"run folder {run_dir} already holds a run: pass resume=True to continue it or "
                              "overwrite=True to replace it (nothing was changed)")
    if cfg.resume and not (run_dir / "checkpoints" / "last.pt").exists():
        raise FileNotFoundError(f"resume=True but {run_dir / 'checkpoints' / 'last.pt'} does not exist")
    if existing and cfg.overwrite:
        for path in run_dir.iterdir():
            if path.name == "experiment.ipynb":  # papermill is writing this very notebook
                continue
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_dir


def write_status(run_dir: Path, state: str, **extra: Any) -> None:
    (run_dir / "status.json").write_text(json.dumps({"state": state, "time": time.time(), **extra}))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file, or a run folder's ``checkpoints/last.pt``; tensors and plain values only."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    return torch.load(path, map_location="cpu", weights_only=True)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _set_epoch(loader: torch.utils.data.DataLoader, epoch: int, seed: int) -> None:
    """A fresh, reproducible order (and augmentation draws) for ``epoch``, as DistributedSampler does."""
    sampler = loader.sampler.sampler if isinstance(loader.sampler, torch.utils.data.BatchSampler) else loader.sampler
    sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "generator"):
        loader.dataset.generator.manual_seed(seed * 100_003 + epoch)


# ---------------------------------------------------------------- the loop

def train(cfg: Config, show_progress: bool = True) -> nn.Module:
    """Train as ``cfg`` says, writing config, metrics and checkpoints into the run folder; return the model."""
    validate(cfg)
    device = resolve_device(cfg)
    run_dir = prepare_run_dir(cfg)
    cfg.save(run_dir / "config.json")  # on resume: the resolved config of the continuing run
    write_status(run_dir, "running")
    try:
        return _train(cfg, device, run_dir, show_progress)
    except BaseException as exc:
        write_status(run_dir, "failed", error=f"{type(exc).__name__}: {exc}")
        raise


def _train(cfg: Config, device: torch.device, run_dir: Path, show_progress: bool) -> nn.Module:
    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    loader = data.make_loader(cfg.dataset, "train", cfg.batch_size, n=cfg.n_train, seed=cfg.seed,
                              root=cfg.data_root, num_workers=cfg.num_workers)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the training set (n_train={cfg.n_train})")

    model = build_model(cfg)
    if cfg.init_checkpoint:
        model.load_state_dict(load_checkpoint(cfg.init_checkpoint)["model"])
    if cfg.finetune_bn:
        norm.freeze_all_but_bn(model)
    channels_last = uses_channels_last(cfg, device)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    optimizer = make_optimizer(cfg, model)
    forward_model = torch.compile(model) if cfg.compile else model

    start_epoch, step, skip = 0, 0, 0
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"], generator)
        start_epoch, step, skip = ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"]

    def checkpoint(epoch: int, batch_in_epoch: int) -> None:
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch,
                                    "rng": _rng_state(generator), "config": cfg.to_dict()})

    ctx = autocast(cfg, device)
    for epoch in range(start_epoch, cfg.epochs):
        running_stats = epoch >= cfg.epochs - cfg.running_stats_epochs
        model.train()
        if running_stats:
            norm.use_running_stats(model)
        _set_epoch(loader, epoch, cfg.seed)
        totals = dict(loss=0.0, batches=0, n_adv=0, correct_adv=0, n_clean=0, correct_clean=0, attack_seconds=0.0)
        t_epoch = time.perf_counter()
        bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show_progress,
                   leave=False)
        for batch_index, batch in enumerate(bar):
            if batch_index < skip:
                continue
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, epoch + batch_index / steps_per_epoch)
            images, labels = data.to_device(batch, device, channels_last)
            loss, stats = training_loss(forward_model, images, labels, cfg, generator, model, ctx)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch + 1}, step {step}; "
                                         f"the last good checkpoint is {ckpt_path}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            totals["loss"] += loss.item()
            totals["batches"] += 1
            for key in ("n_adv", "correct_adv", "n_clean", "correct_clean", "attack_seconds"):
                totals[key] += stats.get(key, 0)
            seen = totals["n_adv"] or totals["n_clean"]
            bar.set_postfix(loss=f"{totals['loss'] / totals['batches']:.3f}",
                            acc=f"{(totals['correct_adv'] or totals['correct_clean']) / max(seen, 1):.3f}",
                            img_s=f"{totals['batches'] * cfg.batch_size / (time.perf_counter() - t_epoch):.0f}")
            if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0:
                checkpoint(epoch, batch_index + 1)
        skip = 0
        seconds = time.perf_counter() - t_epoch
        record = {
            "epoch": epoch + 1, "step": step, "lr": learning_rate(cfg, epoch + 1 - 1e-9),
            "loss": totals["loss"] / max(totals["batches"], 1),
            "train_adv_accuracy": totals["correct_adv"] / totals["n_adv"] if totals["n_adv"] else None,
            "train_clean_accuracy": totals["correct_clean"] / totals["n_clean"] if totals["n_clean"] else None,
            "running_stats": running_stats, "seconds": seconds,
            "images_per_s": totals["batches"] * cfg.batch_size / seconds,
            "attack_share": totals["attack_seconds"] / seconds,
        }
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        checkpoint(epoch + 1, 0)
    model.eval()
    return model


def run(cfg: Config, show_progress: bool = True):
    """Train, then evaluate into the run folder: ``results.csv`` (robustness curves, each MBN branch),
    ``sanity.csv`` (sanity checks) and ``bnstats.csv`` (Figures 5-6). ``results.csv`` is written last: it marks
    a finished run."""
    from .bnstats import bnstats_for_run
    from .evaluate import evaluate_model, sanity_for_run

    model = train(cfg, show_progress)  # marks the run failed itself once its folder is prepared
    try:
        results = evaluate_model(model, cfg, show_progress=show_progress)
        if cfg.sanity_n:
            sanity_for_run(model, cfg).to_csv(cfg.run_dir / "sanity.csv", index=False)
        if cfg.bnstats_channels and norm.batch_norms(model):
            bnstats_for_run(model, cfg).to_csv(cfg.run_dir / "bnstats.csv", index=False)
        results.to_csv(cfg.run_dir / "results.csv", index=False)
    except BaseException as exc:
        write_status(cfg.run_dir, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    write_status(cfg.run_dir, "done")
    return results
