"""``make bench``: the attacker and the trainer against their physical floor and against torchattacks.

Each row times two things side by side in this one process, interleaved over repetitions, and reports the
ratio of their medians, so machine noise hits both alike. The floor of an attack step is one forward pass
plus the backward pass to the input (no weight gradients) of the network the attack runs (the BN-folded view)
on the same batch; a training step's floor adds one training forward-backward. Memory rows run each
side in a fresh subprocess and compare peak resident memory above the process's level before the work
(on CUDA: peak allocated memory). Prints ``name  ratio=R  target<=T  PASS|FAIL`` per row and writes a CSV.

    python -m advkit.bench [--device cpu|cuda] [--out data/results/bench_cpu.csv] [--quick] [--num-workers W]
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import attacks, data, evaluate, models, strategy, train
from .config import PRESETS, make_config
from .device import device_name
from .paths import project_root

NUM_CLASSES = 10


@dataclass
class Row:
    name: str
    model: str
    ratio: float
    target: float | None  # None: a measurement without a goal (printed as 'info')
    higher_is_better: bool = False
    detail: str = ""

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        return self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target

    def line(self) -> str:
        sign = ">=" if self.higher_is_better else "<="
        goal = f"target{sign}{self.target:g}" if self.target is not None else "(no target)"
        verdict = {True: "PASS", False: "FAIL", None: "info"}[self.passed]
        return f"{self.name + '[' + self.model + ']':44s} ratio={self.ratio:.3f}  {goal}  {verdict}  {self.detail}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(candidates: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                   warmup: bool = True) -> dict[str, float]:
    """Median wall time of each callable: one warm-up each (unless ``warmup=False``: already warm), then
    ``repeats`` interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values() if warmup else []:
        fn()
    for _ in range(repeats):
        for name, fn in candidates.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


@functools.cache
def _fashion_test() -> tuple[torch.Tensor, torch.Tensor]:
    return data.load_tensors("fashion-mnist", "test")  # read once: every row takes its batch from it


def fashion_batch(batch_size: int, device: torch.device, image_size: int = 28, channels: int = 1,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of real Fashion-MNIST test images (random images of the given size for other shapes)."""
    if image_size == 28 and channels == 1:
        images, labels = _fashion_test()
        return data.to_device((images[:batch_size], labels[:batch_size]), device)
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch_size, channels, image_size, image_size, generator=g).to(device),
            torch.randint(0, NUM_CLASSES, (batch_size,), generator=g).to(device))


def bench_model(arch: str, device: torch.device, norm: str = "bn", channels: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    info = data.DATASETS["fashion-mnist"]
    mean, std = (info.mean, info.std) if channels == 1 else ((0.5,) * channels, (0.5,) * channels)
    return models.build_model(arch, NUM_CLASSES, norm, in_channels=channels, mean=mean, std=std).to(device)


def floor_steps(model: nn.Module, images: torch.Tensor, goal: torch.Tensor, steps: int, fold_bn: bool = True) -> None:
    """``steps`` x (forward + backward to the input) of the network the kit's attack runs: the BN-folded view
    (``fold_bn``, as :class:`advkit.attacks.Attack` by default) in its memory format. What any gradient attack on
    that network must at least compute; against the unfolded model the kit's attack would beat its own floor."""
    with attacks.attack_mode(model, fold_bn=fold_bn) as view:
        x = images.clone()
        if getattr(view, "channels_last", False):
            x = x.contiguous(memory_format=torch.channels_last)
        for _ in range(steps):
            x.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(view(x), goal, reduction="sum"), x)
            x = x.detach()


def training_floor(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, goal: torch.Tensor, k: int) -> None:
    """The floor of a PGD-``k`` adversarial training step: ``k`` attack floor steps (:func:`floor_steps`), then
    one training-mode forward and backward to the weights (the optimizer's update is not part of it)."""
    floor_steps(model, images, goal, k)
    model.train()
    F.cross_entropy(model(images), labels).backward()
    model.zero_grad(set_to_none=True)


