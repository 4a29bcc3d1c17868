"""Every parameter of an experiment in one dataclass, three presets, and validation before any compute.

Strategies use the paper's names: ``adv_ratio=1, clean_ratio=X`` is "100% adv + X% clean" (X = 0 is Madry's
min-max), ``adv_ratio=0, clean_ratio=1`` is standard training ("0% adv + 100% clean").
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import attacks, autoattack, data, models, paper, tblog
from . import norm as norm_module
from .paths import resolve_output
from .rundir import RunDir, write_atomic
from .validate import check_choice, check_range

OPTIMIZERS = ("sgd", "rmsprop")
SCHEDULES = ("step", "exp", "cosine")
EQ1_WEIGHTINGS = ("share", "per_image")
LIST_PARAMETERS = ("lr_decay_epochs", "eval_checkpoints")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Config:
    # run
    name: str = "test-run"  # run folder: <runs_root>/<name>
    runs_root: str = "runs"  # relative paths resolve against the repository root
    resume: bool | str = False  # continue from <run>/checkpoints/last.pt; 'auto': resume, evaluate or start as the folder says
    overwrite: bool = False  # delete an existing run folder of the same name first
    seed: int = 0
    tensorboard: bool = False  # also write TensorBoard event files into <run>/tensorboard/ (view: tensorboard --logdir runs)
    # data
    dataset: str = "fashion-mnist"  # fashion-mnist | cifar10 | imagenet
    data_root: str | None = None  # None: $ADVKIT_DATA or <repo>/data (imagenet: <that>/imagenet)
    n_train: int | None = 2048  # seeded training subset; 'all': every image
    n_test: int | None = 256  # seeded evaluation subset; 'all': every image
    num_workers: int = 0
    decode: str = "cpu"  # imagenet: cpu (PIL in the workers) | gpu (batched nvJPEG and augmentation on the GPU)
    # model
    arch: str = "small_resnet8"  # small_resnet{8..110} or resnet{50..638}
    width_multiplier: int = 1  # small ResNets only
    norm: str = "bn"  # bn | mbn (Mixture BN) | gn (GroupNorm)
    gn_groups: int = 32
    zero_init_residual: bool | None = None  # zero scale of each residual block's last norm; None: ImageNet ResNets only
    # strategy
    adv_ratio: float = 1.0  # 1: every image attacked; 0: standard training
    clean_ratio: float = 0.0  # X of "100% adv + X% clean"
    alpha: float = 0.5  # Eq. 1: alpha * J(clean) + (1 - alpha) * J(adv)
    eq1_weighting: str = "share"  # X < 100%: share (clean images carry alpha of the loss) | per_image (each image alike)
    alp_weight: float = 0.0  # adversarial logit pairing: weight of mean squared clean/adv logit distance (ALP: 0.5)
    running_stats_epochs: int = 0  # last K epochs normalise with BN running statistics (paper: 10 of 110)
    finetune_bn: bool = False  # train only BN parameters, starting from init_checkpoint (Section 4.4)
    init_checkpoint: str | None = None  # weights to start from (a checkpoint file or a run folder)
    # training attack
    train_eps: float = 16.0  # 0-255 scale
    train_step: float = 4.0  # paper: 1 for PGD-30/20, 2 for PGD-10, 4 for PGD-5
    train_steps: int = 5
    train_clean_start_prob: float = 0.2  # per batch, as in the original pipeline
    attack_bn_mode: str = "running"  # BN statistics during attacks: running | batch
    attack_fold_bn: bool = True  # attacks on BN running statistics run a BN-folded view: same function, faster
    attack_compile: str = "off"  # off | default | reduce-overhead (CUDA graphs) | max-autotune: torch.compile attacks
    # optimisation
    epochs: int = 2
    batch_size: int = 128  # global batch
    optimizer: str = "sgd"
    lr: float = 0.1  # per 256 images: the optimizer uses lr x batch_size / 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4  # conv and linear weights only
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0
    schedule: str = "step"  # step | exp | cosine (to 0 at the last epoch, after the warm-up)
    lr_decay_epochs: list[int] = field(default_factory=list)  # step schedule: x lr_decay_factor at these epochs
    lr_decay_factor: float = 0.1
    exp_decay_rate: float = 0.94  # exp schedule: lr x rate ** floor(epoch / exp_decay_epochs)
    exp_decay_epochs: float = 1.0  # exp schedule: epochs between decays (ALP's RMSProp recipe: 2)
    checkpoint_every_steps: int = 0  # 0: at the end of every epoch only
    # evaluation (the paper's protocol: targeted, random start)
    eval_eps: float = 16.0
    eval_step: float = 1.0
    eval_checkpoints: list[int] = field(default_factory=lambda: list(paper.PGD_CHECKPOINTS))  # PGD-N curve in one pass
    eval_targeted: bool = True  # False: untargeted PGD
    eval_restarts: int = 1  # random restarts; an example must survive all of them
    eval_step_rule: str = "fixed"  # fixed | max_eps_over_steps (the original pipeline's max(step, eps / N))
    eval_batch_size: int = 256
    eval_bf16: bool = False  # evaluate under bf16 autocast (CUDA); default fp32, recorded in results.csv
    eval_autoattack_n: int = 0  # N evaluation images (a seeded sample) also under AutoAttack (APGD-CE + APGD-T, 100 iterations; 0: off)
    eval_seed: int | None = None  # seeds the test subset and the attacks' draws; None: seed. Fixed: seeds vary training only
    sanity_n: int = 256  # test images for the sanity checks (0: skip them)
    bnstats_channels: int = 20  # channels sampled for Figures 5 and 6 (0: skip BN statistics)
    bnstats_layer: str | None = None  # a norm layer's module name; None: the middle block of the third stage
    # hardware
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool | None = None  # None: on for CUDA, off for CPU
    channels_last: bool | None = None  # None: on for CUDA, off for CPU
    compile: bool = False  # torch.compile the training forward pass
    gpus: int = 1  # processes to launch with torchrun from the notebook (one per GPU; gloo on CPU)
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA); default: BN statistics per replica, as the paper

    @property
    def run_dir(self) -> Path:
        return resolve_output(self.runs_root) / self.name

    @property
    def zero_init(self) -> bool:
        """Whether residual blocks start with a zero last-norm scale: as set, else for the ImageNet ResNets only."""
        return not self.arch.startswith("small_") if self.zero_init_residual is None else self.zero_init_residual

    @property
    def evaluation_seed(self) -> int:
        """The seed of the evaluation set and of the attacks' random targets and starts: ``eval_seed``, else ``seed``."""
        return self.seed if self.eval_seed is None else self.eval_seed

    @property
    def training_attack(self) -> attacks.Attack:
        """The attack that makes the training images adversarial (``train_*``, ``attack_*``)."""
        return attacks.Attack(eps=self.train_eps, step=self.train_step, steps=self.train_steps, targeted=True,
                              clean_start_prob=self.train_clean_start_prob, bn_mode=self.attack_bn_mode,
                              fold_bn=self.attack_fold_bn, compile=self.attack_compile)

    @property
    def evaluation_attack(self) -> attacks.Attack:
        """The evaluation's attack (``eval_*``), run to its longest checkpoint; BN on running statistics."""
        return attacks.Attack(eps=self.eval_eps, step=self.eval_step, steps=max(self.eval_checkpoints),
                              targeted=self.eval_targeted, restarts=self.eval_restarts, step_rule=self.eval_step_rule,
                              fold_bn=self.attack_fold_bn, compile=self.attack_compile)

    @property
    def strategy(self) -> str:
        """The paper's name of the training strategy."""
        return paper.strategy_label(self.adv_ratio, self.clean_ratio, self.alp_weight > 0, self.finetune_bn)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        resolved = self.to_dict() | {"strategy": self.strategy, "run_dir": str(self.run_dir)}
        write_atomic(path, json.dumps(resolved, indent=2))


