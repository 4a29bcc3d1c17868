"""Distributed runs: torchrun's environment, a few collectives, and launching torchrun from a notebook.

Launch a run on N processes of one machine with ``torchrun --nproc_per_node=N -m advkit.run CONFIG.json``
(across machines add the usual ``--nnodes``, ``--node_rank``, ``--rdzv_backend=c10d --rdzv_endpoint=HOST:PORT``).
NCCL on CUDA, gloo on CPU (the tests run 2 gloo processes on a CPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_from_env() -> Context:
    """Join the process group torchrun describes in the environment (no-op for a single process). On CUDA each
    process first makes its own GPU (``LOCAL_RANK``) the current device: NCCL's object collectives
    (``all_gather_object``) place their tensors on the current device, which is otherwise GPU 0 for every rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return context()


def context() -> Context:
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_sum(values: list[float], ctx: Context, device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum over ranks (float64, a handful of counters), on ``device``: the rank's own device, which
    the backend accepts (NCCL takes CUDA tensors only)."""
    if not ctx.active:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather(obj: Any, ctx: Context) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.active:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_state(module: nn.Module, ctx: Context, src: int = 0) -> None:
    """Overwrite every rank's parameters and buffers, in place, with rank ``src``'s (no-op for one process).

    Under DDP with per-replica BN (``broadcast_buffers=False``, the paper's choice) the ranks' running statistics
    drift apart during training; after it, broadcasting rank 0's state (the one its checkpoint saves) makes every
    rank evaluate that one model."""
    if not ctx.active:
        return
    for tensor in [p.detach() for p in module.parameters()] + list(module.buffers()):
        dist.broadcast(tensor, src)  # in place; gloo and NCCL accept channels_last weights as they are


def barrier(ctx: Context) -> None:
    if ctx.active:
        dist.barrier()


def launch(config_path: str | Path, nproc: int, tail_lines: int = 60) -> None:
    """Run ``torchrun --nproc_per_node=nproc -m advkit.run config_path``, streaming its output; a failing rank
    raises RuntimeError carrying the end of the output (with the rank's traceback)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "advkit.run", str(config_path)]
    tail: deque[str] = deque(maxlen=tail_lines)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail.append(line)
    if proc.returncode != 0:
        raise RuntimeError(f"distributed run failed (exit {proc.returncode}): {' '.join(command)}\n" + "".join(tail))
