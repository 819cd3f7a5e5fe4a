"""Timed training steps for the benchmark scripts (``scripts/bench_*.py``): one loop, so every table
measures the same thing."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from training.precision import Precision


def time_steps(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, dict[str, Any]], Any],
    data: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    device: torch.device,
    steps: int,
) -> tuple[list[float], float, float]:
    """``steps`` training steps after one warm-up (allocation, kernel selection): their times in seconds,
    the last loss, and the peak memory in MB. Each optimizer group is clipped to its ``grad_clip`` (1.0)."""
    scaler = precision.grad_scaler_for(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        with precision.autocast_context(device):
            loss = loss_fn(model, data).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        for group in optimizer.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], group.get("grad_clip") or 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:
            times.append(time.perf_counter() - start)
    memory = (
        torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return times, float(loss), memory
