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

from . import attacks, data, distributed, models, norm
from .config import Config, validate


def resolve_device(cfg: Config) -> torch.device:
    """The device kind a run uses (under torchrun each rank takes its own CUDA device, see resolve_rank_device)."""
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


class TrainingForward(nn.Module):
    """The forward pass of one training step in a single call (DDP needs exactly one per backward).

    ``forward(adversarial, clean)`` returns their logits (either may be None). Plain BN/GN see both in one batch
    (BN statistics of the mixture, the paper's baseline); Mixture BN forwards adversarial images through
    MBN_adv and clean ones through MBN_clean, so their statistics never mix.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.mixture = norm.has_mixture_bn(model)

    def forward(self, adversarial: torch.Tensor | None, clean: torch.Tensor | None):
        if self.mixture:
            outputs = []
            for images, branch in ((adversarial, "adv"), (clean, "clean")):
                with norm.use_branch(self.model, branch):
                    outputs.append(self.model(images) if images is not None else None)
            return tuple(outputs)
        parts = [t for t in (adversarial, clean) if t is not None]
        logits = self.model(torch.cat(parts) if len(parts) > 1 else parts[0])
        n_adv = len(adversarial) if adversarial is not None else 0
        return (logits[:n_adv] if adversarial is not None else None,
                logits[n_adv:] if clean is not None else None)


def training_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: Config,
    generator: torch.Generator,
    forward: nn.Module | None = None,
    autocast_ctx: contextlib.AbstractContextManager | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The loss of one batch under the configured strategy, and batch statistics for the logs.

    ``100% adv + X% clean``: every image is attacked (targeted PGD through MBN_adv); a random X of the clean
    images is kept; loss = alpha * J(clean) + (1 - alpha) * J(adv) (J(adv) alone when X = 0), plus the ALP
    penalty. ``model`` is the plain model, which the attack runs on (under DDP it never triggers an
    all-reduce); ``forward`` is its :class:`TrainingForward`, possibly wrapped by DDP or torch.compile.
    """
    forward = forward if forward is not None else TrainingForward(model)
    autocast_ctx = autocast_ctx if autocast_ctx is not None else contextlib.nullcontext()
    stats: dict[str, Any] = {}
    if cfg.adv_ratio == 0:
        with autocast_ctx:
            _, logits = forward(None, images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        stats.update(n_clean=len(labels), correct_clean=(logits.argmax(1) == labels).sum().item(), n_adv=0)
        return loss, stats

    t0 = time.perf_counter()
    with norm.use_branch(model, "adv") if norm.has_mixture_bn(model) else contextlib.nullcontext(), autocast_ctx:
        adversarial = attacks.pgd(
            model, images, labels, eps=cfg.train_eps, step=cfg.train_step, steps=cfg.train_steps,
            targeted=True, num_classes=data.DATASETS[cfg.dataset].num_classes,
            clean_start_prob=cfg.train_clean_start_prob, bn_mode=cfg.attack_bn_mode,
            fold_bn=cfg.attack_fold_bn, generator=generator)
    stats["attack_seconds"] = time.perf_counter() - t0
    n_keep = round(cfg.clean_ratio * len(labels))
    keep = torch.randperm(len(labels), generator=generator, device=generator.device)[:n_keep].to(labels.device)
    with autocast_ctx:
        logits_adv, logits_clean = forward(adversarial, images[keep] if n_keep else None)
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

def prepare_run_dir(cfg: Config, ctx: distributed.Context = distributed.Context()) -> Path:
    """Create the run folder; refuse to touch an existing run unless resume or overwrite is asked for.
    Every rank checks (so all raise alike); only rank 0 changes anything."""
    run_dir = cfg.run_dir
    existing = (run_dir / "config.json").exists()
    if existing and not (cfg.resume or cfg.overwrite):
        raise FileExistsError(f"run folder {run_dir} already holds a run: pass resume=True to continue it or "
                              "overwrite=True to replace it (nothing was changed)")
    if cfg.resume and not (run_dir / "checkpoints" / "last.pt").exists():
        raise FileNotFoundError(f"resume=True but {run_dir / 'checkpoints' / 'last.pt'} does not exist")
    distributed.barrier(ctx)  # every rank has checked before rank 0 changes anything
    if not ctx.main:
        return run_dir
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
    """This process's random state (a checkpoint keeps one per rank)."""
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

def resolve_rank_device(cfg: Config, ctx: distributed.Context) -> torch.device:
    device = resolve_device(cfg)
    return torch.device("cuda", ctx.local_rank) if device.type == "cuda" and ctx.active else device


def train(cfg: Config, show_progress: bool = True) -> nn.Module:
    """Train as ``cfg`` says, writing config, metrics and checkpoints into the run folder; return the model.

    Under torchrun every process calls it: the global batch is split across ranks, gradients are averaged by
    DDP, BN statistics stay per replica (as in the paper) unless ``sync_bn``, and only rank 0 writes.
    """
    validate(cfg)
    ctx = distributed.init_from_env()
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"batch_size={cfg.batch_size} is not accepted with {ctx.world_size} processes: the global "
                         "batch must divide evenly between them")
    device = resolve_rank_device(cfg, ctx)
    run_dir = prepare_run_dir(cfg, ctx)
    if ctx.main:
        cfg.save(run_dir / "config.json")  # on resume: the resolved config of the continuing run
        write_status(run_dir, "running")
    distributed.barrier(ctx)
    try:
        return _train(cfg, device, run_dir, show_progress and ctx.main, ctx)
    except BaseException as exc:
        if ctx.main:
            write_status(run_dir, "failed", error=f"{type(exc).__name__}: {exc}")
        raise


