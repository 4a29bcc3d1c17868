"""Models the kit did not train, evaluated under the paper's protocol (issue 17): a local state dict (a released
robust ResNet-152 converted to PyTorch, a torchvision or timm ResNet from another project) loaded into the kit's
architectures and evaluated into a normal run folder (targeted PGD curve of Section 3, AutoAttack with
``eval_autoattack_n``, the sanity checks), so that ``advkit summary``, the analysis notebooks and the explorer show
it beside the paper and the kit's runs. Nothing is trained.

    advkit evaluate --arch resnet50 --weights resnet50-robust.pt --dataset imagenet -p preset paper --name r50

The file may hold a plain state dict or a dict with it under 'state_dict' or 'model' (a kit checkpoint too);
DDP's 'module.' prefixes are stripped. The ResNet's own names (torchvision's and timm's: ``conv1.weight``,
``layer1.0.bn1.running_mean``, ``fc.bias``) are the kit's ResNet's (:mod:`advkit.models` builds torchvision's
ResNet), under the ``net.`` of the kit's ``Sequential(normalize, net)``.

Input normalisation: the kit's models take images in [0, 1] and start with a ``Normalize`` layer. The weights'
model expects its inputs normalised with ``mean``/``std`` (given, else the data set's, as the kit trains and as
torchvision's ImageNet models expect), or normalises inside itself (``norm_inside``: the kit's layer is the
identity); a kit model's state dict brings its own ``normalize.mean``/``normalize.std``. The run folder's
``config.json`` records the file, its SHA-256 and the normalisation under ``evaluated_weights``; its training
parameters are null (nothing was trained) and its strategy reads :data:`EXTERNAL_STRATEGY`.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from . import data, distributed, models, tblog
from .config import Config, ResumeConflict, make_config, validate
from .device import environment, resolve_rank_device, uses_channels_last
from .evaluate import evaluate_model, sanity_table
from .rundir import CHECKPOINT_FORMAT, RunDir, load_checkpoint

EXTERNAL_STRATEGY = "evaluated, not trained (external weights)"
RECORD_KEY = "evaluated_weights"  # config.json's key that marks an evaluation of external weights
WRAPPER_KEYS = ("state_dict", "model")  # where training scripts keep the state dict inside a checkpoint
NORMALIZATIONS = ("given", "dataset", "inside", "weights file")
# Parameters that describe training, or what is computed from training batches (BN statistics of Figure 6):
# null in an evaluated run's config.json, so no analysis mistakes the model for one of the kit's strategies.
NOT_APPLICABLE = ("adv_ratio", "clean_ratio", "alpha", "eq1_weighting", "alp_weight",
                  "running_stats_epochs", "finetune_bn", "init_checkpoint", "zero_init_residual", "train_eps",
                  "train_step", "train_steps", "train_clean_start_prob", "attack_bn_mode", "n_train", "epochs",
                  "batch_size", "optimizer", "lr", "momentum", "nesterov", "weight_decay", "label_smoothing",
                  "warmup_epochs", "schedule", "lr_decay_epochs", "lr_decay_factor", "exp_decay_rate",
                  "exp_decay_epochs", "checkpoint_every_steps", "bnstats_channels", "bnstats_layer", "bf16",
                  "compile", "sync_bn")
# A kit model's own Normalize buffers; optional in a file (``norm_inside``/``mean``/``std`` set them otherwise)
NORMALIZE_KEYS = ("normalize.mean", "normalize.std")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes: names the exact weights a run folder evaluated."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(weights: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in the file ``weights`` (tensors only: ``torch.load(weights_only=True)``, a file carrying
    code is refused): a plain one, or one under 'state_dict' or 'model', 'module.' prefixes stripped."""
    path = Path(weights)
    if not path.is_file():
        raise ValueError(f"weights={str(weights)!r} is not accepted: {'not a file' if path.exists() else 'no such file'}"
                         "; give a file saved with torch.save(model.state_dict(), path)")
    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch reports unreadable files in many ways
        said = str(exc).split("WeightsUnpickler error:")[-1].strip().split("\n")[0]
        raise ValueError(f"weights={str(weights)!r} is not accepted: torch.load(weights_only=True) cannot read it "
                         f"({type(exc).__name__}: {said[:200]}); give a state dict of tensors") from None
    if isinstance(loaded, dict) and loaded.get("format") == CHECKPOINT_FORMAT:
        loaded = load_checkpoint(path)  # a kit checkpoint, checked against its SHA-256
    if isinstance(loaded, dict):
        loaded = next((loaded[k] for k in WRAPPER_KEYS if isinstance(loaded.get(k), dict)), loaded)
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        found = sorted(map(str, loaded))[:5] if isinstance(loaded, dict) else type(loaded).__name__
        raise ValueError(f"weights={str(weights)!r} is not accepted: it holds {found!r}, not a state dict (names -> "
                         f"tensors), nor a dict with one under {' or '.join(map(repr, WRAPPER_KEYS))}")
    return {re.sub(r"^(module\.)+", "", name): tensor for name, tensor in loaded.items()}