PRESETS: dict[str, dict[str, Any]] = {
    # ImageNet, ResNet-152, batch 4096, PGD-30 step 1, 110 epochs, lr / 10 at 35, 70, 95 (Section 3)
    "paper": dict(dataset="imagenet", arch="resnet152", n_train=None, n_test=None, epochs=110, batch_size=4096,
                  lr=0.1, warmup_epochs=5, lr_decay_epochs=[35, 70, 95], weight_decay=1e-4, train_steps=30,
                  train_step=1.0, num_workers=8, checkpoint_every_steps=1000),
    # the embedded default, sized for make demo on 2 CPU cores: the study's recipe on half its images (standard
    # training: 88.0% on the full test set in the recipe pilots), eps 16, one fixed 500-image evaluation set
    "demo": dict(dataset="fashion-mnist", arch="small_resnet8", n_train=12288, n_test=500, eval_seed=0, epochs=8,
                 batch_size=128, schedule="cosine", lr=0.2, warmup_epochs=0.5, nesterov=True, weight_decay=5e-4,
                 train_steps=5, train_step=4.0, eval_checkpoints=[10, 20, 50, 100], eval_step=2.0, sanity_n=128),
    # the decisive study's recipe (docs/study-design.md): >= 89% clean for standard training, one fixed evaluation
    # set for every seed (eval_seed), PGD-100 on 2000 images and AutoAttack on 1000; eps set by the sweep files
    "study": dict(dataset="fashion-mnist", arch="small_resnet8", n_train=24576, n_test=2000, eval_seed=0, epochs=8,
                  batch_size=128, schedule="cosine", lr=0.2, warmup_epochs=0.5, nesterov=True, weight_decay=5e-4,
                  train_steps=5, eval_checkpoints=[10, 20, 50, 100], eval_autoattack_n=1000, sanity_n=256),
    # seconds on a CPU
    "test": dict(dataset="fashion-mnist", arch="small_resnet8", n_train=512, n_test=128, epochs=2, batch_size=64,
                 lr_decay_epochs=[1], train_steps=2, train_step=8.0, eval_checkpoints=[1, 2, 3], eval_step=4.0,
                 sanity_n=32, bnstats_channels=4),
}


