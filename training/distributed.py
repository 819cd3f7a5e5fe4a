"""Multi-process training through torch.distributed (torchrun): process group, model wrapping,
cross-rank reductions and full state dicts for checkpoints.

A run is distributed when torchrun started it (``WORLD_SIZE`` and ``LOCAL_RANK`` in the
environment): ``setup`` joins the process group (nccl on CUDA, gloo on CPU) and picks the device of
``LOCAL_RANK``. ``trainer.devices=N`` in a plain ``python launcher.py`` run is served by
``relaunch_with_torchrun``, which runs the same command again under ``torch.distributed.run``.
Everything else in this module is a no-op in a single process, so the trainer calls it always.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from training.errors import UserError

STRATEGIES = ("ddp", "fsdp")
FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank among ``world_size`` processes, and its device."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # setup() created the process group, so teardown() destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# --- launching ----------------------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def in_notebook() -> bool:
    """A Jupyter/Colab kernel (or IPython) runs this process."""
    import builtins

    return "ipykernel" in sys.modules or hasattr(builtins, "get_ipython")


def refuse_notebook(processes: int) -> None:
    """Multi-process runs from a Jupyter/Colab kernel hang or die with the kernel: refuse them."""
    if in_notebook() and os.environ.get("ALLOW_NOTEBOOK_DDP") != "1":
        raise UserError(
            f"a {processes}-process run cannot start from a notebook kernel; run launcher.py from a terminal "
            "(or set ALLOW_NOTEBOOK_DDP=1 to try anyway)"
        )


def available_devices(device_type: str) -> int:
    """How many processes a machine can give one device each: GPUs on CUDA, cores on CPU."""
    return torch.cuda.device_count() if device_type == "cuda" else os.cpu_count() or 1


def default_device_type(device: str | None) -> str:
    """The device type a run with ``device`` (null: best available) trains on, for multi-process runs."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def check_devices(devices: int, device_type: str) -> None:
    if devices < 1:
        raise UserError(f"trainer.devices must be >= 1, got {devices}")
    if device_type not in ("cuda", "cpu"):
        raise UserError(f"multi-process training runs on cuda or cpu, not {device_type}; drop trainer.devices")
    have = available_devices(device_type)
    if devices > have:
        what = "CUDA GPUs" if device_type == "cuda" else "CPU cores"
        raise UserError(f"trainer.devices={devices} but this machine has {have} {what}; use trainer.devices<={have}")


def torchrun_command(argv: list[str], devices: int) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node=N <argv>``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}", *argv]


def relaunch_with_torchrun(argv: list[str], devices: int, device: str | None = None) -> int:
    """Run ``argv`` (``sys.argv``: the script, then its arguments) again in ``devices`` processes
    under torchrun and return its exit code. ``device`` is the run's ``device`` setting (None: CUDA
    if available, else CPU), checked against the machine's GPUs or cores. For ``launcher.py`` when
    ``trainer.devices > 1`` and not ``launched_by_torchrun()``."""
    refuse_notebook(devices)
    check_devices(devices, default_device_type(device))
    proc = subprocess.Popen(torchrun_command(argv, devices))
    # Ctrl-C reaches this process and torchrun (its workers run in sessions of their own; torchrun passes
    # the signal on): this one ignores it and waits; a SIGTERM sent to it alone goes to torchrun. The workers
    # stop after their step; torchrun kills them if that takes longer than its shutdown timeout (30 s).
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, _: proc.send_signal(signum)),
    }
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def needs_relaunch(devices: int) -> bool:
    return devices > 1 and not launched_by_torchrun()


# --- the process group --------------------------------------------------------------------------
def setup(device: torch.device) -> Dist:
    """Join torchrun's process group (when torchrun started this process) and pick this rank's device."""
    if not launched_by_torchrun():
        return Dist(0, 1, device)
    world, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if world > 1:
        refuse_notebook(world)
    check_devices(int(os.environ.get("LOCAL_WORLD_SIZE", world)), device.type)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Dist(dist.get_rank(), dist.get_world_size(), device, owns)


