"""The trainer: every strategy of the paper in one loop (standard, 100% adv + X% clean, ALP, MBN, GN,
running statistics in the last epochs, BN-only finetuning).

A run lives in ``<runs_root>/<name>/``: ``config.json``, ``metrics.jsonl`` (one line per epoch),
``checkpoints/last.pt`` (model, optimizer, every RNG state, epoch and step; ``prev.pt`` is the one before),
``results.csv`` and ``status.json``. ``run(cfg)`` trains, evaluates and writes them; ``train(cfg)`` only trains.

Checkpoints carry the SHA-256 of their bytes and are written through a temporary file, fsync and rename, so a
kill at any moment leaves a good one; resuming falls back to ``prev.pt`` when ``last.pt`` is bad. SIGTERM
(what clusters send before killing a job) makes the loop checkpoint where it is and stop cleanly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
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
            fold_bn=cfg.attack_fold_bn, compile_attack=cfg.attack_compile, generator=generator)
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

LAST, PREVIOUS = "last.pt", "prev.pt"  # in <run>/checkpoints/
CHECKPOINT_FORMAT = "advkit-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupt (checksum mismatch) or refused (it carries code)."""


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGTERM after writing a checkpoint; ``resume=True`` continues it."""


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run folder holds a checkpoint to resume from (``last.pt`` or the previous one)."""
    folder = Path(run_dir) / "checkpoints"
    return (folder / LAST).exists() or (folder / PREVIOUS).exists()


def prepare_run_dir(cfg: Config, ctx: distributed.Context = distributed.Context()) -> Path:
    """Create the run folder; refuse to touch an existing run unless resume or overwrite is asked for.
    Every rank checks (so all raise alike); only rank 0 changes anything."""
    run_dir = cfg.run_dir
    existing = (run_dir / "config.json").exists()
    if existing and not (cfg.resume or cfg.overwrite):
        raise FileExistsError(f"run folder {run_dir} already holds a run: pass resume=True to continue it or "
                              "overwrite=True to replace it (nothing was changed)")
    if cfg.resume and not has_checkpoint(run_dir):
        raise FileNotFoundError(f"resume=True but {run_dir / 'checkpoints'} holds neither {LAST} nor {PREVIOUS}")
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


def continuing(cfg: Config) -> Config:
    """``cfg`` set to carry on with its run folder, whatever state a kill left it in: resume from its checkpoint
    if it has one; a folder without any (killed before its first checkpoint) is started again."""
    resume = has_checkpoint(cfg.run_dir)
    overwrite = (cfg.run_dir / "config.json").exists() and not resume
    return dataclasses.replace(cfg, resume=resume, overwrite=overwrite)


def write_status(run_dir: Path, state: str, **extra: Any) -> None:
    (run_dir / "status.json").write_text(json.dumps({"state": state, "time": time.time(), **extra}))


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (it lives in the folder's own metadata)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: Path, state: dict[str, Any], previous: Path | None = None) -> None:
    """Write ``state`` so that a kill or power loss at any moment leaves a good checkpoint: the serialised bytes
    go into a wrapper with their SHA-256 (the file checks itself, no sidecar to get out of step), through a
    temporary file, flush and fsync; the current file moves to ``previous`` (if given), the new one takes its
    name, and the folder is fsynced."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    view = buffer.getbuffer()
    wrapper = {"format": CHECKPOINT_FORMAT, "sha256": hashlib.sha256(view).hexdigest(),
               "payload": torch.frombuffer(view, dtype=torch.uint8)}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(wrapper, f)
        f.flush()
        os.fsync(f.fileno())
    del wrapper, view
    if previous is not None and path.exists():
        os.replace(path, previous)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _load_plain(source: Path | io.BytesIO, path: Path) -> Any:
    """``torch.load(weights_only=True)`` with its failures turned into a CheckpointError naming ``path``."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch reports a damaged archive in many ways
        text = str(exc)
        code = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if code:
            raise CheckpointError(f"checkpoint {path} is refused: it refers to {code.group(1)}, not only to tensors "
                                  "and plain values, and checkpoints load with torch.load(weights_only=True) so that "
                                  "a file carrying code never runs it") from None
        said = text.split("WeightsUnpickler error:")[-1].strip().split("\n")[0] if text else ""
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {said})") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file, or a run folder's ``checkpoints/last.pt``, checked against its SHA-256; tensors and
    plain values only (a file carrying code is refused). A bad file raises CheckpointError naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / LAST
    wrapper = _load_plain(path, path)
    if not (isinstance(wrapper, dict) and wrapper.get("format") == CHECKPOINT_FORMAT):
        raise CheckpointError(f"checkpoint {path} is not an advkit checkpoint: it has no {CHECKPOINT_FORMAT!r} "
                              "checksum wrapper (advkit.train.save_checkpoint writes one)")
    payload = wrapper["payload"].numpy().tobytes()
    if hashlib.sha256(payload).hexdigest() != wrapper["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: the SHA-256 of its contents differs from the one "
                              "recorded when it was written")
    return _load_plain(io.BytesIO(payload), path)