def kept_clean(clean_ratio: float, batch: int) -> int:
    """How many of a process's ``batch`` clean images "100% adv + X% clean" keeps (X = ``clean_ratio``)."""
    return round(clean_ratio * batch)


def make_config(preset: str | None = None, *, check_paths: bool = True, **overrides: Any) -> Config:
    """A validated Config: the preset's values, then ``overrides``. Unknown names are rejected.

    ``check_paths=False`` skips the existence check of ``init_checkpoint`` (a sweep's finetuning point whose
    starting run comes earlier in the same sweep). A preset's value that an override makes inapplicable (the
    ``test`` preset's ``lr_decay_epochs`` under ``schedule='cosine'``) goes back to the default; the same value
    passed explicitly is refused."""
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}; valid parameters: {sorted(known)}")
    values: dict[str, Any] = {}
    if preset is not None:
        check_choice("preset", preset, list(PRESETS))
        values.update(PRESETS[preset])
    values.update(overrides)
    for name in _inapplicable(values):
        if name not in overrides:  # the preset's own value: back to the default; a value passed is refused
            values[name] = getattr(Config(), name)
    for name in ("n_train", "n_test"):
        if values.get(name) == "all":
            values[name] = None
    cfg = Config(**values)
    validate(cfg, check_paths=check_paths)
    return cfg


def _inapplicable(values: dict[str, Any]) -> dict[str, str]:
    """The parameters that ``values`` (Config's defaults fill the rest) sets to something the run would ignore or
    fail on, given the other values: name -> what to give instead."""
    default = Config()
    v = dataclasses.asdict(default) | values
    out = {}
    if v["nesterov"] is True and v["optimizer"] != "sgd":
        out["nesterov"] = (f"optimizer={v['optimizer']!r}: RMSProp has no Nesterov momentum (it would be ignored); "
                           "use nesterov=False")
    elif v["nesterov"] is True and v["momentum"] == 0:
        out["nesterov"] = (f"momentum={v['momentum']}: Nesterov momentum needs momentum > 0 (torch's SGD refuses it "
                           "after the run folder is taken); give momentum > 0 or nesterov=False")
    for schedule, names in (("step", ("lr_decay_epochs", "lr_decay_factor")),
                            ("exp", ("exp_decay_rate", "exp_decay_epochs"))):
        for name in names:
            if v["schedule"] != schedule and v[name] != getattr(default, name):
                out[name] = (f"schedule={v['schedule']!r}: only schedule={schedule!r} reads it (it would be "
                             f"ignored); leave {name}={getattr(default, name)!r} or use schedule={schedule!r}")
    return out