def kit_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` under the kit model's names: a ResNet's own names gain the kit's ``net.`` prefix; a kit model's
    state dict (``normalize.``/``net.`` names) is kept as it is."""
    return {name if name.split(".")[0] in ("net", "normalize") else f"net.{name}": tensor
            for name, tensor in state.items()}


def _few(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def check_fit(state: dict[str, torch.Tensor], model: nn.Module, what: str) -> None:
    """ValueError (naming ``what``, the missing, unexpected and misshapen names) unless ``state``, in the kit's
    names, fits ``model`` (which may live on the meta device: no memory, no compute). The BN counters
    ``num_batches_tracked`` and the kit's own Normalize buffers may be absent."""
    expected = model.state_dict()
    optional = [k for k in expected if k.endswith("num_batches_tracked") or k in NORMALIZE_KEYS]
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} is {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in the model"
              for k in state if k in expected and state[k].shape != expected[k].shape]
    problems = [f"{len(names)} {kind}: {_few(names)}" for kind, names in
                (("missing key(s)", missing), ("unexpected key(s)", unexpected), ("of another shape", shapes)) if names]
    if problems:
        raise ValueError(f"weights do not fit {what}: {'; '.join(problems)} (names after stripping 'module.' and "
                         "adding the kit's 'net.'; torchvision and timm ResNet names fit resnet50/101/152)")


def _numbers(name: str, values: Any, channels: int, dataset: str) -> list[float]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != channels or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
        raise ValueError(f"{name}={values!r} is not accepted; {dataset} images have {channels} channel(s): give "
                         f"{channels} finite number(s), one per channel")
    return [float(v) for v in values]


def input_normalization(dataset: str, state: dict[str, torch.Tensor], norm_inside: bool = False,
                        mean: Any = None, std: Any = None) -> dict[str, Any]:
    """How inputs in [0, 1] reach the weights' model: ``{'mode', 'mean', 'std'}`` with mode 'inside' (the kit's
    normaliser is the identity), 'given', 'dataset' (neither given) or 'weights file' (``state`` is a kit model's,
    in the kit's names, with its own Normalize buffers). ValueError for a combination that contradicts itself."""
    info = data.DATASETS[dataset]
    if norm_inside not in (False, True):
        raise ValueError(f"norm_inside={norm_inside!r} is not accepted; give True or False")
    if (mean is None) != (std is None):
        raise ValueError(f"mean={mean!r}, std={std!r} is not accepted; give both (one value per channel) or neither")
    if norm_inside and mean is not None:
        raise ValueError("norm_inside=True and mean/std are not accepted together: the weights' model either "
                         "normalises inside itself or expects inputs normalised with mean/std; give one")
    if any(k in state for k in NORMALIZE_KEYS) and not all(k in state for k in NORMALIZE_KEYS):
        raise ValueError(f"weights are not accepted: the file holds one of {NORMALIZE_KEYS} without the other")
    if all(k in state for k in NORMALIZE_KEYS):
        if norm_inside or mean is not None:
            raise ValueError("norm_inside/mean/std are not accepted with these weights: the file is a kit model's "
                             "state dict and carries its own input normalisation (normalize.mean, normalize.std)")
        return dict(mode="weights file", mean=state["normalize.mean"].flatten().tolist(),
                    std=state["normalize.std"].flatten().tolist())
    if norm_inside:
        return dict(mode="inside", mean=[0.0] * info.channels, std=[1.0] * info.channels)
    if mean is None:
        return dict(mode="dataset", mean=list(info.mean), std=list(info.std))
    mean, std = (_numbers(n, v, info.channels, dataset) for n, v in (("mean", mean), ("std", std)))
    if min(std) <= 0:
        raise ValueError(f"std={std!r} is not accepted; every standard deviation must be > 0")
    return dict(mode="given", mean=mean, std=std)


def _build(cfg: Config, normalization: dict[str, Any]) -> nn.Module:
    info = data.DATASETS[cfg.dataset]
    return models.build_model(cfg.arch, info.num_classes, cfg.norm, in_channels=info.channels,
                              mean=normalization["mean"], std=normalization["std"],
                              width_multiplier=cfg.width_multiplier, gn_groups=cfg.gn_groups, zero_init_residual=False)


def load_weights(cfg: Config, weights: str | Path, *, norm_inside: bool = False, mean: Any = None, std: Any = None
                 ) -> tuple[nn.Module, dict[str, Any]]:
    """The kit model ``cfg.arch``/``cfg.norm`` (classes and channels of ``cfg.dataset``) holding the file's
    weights, in eval mode on the CPU, and the record of what was loaded (file, SHA-256, normalisation). Every
    refusal (file, contents, fit, normalisation) comes before the model is built."""
    state = kit_names(read_state_dict(weights))
    normalization = input_normalization(cfg.dataset, state, norm_inside, mean, std)
    with torch.device("meta"):
        skeleton = _build(cfg, normalization)
    check_fit(state, skeleton, f"arch={cfg.arch!r}, norm={cfg.norm!r} with the {data.DATASETS[cfg.dataset].num_classes}"
                               f" classes and {data.DATASETS[cfg.dataset].channels} channel(s) of dataset="
                               f"{cfg.dataset!r} (file {weights})")
    model = _build(cfg, normalization)
    own = model.state_dict()
    model.load_state_dict({k: own[k] for k in own if k not in state} | state)  # the optional ones: the model's
    record = dict(file=str(Path(weights).resolve()), sha256=file_sha256(weights), normalization=normalization["mode"],
                  mean=normalization["mean"], std=normalization["std"])
    return model.eval(), record


# ---------------------------------------------------------------- the run folder

def _saved_config(cfg: Config, record: dict[str, Any]) -> dict[str, Any]:
    return cfg.to_dict() | dict.fromkeys(NOT_APPLICABLE) | {
        "strategy": EXTERNAL_STRATEGY, "run_dir": str(cfg.run_dir), RECORD_KEY: record}


def _refuse(cfg: Config, folder: RunDir, record: dict[str, Any]) -> None:
    """Refusals before anything is written: an existing folder without ``overwrite``, unless ``resume`` continues
    the evaluation of the same weights, model and normalisation (evaluation parameters may change)."""
    if not folder.exists() or cfg.overwrite:
        return
    if not cfg.resume:
        raise FileExistsError(f"run folder {folder.path} already holds a run: pass overwrite=True to replace it or "
                              "resume=True to continue evaluating the same weights (nothing was changed)")
    saved = folder.config()
    if RECORD_KEY not in saved:
        raise ResumeConflict(f"resume of {folder.path} is refused: it holds a trained run, not an evaluation of "
                             "external weights; give another name (nothing was changed)")
    new = _saved_config(cfg, record)
    keys = [("arch",), ("norm",), ("dataset",), ("width_multiplier",), ("gn_groups",),
            (RECORD_KEY, "sha256"), (RECORD_KEY, "mean"), (RECORD_KEY, "std")]
    differ = [f"{'.'.join(k)}: {_get(saved, k)!r} -> {_get(new, k)!r}" for k in keys if _get(saved, k) != _get(new, k)]
    if differ:
        raise ResumeConflict(f"resume of {folder.path} is refused: it evaluated other weights or another model "
                             f"({'; '.join(differ)}); use another name or overwrite=True (nothing was changed)")


def _get(values: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        values = values.get(key) if isinstance(values, dict) else None
    return values


def evaluate_weights(cfg: Config, weights: str | Path, *, norm_inside: bool = False, mean: Any = None,
                     std: Any = None, show_progress: bool = True) -> pd.DataFrame:
    """Evaluate the state dict in ``weights`` as ``cfg`` says (its ``arch``, ``norm``, ``dataset`` and evaluation
    parameters; see the module's text for the normalisation) into the run folder ``cfg.run_dir``: ``config.json``
    (with ``evaluated_weights``), ``environment.json``, ``results.csv`` (:func:`advkit.evaluate.evaluate_model`,
    AutoAttack's rows with ``eval_autoattack_n``), ``sanity.csv``, ``status.json``, TensorBoard's with
    ``tensorboard``. Every input is checked before anything is written or computed. Returns the results table.

        results = advkit.external.evaluate_weights(make_config("paper", name="r50", arch="resnet50"),
                                                   "resnet50-robust.pt", mean=[0.485, 0.456, 0.406],
                                                   std=[0.229, 0.224, 0.225])

    The paper's released weights (facebookresearch/ImageNet-Adversarial-Training, tensorpack) take BGR images
    scaled to [-1, 1]: convert them with conv1's input channels reversed (``w[:, [2, 1, 0]]``, the kit feeds
    RGB) and give ``mean=std=[0.5, 0.5, 0.5]``, not ``norm_inside``. Their stride-2 layers pad as TensorFlow's
    'SAME' does (one pixel fewer before than after), torchvision's ResNet symmetrically, so the kit evaluates a
    function shifted by one pixel at each stride-2 layer, not exactly the released model.
    """
    validate(cfg)
    if cfg.gpus != 1:
        raise ValueError(f"gpus={cfg.gpus} is not accepted for evaluating external weights; give gpus=1 (one process)")
    data.check_available(cfg.dataset, cfg.data_root)
    model, record = load_weights(cfg, weights, norm_inside=norm_inside, mean=mean, std=std)
    folder = RunDir(cfg.run_dir)
    _refuse(cfg, folder, record)
    with folder.lock():
        _refuse(cfg, folder, record)  # again under the lock: another process may have written meanwhile
        if cfg.overwrite and folder.exists():
            folder.clear()
        device = resolve_rank_device(cfg, distributed.context())
        folder.write_json(folder.config_file, _saved_config(cfg, record))
        folder.write_json(folder.environment_file, environment(cfg, device))
        folder.write_status("running")
        try:
            results = _evaluate(model, cfg, folder, device, show_progress)
        except BaseException as exc:
            folder.write_status("failed", error=f"{type(exc).__name__}: {exc}")
            raise
    return results


def _evaluate(model: nn.Module, cfg: Config, folder: RunDir, device: torch.device, show_progress: bool
              ) -> pd.DataFrame:
    """What :func:`advkit.run.run` records after training, for a model that was not trained."""
    model = model.to(device, memory_format=torch.channels_last if uses_channels_last(cfg, device)
                     else torch.preserve_format)
    results = evaluate_model(model, cfg, show_progress=show_progress)
    sanity = sanity_table(model, cfg)
    if sanity is not None:
        folder.write_table(folder.sanity_file, sanity)
    if cfg.tensorboard:
        tblog.log_evaluation(folder, results)
    folder.write_table(folder.results_file, results)  # last: with status 'done' it marks a finished run
    folder.write_status("done")
    return results


def is_evaluated(saved: dict[str, Any]) -> bool:
    """Whether a run folder's ``config.json`` (as a dict) is an evaluation of external weights."""
    return RECORD_KEY in saved


def load_evaluated(run_dir: str | Path) -> tuple[Config, nn.Module]:
    """The Config an evaluated run used and its model, with the weights file it names (refused if the file's
    SHA-256 is no longer the one evaluated). :func:`advkit.run.load_run` calls it for such folders."""
    folder = RunDir(run_dir)
    saved = folder.config()
    record = saved[RECORD_KEY]
    cfg = make_config(None, **{k: v for k, v in saved.items()
                               if k in Config.__dataclass_fields__ and k not in NOT_APPLICABLE})
    if not Path(record["file"]).is_file() or file_sha256(record["file"]) != record["sha256"]:
        raise ValueError(f"run {folder.path} evaluated weights {record['file']} with SHA-256 {record['sha256'][:16]}..., "
                         "and that file is missing or has changed since; restore it or evaluate the new file")
    given = record["normalization"] == "given"
    model, _ = load_weights(cfg, record["file"], norm_inside=record["normalization"] == "inside",
                            mean=record["mean"] if given else None, std=record["std"] if given else None)
    return cfg, model