def attack_rows(arch: str, device: torch.device, batch_size: int, steps: int, repeats: int) -> list[Row]:
    """pgd_vs_floor, pgd_vs_torchattacks, pgd_folded_vs_unfolded, and two rows without a target (the whole model
    in channels_last; the attack through torch.compile, its compile time apart): targeted PGD-``steps``, eps 16,
    step 1, random start, BN on running statistics (the kit attacks a BN-folded view by default)."""
    import torchattacks

    model = bench_model(arch, device).eval()
    images, labels = fashion_batch(batch_size, device)
    goal = attacks.random_targets(labels, NUM_CLASSES, torch.Generator(device).manual_seed(1))
    generator = torch.Generator(device).manual_seed(0)
    attack = attacks.Attack(eps=16, step=1, steps=steps)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    images_cl = images.contiguous(memory_format=torch.channels_last)
    reference = torchattacks.PGD(model, eps=16 / 255, alpha=1 / 255, steps=steps, random_start=True)
    reference.set_mode_targeted_random()
    modes = ["default"] + (["reduce-overhead"] if device.type == "cuda" else [])  # the second: CUDA graphs
    compiled, first_call = {}, {}
    for mode in modes:
        compiled[mode] = lambda mode=mode: attacks.pgd(model, images, labels, replace(attack, compile=mode),
                                                       num_classes=NUM_CLASSES, generator=generator)
        synchronize(device)
        started = time.perf_counter()
        compiled[mode]()  # the first call compiles
        synchronize(device)
        first_call[mode] = time.perf_counter() - started
    times = median_seconds({
        "floor": lambda: floor_steps(model, images, goal, steps),
        "advkit": lambda: attacks.pgd(model, images, labels, attack, num_classes=NUM_CLASSES, generator=generator),
        **{f"compiled[{mode}]": fn for mode, fn in compiled.items()},
        "unfolded": lambda: attacks.pgd(model, images, labels, replace(attack, fold_bn=False),
                                        num_classes=NUM_CLASSES, generator=generator),
        "torchattacks": lambda: reference(images, labels),
        "channels_last": lambda: attacks.pgd(model_cl, images_cl, labels, attack, num_classes=NUM_CLASSES,
                                             generator=generator),
    }, repeats, device)
    detail = f"PGD-{steps} batch {batch_size}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in times.items())
    return [Row("pgd_vs_floor", arch, times["advkit"] / times["floor"], 1.05, detail=detail),
            Row("pgd_vs_torchattacks", arch, times["advkit"] / times["torchattacks"], 0.70, detail=detail),
            Row("pgd_folded_vs_unfolded", arch, times["advkit"] / times["unfolded"], 0.75, detail=detail),
            Row("pgd_channels_last_vs_default", arch, times["channels_last"] / times["advkit"], None, detail=detail),
            *[Row("pgd_compiled_vs_default" if mode == "default" else "pgd_cudagraphs_vs_default", arch,
                  times[f"compiled[{mode}]"] / times["advkit"], None,
                  detail=f"torch.compile(mode={mode!r}) of the folded view: first call {first_call[mode]:.1f} s "
                         f"(compile time {first_call[mode] - times[f'compiled[{mode}]']:.1f} s), then "
                         f"{times[f'compiled[{mode}]'] * 1e3:.0f} ms") for mode in modes]]


def curve_row(arch: str, device: torch.device, batch_size: int, checkpoints: list[int], repeats: int) -> Row:
    """curve_one_pass: one pass to max(checkpoints) against a separate PGD-N run for every checkpoint N."""
    model = bench_model(arch, device).eval()
    images, labels = fashion_batch(batch_size, device)
    attack = attacks.Attack(eps=16.0, step=1.0, steps=max(checkpoints))

    def separate() -> None:
        for n in checkpoints:
            generator = evaluate.batch_generator(0, 0, device)
            attacks.pgd(model, images, labels, replace(attack, steps=n), num_classes=NUM_CLASSES, generator=generator)

    times = median_seconds({
        "one_pass": lambda: evaluate.curve_batch(model, images, labels, attack, checkpoints=checkpoints,
                                                 num_classes=NUM_CLASSES),
        "separate": separate,
    }, repeats, device, warmup=False)  # the attack rows before it ran the same model and shapes
    detail = (f"checkpoints {checkpoints}: one pass {times['one_pass']:.1f} s, separate runs {times['separate']:.1f} s"
              f" (step count ratio {max(checkpoints) / sum(checkpoints):.3f})")
    return Row("curve_one_pass", arch, times["one_pass"] / times["separate"], 0.55, detail=detail)