def _preset_values(name: str) -> str:
    """What a parameter left at None in the notebook becomes under each preset, for its help text."""
    default = getattr(Config(), name)
    values = {preset: PRESETS[preset].get(name, default) for preset in PRESETS}
    if len(set(map(repr, values.values()))) == 1:
        return f"[None: {default!r}]"
    return "[None: " + ", ".join(f"{preset} {value!r}" for preset, value in values.items()) + "]"


def parameters_cell() -> str:
    """The experiment notebook's ``parameters`` cell, generated from :class:`Config`: every parameter defaults to
    ``None``, meaning "the preset's value" (each preset's value is in its help text), so any value passed with
    papermill wins, even one equal to a preset's. Written in the form papermill documents (``Optional[...]``, no
    '=' in help). The committed notebook must hold exactly this (a test checks it)."""
    import inspect
    import re

    source = inspect.getsource(Config)
    lines = [f'preset: str = "test"  # {" | ".join(PRESETS)}: every parameter left at None takes the preset\'s value']
    for f in dataclasses.fields(Config):
        match = re.search(rf"^\s+{f.name}: (.+?) = .*?(?:  # (.*))?$", source, re.MULTILINE)
        annotation, help_text = match.group(1), match.group(2)
        if annotation.endswith(" | None"):
            annotation = annotation[:-7]
        if " | " in annotation:  # papermill's parser reads typing's spelling
            annotation = f"Union[{annotation.replace(' | ', ', ')}]"
        help_text = f"{help_text} {_preset_values(f.name)}" if help_text else _preset_values(f.name)
        lines.append(f"{f.name}: Optional[{annotation}] = None  # {help_text}")
    return "\n".join(lines)


def _parse_list(name: str, value: Any) -> Any:
    """A list-valued parameter passed as text (``papermill -p lr_decay_epochs "[2]"``) parsed as YAML."""
    if not isinstance(value, str):
        return value
    import yaml

    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = None
    if not isinstance(parsed, list):
        raise ValueError(f"{name}={value!r} is not accepted; give a list such as [2, 4] (papermill: -p {name} "
                         f"'[2, 4]' or -y '{name}: [2, 4]')")
    return parsed


def config_from_parameters(parameters: dict[str, Any]) -> Config:
    """The Config of a notebook run: its ``preset``, then every parameter that is not None. An explicitly passed
    value always wins, whatever its value (``-p preset demo -p train_steps 2`` trains with PGD-2); None means
    the preset's value (``n_train='all'`` asks for every image). Unknown names (typos passed through papermill)
    are rejected with the list of valid ones; list-valued parameters given as text are parsed."""
    parameters = dict(parameters)
    preset = parameters.pop("preset", None) or "test"
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(parameters) - known)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}; valid parameters: {['preset', *sorted(known)]}")
    overrides = {k: v for k, v in parameters.items() if v is not None}
    for name in LIST_PARAMETERS:
        if name in overrides:
            overrides[name] = _parse_list(name, overrides[name])
    return make_config(preset, **overrides)


class ResumeConflict(ValueError):
    """A resume that would change what the run is trained with; the message names the parameters."""


# Where a run and its data live, and how it runs: they change neither its weights nor what it writes.
WHERE_AND_HOW = ("name", "runs_root", "resume", "overwrite", "data_root", "num_workers", "checkpoint_every_steps",
                 "decode", "attack_compile", "device")
# What may differ between a run and its resumption: the above, how it is evaluated and logged, and nothing that
# changes the weights of the epochs already trained.
RESUME_FREE = WHERE_AND_HOW + ("sanity_n", "bnstats_channels", "bnstats_layer", "tensorboard")
# Besides ``eval_*``: parameters that change only the evaluation, so a finished run is evaluated again with them.
EVALUATION_ONLY = ("n_test",)


def _evaluation_parameter(name: str) -> bool:
    return name.startswith("eval_") or name in EVALUATION_ONLY


