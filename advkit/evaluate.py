"""Evaluation you can trust: whole robustness curves (PGD-10 ... PGD-2000) in one pass, every MBN branch,
per-example results that resume after an interruption, and sanity checks against fooling ourselves.

With a fixed step, PGD-N is exactly the first N steps of PGD-2000 from the same start, so one run of the
longest attack gives every checkpoint N: the final-iterate accuracy (the paper's PGD-N number) and the
worst-iterate accuracy (an example counts as broken once any iterate so far, the random start included,
fooled the model). The logits of each iterate come for free from the forward pass of its gradient step.
Random numbers are drawn per batch from ``seed`` and the batch index, so a resumed (or sharded) evaluation,
and a separate PGD-N run of the same batch with the same seed, draw the same targets and starts.
AutoAttack (APGD-CE + APGD-T, :mod:`advkit.autoattack`) runs beside PGD on the first ``eval_autoattack_n``
images, resumable in the same way (:func:`autoattack_for_run`), checked against untargeted PGD
(:func:`autoattack_vs_pgd_check`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import dataclasses
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from . import attacks, autoattack, data, distributed, models, norm, paper
from .device import device_name, eval_autocast, exact_fp32, resolve_rank_device, uses_channels_last
from .validate import check_choice, check_range



def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of one evaluation batch: independent of which batches ran before (resume, sharding)."""
    return seed * 1_000_003 + batch_index


def batch_generator(seed: int, batch_index: int, device: torch.device | str) -> torch.Generator:
    """The generator of one evaluation batch, seeded with :func:`batch_seed`."""
    return torch.Generator(torch.device(device)).manual_seed(batch_seed(seed, batch_index))


def curve_checkpoints(attack: attacks.Attack, checkpoints: Sequence[int] | None) -> list[int]:
    """The sorted PGD iteration counts a curve records: ``checkpoints``, or ``attack.steps`` alone."""
    checkpoints = [attack.steps] if checkpoints is None else list(checkpoints)
    if not checkpoints or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in checkpoints):
        raise ValueError(f"checkpoints={checkpoints!r} is not accepted; give positive PGD iteration counts")
    return sorted(set(checkpoints))