def load_resume_checkpoint(folder: Path) -> dict[str, Any]:
    """The newest good checkpoint in a run's ``checkpoints`` folder: ``last.pt``, else ``prev.pt`` with a
    warning saying why; CheckpointError listing both problems when neither is good."""
    problems = []
    for path in (folder / LAST, folder / PREVIOUS):
        try:
            state = load_checkpoint(path)
        except (CheckpointError, FileNotFoundError) as exc:
            problems.append(str(exc))
            continue
        if problems:
            warnings.warn(f"{problems[0]}; resuming from the previous checkpoint {path} instead", RuntimeWarning,
                          stacklevel=2)
        return state
    raise CheckpointError(f"no good checkpoint to resume from in {folder}: " + "; ".join(problems))


def _trim_metrics(path: Path, epochs_done: int) -> None:
    """Drop metrics lines of epochs after the checkpoint (logged before a kill, to be trained again)."""
    if not path.exists():
        return
    lines = [l for l in path.read_text().splitlines() if json.loads(l)["epoch"] <= epochs_done]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(l + "\n" for l in lines))
    tmp.replace(path)


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

    Every input is checked before the run folder is touched: the parameters, the data set's files and the
    starting checkpoint. Under torchrun every process calls it: the global batch is split across ranks,
    gradients are averaged by DDP, BN statistics stay per replica (as in the paper) unless ``sync_bn``, and
    only rank 0 writes. SIGTERM checkpoints and raises :class:`TrainingInterrupted` (status 'interrupted').
    """
    validate(cfg)
    data.check_available(cfg.dataset, cfg.data_root)
    init_model = load_checkpoint(cfg.init_checkpoint)["model"] if cfg.init_checkpoint else None
    ctx = distributed.init_from_env()
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"batch_size={cfg.batch_size} is not accepted with {ctx.world_size} processes: the global "
                         "batch must divide evenly between them")
    device = resolve_rank_device(cfg, ctx)
    run_dir = prepare_run_dir(cfg, ctx)
    with sigterm_flag() as sigterm:  # from 'running' on, a SIGTERM stops the run at a step boundary
        if ctx.main:
            cfg.save(run_dir / "config.json")  # on resume: the resolved config of the continuing run
            write_status(run_dir, "running")
        distributed.barrier(ctx)
        try:
            return _train(cfg, device, run_dir, show_progress and ctx.main, ctx, init_model, sigterm)
        except TrainingInterrupted as exc:
            if ctx.main:
                write_status(run_dir, "interrupted", error=str(exc))
            raise
        except BaseException as exc:
            if ctx.main:
                write_status(run_dir, "failed", error=f"{type(exc).__name__}: {exc}")
            raise


def _train(cfg: Config, device: torch.device, run_dir: Path, show_progress: bool, ctx: distributed.Context,
           init_model: dict[str, torch.Tensor] | None, sigterm: list[int]) -> nn.Module:
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

    counters = ("loss", "batches", "n_adv", "correct_adv", "n_clean", "correct_clean", "attack_seconds")
    start_epoch, step, skip, resumed_totals = 0, 0, 0, None
    ckpt_dir = run_dir / "checkpoints"
    ckpt_path = ckpt_dir / LAST
    if cfg.resume:
        ckpt = load_resume_checkpoint(ckpt_dir)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if len(ckpt["rng"]) != ctx.world_size:
            raise ValueError(f"the checkpoint was written by {len(ckpt['rng'])} processes; resume it with as many "
                             f"(got {ctx.world_size})")
        _set_rng_state(ckpt["rng"][ctx.rank], generator)
        start_epoch, step, skip = ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"]
        resumed_totals = ckpt["totals"][ctx.rank] if skip else None  # the epoch's counters so far
        if ctx.main:
            _trim_metrics(run_dir / "metrics.jsonl", start_epoch)

    def checkpoint(epoch: int, batch_in_epoch: int) -> None:
        states = distributed.gather({"rng": _rng_state(generator),
                                     "totals": totals | {"seconds": time.perf_counter() - t_epoch}}, ctx)
        if ctx.main:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch,
                                        "rng": [s["rng"] for s in states], "totals": [s["totals"] for s in states],
                                        "config": cfg.to_dict()}, previous=ckpt_dir / PREVIOUS)

    ctx_autocast = autocast(cfg, device)
    for epoch in range(start_epoch, cfg.epochs):
        running_stats = epoch >= cfg.epochs - cfg.running_stats_epochs
        forward.train()
        if running_stats:
            norm.use_running_stats(model)
        _set_epoch(loader, epoch, cfg.seed)
        totals = dict.fromkeys(counters, 0.0)
        t_epoch = time.perf_counter()
        if resumed_totals is not None:
            t_epoch -= resumed_totals.pop("seconds")
            totals, resumed_totals = resumed_totals, None
        bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show_progress,
                   leave=False)
        for batch_index, batch in enumerate(bar):
            if batch_index < skip:
                continue
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, epoch + batch_index / steps_per_epoch)
            images, labels = data.to_device(batch, device, channels_last)
            loss, stats = training_loss(model, images, labels, cfg, generator, forward, ctx_autocast)
            # one all-reduce per step: every rank stops at the same step, on a NaN or a SIGTERM anywhere
            non_finite, stop = distributed.all_sum([float(not torch.isfinite(loss)), float(bool(sigterm))], ctx,
                                                   device)
            if non_finite:
                raise FloatingPointError(
                    f"non-finite loss ({loss.item()} on this rank) at epoch {epoch + 1}, batch {batch_index + 1} of "
                    f"{steps_per_epoch} (step {step + 1}); training stopped before the update, and the last "
                    f"checkpoint written, {ckpt_path} (if any), is intact")
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
            if stop or (cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0):
                checkpoint(epoch, batch_index + 1)
            if stop:
                raise TrainingInterrupted(
                    f"SIGTERM: training stopped at epoch {epoch + 1}, batch {batch_index + 1} of {steps_per_epoch} "
                    f"(step {step}) after writing {ckpt_path}. Continue it with resume=True: "
                    f"python -m advkit.train --resume {run_dir / 'config.json'} (papermill: -p resume True)")
        skip = 0
        seconds = time.perf_counter() - t_epoch
        summed = dict(zip(counters, distributed.all_sum([totals[k] for k in counters], ctx, device)))
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
    across ranks under torchrun; AutoAttack's rows too), ``sanity.csv`` (sanity checks, AutoAttack against PGD)
    and ``bnstats.csv`` (Figures 5-6), the last two on rank 0. ``results.csv`` is written last: it marks a
    finished run."""
    import pandas as pd

    from .bnstats import bnstats_for_run
    from .evaluate import autoattack_sanity_for_run, evaluate_model, sanity_for_run

    model = train(cfg, show_progress)  # marks the run failed itself once its folder is prepared
    ctx = distributed.context()
    try:
        results = evaluate_model(model, cfg, show_progress=show_progress and ctx.main)
        if ctx.main:
            sanity = [sanity_for_run(model, cfg)] if cfg.sanity_n else []
            sanity += [autoattack_sanity_for_run(model, cfg)] if cfg.eval_autoattack_n else []
            if sanity:
                pd.concat(sanity, ignore_index=True).to_csv(cfg.run_dir / "sanity.csv", index=False)
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
    """``python -m advkit.train [--resume] CONFIG.json`` (what torchrun starts on every rank): run the saved
    config. With ``--resume`` the same command starts the run or continues it from its checkpoint, so a job
    script can simply be started again after a kill or pre-emption. Exit status 143 after a SIGTERM stop."""
    import argparse

    from .config import config_from_file

    parser = argparse.ArgumentParser(prog="python -m advkit.train", description=main.__doc__)
    parser.add_argument("config", help="a config.json (as a run folder holds) or launch.json")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run from its checkpoint if it has one, else start it")
    args = parser.parse_args(argv)
    cfg = config_from_file(args.config)
    try:
        run(continuing(cfg) if args.resume else cfg, show_progress=True)
    except TrainingInterrupted as exc:
        print(exc, file=sys.stderr, flush=True)
        return 128 + signal.SIGTERM
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