def resume_conflicts(saved: dict[str, Any], cfg: Config) -> list[str]:
    """The parameters of ``cfg`` that a resumed run may not change from the ``saved`` config (its checkpoint's):
    anything that alters what is trained. ``epochs`` may grow (the run is extended and evaluated afresh), unless
    the schedule or the running-statistics epochs depend on the total (cosine, ``running_stats_epochs``), and
    evaluation parameters (``eval_*``, ``n_test``) may change. Each conflict reads ``name: saved -> new``."""
    new = cfg.to_dict()
    conflicts = []
    for name, value in new.items():
        old = saved.get(name, getattr(Config(), name))
        if value == old or name in RESUME_FREE or _evaluation_parameter(name):
            continue
        if name == "epochs" and value > old and cfg.schedule != "cosine" and not cfg.running_stats_epochs:
            continue
        conflicts.append(f"{name}: {old!r} -> {value!r}")
    return conflicts


def evaluation_changed(saved: dict[str, Any], cfg: Config) -> bool:
    """Whether ``cfg`` evaluates differently from the ``saved`` config (its ``eval_*`` parameters or ``n_test``
    differ)."""
    return any(saved.get(k) != v for k, v in cfg.to_dict().items() if _evaluation_parameter(k))


def config_from_file(path: str | Path) -> Config:
    """The Config saved in a JSON file (``config.json`` of a run folder: its derived keys are dropped)."""
    values = json.loads(Path(path).read_text())
    for derived in ("strategy", "run_dir"):
        values.pop(derived, None)
    return make_config(None, **values)


def check_checkpoint_path(path: str) -> None:
    """Raise ValueError naming ``init_checkpoint`` unless ``path`` is a readable file or a run folder with a
    checkpoint (its contents are checked when training loads it, still before the run folder is written)."""
    target = Path(path)
    if target.is_dir():
        target = RunDir(target).last_checkpoint
        if not target.exists():
            raise ValueError(f"init_checkpoint={path!r} is not accepted: the folder holds no "
                             f"{target.relative_to(path)}; "
                             "give a checkpoint file or a run folder that has one")
    if not target.exists():
        raise ValueError(f"init_checkpoint={path!r} does not exist; give a checkpoint file or a run folder")
    if not os.access(target, os.R_OK):
        raise ValueError(f"init_checkpoint={path!r} is not accepted: {target} is not readable")


def validate(cfg: Config, check_paths: bool = True) -> Config:
    """Check every parameter and combination; raise ValueError naming the parameter, the value, what is accepted."""
    _check_values(cfg)
    _check_schedule(cfg)
    _check_combinations(cfg, check_paths)
    _check_model_parameters(cfg)
    return cfg


def _bool_parameters() -> dict[str, bool]:
    """Each parameter annotated ``bool`` or ``bool | None`` (from the dataclass, so a new one is covered) and
    whether it may be None. ``resume`` (``bool | str``) has its own check."""
    kinds = {f.name: f.type.split(" | ") for f in dataclasses.fields(Config)}
    return {name: "None" in kind for name, kind in kinds.items() if kind in (["bool"], ["bool", "None"])}


def _check_sizes(cfg: Config) -> None:
    """Image counts within the data set's splits, before any compute (ImageNet: its folders decide, read when the
    loader is built)."""
    sizes = data.SPLIT_SIZES.get(cfg.dataset)
    if sizes is None:
        return
    for name in ("n_train", "n_test", "sanity_n", "eval_autoattack_n"):
        value, split = getattr(cfg, name), "train" if name == "n_train" else "test"
        if value is not None and value > sizes[split]:
            every = " (None or 'all': every image)" if name.startswith("n_") else ""
            raise ValueError(f"{name}={value} is not accepted; {data.DATA_NAMES[cfg.dataset]}'s "
                             f"{'training' if split == 'train' else 'test'} split has {sizes[split]} images: give at "
                             f"most {sizes[split]}{every}")