def curve_batch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: attacks.Attack,
    *,
    checkpoints: Sequence[int] | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    batch_index: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example correctness under PGD-n of ``attack`` for every n in ``checkpoints`` (default: its ``steps``):
    (final-iterate, worst-iterate), each (len(checkpoints), B). BN runs on running statistics.

    Checkpoints that share an effective step (all of them with the fixed rule) come from one pass; under
    ``step_rule='max_eps_over_steps'`` the short checkpoints whose step is raised get their own runs, each
    starting from the same draws. Restarts: an example is correct only if it survives every restart.
    """
    checkpoints = curve_checkpoints(attack, checkpoints)
    groups: dict[float, list[int]] = {}
    for n in checkpoints:
        groups.setdefault(attacks.effective_step(attack.eps, attack.step, n, attack.step_rule), []).append(n)
    position = {n: i for i, n in enumerate(checkpoints)}
    final = torch.ones(len(checkpoints), len(labels), dtype=torch.bool, device=labels.device)
    worst = final.clone()
    with attacks.attack_mode(model, "running", attack.fold_bn, attack.compile) as attacked:
        for group_step, group in groups.items():
            run = dataclasses.replace(attack, step=group_step, steps=max(group), step_rule="fixed",
                                      clean_start_prob=0.0)
            generator = batch_generator(seed, batch_index, images.device)
            for _ in range(attack.restarts):
                never_broken = torch.ones_like(labels, dtype=torch.bool)

                def record(i: int, logits: torch.Tensor) -> None:
                    correct = logits.argmax(1) == labels
                    never_broken.logical_and_(correct)
                    if i in group:
                        final[position[i]] &= correct
                        worst[position[i]] &= never_broken

                x_last = attacks.attack_once(attacked, images, labels, run, num_classes=num_classes, targets=None,
                                             generator=generator, on_logits=record)
                with torch.no_grad():
                    record(max(group), attacked(x_last))
    return final, worst


def evaluate_batches(
    loader: torch.utils.data.DataLoader,
    compute: Callable[[int, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
    *,
    n: int | None = None,
    save_dir: str | Path | None = None,
    show_progress: bool = False,
    desc: str = "evaluation",
) -> list[dict[str, torch.Tensor]]:
    """``compute(batch_index, images, labels)`` for every batch of ``loader`` (its first ``n`` images), in order.

    With ``save_dir`` every batch's result is saved as it completes and reused when the same evaluation runs
    again, so an interrupted evaluation resumes from its saved batches (a damaged file is computed again).
    Under torchrun each rank computes every world_size-th batch and the results are gathered exactly, in order,
    on every rank."""
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)  # every rank: exist_ok makes the race harmless
    ctx = distributed.context()
    mine: dict[int, dict[str, torch.Tensor]] = {}
    seen = 0
    for batch_index, (images, labels) in enumerate(tqdm(loader, desc=desc, disable=not show_progress, leave=False)):
        if n is not None:
            if seen >= n:
                break
            images, labels = images[:n - seen], labels[:n - seen]
            seen += len(labels)
        if batch_index % ctx.world_size != ctx.rank:  # under torchrun: every rank its share, none dropped
            continue
        saved = save_dir / f"batch_{batch_index:06d}.pt" if save_dir is not None else None
        loaded = load_saved_batch(saved) if saved is not None and saved.exists() else None
        if loaded is not None:
            mine[batch_index] = loaded
            continue
        mine[batch_index] = {k: v.cpu() for k, v in compute(batch_index, images, labels).items()}
        if saved is not None:
            tmp = saved.with_suffix(f".tmp{ctx.rank}")
            torch.save(mine[batch_index], tmp)
            tmp.replace(saved)
    results = {i: r for part in distributed.gather(mine, ctx) for i, r in part.items()}
    return [results[i] for i in sorted(results)]


def robustness_curve(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    attack: attacks.Attack,
    *,
    num_classes: int,
    checkpoints: Sequence[int] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
    autocast_ctx: contextlib.AbstractContextManager | None = None,
    save_dir: str | Path | None = None,
    show_progress: bool = False,
    desc: str = "curve",
) -> dict[str, np.ndarray]:
    """Clean, final-iterate and worst-iterate correctness of every example of ``loader`` under PGD-n of
    ``attack`` for each n in ``checkpoints`` (Section 5's curves, PGD-10 to PGD-2000, from one pass).

    Returns numpy arrays ``clean`` (n,), ``final`` and ``worst`` (len(checkpoints), n), ``labels`` (n,),
    ``checkpoints``. Batches are seeded with :func:`batch_seed`; ``save_dir``, resuming and torchrun as in
    :func:`evaluate_batches`."""
    checkpoints = curve_checkpoints(attack, checkpoints)
    autocast_ctx = autocast_ctx if autocast_ctx is not None else contextlib.nullcontext()

    def compute(batch_index: int, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        images, labels = data.to_device((images, labels), device, channels_last)
        with autocast_ctx:
            with torch.no_grad(), attacks.attack_mode(model):
                clean = model(images).argmax(1) == labels
            final, worst = curve_batch(model, images, labels, attack, checkpoints=checkpoints,
                                       num_classes=num_classes, seed=seed, batch_index=batch_index)
        return {"clean": clean, "final": final, "worst": worst, "labels": labels}

    ordered = evaluate_batches(loader, compute, save_dir=save_dir, show_progress=show_progress, desc=desc)
    return {"clean": torch.cat([r["clean"] for r in ordered]).numpy(),
            "final": torch.cat([r["final"] for r in ordered], 1).numpy(),
            "worst": torch.cat([r["worst"] for r in ordered], 1).numpy(),
            "labels": torch.cat([r["labels"] for r in ordered]).numpy(),
            "checkpoints": np.array(checkpoints)}


def curve_table(curve: dict[str, np.ndarray], **columns) -> pd.DataFrame:
    """The tidy rows of one curve: a clean row (steps 0), then one row per checkpoint.

    ``accuracy`` is the final iterate's (the paper's definition): an image the model gets wrong when clean can
    count as right at PGD-n, when the targeted attack's steps happen to move it to its true class.
    ``worst_accuracy`` counts an image right only if every iterate, from the random start on, is classified right.
    """
    n = len(curve["clean"])
    rows = [dict(attack="clean", steps=0, accuracy=curve["clean"].mean(), worst_accuracy=curve["clean"].mean())]
    for i, steps in enumerate(curve["checkpoints"]):
        rows.append(dict(attack="pgd", steps=int(steps), accuracy=curve["final"][i].mean(),
                         worst_accuracy=curve["worst"][i].mean()))
    return pd.DataFrame([columns | row | {"n": n} for row in rows])


def load_saved_batch(path: Path) -> dict[str, torch.Tensor] | None:
    """A batch's saved per-example results, or None (with a warning naming the file) when the file is damaged:
    the batch is then evaluated again, since resuming from it is a convenience, not a record."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # truncated or corrupt: torch reports it in many ways
        warnings.warn(f"saved evaluation batch {path} is damaged ({type(exc).__name__}); evaluating it again",
                      RuntimeWarning, stacklevel=2)
        return None


# Saved evaluation batches are reused only under the same spec: bump this when a change to the evaluation code
# changes its results (2: AutoAttack's and the sanity checks' images became a seeded sample of the evaluation set,
# no longer its first images, which on a class-ordered test set such as ImageNet's are a few classes).
EVALUATION_VERSION = 2


def subset_loader(cfg, n: int, batch_size: int) -> torch.utils.data.DataLoader:
    """``n`` images of the run's evaluation set (``n_test`` images, or the whole test split) drawn by its seed: the
    first ``n`` of the seeded permutation whose first ``n_test`` are the evaluation set, so the subset lies inside
    it and, unlike the evaluation set's first ``n`` images (kept in file order), does not follow the file's
    class order."""
    n = n if cfg.n_test is None else min(n, cfg.n_test)
    return data.make_loader(cfg.dataset, "test", batch_size, n=n, seed=cfg.evaluation_seed, root=cfg.data_root,
                            num_workers=cfg.num_workers)