def training_step(model: nn.Module, cfg, images: torch.Tensor, labels: torch.Tensor, seed: int = 0,
                  bf16: bool = False) -> Callable[[], None]:
    """One training step of ``cfg``'s strategy (attack, forward, backward, optimizer step) on a fixed batch
    (under bf16 autocast with ``bf16``, as the trainer on CUDA)."""
    optimizer = train.make_optimizer(cfg, model)
    forward = strategy.TrainingForward(model)
    generator = torch.Generator(images.device).manual_seed(seed)

    def step() -> None:
        model.train()
        loss, _ = strategy.training_loss(model, images, labels, cfg, generator, forward,
                                         torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def training_rows(arch: str, device: torch.device, batch_size: int, k: int, repeats: int) -> list[Row]:
    """train_step_vs_floor (PGD-k, 100% adv) and mbn_vs_bn (100% adv + 100% clean, MBN against BN)."""
    images, labels = fashion_batch(batch_size, device)
    adv_only = make_config("demo", arch=arch, clean_ratio=0.0, train_steps=k, check_paths=False)
    floor_model = bench_model(arch, device)
    goal = attacks.random_targets(labels, NUM_CLASSES, torch.Generator(device).manual_seed(1))
    mixed = {n: make_config("demo", arch=arch, clean_ratio=1.0, norm=n, train_steps=k) for n in ("bn", "mbn")}
    times = median_seconds({
        "floor": lambda: training_floor(floor_model, images, labels, goal, k),
        "step": training_step(bench_model(arch, device), adv_only, images, labels),
        "bn": training_step(bench_model(arch, device, "bn"), mixed["bn"], images, labels),
        "mbn": training_step(bench_model(arch, device, "mbn"), mixed["mbn"], images, labels),
    }, repeats, device)
    return [
        Row("train_step_vs_floor", arch, times["step"] / times["floor"], 1.05,
            detail=f"PGD-{k} step {times['step'] * 1e3:.0f} ms, floor ({k} attack floor steps + one training "
                   f"forward-backward) {times['floor'] * 1e3:.0f} ms"),
        Row("mbn_vs_bn", arch, times["mbn"] / times["bn"], 1.10,
            detail=f"100% adv + 100% clean: MBN {times['mbn'] * 1e3:.0f} ms, BN {times['bn'] * 1e3:.0f} ms"),
    ]


def loader_row(repeats: int, device: torch.device) -> Row:
    """loader_vs_train: images/s the demo pipeline delivers (to the device, as floats) / images/s demo training
    consumes (PGD-5 adversarial training steps of the demo model)."""
    cfg = make_config("demo")
    loader = data.make_loader(cfg.dataset, "train", cfg.batch_size, n=cfg.n_train, seed=cfg.seed)
    model = bench_model(cfg.arch, device)
    images, labels = fashion_batch(cfg.batch_size, device)
    step = training_step(model, cfg, images, labels)
    train_steps = 3

    def one_epoch() -> None:
        for batch in loader:
            data.to_device(batch, device)

    def training() -> None:
        for _ in range(train_steps):
            step()

    times = median_seconds({"loader": one_epoch, "train": training}, repeats, device)
    loader_rate = len(loader) * cfg.batch_size / times["loader"]
    train_rate = train_steps * cfg.batch_size / times["train"]
    return Row("loader_vs_train", cfg.arch, loader_rate / train_rate, 5.0, higher_is_better=True,
               detail=f"loader {loader_rate:,.0f} img/s, training {train_rate:,.0f} img/s")


def jpeg_image_folder(root: Path, n: int, width: int, height: int, classes: int = 2, seed: int = 0) -> Path:
    """A generated ImageFolder ``root/train/<class>/<i>.jpg`` of ``n`` JPEGs (quality 90): smooth random colour
    fields plus pixel noise, so that they compress, and decode, more like photographs than pure noise would."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    for i in range(n):
        folder = root / "train" / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = torch.rand(1, 3, height // 16, width // 16, generator=generator) * 255
        smooth = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
        pixels = (smooth + 12 * torch.randn(smooth.shape, generator=generator)).clamp(0, 255).to(torch.uint8)
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(folder / f"{i}.jpg", quality=90)
    return root


def imagenet_loader_rows(device: torch.device, quick: bool, num_workers: int,
                         decodes: tuple[str, ...] | None = None) -> list[Row]:
    """imagenet_loader_vs_train: images/s the ImageNet training loader delivers to ``device`` (as floats; PIL
    decoding and augmentation in ``num_workers`` workers) / images/s a ResNet-50 standard training step consumes
    on that device (224 px; bf16 autocast and channels_last on CUDA, as the trainer), on a generated JPEG
    ImageFolder of ImageNet's mean image size. On CUDA also imagenet_gpu_decode_vs_train: the loader with
    ``decode='gpu'`` (``decodes`` overrides which loaders run: the tests run the GPU path's code on the CPU)."""
    cuda = device.type == "cuda"
    decodes = decodes or (("cpu", "gpu") if cuda else ("cpu",))
    n, size, batch = (16, (160, 128), 8) if quick else (1024 if cuda else 256, (400, 350), 64 if cuda else 32)
    train_batch, train_px, repeats = (2, 64, 1) if quick else (128 if cuda else 16, data.CROP, 3)  # quick: a smoke test
    model = bench_model("resnet50", device, channels=3).to(memory_format=torch.channels_last if cuda
                                                           else torch.preserve_format)
    images, labels = fashion_batch(train_batch, device, train_px, channels=3)
    cfg = make_config("paper", arch="resnet50", adv_ratio=0, clean_ratio=1.0, check_paths=False)
    step = training_step(model, cfg, images.contiguous(memory_format=torch.channels_last) if cuda else images,
                         labels, bf16=cuda)
    with tempfile.TemporaryDirectory(prefix="advkit-bench-jpeg-") as tmp:
        root = jpeg_image_folder(Path(tmp), n, *size)
        loaders = {decode: data.make_loader("imagenet", "train", batch, root=root, num_workers=num_workers,
                                            decode=decode, device=device, persistent_workers=True)
                   for decode in decodes}  # steady state: the workers' start is not timed (warm-up starts them)

        def epoch(loader) -> None:
            for batch_ in loader:
                data.to_device(batch_, device, channels_last=cuda)

        times = median_seconds({**{decode: functools.partial(epoch, loader) for decode, loader in loaders.items()},
                                "train": step}, repeats, device, warmup=not quick)
        del loaders  # ends the workers before their folder goes
    train_rate = train_batch / times["train"]
    precision = "bf16, channels_last" if cuda else "fp32"
    rows = []
    for decode in decodes:
        rate = n // batch * batch / times[decode]  # an epoch drops the last partial batch
        how = (f"PIL in {num_workers} workers" if decode == "cpu"
               else f"batched decode_jpeg + augmentation on {device.type}, {num_workers} workers read bytes")
        rows.append(Row("imagenet_loader_vs_train" if decode == "cpu" else "imagenet_gpu_decode_vs_train", "resnet50",
                        rate / train_rate, 1.0, higher_is_better=True,
                        detail=f"{device_name(device)}: loader ({how}) {rate:,.4g} img/s, ResNet-50 standard training "
                               f"{train_rate:,.4g} img/s (batch {train_batch}, {train_px} px, {precision}); {n} generated "
                               f"{size[0]}x{size[1]} JPEGs, loader batch {batch}"))
    return rows


def default_num_workers() -> int:
    """The paper preset's ``num_workers``, at most one per CPU core this process may use."""
    return min(PRESETS["paper"]["num_workers"], len(os.sched_getaffinity(0)))


# ---------------------------------------------------------------- memory: each side in a fresh process

def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory ``fn`` adds to this process: CUDA peak allocated, else peak resident set (Linux's VmHWM,
    reset through /proc/self/clear_refs) above the resident set before."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = _rss_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return _rss_bytes("VmHWM") - before


def memory_probe(kind: str, arch: str, device: torch.device, batch_size: int, steps: int) -> int:
    """Peak memory of one side of eval_memory: 'curve' (one-pass evaluation) or 'fwdbwd' (training pass)."""
    model = bench_model(arch, device)
    images, labels = fashion_batch(batch_size, device)

    def curve() -> None:
        evaluate.curve_batch(model.eval(), images, labels, attacks.Attack(eps=16.0, step=1.0),
                             checkpoints=[1, 2, steps], num_classes=NUM_CLASSES)

    def forward_backward() -> None:
        F.cross_entropy(model.train()(images), labels).backward()

    return peak_memory(curve if kind == "curve" else forward_backward, device)


def memory_row(arch: str, device: torch.device, batch_size: int, steps: int, repeats: int) -> Row:
    peaks: dict[str, list[int]] = {"curve": [], "fwdbwd": []}
    for _ in range(repeats):
        for kind in peaks:
            out = subprocess.run(
                [sys.executable, "-m", "advkit.bench", "--memory-probe", kind, "--arch", arch, "--device", device.type,
                 "--batch-size", str(batch_size), "--steps", str(steps)],
                capture_output=True, text=True, check=True, cwd=project_root())
            peaks[kind].append(int(out.stdout.strip().splitlines()[-1]))
    curve, fwdbwd = (statistics.median(peaks[k]) for k in ("curve", "fwdbwd"))
    return Row("eval_memory", arch, curve / fwdbwd, 1.2,
               detail=f"one-pass PGD-{steps} curve {curve / 2**20:.1f} MiB, forward-backward {fwdbwd / 2**20:.1f} MiB")


# ---------------------------------------------------------------- GPU only: absolute throughput at 224 px

def throughput(arch: str, device: torch.device, batch_size: int, image_size: int = 224, repeats: int = 5) -> dict[str, float]:
    """Images/s of a standard training step and of one attack step (forward + input gradient), bf16 autocast
    and channels_last, ImageNet-sized inputs."""
    model = bench_model(arch, device, channels=3).to(memory_format=torch.channels_last)
    cfg = make_config("paper", arch=arch, adv_ratio=0, clean_ratio=1.0, check_paths=False)
    images, labels = fashion_batch(batch_size, device, image_size, channels=3)
    images = images.contiguous(memory_format=torch.channels_last)
    optimizer = train.make_optimizer(cfg, model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def train_step() -> None:
        model.train()
        with autocast:
            loss = F.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def attack_step() -> None:
        with autocast:
            floor_steps(model, images, labels, 1)

    times = median_seconds({"train": train_step, "attack": attack_step}, repeats, device)
    return {name: batch_size / seconds for name, seconds in times.items()}


# ---------------------------------------------------------------- the run

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def run_benchmarks(device: torch.device, quick: bool = False, num_workers: int | None = None) -> list[Row]:
    """Every row for ``device``; ``quick`` shrinks batches and steps (a smoke test, not a measurement).
    ``num_workers``: the ImageNet loader's (None: :func:`default_num_workers`; 0 with ``quick``)."""
    batch, repeats = (16, 1) if quick else (128, 5)
    steps = 3 if quick else 20
    checkpoints = [1, 2, 5] if quick else [1, 2, 5, 10, 20, 50, 100, 200]  # the paper's 10 ... 2000, divided by 10
    rows: list[Row] = []

    def emit(new: Row | list[Row]) -> None:
        for row in new if isinstance(new, list) else [new]:
            rows.append(row)
            print(row.line(), flush=True)

    for arch in ["small_resnet8"] + ([] if quick else ["small_resnet20"]):
        emit(attack_rows(arch, device, batch, steps, repeats))
    emit(curve_row("small_resnet8", device, batch, checkpoints, 1 if quick else 2))
    emit(training_rows("small_resnet8", device, batch, 2 if quick else 5, repeats))
    emit(memory_row("small_resnet8", device, batch, steps, 1 if quick else 3))
    emit(loader_row(1 if quick else 3, device))
    if num_workers is None:
        num_workers = 0 if quick else default_num_workers()
    emit(imagenet_loader_rows(device, quick, num_workers))
    if device.type == "cuda":
        for arch in ("resnet50", "resnet152"):
            rates = throughput(arch, device, 16 if quick else 128)
            print(f"{'throughput[' + arch + ']':44s} train {rates['train']:,.0f} img/s, attack step "
                  f"{rates['attack']:,.0f} img/s (224 px, bf16, channels_last)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m advkit.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None, help="CSV of the rows (default: data/results/bench_<device>.csv; "
                        "with --quick runs/bench/bench_<device>.csv)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every row runs")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="workers of the ImageNet loader rows (default: the paper preset's 8, at most one per "
                             "usable CPU core; 0 with --quick)")
    parser.add_argument("--memory-probe", choices=["curve", "fwdbwd"], help=argparse.SUPPRESS)
    parser.add_argument("--arch", default="small_resnet8", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=20, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.num_workers is not None and args.num_workers < 0:
        parser.error(f"--num-workers={args.num_workers} is not accepted: give 0 (load in this process) or more")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device=cuda is not accepted: no CUDA device is visible; use --device cpu")
    device = torch.device(args.device)
    if args.memory_probe:
        print(memory_probe(args.memory_probe, args.arch, device, args.batch_size, args.steps))
        return 0
    default = project_root() / ("runs/bench" if args.quick else "data/results") / f"bench_{args.device}.csv"
    out = Path(args.out) if args.out else default
    print(f"# {machine()}", flush=True)
    started = time.perf_counter()
    rows = run_benchmarks(device, args.quick, args.num_workers)
    table = pd.DataFrame([{**row.__dict__, "passed": row.passed} for row in rows])
    table["machine"] = machine()
    table["device"] = args.device
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    goals = [r for r in rows if r.target is not None]
    print(f"# {sum(bool(r.passed) for r in goals)}/{len(goals)} rows with a target pass; "
          f"{time.perf_counter() - started:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
