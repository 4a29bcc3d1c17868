"""One run from start to end, the only module that knows the order: check every input, take the run folder
(its lock, then resume, evaluate again, start or refuse), train, evaluate, compute the sanity checks and BN
statistics, and record. ``python -m advkit.run [--resume] CONFIG.json`` is what torchrun starts on every rank."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from . import data, distributed, external, models, norm, tblog
from .bnstats import bnstats_for_run
from .config import WHERE_AND_HOW, Config, ResumeConflict, config_from_file, resume_conflicts, validate
from .device import environment, resolve_rank_device
from .evaluate import evaluate_model, sanity_table
from .rundir import RunDir, load_checkpoint
from .train import TrainingInterrupted, build_model, check_loadable, train


def _check_inputs(cfg: Config) -> tuple[distributed.Context, dict[str, Any] | None, str | None]:
    """Everything that can be checked before the run folder is touched: the parameters, the data set's files,
    the starting checkpoint (it must fit the model), the number of processes. Returns the process context, the
    starting checkpoint's weights and their digest (read and hashed once here: a checkpoint of a 638-layer ResNet
    is large)."""
    validate(cfg)
    data.check_available(cfg.dataset, cfg.data_root)
    source, digest = None, None
    if cfg.init_checkpoint:
        check_source_finished(cfg.init_checkpoint)
        source = load_checkpoint(cfg.init_checkpoint)["model"]
        check_loadable(cfg, source)
        digest = models.state_digest(source)
    ctx = distributed.init_from_env()
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"batch_size={cfg.batch_size} is not accepted with {ctx.world_size} processes: the global "
                         "batch must divide evenly between them")
    return ctx, source, digest


def check_source_finished(init_checkpoint: str) -> None:
    """Raise ValueError naming ``init_checkpoint`` if it is a run folder whose run is not finished now (still
    training, failed, interrupted) or that another process holds: its checkpoint is not the final model, and a
    finetuning run (Section 4.4) started from it would silently build on partial weights. A file is taken as is;
    a path that does not exist is a run folder not yet started."""
    source = RunDir(init_checkpoint)
    if source.path.is_file():
        return
    holder = source.locked_by_other()
    if holder is not None:
        raise ValueError(f"init_checkpoint={init_checkpoint!r} is not accepted: the run is in use by {holder} (its "
                         "checkpoint may change); start from it once that process has finished")
    state = source.state()
    if state != "done":
        raise ValueError(f"init_checkpoint={init_checkpoint!r} is not accepted: the run in that folder is not "
                         f"finished (state {state!r}); finish it first, or give a checkpoint file")


def source_changed(cfg: Config, run: RunDir, checkpoint: dict[str, Any] | None = None,
                   source_digest: str | None = None) -> str | None:
    """Why the run in ``run`` (started from ``cfg.init_checkpoint``) no longer belongs to that source, or None: its
    checkpoint (``checkpoint``, else its newest) records the digest of the weights it started from, and the
    source (a file, or a finished run folder) now holds other weights (digest ``source_digest`` if the caller has
    it, else read and hashed here: extended, or trained again). A source not there or not finished yet is not
    compared."""
    source = cfg.init_checkpoint
    if not source or not (Path(source).is_file() or RunDir(source).finished()):
        return None
    started_from = (checkpoint if checkpoint is not None else run.load_resume_checkpoint()).get("init_weights")
    if started_from is None:  # written before the digest was recorded
        return None
    now = source_digest if source_digest is not None else models.state_digest(load_checkpoint(source)["model"])
    if now == started_from:
        return None
    return (f"init_checkpoint={source!r} now holds other weights (digest {now}) than the run started from "
            f"({started_from}): the source was extended or trained again since")


def outputs_differ(saved: dict[str, Any], cfg: Config) -> list[str]:
    """The parameters (``name: saved -> new``) in which ``cfg`` asks a run for something other than its ``saved``
    config gave: anything but :data:`WHERE_AND_HOW` (more epochs, other evaluation, sanity checks, BN statistics,
    TensorBoard logs). A finished run with any of them is not up to date."""
    return [f"{name}: {saved.get(name, getattr(Config(), name))!r} -> {value!r}"
            for name, value in cfg.to_dict().items()
            if name not in WHERE_AND_HOW and saved.get(name, getattr(Config(), name)) != value]


def _refuse_early(cfg: Config, run: RunDir) -> None:
    """The refusals that need no lock, made before the lock file is created, so that nothing is written; they
    are made again under the lock (another process may change the folder in between)."""
    if cfg.resume is True and not run.has_checkpoint():
        raise FileNotFoundError(f"resume=True but {run.checkpoints} holds no checkpoint to resume from")
    if run.exists() and not (cfg.resume or cfg.overwrite):
        raise FileExistsError(f"run folder {run.path} already holds a run: pass resume=True to continue it or "
                              "overwrite=True to replace it (nothing was changed)")


def _take_folder(cfg: Config, run: RunDir, ctx: distributed.Context,
                 source_digest: str | None) -> tuple[Config, dict[str, Any] | None]:
    """Decide what happens to the run folder and prepare it (called under its lock). ``resume='auto'`` resumes a
    run with a checkpoint (a finished one is evaluated again: saved batches of the same weights are reused) and
    starts a folder without any (killed before its first checkpoint) again. Refused, with nothing changed: an
    existing run without resume/overwrite, and a resume that would change what is trained (ResumeConflict
    naming the parameters). Returns the resolved config and the checkpoint to resume from."""
    if cfg.resume == "auto":
        has = run.has_checkpoint()
        cfg = dataclasses.replace(cfg, resume=has, overwrite=run.exists() and not has)
    _refuse_early(cfg, run)
    checkpoint = None
    if cfg.resume:
        checkpoint = run.load_resume_checkpoint()
        conflicts = resume_conflicts(checkpoint.get("config", {}), cfg)
        conflicts += [changed] if (changed := source_changed(cfg, run, checkpoint, source_digest)) else []
        if conflicts:
            raise ResumeConflict(f"resume of {run.path} is refused: these parameters differ from the ones it was "
                                 f"trained with ({'; '.join(conflicts)}); resume with the saved values, or start a "
                                 "new run (another name, or overwrite=True) (nothing was changed)")
    distributed.barrier(ctx)  # every rank has checked before rank 0 changes anything
    if ctx.main:
        if cfg.overwrite and run.exists():
            run.clear()
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        cfg.save(run.config_file)  # on resume: the resolved config of the continuing run
        run.write_json(run.environment_file, environment(cfg, resolve_rank_device(cfg, ctx)))
        run.write_status("running")
    distributed.barrier(ctx)
    return cfg, checkpoint


def _unchanged_and_finished(cfg: Config, run: RunDir, source_digest: str | None = None) -> bool:
    """Whether the folder holds a finished run of exactly this configuration (where things live aside), started
    from the weights its init_checkpoint holds now (digest ``source_digest``)."""
    return (run.finished() and not outputs_differ(run.config(), cfg)
            and source_changed(cfg, run, source_digest=source_digest) is None)


@contextlib.contextmanager
def _recorded(run: RunDir, ctx: distributed.Context):
    """Mark the run 'interrupted' (SIGTERM, resumable) or 'failed' (with the error) if the body raises."""
    try:
        yield
    except TrainingInterrupted as exc:
        if ctx.main:
            run.write_status("interrupted", error=str(exc))
        raise
    except BaseException as exc:
        if ctx.main:
            run.write_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise


def train_run(cfg: Config, show_progress: bool = True) -> nn.Module:
    """Check the inputs, take the run folder and train (no evaluation); return the trained model."""
    ctx, source, digest = _check_inputs(cfg)
    run = RunDir(cfg.run_dir)
    _refuse_early(cfg, run)
    with run.lock() if ctx.main else contextlib.nullcontext():
        cfg, checkpoint = _take_folder(cfg, run, ctx, digest)
        with _recorded(run, ctx):
            return train(cfg, show_progress, checkpoint, source, digest)


def run(cfg: Config, show_progress: bool = True) -> pd.DataFrame:
    """Train, then evaluate into the run folder, holding its lock throughout: ``results.csv`` (robustness curves,
    each MBN branch, sharded across ranks under torchrun; AutoAttack's rows too), ``sanity.csv`` (sanity checks,
    AutoAttack against PGD) and ``bnstats.csv`` (Figures 5-6), the last two on rank 0. All describe the model of the last checkpoint (under torchrun every rank evaluates that
    state, not its own per-replica BN statistics). ``results.csv`` is written last: with status 'done' it marks
    a finished run."""
    ctx, source, digest = _check_inputs(cfg)
    run_dir = RunDir(cfg.run_dir)
    _refuse_early(cfg, run_dir)
    with run_dir.lock() if ctx.main else contextlib.nullcontext():
        if cfg.resume == "auto" and not ctx.active and _unchanged_and_finished(cfg, run_dir, digest):
            return run_dir.results()  # another process finished it meanwhile: nothing to do
        cfg, checkpoint = _take_folder(cfg, run_dir, ctx, digest)
        with _recorded(run_dir, ctx):
            model = train(cfg, show_progress, checkpoint, source, digest)
            results = evaluate_model(model, cfg, show_progress=show_progress and ctx.main)
            if ctx.main:
                sanity = sanity_table(model, cfg)
                if sanity is not None:
                    run_dir.write_table(run_dir.sanity_file, sanity)
                if cfg.bnstats_channels and norm.batch_norms(model):
                    run_dir.write_table(run_dir.bnstats_file, bnstats_for_run(model, cfg))
                if cfg.tensorboard:
                    tblog.log_evaluation(run_dir, results)
                run_dir.write_table(run_dir.results_file, results)
                run_dir.write_status("done")
            distributed.barrier(ctx)
    return results


def run_launched(cfg: Config, show_progress: bool = True) -> pd.DataFrame:
    """:func:`run` in this process, or with ``cfg.gpus > 1`` on that many processes through torchrun (the
    notebook's entry point); returns the results table either way. A failing rank raises RuntimeError with its
    traceback."""
    if cfg.gpus <= 1:
        return run(cfg, show_progress)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        launch_file = Path(tmp) / "launch.json"
        cfg.save(launch_file)
        distributed.launch(launch_file, cfg.gpus)
    return RunDir(cfg.run_dir).results()


def load_run(run_dir: str | Path, branch: str | None = None, device: str | torch.device = "cpu"
             ) -> tuple[Config, nn.Module]:
    """A finished (or checkpointed) run's Config and trained model, in eval mode on ``device``, with the weights
    of its last checkpoint (the state its results were computed from; for an evaluation of external weights, the
    weights of the file it names, see :mod:`advkit.external`). ``branch`` ('clean' or 'adv') routes a
    Mixture BN model through that branch; None leaves it as saved (switch with ``norm.use_branch``).

        cfg, model = advkit.load_run("runs/demo/adv100clean-mbn", branch="adv")
    """
    folder = RunDir(run_dir)
    if not folder.config_file.is_file():
        raise FileNotFoundError(f"run_dir={str(run_dir)!r} is not a run folder: it has no config.json")
    if external.is_evaluated(folder.config()):  # weights the kit did not train: read from the file it names
        cfg, model = external.load_evaluated(folder.path)
    else:
        cfg = config_from_file(folder.config_file)
        model = build_model(cfg)
        model.load_state_dict(load_checkpoint(folder.path)["model"])
    if branch is not None:
        if not norm.has_mixture_bn(model):
            raise ValueError(f"branch={branch!r} is not accepted: run {run_dir} has norm={cfg.norm!r}, no Mixture BN; "
                             "give branch=None")
        norm.set_branch(model, branch)
    return cfg, model.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    """``python -m advkit.run [--resume] CONFIG.json`` (what torchrun starts on every rank): run the saved
    config. With ``--resume`` the same command starts the run or continues it from its checkpoint
    (``resume='auto'``), so a job script can simply be started again after a kill or pre-emption. Exit status
    143 after a SIGTERM stop."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m advkit.run", description=main.__doc__)
    parser.add_argument("config", help="a config.json (as a run folder holds) or launch.json")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run from its checkpoint if it has one, else start it")
    args = parser.parse_args(argv)
    cfg = config_from_file(args.config)
    try:
        run(dataclasses.replace(cfg, resume="auto", overwrite=False) if args.resume else cfg, show_progress=True)
    except TrainingInterrupted as exc:
        print(exc, file=sys.stderr, flush=True)
        return 128 + signal.SIGTERM
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