def _spec_dir(root: Path, spec: dict, write: bool = True) -> Path:
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    folder = root / f"{spec['branch']}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    if write:
        (folder / "spec.json").write_text(json.dumps(spec, indent=2))
    return folder


@exact_fp32()
def evaluate_model(model: nn.Module, cfg, show_progress: bool = True) -> pd.DataFrame:
    """The run's robustness curves, through every MBN branch, as one tidy table (also per-example results).

    Per-example results go to ``<run>/eval/<branch>-<hash>/`` (batches, and ``examples.npz`` when complete). The
    hash covers the evaluation's spec, the batch size and the digest of the evaluated weights and buffers, so
    saved batches are reused only for the same model and batches (a run extended by more epochs is evaluated
    afresh). Every row names the weights (``weights``), the precision and the device it was computed with.
    """
    device = resolve_rank_device(cfg, distributed.context())
    loader = data.make_loader(cfg.dataset, "test", cfg.eval_batch_size, n=cfg.n_test, seed=cfg.evaluation_seed,
                              root=cfg.data_root, num_workers=cfg.num_workers)
    branches = norm.evaluated_branches(model)
    weights = models.weights_digest(model)
    precision = "bf16" if cfg.eval_bf16 else "fp32"
    tables = []
    for branch in branches:
        spec = dict(branch=branch, targeted=cfg.eval_targeted, eps=cfg.eval_eps, step=cfg.eval_step,
                    restarts=cfg.eval_restarts, step_rule=cfg.eval_step_rule, seed=cfg.evaluation_seed, n=cfg.n_test,
                    checkpoints=list(cfg.eval_checkpoints), dataset=cfg.dataset, batch_size=cfg.eval_batch_size,
                    weights=weights, precision=precision, device=device.type, version=EVALUATION_VERSION)
        folder = _spec_dir(cfg.run_dir / "eval", spec, write=distributed.context().main)
        with norm.through_branch(model, branch):
            curve = robustness_curve(
                model, loader, cfg.evaluation_attack, num_classes=data.DATASETS[cfg.dataset].num_classes,
                checkpoints=cfg.eval_checkpoints, seed=cfg.evaluation_seed, device=device,
                channels_last=uses_channels_last(cfg, device), autocast_ctx=eval_autocast(cfg, device),
                save_dir=folder / "batches", show_progress=show_progress, desc=f"{branch} PGD-{max(cfg.eval_checkpoints)}")
        if distributed.context().main:
            np.savez_compressed(folder / "examples.npz", **curve)
        tables.append(curve_table(curve, branch=branch, targeted=cfg.eval_targeted, eps=cfg.eval_eps,
                                  step=cfg.eval_step, step_rule=cfg.eval_step_rule, restarts=cfg.eval_restarts,
                                  seed=cfg.seed, eval_seed=cfg.evaluation_seed))
    if cfg.eval_autoattack_n:
        tables.append(autoattack_for_run(model, cfg, show_progress))
    table = pd.concat(tables, ignore_index=True)
    return table.assign(weights=weights, precision=precision, device=device_name(device))


@exact_fp32()
def full_test_accuracy(model: nn.Module, cfg) -> dict:
    """Clean accuracy (%) of ``model`` on every test image of its data set, fp32 through BN running statistics
    (every MBN branch the model has: the lowest counts), with the weights' digest, precision and device: the
    decisive study's validity gate, which its 2,000-image evaluation set cannot show."""
    device = resolve_rank_device(cfg, distributed.context())
    loader = data.make_loader(cfg.dataset, "test", cfg.eval_batch_size, root=cfg.data_root,
                              num_workers=cfg.num_workers)
    correct, images = {}, 0
    model = model.to(device).eval()
    with torch.no_grad():
        for batch in loader:
            x, y = data.to_device(batch, device)
            images += len(y)
            for branch in norm.evaluated_branches(model):
                with norm.through_branch(model, branch):
                    correct[branch] = correct.get(branch, 0) + int((model(x).argmax(1) == y).sum())
    return dict(clean_acc_full_test=round(100 * min(correct.values()) / images, 2), images=images,
                weights=models.weights_digest(model), precision="fp32", device=device_name(device))


