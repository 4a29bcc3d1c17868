"""The training loop: every strategy of the paper (standard, 100% adv + X% clean, ALP, MBN, GN, running
statistics in the last epochs, BN-only finetuning) through one loop, with exact resume, DDP and SIGTERM.

The loss of a batch is :mod:`advkit.strategy`'s; the run folder (metrics, checkpoints) is :mod:`advkit.rundir`'s;
:mod:`advkit.run` prepares the folder, then trains, evaluates and records, in that order.

Under torchrun BN statistics stay per replica while training (the paper's choice), so the ranks' running
statistics differ. The checkpoint's ``model`` is rank 0's state and ``rank_buffers`` holds every rank's buffers:
a resumed run restores each rank's own and continues exactly. After training every rank takes rank 0's state
(:func:`advkit.distributed.broadcast_state`), so evaluation, sanity checks and BN statistics all describe the one
model the checkpoint holds. SIGTERM (what clusters send before killing a job) makes the loop checkpoint where it
is and stop cleanly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import data, distributed, models, norm, tblog
from .config import Config
from .device import autocast, resolve_decode, resolve_rank_device, uses_channels_last
from .rundir import RunDir, load_checkpoint
from .strategy import TrainingForward, training_loss


def build_model(cfg: Config) -> nn.Module:
    info = data.DATASETS[cfg.dataset]
    return models.build_model(cfg.arch, info.num_classes, cfg.norm, in_channels=info.channels, mean=info.mean,
                              std=info.std, width_multiplier=cfg.width_multiplier, gn_groups=cfg.gn_groups,
                              zero_init_residual=cfg.zero_init)


def check_loadable(cfg: Config, state: dict[str, torch.Tensor]) -> None:
    """Raise ValueError naming ``init_checkpoint`` unless ``state`` fits the configured model (tried on the meta
    device: no memory, no compute), before the run folder is written."""
    with torch.device("meta"):
        model = build_model(cfg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "copying into a meta parameter is a no-op": intended
            model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).split("\n\t")[1:3]
        raise ValueError(f"init_checkpoint={cfg.init_checkpoint!r} does not fit arch={cfg.arch!r}, norm={cfg.norm!r} "
                         f"on {cfg.dataset}: {'; '.join(first) or exc}") from None


def learning_rate(cfg: Config, epoch: float) -> float:
    """lr at fractional ``epoch``: lr * batch / 256, linear warm-up, then step decay, exponential decay by
    ``exp_decay_rate`` every ``exp_decay_epochs`` (ALP's recipe: 0.94 every 2 epochs), or a cosine to 0 at the
    last epoch (the short recipes of the embedded study)."""
    base = cfg.lr * cfg.batch_size / 256
    if epoch < cfg.warmup_epochs:
        return base * (epoch + 1e-12) / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        progress = (epoch - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-12)
        return base * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.schedule == "exp":
        return base * cfg.exp_decay_rate ** math.floor(epoch / cfg.exp_decay_epochs + 1e-9)
    return base * cfg.lr_decay_factor ** sum(epoch >= e for e in cfg.lr_decay_epochs)


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (or RMSProp) with weight decay on conv and linear weights only (not on BN/GN or biases). RMSProp is
    torch's, which adds eps outside the square root (TensorFlow's, ALP's recipe, adds it inside): with eps=1 the
    steps differ once the squared-gradient average is not small."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim > 1]
    no_decay = [p for n, p in trainable if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    lr = learning_rate(cfg, 0.0)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=cfg.momentum, alpha=0.9, eps=1.0)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


# ---------------------------------------------------------------- run folder and checkpoints


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGTERM after writing a checkpoint; ``resume=True`` continues it."""


@contextlib.contextmanager
def sigterm_flag() -> Iterator[list[int]]:
    """While training, SIGTERM appends to the yielded list instead of killing the process, so the loop can
    checkpoint and stop; the previous handler comes back afterwards. Python runs signal handlers in the main
    thread only: elsewhere the list stays empty and SIGTERM keeps its old meaning."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


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


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's persistent buffers (BN running statistics and counters) by state-dict name, on the CPU: under
    DDP they differ between ranks (per-replica BN), so a checkpoint keeps one set per rank."""
    names = {name for name, _ in model.named_buffers()}
    return {name: value.detach().cpu() for name, value in model.state_dict().items() if name in names}


def _resumed_state(ckpt: dict[str, Any], model: nn.Module, ctx: distributed.Context) -> dict[str, torch.Tensor]:
    """The model state this rank resumes from: the checkpoint's ``model`` with this rank's own buffers. A checkpoint
    without ``rank_buffers`` (older advkit) gives every rank rank 0's, with a warning under DDP."""
    if "rank_buffers" in ckpt:
        return ckpt["model"] | ckpt["rank_buffers"][ctx.rank]
    if ctx.active and _buffers(model):
        warnings.warn("the checkpoint holds rank 0's buffers only (written by an older advkit): every rank resumes "
                      "with rank 0's BN running statistics, so this run will not equal an uninterrupted one",
                      RuntimeWarning, stacklevel=2)
    return ckpt["model"]


def _set_epoch(loader: torch.utils.data.DataLoader | data.DecodingLoader, epoch: int, seed: int, rank: int) -> None:
    """A fresh, reproducible order (and augmentation draws) for ``epoch``, as DistributedSampler does. The
    loader's generator, which seeds its workers, is reseeded, and the data set's crops are seeded from the epoch
    and each sample's index (:func:`advkit.data.draw_seed`): an epoch's augmentations do not depend on whether the
    run was resumed, nor on ``num_workers`` (which a resume may change)."""
    sampler = loader.sampler.sampler if isinstance(loader.sampler, torch.utils.data.BatchSampler) else loader.sampler
    sampler.set_epoch(epoch)
    inner = loader.loader if isinstance(loader, data.DecodingLoader) else loader
    epoch_seed = (seed * 100_003 + epoch) * 1_009 + rank
    inner.generator.manual_seed(epoch_seed)
    if isinstance(loader, data.DecodingLoader):  # draws each batch's crops in this process, in order
        loader.generator.manual_seed(2 * epoch_seed + 1)
    elif hasattr(loader.dataset, "epoch_seed"):  # each rank its own crops; workers copy it when they start
        loader.dataset.epoch_seed = 2 * epoch_seed + 1


# ---------------------------------------------------------------- the loop

@dataclasses.dataclass
class Loop:
    """What one training process carries from step to step (set up once, restored from a checkpoint on resume)."""

    cfg: Config
    run: RunDir
    device: torch.device
    ctx: distributed.Context
    model: nn.Module
    forward: nn.Module  # TrainingForward, possibly wrapped by DDP and torch.compile
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader | data.DecodingLoader
    generator: torch.Generator
    sigterm: list[int]
    show_progress: bool
    init_weights: str | None = None  # digest of the init_checkpoint weights the run started from
    step: int = 0
    totals: dict[str, float] = dataclasses.field(default_factory=dict)
    t_epoch: float = 0.0
    writer: Any = None  # rank 0's TensorBoard writer (tensorboard=True), else None


COUNTERS = ("loss", "batches", "n_adv", "correct_adv", "n_clean", "correct_clean", "attack_seconds")


def train(cfg: Config, show_progress: bool = True, checkpoint: dict[str, Any] | None = None,
          init_model: dict[str, torch.Tensor] | None = None, init_digest: str | None = None) -> nn.Module:
    """Train as ``cfg`` says in its run folder, which :func:`advkit.run.run` has prepared (``checkpoint``: the
    state to resume from, which it loaded; ``init_model``: the weights of ``cfg.init_checkpoint`` and
    ``init_digest`` their digest, if the caller has them, else read and hashed here); write metrics and
    checkpoints; return the model.

    Under torchrun every process calls it: the global batch is split across ranks, gradients are averaged by DDP,
    BN statistics stay per replica (as in the paper) unless ``sync_bn``, and only rank 0 writes. The model
    returned is, on every rank, the state of the last checkpoint's ``model`` (rank 0's, broadcast). SIGTERM
    checkpoints and raises :class:`TrainingInterrupted`. With ``cfg.tensorboard`` rank 0 also writes each epoch's
    metrics as TensorBoard scalars (:mod:`advkit.tblog`).
    """
    ctx = distributed.context()
    device = resolve_rank_device(cfg, ctx)
    if init_model is None and cfg.init_checkpoint:
        init_model, init_digest = load_checkpoint(cfg.init_checkpoint)["model"], None
    resumed_step = checkpoint["step"] if checkpoint is not None else None
    with sigterm_flag() as sigterm, tblog.training_writer(RunDir(cfg.run_dir), cfg.tensorboard and ctx.main,
                                                          resumed_step) as writer:  # a SIGTERM stops at a step boundary
        loop = _set_up(cfg, RunDir(cfg.run_dir), device, ctx, init_model, sigterm, show_progress and ctx.main)
        loop.writer = writer
        loop.init_weights = (checkpoint.get("init_weights") if checkpoint is not None else
                             init_digest if init_digest is not None else
                             models.state_digest(init_model) if init_model is not None else None)
        start_epoch, skip, resumed_totals = _restore(loop, checkpoint) if checkpoint is not None else (0, 0, None)
        for epoch in range(start_epoch, cfg.epochs):
            _run_epoch(loop, epoch, skip, resumed_totals)
            skip, resumed_totals = 0, None
    distributed.broadcast_state(loop.model, ctx)  # every rank: the model the last checkpoint saved (rank 0's)
    return loop.model.eval()


def _set_up(cfg: Config, run: RunDir, device: torch.device, ctx: distributed.Context,
            init_model: dict[str, torch.Tensor] | None, sigterm: list[int], show_progress: bool) -> Loop:
    """The data, the model (from ``init_model`` if given), the optimizer and the training forward of a run."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    generator = torch.Generator(device).manual_seed(cfg.seed + 1_000 * ctx.rank)
    loader = data.make_loader(cfg.dataset, "train", cfg.batch_size // ctx.world_size, n=cfg.n_train, seed=cfg.seed,
                              root=cfg.data_root, num_workers=cfg.num_workers, world_size=ctx.world_size,
                              rank=ctx.rank, decode=resolve_decode(cfg, device), device=device)
    if len(loader) == 0:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the training set (n_train={cfg.n_train})")
    model = build_model(cfg)
    if init_model is not None:
        model.load_state_dict(init_model)
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
    return Loop(cfg, run, device, ctx, model, forward, optimizer, loader, generator, sigterm, show_progress)


def _restore(loop: Loop, ckpt: dict[str, Any]) -> tuple[int, int, dict[str, float] | None]:
    """Put ``loop`` where the checkpoint left it; return (epoch, batch within it, the epoch's counters so far)."""
    if len(ckpt["rng"]) != loop.ctx.world_size:
        raise ValueError(f"the checkpoint was written by {len(ckpt['rng'])} processes; resume it with as many "
                         f"(got {loop.ctx.world_size})")
    loop.model.load_state_dict(_resumed_state(ckpt, loop.model, loop.ctx))
    loop.optimizer.load_state_dict(ckpt["optimizer"])
    _set_rng_state(ckpt["rng"][loop.ctx.rank], loop.generator)
    loop.step = ckpt["step"]
    if loop.ctx.main:
        loop.run.trim_metrics(ckpt["epoch"])
    skip = ckpt["batch_in_epoch"]
    return ckpt["epoch"], skip, dict(ckpt["totals"][loop.ctx.rank]) if skip else None


def _save(loop: Loop, epoch: int, batch_in_epoch: int) -> None:
    """A checkpoint at this position: rank 0's model and optimizer, every rank's random state, BN buffers and
    counters of the epoch so far (so a resumed run continues exactly)."""
    states = distributed.gather({"rng": _rng_state(loop.generator), "buffers": _buffers(loop.model),
                                 "totals": loop.totals | {"seconds": time.perf_counter() - loop.t_epoch}}, loop.ctx)
    if loop.ctx.main:
        loop.run.save_checkpoint({
            "model": loop.model.state_dict(), "optimizer": loop.optimizer.state_dict(), "epoch": epoch,
            "step": loop.step, "batch_in_epoch": batch_in_epoch, "rng": [s["rng"] for s in states],
            "totals": [s["totals"] for s in states], "rank_buffers": [s["buffers"] for s in states],
            "config": loop.cfg.to_dict(), "init_weights": loop.init_weights})


def _run_epoch(loop: Loop, epoch: int, skip: int, resumed_totals: dict[str, float] | None) -> None:
    """One epoch (from batch ``skip`` on a mid-epoch resume), then its metrics line and a checkpoint."""
    cfg = loop.cfg
    running_stats = epoch >= cfg.epochs - cfg.running_stats_epochs
    loop.forward.train()
    if running_stats:
        norm.use_running_stats(loop.model)
    _set_epoch(loop.loader, epoch, cfg.seed, loop.ctx.rank)
    loop.totals, loop.t_epoch = dict.fromkeys(COUNTERS, 0.0), time.perf_counter()
    if resumed_totals is not None:
        loop.t_epoch -= resumed_totals.pop("seconds")
        loop.totals = resumed_totals
    bar = tqdm(loop.loader, total=len(loop.loader), desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not loop.show_progress, leave=False)
    for batch_index, batch in enumerate(bar):
        if batch_index >= skip:
            _step(loop, epoch, batch_index, batch)
            bar.set_postfix(_progress(loop))
    seconds = time.perf_counter() - loop.t_epoch
    if loop.ctx.main:
        record = _epoch_record(loop, epoch, running_stats, seconds)
        loop.run.append_metrics(record)
        if loop.writer is not None:
            tblog.log_epoch(loop.writer, record)
    else:
        _epoch_record(loop, epoch, running_stats, seconds)  # its all-reduce takes every rank
    _save(loop, epoch + 1, 0)


def _step(loop: Loop, epoch: int, batch_index: int, batch) -> None:
    """One optimisation step under the configured strategy; stops cleanly on a non-finite loss or a SIGTERM."""
    cfg, steps_per_epoch = loop.cfg, len(loop.loader)
    for group in loop.optimizer.param_groups:
        group["lr"] = learning_rate(cfg, epoch + batch_index / steps_per_epoch)
    images, labels = data.to_device(batch, loop.device, uses_channels_last(cfg, loop.device))
    loss, stats = training_loss(loop.model, images, labels, cfg, loop.generator, loop.forward,
                                autocast(cfg, loop.device))
    # one all-reduce per step: every rank stops at the same step, on a NaN or a SIGTERM anywhere
    non_finite, stop = distributed.all_sum([float(not torch.isfinite(loss)), float(bool(loop.sigterm))], loop.ctx,
                                           loop.device)
    if non_finite:
        raise FloatingPointError(
            f"non-finite loss ({loss.item()} on this rank) at epoch {epoch + 1}, batch {batch_index + 1} of "
            f"{steps_per_epoch} (step {loop.step + 1}); training stopped before the update, and the last "
            f"checkpoint written, {loop.run.last_checkpoint} (if any), is intact")
    loop.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    loop.optimizer.step()
    loop.step += 1
    loop.totals["loss"] += loss.item()
    loop.totals["batches"] += 1
    for key in COUNTERS[2:]:
        loop.totals[key] += stats.get(key, 0)
    if stop or (cfg.checkpoint_every_steps and loop.step % cfg.checkpoint_every_steps == 0):
        _save(loop, epoch, batch_index + 1)
    if stop:
        raise TrainingInterrupted(
            f"SIGTERM: training stopped at epoch {epoch + 1}, batch {batch_index + 1} of {steps_per_epoch} "
            f"(step {loop.step}) after writing {loop.run.last_checkpoint}. Continue it with resume=True: "
            f"python -m advkit.run --resume {loop.run.config_file} (papermill: -p resume True)")


def _progress(loop: Loop) -> dict[str, str]:
    totals = loop.totals
    seen = totals["n_adv"] or totals["n_clean"]
    return dict(loss=f"{totals['loss'] / totals['batches']:.3f}",
                acc=f"{(totals['correct_adv'] or totals['correct_clean']) / max(seen, 1):.3f}",
                img_s=f"{totals['batches'] * loop.cfg.batch_size / (time.perf_counter() - loop.t_epoch):.0f}")


def _epoch_record(loop: Loop, epoch: int, running_stats: bool, seconds: float) -> dict[str, Any]:
    """The epoch's line of ``metrics.jsonl``: losses and accuracies summed over ranks, lr, throughput."""
    cfg, totals = loop.cfg, loop.totals
    summed = dict(zip(COUNTERS, distributed.all_sum([totals[k] for k in COUNTERS], loop.ctx, loop.device)))
    return {
        "epoch": epoch + 1, "step": loop.step, "lr": learning_rate(cfg, epoch + 1 - 1e-9),
        "loss": summed["loss"] / max(summed["batches"], 1),  # mean over ranks and batches
        "train_adv_accuracy": summed["correct_adv"] / summed["n_adv"] if summed["n_adv"] else None,
        "train_clean_accuracy": summed["correct_clean"] / summed["n_clean"] if summed["n_clean"] else None,
        "running_stats": running_stats, "seconds": seconds, "processes": loop.ctx.world_size,
        "images_per_s": totals["batches"] * cfg.batch_size / seconds,
        "attack_share": totals["attack_seconds"] / seconds,
    }