def _check_values(cfg: Config) -> None:
    """Each parameter on its own: choices, ranges, types."""
    for name, optional in _bool_parameters().items():  # the string 'false' would count as True
        check_choice(name, getattr(cfg, name), [False, True, None] if optional else [False, True])
    if not isinstance(cfg.name, str) or not cfg.name or "/" in cfg.name or cfg.name.startswith("."):
        raise ValueError(f"name={cfg.name!r} is not accepted; give a non-empty folder name without '/'")
    if not isinstance(cfg.runs_root, (str, os.PathLike)):
        raise ValueError(f"runs_root={cfg.runs_root!r} is not accepted; give a folder path (text)")
    check_choice("dataset", cfg.dataset, list(data.DATASETS))
    check_choice("arch", cfg.arch, models.ARCHS)
    check_choice("norm", cfg.norm, models.NORMS)
    check_choice("optimizer", cfg.optimizer, OPTIMIZERS)
    check_choice("schedule", cfg.schedule, SCHEDULES)
    check_choice("device", cfg.device, DEVICES)
    check_choice("decode", cfg.decode, data.DECODES)
    check_choice("attack_bn_mode", cfg.attack_bn_mode, attacks.BN_MODES)
    check_choice("eval_step_rule", cfg.eval_step_rule, attacks.STEP_RULES)
    check_choice("attack_compile", cfg.attack_compile, attacks.COMPILE_MODES)
    check_choice("eq1_weighting", cfg.eq1_weighting, EQ1_WEIGHTINGS)
    check_choice("adv_ratio", cfg.adv_ratio, [0, 1])
    for name in ("clean_ratio", "alpha", "train_clean_start_prob", "label_smoothing", "lr_decay_factor",
                 "exp_decay_rate", "momentum"):
        check_range(name, getattr(cfg, name), 0, 1)
    for name in ("train_eps", "train_step", "eval_eps", "eval_step"):
        check_range(name, getattr(cfg, name), 0, 255)
    for name in ("seed", "train_steps", "num_workers", "checkpoint_every_steps", "running_stats_epochs", "sanity_n",
                 "bnstats_channels", "eval_autoattack_n"):
        check_range(name, getattr(cfg, name), 0, integer=True)
    for name in ("epochs", "batch_size", "eval_batch_size", "width_multiplier", "gn_groups", "eval_restarts", "gpus"):
        check_range(name, getattr(cfg, name), 1, integer=True)
    for name in ("n_train", "n_test"):
        if getattr(cfg, name) is not None:
            check_range(name, getattr(cfg, name), 1, integer=True)
    if cfg.eval_seed is not None:
        check_range("eval_seed", cfg.eval_seed, 0, integer=True)
    if not isinstance(cfg.eval_checkpoints, (list, tuple)) or not cfg.eval_checkpoints or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in cfg.eval_checkpoints):
        raise ValueError(f"eval_checkpoints={cfg.eval_checkpoints!r} is not accepted; give a list of positive PGD "
                         "iteration counts, e.g. [10, 20, 50, 100, 200, 500, 1000, 2000]")
    _check_sizes(cfg)
    if cfg.eval_autoattack_n and cfg.n_test is not None and cfg.eval_autoattack_n > cfg.n_test:
        raise ValueError(f"eval_autoattack_n={cfg.eval_autoattack_n} is not accepted with n_test={cfg.n_test}: "
                         "AutoAttack runs on a sample of the evaluation set; give 0 (off) up to n_test")
    if cfg.eval_autoattack_n:
        autoattack.require_torchattacks()  # an ImportError saying how to install it, before any compute
    check_choice("resume", cfg.resume, [False, True, "auto"])
    if cfg.tensorboard:
        tblog.require_tensorboard()  # an ImportError saying how to install it, before any compute


def _check_schedule(cfg: Config) -> None:
    """The optimiser's numbers and the epochs they refer to."""
    check_range("lr", cfg.lr, 0, low_open=True)
    check_range("weight_decay", cfg.weight_decay, 0)
    check_range("alp_weight", cfg.alp_weight, 0)
    check_range("warmup_epochs", cfg.warmup_epochs, 0, cfg.epochs)
    check_range("exp_decay_epochs", cfg.exp_decay_epochs, 0, low_open=True)
    if not isinstance(cfg.lr_decay_epochs, (list, tuple)) or any(
            not isinstance(e, int) or not 0 < e <= cfg.epochs for e in cfg.lr_decay_epochs):
        raise ValueError(f"lr_decay_epochs={cfg.lr_decay_epochs!r} is not accepted; give a list of epochs in "
                         f"[1, epochs={cfg.epochs}]")
    if cfg.running_stats_epochs > cfg.epochs:
        raise ValueError(f"running_stats_epochs={cfg.running_stats_epochs} is not accepted; it must be <= "
                         f"epochs={cfg.epochs}")