def sanity_checks(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: attacks.Attack = attacks.Attack(),
    *,
    num_classes: int,
    checkpoints: Sequence[int] = (1, 2, 5, 10, 20),
    seed: int = 0,
    undefended: bool = False,
) -> pd.DataFrame:
    """Checks against a broken evaluation, each computed from what the kit's attack produced, each able to fail.

    The attack checked is the paper's protocol (Section 3: targeted L-inf PGD, random target, random start) at
    ``attack``'s eps, step and BN folding (one restart, fixed step), run as the evaluation runs it
    (:func:`curve_batch`, the draws of batch 0); the reference is the model as it is
    evaluated: eval mode, its selected MBN branch, unfolded, fp32 (TF32 off). Rows (check, passed, value, expected):

    - eps 0 gives the clean prediction of every example at every checkpoint (a start or step that ignores eps);
    - the logits the attack computed for its start and its final iterate are the reference's on those images (an
      attack through the other MBN branch, on batch statistics, or on a different model);
    - adversarial examples and starts lie in the eps-ball and in [0, 1] (no projection, no clamp, eps left on the
      0-255 scale), and every example's perturbation reaches 90% of eps (eps shrunk, e.g. divided twice);
    - the start is the documented draw: targets from the batch generator, then uniform noise in the eps-cube,
      clamped to [0, 1] (no random start, a start on the wrong scale or from another generator);
    - the target's log-probability rises from start to final iterate for >= 90% of examples (a targeted step
      that ascends the target's loss);
    - :func:`_plain_pgd`, a second implementation written apart from :mod:`advkit.attacks`, fed the same targets
      and starts, gives the same final- and worst-iterate correctness at every checkpoint for >= 99% of examples
      (float rounding between the folded and the plain model may flip an example whose gradient sign is a tie);
    - untargeted: the one-pass curve agrees per example with torchattacks' PGD from the same starts (>= 99%);
    - ``undefended`` (clean-trained) model: untargeted PGD brings accuracy below 5%;
    - the model's weights, BN buffers, train flags, ``requires_grad`` flags and MBN branch are left unchanged.
    """
    attack = dataclasses.replace(attack, targeted=True, restarts=1, step_rule="fixed", clean_start_prob=0.0,
                                 compile=False, steps=max(curve_checkpoints(attack, checkpoints)))
    checkpoints, eps = curve_checkpoints(attack, checkpoints), attack.eps
    before = _model_state(model)
    kw = dict(num_classes=num_classes, checkpoints=checkpoints, seed=seed)
    with exact_fp32():
        rows = [_eps_zero_row(model, images, labels, curve_batch(model, images, labels,
                                                                 dataclasses.replace(attack, eps=0.0), **kw))]
        final, worst = curve_batch(model, images, labels, attack, **kw)
        seen = _observed_attack(model, images, labels, attack, num_classes=num_classes, seed=seed)
        targets, start = _protocol_draws(images, labels, eps, num_classes, seed)
        rows += _model_rows(model, seen) + _geometry_rows(images, seen, eps) + _start_rows(images, seen, start)
        rows += _targeted_rows(model, seen, targets, num_classes)
        plain_final, plain_worst = _plain_pgd(model, images, labels, targets, start, eps=eps, step=attack.step,
                                              checkpoints=checkpoints)
        rows.append(_agreement_row("agrees with a plain targeted PGD (same targets, starts)", torch.cat([worst, final]),
                                   torch.cat([plain_worst, plain_final]), "final and worst iterate, every checkpoint"))
        untargeted, _ = curve_batch(model, images, labels, dataclasses.replace(attack, targeted=False), **kw)
        rows.append(_torchattacks_row(model, images, labels, untargeted[-1], eps=eps, step=attack.step,
                                      steps=attack.steps, seed=seed))
        if undefended:
            acc = _mean(untargeted[-1])
            rows.append(_row("undefended model falls to ~0% (untargeted)", acc < 0.05, f"{acc:.4f}", "< 0.05"))
    changed = [name for name, value in _model_state(model).items() if not _same(value, before[name])]
    listed = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    rows.append(_row("the model is left unchanged", not changed, f"changed: {listed}" if changed else "nothing changed",
                     "weights, BN buffers, train and requires_grad flags, MBN branch"))
    return pd.DataFrame(rows)


def sanity_for_run(model: nn.Module, cfg) -> pd.DataFrame:
    """:func:`sanity_checks` on ``cfg.sanity_n`` images of the run's evaluation set (:func:`subset_loader`),
    through every MBN branch."""
    device = resolve_rank_device(cfg, distributed.context())
    loader = subset_loader(cfg, cfg.sanity_n, cfg.sanity_n)
    images, labels = data.to_device(next(iter(loader)), device)
    checkpoints = [n for n in cfg.eval_checkpoints if n <= 20] or [min(cfg.eval_checkpoints)]
    tables = []
    for branch in norm.evaluated_branches(model):
        with norm.through_branch(model, branch):
            table = sanity_checks(model, images, labels, cfg.evaluation_attack,
                                  num_classes=data.DATASETS[cfg.dataset].num_classes, checkpoints=checkpoints,
                                  seed=cfg.evaluation_seed, undefended=cfg.adv_ratio == 0 and not cfg.finetune_bn)
        tables.append(table.assign(branch=branch))
    return pd.concat(tables, ignore_index=True)