def _train(cfg: Config, device: torch.device, run_dir: Path, show_progress: bool, ctx: distributed.Context) -> nn.Module:
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    generator = torch.Generator(device).manual_seed(cfg.seed + 1_000 * ctx.rank)
    local_batch = cfg.batch_size // ctx.world_size
    loader = data.make_loader(cfg.dataset, "train", local_batch, n=cfg.n_train, seed=cfg.seed,
                              root=cfg.data_root, num_workers=cfg.num_workers, world_size=ctx.world_size,
                              rank=ctx.rank)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the training set (n_train={cfg.n_train})")

    model = build_model(cfg)
    if cfg.init_checkpoint:
        model.load_state_dict(load_checkpoint(cfg.init_checkpoint)["model"])
    if cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.finetune_bn:
        norm.freeze_all_but_bn(model)
    channels_last = uses_channels_last(cfg, device)
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    optimizer = make_optimizer(cfg, model)
    forward: nn.Module = TrainingForward(model)
    if ctx.active:
        forward = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=norm.has_mixture_bn(model))  # an MBN branch may sit out a step
    if cfg.compile:
        forward = torch.compile(forward)

    start_epoch, step, skip = 0, 0, 0
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if len(ckpt["rng"]) != ctx.world_size:
            raise ValueError(f"the checkpoint was written by {len(ckpt['rng'])} processes; resume it with as many "
                             f"(got {ctx.world_size})")
        _set_rng_state(ckpt["rng"][ctx.rank], generator)
        start_epoch, step, skip = ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"]

    def checkpoint(epoch: int, batch_in_epoch: int) -> None:
        rng = distributed.gather(_rng_state(generator), ctx)
        if ctx.main:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch,
                                        "rng": rng, "config": cfg.to_dict()})

    ctx_autocast = autocast(cfg, device)
    counters = ("loss", "batches", "n_adv", "correct_adv", "n_clean", "correct_clean", "attack_seconds")
    for epoch in range(start_epoch, cfg.epochs):
        running_stats = epoch >= cfg.epochs - cfg.running_stats_epochs
        forward.train()
        if running_stats:
            norm.use_running_stats(model)
        _set_epoch(loader, epoch, cfg.seed)
        totals = dict.fromkeys(counters, 0.0)
        t_epoch = time.perf_counter()
        bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show_progress,
                   leave=False)
        for batch_index, batch in enumerate(bar):
            if batch_index < skip:
                continue
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, epoch + batch_index / steps_per_epoch)
            images, labels = data.to_device(batch, device, channels_last)
            loss, stats = training_loss(model, images, labels, cfg, generator, forward, ctx_autocast)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch + 1}, step {step}; "
                                         f"the last good checkpoint is {ckpt_path}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            totals["loss"] += loss.item()
            totals["batches"] += 1
            for key in counters[2:]:
                totals[key] += stats.get(key, 0)
            seen = totals["n_adv"] or totals["n_clean"]
            bar.set_postfix(loss=f"{totals['loss'] / totals['batches']:.3f}",
                            acc=f"{(totals['correct_adv'] or totals['correct_clean']) / max(seen, 1):.3f}",
                            img_s=f"{totals['batches'] * cfg.batch_size / (time.perf_counter() - t_epoch):.0f}")
            if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0:
                checkpoint(epoch, batch_index + 1)
        skip = 0
        seconds = time.perf_counter() - t_epoch
        summed = dict(zip(counters, distributed.all_sum([totals[k] for k in counters], ctx)))
        record = {
            "epoch": epoch + 1, "step": step, "lr": learning_rate(cfg, epoch + 1 - 1e-9),
            "loss": summed["loss"] / max(summed["batches"], 1),  # mean over ranks and batches
            "train_adv_accuracy": summed["correct_adv"] / summed["n_adv"] if summed["n_adv"] else None,
            "train_clean_accuracy": summed["correct_clean"] / summed["n_clean"] if summed["n_clean"] else None,
            "running_stats": running_stats, "seconds": seconds, "processes": ctx.world_size,
            "images_per_s": totals["batches"] * cfg.batch_size / seconds,
            "attack_share": totals["attack_seconds"] / seconds,
        }
        if ctx.main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        checkpoint(epoch + 1, 0)
    model.eval()
    return model