def _check_combinations(cfg: Config, check_paths: bool) -> None:
    """Parameters that are fine alone but not together, or an attack that would never move."""
    if cfg.n_train is not None and cfg.batch_size > cfg.n_train:
        raise ValueError(f"batch_size={cfg.batch_size} is not accepted with n_train={cfg.n_train}: an epoch would "
                         "have no full batch")
    if cfg.adv_ratio == 0 and cfg.clean_ratio != 1:
        raise ValueError(f"clean_ratio={cfg.clean_ratio} is not accepted with adv_ratio=0; standard training "
                         "uses every clean image (clean_ratio=1)")
    local_batch = cfg.batch_size // cfg.gpus if cfg.batch_size % cfg.gpus == 0 else None
    if cfg.adv_ratio == 1 and cfg.clean_ratio > 0 and local_batch and kept_clean(cfg.clean_ratio, local_batch) == 0:
        raise ValueError(f"clean_ratio={cfg.clean_ratio} is not accepted with batch_size={cfg.batch_size}, gpus="
                         f"{cfg.gpus}: each process keeps round({cfg.clean_ratio} x {local_batch}) = 0 clean images, "
                         "so it would train 100% adv + 0% clean (no Eq. 1 clean term, no ALP pairs, MBN_clean never "
                         f"trained); give clean_ratio > {0.5 / local_batch:g} (or 0), or a larger batch_size")
    if cfg.alp_weight > 0 and (cfg.adv_ratio == 0 or cfg.clean_ratio == 0):
        raise ValueError(f"alp_weight={cfg.alp_weight} needs clean/adversarial pairs: adv_ratio=1 and "
                         f"clean_ratio > 0 (got adv_ratio={cfg.adv_ratio}, clean_ratio={cfg.clean_ratio})")
    if cfg.finetune_bn and cfg.norm == "gn":
        raise ValueError("finetune_bn=True is not accepted with norm='gn': the model has no BN to finetune")
    if cfg.finetune_bn and not cfg.init_checkpoint:
        raise ValueError("finetune_bn=True needs init_checkpoint: the model whose BN layers are finetuned")
    if check_paths and cfg.init_checkpoint:
        check_checkpoint_path(cfg.init_checkpoint)
    if cfg.running_stats_epochs and cfg.norm == "gn":
        raise ValueError(f"running_stats_epochs={cfg.running_stats_epochs} is not accepted with norm='gn': GroupNorm "
                         "has no running statistics; use norm='bn' or 'mbn', or running_stats_epochs=0")
    if cfg.attack_bn_mode != "running" and cfg.norm == "gn":
        raise ValueError(f"attack_bn_mode={cfg.attack_bn_mode!r} is not accepted with norm='gn': it chooses BN "
                         "statistics and GroupNorm has none; leave attack_bn_mode='running'")
    if cfg.norm == "mbn" and not (cfg.adv_ratio == 1 and cfg.clean_ratio > 0):
        raise ValueError(f"norm='mbn' is not accepted with adv_ratio={cfg.adv_ratio}, clean_ratio={cfg.clean_ratio}: "
                         "Mixture BN trains MBN_adv on adversarial and MBN_clean on clean images, so it needs both "
                         "(adv_ratio=1, clean_ratio > 0); one branch would never be trained, yet both are evaluated")
    if cfg.sync_bn and cfg.norm != "bn":
        raise ValueError(f"sync_bn=True is not accepted with norm={cfg.norm!r}: Mixture BN keeps each branch's "
                         "statistics apart and GroupNorm has none; use norm='bn' or sync_bn=False")
    if cfg.sync_bn and cfg.gpus > 1 and cfg.device == "cpu":
        raise ValueError(f"sync_bn=True is not accepted with device='cpu' and gpus={cfg.gpus}: SyncBatchNorm "
                         "synchronizes on GPUs only; use sync_bn=False (BN statistics per process, as the paper)")
    if cfg.batch_size % cfg.gpus:
        raise ValueError(f"batch_size={cfg.batch_size} is not accepted with gpus={cfg.gpus}: the global batch must "
                         "divide evenly between the processes")
    if cfg.resume and cfg.overwrite:
        raise ValueError("resume=True and overwrite=True are not accepted together; choose one")
    if cfg.decode == "gpu" and cfg.dataset != "imagenet":
        raise ValueError(f"decode='gpu' is not accepted with dataset={cfg.dataset!r}: it decodes ImageNet's JPEG "
                         f"files; {cfg.dataset} is held in memory already decoded. Use decode='cpu'")
    if cfg.decode == "gpu" and cfg.device == "cpu":
        raise ValueError("decode='gpu' is not accepted with device='cpu': it decodes on the training GPU. Use "
                         "decode='cpu', or device='auto' (decodes on the GPU where there is one, else falls back to "
                         "the CPU path with a warning)")
    inapplicable = _inapplicable(cfg.to_dict())
    if inapplicable:
        name, instead = next(iter(inapplicable.items()))
        raise ValueError(f"{name}={getattr(cfg, name)!r} is not accepted with {instead}")
    if cfg.width_multiplier != 1 and not cfg.arch.startswith("small_"):
        raise ValueError(f"width_multiplier={cfg.width_multiplier} is not accepted with arch={cfg.arch!r}: it widens "
                         "the small ResNets only (it would be ignored); use width_multiplier=1")
    if cfg.arch.startswith("small_") and cfg.dataset == "imagenet":
        raise ValueError(f"arch={cfg.arch!r} is for 28-32 px images, not dataset='imagenet'; use resnet50..resnet638")
    if cfg.adv_ratio == 1 and (cfg.train_steps == 0 or cfg.train_step == 0 or cfg.train_eps == 0):
        raise ValueError(f"train_eps={cfg.train_eps}, train_step={cfg.train_step}, train_steps={cfg.train_steps} is "
                         "not accepted for adversarial training (adv_ratio=1): an attack that never moves trains on "
                         "clean images; give all three > 0, or adv_ratio=0 for standard training")
    if cfg.eval_eps > 0 and cfg.eval_step == 0:
        raise ValueError(f"eval_step=0 is not accepted with eval_eps={cfg.eval_eps}: the evaluation attack would never "
                         "move from its random start; give eval_step > 0")