def sanity_table(model: nn.Module, cfg) -> pd.DataFrame | None:
    """``sanity.csv``'s rows: :func:`sanity_for_run` (``sanity_n`` > 0) and, after :func:`autoattack_for_run`,
    :func:`autoattack_sanity_for_run` (``eval_autoattack_n`` > 0); None when both are off."""
    tables = [sanity_for_run(model, cfg)] if cfg.sanity_n else []
    tables += [autoattack_sanity_for_run(model, cfg)] if cfg.eval_autoattack_n else []
    return pd.concat(tables, ignore_index=True) if tables else None


# Share of examples on which two PGD implementations fed the same draws must agree. Measured on the CPU, for the
# plain PGD and for torchattacks: no example disagreed in over 1,000 (clean- and adversarially trained BN and MBN
# models; PGD-3 to PGD-20, eps 16 and 32); the 1% absorbs a gradient-sign tie that rounding may flip elsewhere.
SANITY_AGREEMENT = 0.99
# The attack's logits vs the reference's, relative to the largest logit: measured <= 4e-7 (BN folding's rounding);
# the other MBN branch or batch statistics give >= 6e-2.
SANITY_LOGIT_TOLERANCE = 1e-3


def _row(check: str, passed: bool | None, value: str, expected: str) -> dict:
    return dict(check=check, passed=None if passed is None else bool(passed), value=value, expected=expected)


def _mean(flags: torch.Tensor) -> float:
    return flags.float().mean().item()


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """``model`` in eval mode (its MBN branch kept), every module's train flag restored on exit."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def _reference_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The evaluated model's logits, computed without :mod:`advkit.attacks`."""
    with torch.no_grad(), _eval_mode(model):
        return model(images)


def _eps_zero_row(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  curve: tuple[torch.Tensor, torch.Tensor]) -> dict:
    clean = _reference_logits(model, images).argmax(1) == labels
    differ = int(sum((rows != clean).sum() for rows in curve))
    return _row("eps 0 gives clean accuracy", differ == 0,
                f"{_mean(curve[0][-1]):.4f} vs clean {_mean(clean):.4f}; {differ} (checkpoint, example) differ",
                "equal for every example at every checkpoint")


def _model_state(model: nn.Module) -> dict[str, object]:
    state: dict[str, object] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["train flags"] = [m.training for m in model.modules()]
    state["requires_grad flags"] = [p.requires_grad for p in model.parameters()]
    state["MBN branch"] = norm.get_branch(model)
    return state


def _same(a: object, b: object) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def _observed_attack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, attack: attacks.Attack, *,
                     num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    """The kit's targeted ``attack`` of batch 0, run as :func:`curve_batch` runs it, observed: its start (the same
    call with 0 steps), its final iterate, and the logits it computed for both."""
    seen: dict[str, torch.Tensor] = {}

    def record(i: int, logits: torch.Tensor) -> None:
        if i == 0:
            seen["start logits"] = logits

    with attacks.attack_mode(model, "running", attack.fold_bn) as attacked:
        for name, run, hook in (("start", dataclasses.replace(attack, steps=0), None), ("adv", attack, record)):
            seen[name] = attacks.attack_once(attacked, images, labels, run, num_classes=num_classes, targets=None,
                                             generator=batch_generator(seed, 0, images.device), on_logits=hook)
        with torch.no_grad():
            seen["adv logits"] = attacked(seen["adv"])
    return seen