def run(cfg: Config, show_progress: bool = True):
    """Train, then evaluate into the run folder: ``results.csv`` (robustness curves, each MBN branch; sharded
    across ranks under torchrun), ``sanity.csv`` (sanity checks) and ``bnstats.csv`` (Figures 5-6), the last two
    on rank 0. ``results.csv`` is written last: it marks a finished run."""
    from .bnstats import bnstats_for_run
    from .evaluate import evaluate_model, sanity_for_run

    model = train(cfg, show_progress)  # marks the run failed itself once its folder is prepared
    ctx = distributed.context()
    try:
        results = evaluate_model(model, cfg, show_progress=show_progress and ctx.main)
        if ctx.main:
            if cfg.sanity_n:
                sanity_for_run(model, cfg).to_csv(cfg.run_dir / "sanity.csv", index=False)
            if cfg.bnstats_channels and norm.batch_norms(model):
                bnstats_for_run(model, cfg).to_csv(cfg.run_dir / "bnstats.csv", index=False)
            results.to_csv(cfg.run_dir / "results.csv", index=False)
            write_status(cfg.run_dir, "done")
        distributed.barrier(ctx)
    except BaseException as exc:
        if ctx.main:
            write_status(cfg.run_dir, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    return results


def run_launched(cfg: Config, show_progress: bool = True):
    """:func:`run` in this process, or with ``cfg.gpus > 1`` on that many processes through torchrun (the
    notebook's entry point); returns the results table either way. A failing rank raises RuntimeError with its
    traceback."""
    if cfg.gpus <= 1:
        return run(cfg, show_progress)
    import tempfile

    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        launch_file = Path(tmp) / "launch.json"
        cfg.save(launch_file)
        distributed.launch(launch_file, cfg.gpus)
    return pd.read_csv(cfg.run_dir / "results.csv")


def main(argv: list[str] | None = None) -> int:
    """``python -m advkit.train CONFIG.json`` (what torchrun starts on every rank): run the saved config."""
    import argparse

    from .config import config_from_file

    parser = argparse.ArgumentParser(prog="python -m advkit.train", description=main.__doc__)
    parser.add_argument("config", help="a config.json (as a run folder holds) or launch.json")
    args = parser.parse_args(argv)
    try:
        run(config_from_file(args.config), show_progress=True)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