def teardown(ctx: Dist) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """A process group is up: the model trains wrapped, reductions cross ranks."""
    return dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def seed_rank(seed: int, rank: int, step: int) -> None:
    """Give ranks > 0 their own random stream (noise, times, dropout), a function of (seed, rank,
    step) so a resumed run draws afresh; rank 0 keeps the stream a 1-process run has."""
    if rank == 0:
        return
    mixed = (seed * 1_000_003 + rank * 7919 + step) % 2**63
    random.seed(mixed)
    np.random.seed(mixed % 2**32)
    torch.manual_seed(mixed)


def per_rank_batch(global_batch: int, world: int) -> int:
    """``dataloaders.batch_size`` is the global batch; each of ``world`` ranks takes an equal share."""
    if global_batch % world:
        raise UserError(
            f"dataloaders.batch_size={global_batch} does not split over {world} processes; use a multiple of {world}"
        )
    return global_batch // world


def mean_across_ranks(x: Tensor) -> Tensor:
    """The mean of ``x`` over ranks (a NaN on any rank is a NaN on all, so all stop together)."""
    if not dist.is_initialized():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / dist.get_world_size()


def any_across_ranks(flags: list[bool]) -> list[bool]:
    """Each flag, true if it is true on any rank (one small all-reduce; a no-op in one process)."""
    if not dist.is_initialized():
        return flags
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    x = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return [bool(v) for v in x.tolist()]


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- models -------------------------------------------------------------------------------------
def wrap_for_training(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """The module the training step calls: ``model`` itself in one process; DDP over it, or
    ``model`` sharded in place by FSDP2 (each top-level block, then the root), under torchrun.

    DDP does not broadcast buffers: MeanFlow calls the model again (no-grad jvp) a number of times
    that differs between ranks, and a per-forward buffer broadcast would then mismatch the ranks'
    collectives. Our models have no running statistics, so buffers stay equal after DDP's
    initial broadcast.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"trainer.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not dist.is_initialized():
        return model
    if strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
    for block in top_level_blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def top_level_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: the members of the model's ModuleLists (DiT's
    ``blocks``, a UNet's levels), else its direct children that hold parameters."""
    lists = [m for m in model.children() if isinstance(m, nn.ModuleList)]
    blocks = [block for ml in lists for block in ml] if lists else list(model.children())
    return [b for b in blocks if any(True for _ in b.parameters())]


def gradient_sync(module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce (DDP ``no_sync``) / reduce-scatter (FSDP) while ``enabled`` is
    False: micro-batches of an accumulation group but the last."""
    if enabled:
        return contextlib.nullcontext()
    if isinstance(module, DistributedDataParallel):
        return module.no_sync()
    if isinstance(module, FSDPModule):
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module: FSDPModule) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def model_state(module: nn.Module) -> dict[str, Any]:
    """The full (unsharded) state dict; under FSDP a collective, complete on rank 0 only."""
    if is_sharded(module):
        return get_model_state_dict(module, options=FULL_ON_RANK0)
    return module.state_dict()


def load_model_state(module: nn.Module, state: dict[str, Any]) -> None:
    if is_sharded(module):
        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
    else:
        module.load_state_dict(state)


def optimizer_state(module: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` (keyed by parameter index, the same in 1 and N processes), or
    under FSDP the full state keyed by parameter name, which a plain model loads too."""
    if is_sharded(module):
        return get_optimizer_state_dict(module, optimizer, options=FULL_ON_RANK0)
    return optimizer.state_dict()


def load_optimizer_state(module: nn.Module, optimizer: Optimizer, state: dict[str, Any]) -> None:
    keyed_by_name = any(isinstance(k, str) for k in state["state"])  # written under FSDP
    if is_sharded(module) or keyed_by_name:
        set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