def _protocol_draws(images: torch.Tensor, labels: torch.Tensor, eps: float, num_classes: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 0's targets and start as the protocol defines them, drawn here rather than by :mod:`advkit.attacks`:
    from the batch generator, a target offset in 1..C-1 per example, then noise uniform in [-eps, eps] per pixel."""
    generator = batch_generator(seed, 0, images.device)
    offsets = torch.randint(1, num_classes, labels.shape, generator=generator, device=generator.device)
    noise = torch.rand(images.shape, generator=generator, device=generator.device).to(images.device)
    return (labels + offsets.to(labels.device)) % num_classes, (images + (noise * 2 - 1) * (eps / 255.0)).clamp(0, 1)


def _relative_gap(ours: torch.Tensor | None, reference: torch.Tensor) -> float:
    if ours is None:
        return float("inf")
    return ((ours.float() - reference).abs().max() / reference.abs().max().clamp(min=1)).item()


def _model_rows(model: nn.Module, seen: dict[str, torch.Tensor]) -> list[dict]:
    start_gap = _relative_gap(seen.get("start logits"), _reference_logits(model, seen["start"]))
    adv_gap = _relative_gap(seen["adv logits"], _reference_logits(model, seen["adv"]))
    return [_row("the attack runs the evaluated model", max(start_gap, adv_gap) <= SANITY_LOGIT_TOLERANCE,
                 f"max logit gap {start_gap:.1e} (start), {adv_gap:.1e} (final iterate)",
                 f"<= {SANITY_LOGIT_TOLERANCE:g} x the largest logit (eval mode, this branch)")]


def _linf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-example L-inf distance on the 0-255 scale."""
    return (a - b).abs().flatten(1).amax(1) * 255


def _geometry_rows(images: torch.Tensor, seen: dict[str, torch.Tensor], eps: float) -> list[dict]:
    adv, start = seen["adv"], seen["start"]
    far = max(_linf(adv, images).max().item(), _linf(start, images).max().item())
    low, high = min(adv.min().item(), start.min().item()), max(adv.max().item(), start.max().item())
    reach = _linf(adv, images).min().item()
    return [
        _row("adversarial examples lie in the eps-ball", far <= eps + 1e-4, f"max L-inf {far:.4f} (0-255)",
             f"<= eps = {eps:g}"),
        _row("adversarial examples lie in [0, 1]", low >= 0 and high <= 1, f"min {low:.4f}, max {high:.4f}",
             "within [0, 1]"),
        _row("the perturbation uses the budget", reach >= 0.9 * eps, f"smallest L-inf {reach:.4f} (0-255)",
             f">= 0.9 eps = {0.9 * eps:g} for every example"),
    ]


def _start_rows(images: torch.Tensor, seen: dict[str, torch.Tensor], drawn: torch.Tensor) -> list[dict]:
    gap = (seen["start"] - drawn).abs().max().item() * 255
    moved = _mean(seen["start"] != images)
    return [_row("random start: the documented uniform draw in the eps-cube", gap <= 1e-4,
                 f"max gap to the draw {gap:.1e} (0-255); median L-inf {_linf(seen['start'], images).median():.2f}; "
                 f"{moved:.0%} of pixels moved", "equal (<= 1e-4 on the 0-255 scale)")]


def _targeted_rows(model: nn.Module, seen: dict[str, torch.Tensor], targets: torch.Tensor,
                   num_classes: int) -> list[dict]:
    def target_log_prob(x: torch.Tensor) -> torch.Tensor:
        return _reference_logits(model, x).log_softmax(1).gather(1, targets[:, None])[:, 0]

    rises = _mean(target_log_prob(seen["adv"]) > target_log_prob(seen["start"]))
    hits = [_mean(_reference_logits(model, seen[k]).argmax(1) == targets) for k in ("start", "adv")]
    return [_row("targeted: the target's log-probability rises", rises >= 0.9,
                 f"rises for {rises:.1%}; classified as the target: {hits[0]:.1%} at the start, {hits[1]:.1%} at the "
                 f"end (chance {1 / (num_classes - 1):.1%})", ">= 90% of examples, from start to final iterate")]


def _agreement_row(check: str, ours: torch.Tensor, theirs: torch.Tensor, what: str) -> dict:
    """Per-example agreement of two (rows, B) correctness tables, the last row the final iterate of the longest
    attack; an example agrees when all its rows do."""
    agree = _mean((ours == theirs).all(0))
    return _row(check, agree >= SANITY_AGREEMENT,
                f"{agree:.1%} agree; PGD accuracy {_mean(ours[-1]):.4f} vs {_mean(theirs[-1]):.4f}",
                f">= {SANITY_AGREEMENT:.0%} of examples ({what})")


def _plain_pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, start: torch.Tensor,
               *, eps: float, step: float, checkpoints: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Targeted L-inf PGD written apart from :mod:`advkit.attacks`, as plainly as possible: the evaluated model
    itself (eval mode, unfolded), mean cross-entropy, the step projected as ``clean + clamp(delta)``. Returns the
    final- and worst-iterate correctness at each checkpoint, each (len(checkpoints), B)."""
    radius, alpha = eps / 255.0, step / 255.0
    final, worst = [], []
    never_broken = torch.ones_like(labels, dtype=torch.bool)
    x = start.detach()
    with _eval_mode(model):
        for i in range(max(checkpoints) + 1):
            x.requires_grad_(True)
            logits = model(x)
            correct = logits.argmax(1) == labels
            never_broken &= correct
            if i in checkpoints:
                final.append(correct)
                worst.append(never_broken.clone())
            if i == max(checkpoints):
                break
            (grad,) = torch.autograd.grad(nn.functional.cross_entropy(logits, targets), x)
            delta = (x.detach() - alpha * grad.sign() - images).clamp(-radius, radius)
            x = (images + delta).clamp(0, 1)
    return torch.stack(final), torch.stack(worst)


def _torchattacks_row(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, ours: torch.Tensor, *,
                      eps: float, step: float, steps: int, seed: int) -> dict:
    """Untargeted: torchattacks' PGD, its start drawn from torch's global generator seeded as batch 0's generator
    (the same uniform numbers as the kit's start), against the one-pass curve's final iterate, per example."""
    check = "agrees with torchattacks (untargeted)"
    try:
        import torchattacks
    except ImportError:
        return _row(check, None, "torchattacks not installed", "skipped")
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _eval_mode(model):
        torch.manual_seed(batch_generator(seed, 0, images.device).initial_seed())
        adv = torchattacks.PGD(model, eps=eps / 255, alpha=step / 255, steps=steps, random_start=True)(images, labels)
    theirs = _reference_logits(model, adv).argmax(1) == labels
    return _agreement_row(check, ours[None], theirs[None], f"PGD-{steps}, final iterate")


# ---------------------------------------------------------------- AutoAttack beside the paper's PGD

def autoattack_curve(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    reference: attacks.Attack,
    *,
    num_classes: int,
    n: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
    autocast_ctx: contextlib.AbstractContextManager | None = None,
    save_dir: str | Path | None = None,
    show_progress: bool = False,
    desc: str = "AutoAttack",
) -> dict[str, np.ndarray]:
    """Per-example correctness of the first ``n`` images of ``loader`` under AutoAttack (see
    :mod:`advkit.autoattack`) at ``reference.eps``, ``reference.steps`` iterations, and under ``reference``
    itself, an untargeted PGD (the yardstick of :func:`autoattack_vs_pgd_check`). Arrays ``clean``, ``apgd-ce``,
    ``apgd-t``, ``autoattack`` (robust against both), ``pgd_untargeted`` (worst iterate) and ``labels``, each
    (n,). Batches are seeded with :func:`batch_seed`; ``save_dir``, resuming and torchrun as in
    :func:`evaluate_batches`."""
    check_range("n", n, 1, integer=True)
    if reference.targeted:
        raise ValueError("reference.targeted=True is not accepted: AutoAttack is checked against untargeted PGD")
    autoattack.check_autoattack_arguments(reference.eps, num_classes, reference.steps)
    autocast_ctx = autocast_ctx if autocast_ctx is not None else contextlib.nullcontext()

    def compute(batch_index: int, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        images, labels = data.to_device((images, labels), device, channels_last)
        with autocast_ctx:
            result = autoattack.autoattack_batch(model, images, labels, eps=reference.eps, num_classes=num_classes,
                                                 seed=batch_seed(seed, batch_index), n_iter=reference.steps,
                                                 fold_bn=reference.fold_bn)
            _, worst = curve_batch(model, images, labels, reference, seed=seed, batch_index=batch_index)
        return result | {"pgd_untargeted": worst[0], "labels": labels}

    ordered = evaluate_batches(loader, compute, n=n, save_dir=save_dir, show_progress=show_progress, desc=desc)
    return {key: torch.cat([r[key] for r in ordered]).numpy() for key in ordered[0]}


def autoattack_table(result: dict[str, np.ndarray], *, n_iter: int, **columns) -> pd.DataFrame:
    """The tidy rows of one :func:`autoattack_curve` in ``results.csv``'s schema: 'apgd-ce', 'apgd-t' and their
    worst case 'autoattack' (APGD counts an example broken once any iterate fooled the model, so
    ``worst_accuracy`` equals ``accuracy``; the step is adaptive: ``step`` is NaN, ``step_rule`` 'apgd')."""
    n = len(result["labels"])
    rows = [dict(attack=name, targeted=name == "apgd-t", step=float("nan"), step_rule="apgd", restarts=1,
                 steps=n_iter, accuracy=result[name].mean(), worst_accuracy=result[name].mean())
            for name in (*autoattack.ATTACKS, autoattack.WORST_CASE)]
    return pd.DataFrame([columns | row | {"n": n} for row in rows])


def autoattack_spec(cfg, branch: str, n_iter: int, weights: str, device_type: str) -> dict:
    """What decides a run's AutoAttack results (the evaluated weights' digest and the device type included): its
    saved batches are reused only under the same spec."""
    return dict(branch=branch, weights=weights, precision="bf16" if cfg.eval_bf16 else "fp32", device=device_type,
                attack=autoattack.WORST_CASE, attacks=list(autoattack.ATTACKS), eps=cfg.eval_eps,
                n_iter=n_iter, max_target_classes=autoattack.MAX_TARGET_CLASSES, pgd_step=cfg.eval_step,
                seed=cfg.evaluation_seed, n=cfg.eval_autoattack_n, n_test=cfg.n_test, batch_size=cfg.eval_batch_size,
                dataset=cfg.dataset, torchattacks=autoattack.require_torchattacks().__version__,
                version=EVALUATION_VERSION)


def _autoattack_folders(model: nn.Module, cfg, n_iter: int, write: bool, device: torch.device) -> dict[str, Path]:
    branches = norm.evaluated_branches(model)
    weights = models.weights_digest(model)
    return {branch: _spec_dir(cfg.run_dir / "eval" / "autoattack",
                              autoattack_spec(cfg, branch, n_iter, weights, device.type), write=write)
            for branch in branches}


@exact_fp32()
def autoattack_for_run(model: nn.Module, cfg, show_progress: bool = False, n_iter: int | None = None) -> pd.DataFrame:
    """AutoAttack on ``cfg.eval_autoattack_n`` images of the run's evaluation set (:func:`subset_loader`), through
    every MBN branch, at ``cfg.eval_eps``: rows for ``results.csv`` (see :func:`autoattack_table`). Per-example results go
    to ``<run>/eval/autoattack/<branch>-<hash>/`` (batches, and ``examples.npz`` when complete).
    ``n_iter``: None is AutoAttack's reference (:data:`advkit.autoattack.REFERENCE_ITERATIONS`)."""
    n_iter = n_iter or autoattack.REFERENCE_ITERATIONS
    reference = attacks.Attack(eps=cfg.eval_eps, step=cfg.eval_step, steps=n_iter, targeted=False,
                               fold_bn=cfg.attack_fold_bn)
    ctx = distributed.context()
    device = resolve_rank_device(cfg, ctx)
    loader = subset_loader(cfg, cfg.eval_autoattack_n, cfg.eval_batch_size)
    tables = []
    for branch, folder in _autoattack_folders(model, cfg, n_iter, write=ctx.main, device=device).items():
        with norm.through_branch(model, branch):
            result = autoattack_curve(
                model, loader, reference, num_classes=data.DATASETS[cfg.dataset].num_classes,
                n=cfg.eval_autoattack_n, seed=cfg.evaluation_seed, device=device,
                channels_last=uses_channels_last(cfg, device), autocast_ctx=eval_autocast(cfg, device),
                save_dir=folder / "batches", show_progress=show_progress, desc=f"{branch} AutoAttack")
        if ctx.main:
            np.savez_compressed(folder / "examples.npz", **result)
        tables.append(autoattack_table(result, n_iter=n_iter, branch=branch, eps=cfg.eval_eps, seed=cfg.seed,
                                            eval_seed=cfg.evaluation_seed))
    return pd.concat(tables, ignore_index=True)


def autoattack_vs_pgd_check(autoattack_correct: np.ndarray, pgd_correct: np.ndarray, *,
                            pgd_name: str = "untargeted PGD", alpha: float = 1e-3,
                            masking_margin: float = 0.05) -> pd.DataFrame:
    """Two rows in ``sanity.csv``'s format comparing per-example correctness on the same images.

    - AutoAttack must not be weaker than untargeted PGD beyond sampling noise. The comparison is paired: of the
      images on which the two disagree, ``b`` survive only AutoAttack and ``c`` only PGD. Were AutoAttack as
      strong as PGD, ``b`` would be at most Binomial(b + c, 1/2); the check fails when the exact one-sided
      McNemar p-value P(X >= b) is below ``alpha`` (0.001: one false alarm in a thousand evaluations). A paired
      test rather than a bound on two accuracies: the images on which both agree carry no noise. A failure
      means a broken or misconfigured AutoAttack (eps scale, model mode, MBN branch).
    - PGD accuracy must not exceed AutoAttack's by more than ``masking_margin`` (5 points). A larger gap flags
      a PGD that its cross-entropy gradients mislead (gradient masking; APGD-T's DLR loss is scale-invariant)
      or that is too weak: the paper's protocol would overstate robustness. Reported; the numbers stand.
    """
    from scipy.stats import binomtest  # torchattacks needs scipy too

    aa, pgd = np.asarray(autoattack_correct, dtype=bool), np.asarray(pgd_correct, dtype=bool)
    if aa.shape != pgd.shape or aa.ndim != 1 or not len(aa):
        raise ValueError(f"autoattack_correct and pgd_correct must be per-example arrays of one length "
                         f"(got shapes {aa.shape} and {pgd.shape})")
    b, c = int((aa & ~pgd).sum()), int((~aa & pgd).sum())
    p_value = binomtest(b, b + c, 0.5, alternative="greater").pvalue if b + c else 1.0
    aa_acc, pgd_acc = aa.mean(), pgd.mean()
    on = f"on {len(aa)} images"
    return pd.DataFrame([
        dict(check=f"AutoAttack not weaker than {pgd_name}", passed=bool(p_value >= alpha),
             value=f"{aa_acc:.4f} vs {pgd_acc:.4f} {on}; {b} survive only AutoAttack, {c} only PGD "
                   f"(one-sided McNemar p={p_value:.2g})",
             expected=f"AutoAttack <= PGD within noise (p >= {alpha:g})"),
        dict(check=f"{pgd_name} not far above AutoAttack (gradient masking)",
             passed=bool(pgd_acc - aa_acc <= masking_margin + 1e-12),
             value=f"{pgd_name} - AutoAttack = {(pgd_acc - aa_acc) * 100:.1f} points {on}",
             expected=f"<= {masking_margin * 100:g} points"),
    ])


def autoattack_sanity_for_run(model: nn.Module, cfg, n_iter: int | None = None) -> pd.DataFrame:
    """:func:`autoattack_vs_pgd_check` for every MBN branch, from the ``examples.npz`` that
    :func:`autoattack_for_run` saved (call it after that, on the main process)."""
    n_iter = n_iter or autoattack.REFERENCE_ITERATIONS
    device = resolve_rank_device(cfg, distributed.context())
    tables = []
    for branch, folder in _autoattack_folders(model, cfg, n_iter, write=False, device=device).items():
        with np.load(folder / "examples.npz") as result:
            table = autoattack_vs_pgd_check(result[autoattack.WORST_CASE], result["pgd_untargeted"],
                                            pgd_name=f"untargeted PGD-{n_iter}")
        tables.append(table.assign(branch=branch))
    return pd.concat(tables, ignore_index=True)