def _check_model_parameters(cfg: Config) -> None:
    """Parameters that only the model can judge (``bnstats_layer``, ``gn_groups``), checked on a model built on
    the meta device (no memory, no compute), so a typo fails before training rather than after it."""
    info = data.DATASETS[cfg.dataset]
    try:
        with torch.device("meta"):
            model = models.build_model(cfg.arch, info.num_classes, cfg.norm, in_channels=info.channels,
                                       mean=info.mean, std=info.std, width_multiplier=cfg.width_multiplier,
                                       gn_groups=cfg.gn_groups, zero_init_residual=cfg.zero_init)
    except ValueError as exc:
        raise ValueError(f"arch={cfg.arch!r}, norm={cfg.norm!r}, gn_groups={cfg.gn_groups}, width_multiplier="
                         f"{cfg.width_multiplier} do not make a model: {exc}") from None
    if cfg.bnstats_layer is None and cfg.bnstats_channels and norm_module.batch_norms(model):
        try:
            norm_module.default_layer(model)
        except ValueError as exc:
            raise ValueError(f"bnstats_layer=None is not accepted for arch={cfg.arch!r}: {exc}") from None
    if cfg.bnstats_layer is not None and cfg.bnstats_channels:
        names = norm_module.norm_layer_names(model)
        if cfg.bnstats_layer not in names:
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            raise ValueError(f"bnstats_layer={cfg.bnstats_layer!r} is not accepted; the BN layers of {cfg.arch} with "
                             f"norm={cfg.norm!r} are: {shown or 'none (no BN layer: set bnstats_channels=0)'}")
