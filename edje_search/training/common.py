"""Shared training plumbing: devices, precision, schedules, resumable checkpoints, processes."""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import get_cosine_schedule_with_warmup

from ..fsutil import atomic_write


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads for torch's intra-op work (None: leave torch's default).

    torch starts one thread per core; on a machine others share, that oversubscribes the cores
    and a training step can run several times slower than with one or two threads.
    """
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(params, lr: float, weight_decay: float, warmup_steps: int, total_steps: int,
                   fast_params=(), fast_lr_scale: float = 1.0, sized: bool = False):
    """AdamW with linear warmup then cosine decay; no weight decay on biases and norms.

    ``fast_params`` (freshly initialised modules) train at ``lr * fast_lr_scale``. ``sized``: the
    schedule is a :class:`SizedCosine`, whose length a run can still change (auto mode).
    """
    fast_ids = {id(p) for p in fast_params}
    params = [p for p in params if p.requires_grad]
    groups = []
    for fast in (False, True):
        chosen = [p for p in params if (id(p) in fast_ids) == fast]
        group_lr = lr * (fast_lr_scale if fast else 1.0)
        groups += [{"params": [p for p in chosen if p.ndim >= 2], "weight_decay": weight_decay, "lr": group_lr},
                   {"params": [p for p in chosen if p.ndim < 2], "weight_decay": 0.0, "lr": group_lr}]
    # torch's fused AdamW updates all parameters in one kernel, on the CPU too, which pays here
    # because most of a reranker's parameters are embeddings.
    # A resumed run keeps the setting its checkpoint was saved with (load_state_dict restores it).
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused or None)
    if sized:
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, SizedCosine(warmup_steps, total_steps))
    return opt, get_cosine_schedule_with_warmup(opt, warmup_steps, max(total_steps, 1))


class SizedCosine:
    """Learning-rate factor: linear warm-up, then cosine decay to 0 at ``total`` (resizable).

    A callable object, so ``LambdaLR.state_dict`` saves its fields and a resumed run keeps the
    length the run chose."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = int(warmup), max(int(total), 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


class TrainLog:
    """``train_log.jsonl``: one JSON line per optimizer step, with the seconds spent training so far.

    On resume from a checkpoint taken at step S, lines after S (written by the interrupted run
    after its last checkpoint, and about to be redone) are dropped, and the clock goes on from
    the time logged at S, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        kept: list[str] = []
        if resume_step and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut short by the interruption
                if entry.get("step", 0) <= resume_step:
                    kept.append(line)
        self.offset = json.loads(kept[-1]).get("time", 0.0) if kept else 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(line + "\n" for line in kept))
        self.start = time.time()

    def elapsed(self) -> float:
        return self.offset + time.time() - self.start

    def write(self, step: int, **values: float) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": round(self.elapsed(), 2), **values}) + "\n")


def save_checkpoint(path: Path, **state) -> None:
    """Atomic torch checkpoint (fsutil.atomic_write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


# ------------------------------------------------------------------------------- processes
def init_distributed() -> tuple[int, int]:
    """Join the torchrun process group when launched by torchrun; returns (rank, world_size).

    On GPUs each process first takes its own device, ``cuda:LOCAL_RANK`` (otherwise every
    process would land on GPU 0), and the group talks NCCL; on CPUs it talks gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="nccl")
        else:
            dist.init_process_group(backend="gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from every process along dim 0 (identity in one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class TrainingStep(torch.nn.Module):
    """``step_fn(model, ...)`` as one module call.

    DistributedDataParallel averages gradients only for work done inside its ``forward``; a
    training step that calls several methods of the model (the reranker's project, pair_hidden,
    joint, ...) therefore becomes the forward of this module, which DDP wraps.
    """

    def __init__(self, model: torch.nn.Module, step_fn):
        super().__init__()
        self.model = model
        self.step_fn = step_fn

    def forward(self, *args, **kwargs):
        return self.step_fn(self.model, *args, **kwargs)


def data_parallel(model: torch.nn.Module, step_fn) -> torch.nn.Module:
    """The training step of ``model`` as a module: under torchrun, wrapped in torch
    DistributedDataParallel (replicas start from rank 0's parameters; gradients are averaged in
    buckets during backward); in one process, the plain step."""
    step = TrainingStep(model, step_fn)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return step
    from torch.nn.parallel import DistributedDataParallel

    on_gpu = next(model.parameters()).is_cuda
    # some parameters get no gradient in some steps (losses switched off, the MLM head without masks)
    return DistributedDataParallel(step, device_ids=[torch.cuda.current_device()] if on_gpu else None,
                                   find_unused_parameters=True)


def gradient_sync(step: torch.nn.Module, last_micro_batch: bool):
    """Context for one micro-batch's backward: DDP all-reduces only on the last micro-batch of an
    accumulated step (``no_sync`` before it); nothing to do in one process."""
    if last_micro_batch or not hasattr(step, "no_sync"):
        return contextlib.nullcontext()
    return step.no_sync()
