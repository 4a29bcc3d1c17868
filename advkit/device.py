"""Device, precision and rank of a run, and what else decides its numbers (versions, hardware, threads)."""

from __future__ import annotations

import contextlib
import platform
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .config import Config


def resolve_device(cfg: Config) -> torch.device:
    """The device kind a run uses (under torchrun each rank takes its own CUDA device, see resolve_rank_device)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' is not accepted: no CUDA device is visible; use 'cpu' or 'auto'")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)

def resolve_decode(cfg: Config, device: torch.device) -> str:
    """Where the training loader decodes ImageNet's JPEGs: ``cfg.decode``, except that 'gpu' on a run that
    resolved to the CPU (``device='auto'`` on a machine without CUDA) falls back to 'cpu' with a warning.
    (``device='cpu'`` with 'gpu' is refused by the config; ``device='cuda'`` without CUDA by resolve_device.)"""
    if cfg.decode == "gpu" and device.type != "cuda":
        warnings.warn(f"decode='gpu' falls back to decode='cpu': the run uses device {device.type!r} "
                      f"(device={cfg.device!r}, no CUDA device visible), so the loader's workers decode with PIL",
                      RuntimeWarning, stacklevel=2)
        return "cpu"
    return cfg.decode

def uses_bf16(cfg: Config, device: torch.device) -> bool:
    return device.type == "cuda" if cfg.bf16 is None else cfg.bf16

def uses_channels_last(cfg: Config, device: torch.device) -> bool:
    return device.type == "cuda" if cfg.channels_last is None else cfg.channels_last

def autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where switched on (CUDA by default; CPU autocast works too, for the tests)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(cfg, device))

def eval_autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """Evaluation precision: fp32 unless ``eval_bf16`` (training's bf16 default does not carry over, so that a
    robustness number never depends on a precision nobody chose)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.eval_bf16)

@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """Plain fp32 on CUDA too: no TF32 matmuls or convolutions (PyTorch leaves cuDNN's TF32 on by default), so
    that a number labelled fp32 is fp32. Also a decorator."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

def fp32_name(device: torch.device) -> str:
    """'tf32' where a CUDA device would round fp32 matmuls or convolutions to TF32 (the flags as set now), else
    'fp32'."""
    tf32 = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
    return "tf32" if device.type == "cuda" and tf32 else "fp32"

def device_name(device: torch.device) -> str:
    """The hardware a number was computed on: the GPU's name, or the CPU's model and torch's thread count."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"cpu: {model}, {torch.get_num_threads()} threads"

def environment(cfg: Config, device: torch.device) -> dict[str, Any]:
    """What decides a run's numbers besides its config: library versions, hardware, threads, precision,
    folding, determinism flags and the code's commit (written to ``environment.json`` of every run)."""
    import numpy
    import torchvision

    info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "device": device_name(device), "torch_threads": torch.get_num_threads(),
            "train_precision": "bf16" if uses_bf16(cfg, device) else fp32_name(device),
            "eval_precision": "bf16" if cfg.eval_bf16 else "fp32", "attack_fold_bn": cfg.attack_fold_bn,
            "attack_compile": cfg.attack_compile, "channels_last": uses_channels_last(cfg, device),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "code": code_version()}
    if device.type == "cuda":
        info |= {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    return info

def code_version() -> str:
    """The git commit of the kit's code, with '+dirty' when files differ from it ('unknown' outside git)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                "advkit"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")

def resolve_rank_device(cfg: Config, ctx: distributed.Context) -> torch.device:
    device = resolve_device(cfg)
    return torch.device("cuda", ctx.local_rank) if device.type == "cuda" and ctx.active else device
