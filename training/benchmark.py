"""The harness of the benchmark scripts (``scripts/bench_*.py``): one way to time, to rotate
side-by-side runs, to read peak memory, to take medians and to print and store the results, so
that every table measures and reports the same thing."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from training.compose import compose_config
from training.precision import Precision

T = TypeVar("T")
K = TypeVar("K")
R = TypeVar("R")

ALIGN = {"l": "---", "r": "---:", "c": ":---:"}


# --- timing --------------------------------------------------------------------------------------
def timed(fn: Callable[[], R], device: torch.device | None = None) -> tuple[float, R]:
    """Seconds ``fn`` takes and what it returns; on CUDA the queued kernels are waited for on both
    sides, so the time is the work's and not its launch."""
    sync = device is not None and device.type == "cuda"
    if sync:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if sync:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def time_repeats(
    fn: Callable[[], R], repeats: int, warmup: int = 0, device: torch.device | None = None
) -> tuple[list[float], R]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones (allocation, kernel
    selection, caches), and the last call's result."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        s, result = timed(fn, device)
        seconds.append(s)
    return seconds, result


def rotated(items: Sequence[T], turn: int) -> list[T]:
    """``items`` rotated by ``turn``: run in this order on turn after turn, no item always gets the
    warm (or the cold) process."""
    shift = turn % len(items)
    return [*items[shift:], *items[:shift]]


def alternating(items: Sequence[T], repeats: int) -> Iterator[tuple[T, int]]:
    """Every item once per repeat, the order rotated by one each repeat (with two: alternating)."""
    for repeat in range(repeats):
        for item in rotated(items, repeat):
            yield item, repeat


def side_by_side(
    fns: Mapping[K, Callable[[], R]], repeats: int, device: torch.device | None = None
) -> tuple[dict[K, list[float]], dict[K, list[R]]]:
    """Each function's seconds and results, one per repeat, measured in alternating order: a ratio of
    the two taken within a repeat compares runs under the same load."""
    seconds: dict[K, list[float]] = {name: [] for name in fns}
    results: dict[K, list[R]] = {name: [] for name in fns}
    for name, _ in alternating(list(fns), repeats):
        s, result = timed(fns[name], device)
        seconds[name].append(s)
        results[name].append(result)
    return seconds, results


# --- memory ----------------------------------------------------------------------------------------
PROC_STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    """A ``VmHWM``/``VmRSS`` line of /proc/self/status (Linux), in KiB."""
    line = next(line for line in PROC_STATUS.read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak from here: CUDA's allocator statistics; on Linux the process's RSS high-water mark
    (writing 5 to /proc/self/clear_refs), after glibc hands the memory it holds free back to the system
    (``malloc_trim``): otherwise a step reuses what an earlier one freed and its RSS never rises.
    Elsewhere the CPU peak is the whole process's."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif CLEAR_REFS.exists():
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
        CLEAR_REFS.write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    """``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the peak RSS since ``reset_peak_memory``
    (Linux), or the process's peak RSS (``ru_maxrss``, KiB on Linux) where it cannot be reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if PROC_STATUS.exists():
        return _status_kib("VmHWM") / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_memory_mb(device: torch.device) -> float:
    """What is held now: CUDA's allocated bytes, or the process's RSS (Linux; 0 where unknown)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _status_kib("VmRSS") / 1024 if PROC_STATUS.exists() else 0.0


# --- runs of train(cfg) ----------------------------------------------------------------------------
# torchcfm's README setup on the 2D toys, shared by bench_2d and bench_meanflow
TOY_BATCH = 256
TOY_WIDTH = 256
TOY_DEPTH = 3  # hidden layers, as torchcfm's MLP
TOY_LR = 1e-3
TOY_EMA_DECAY = 0.999


def toy_overrides(dataset: str, steps: int, eval_samples: int, nfe: Sequence[int]) -> list[str]:
    """The 2D toy setup: our MLP as wide and deep as torchcfm's, its batch, a constant learning rate,
    no gradient clipping, one epoch of ``steps`` steps (every step sees fresh points), scored at ``nfe``
    on ``eval_samples`` samples and held-out points at the end of the run only."""
    return [
        f"dataloaders={dataset}",
        "precision=fp32",
        "lr_schedule=constant",
        f"optimizer.lr={TOY_LR}",
        f"model.hidden={TOY_WIDTH}",
        f"model.depth={TOY_DEPTH}",
        f"dataloaders.batch_size={TOY_BATCH}",
        f"dataloaders.num_train={steps * TOY_BATCH}",
        f"dataloaders.num_eval={eval_samples}",
        "epochs=1",
        f"max_steps={steps}",
        f"trainer.ema_decay={TOY_EMA_DECAY}",
        "trainer.grad_clip=null",  # torchcfm does not clip
        f"eval.nfe=[{','.join(map(str, nfe))}]",
        f"eval.num_samples={eval_samples}",
        "eval.every_epochs=0",
    ]


def run_overrides(name: str, device: str, root: Path) -> list[str]:
    """What keeps a benchmark run to itself: no tracking, no archived checkpoints, every output under
    ``root`` (a temporary folder), overwritten by the next run of the same name."""
    return [
        f"run_name={name}",
        "trackio.enabled=false",
        "checkpoint.archive_every_epochs=0",
        f"device={device}",
        "overwrite=true",
        f"paths.root={root}",
        f"paths.run_dir={root}/runs/{name}",
        f"paths.experiment_log={root}/EXPERIMENT_LOG.md",
    ]


def run_config(name: str, overrides: Sequence[str], device: str, root: Path) -> DictConfig:
    """The launcher's config with ``overrides``, for one benchmark run (``run_overrides``)."""
    return compose_config([*overrides, *run_overrides(name, device, root)])


# --- training steps --------------------------------------------------------------------------------
def precision_preset(name: str, device: torch.device) -> Precision:
    """The precision preset ``configs/precision/{name}.yaml``, checked against ``device`` and applied
    (the process-wide matmul precision), as ``train`` applies it."""
    precision: Precision = instantiate(compose_config([f"precision={name}"]).precision)
    precision.check(device)
    precision.apply()
    return precision


@dataclass
class StepTiming:
    """``seconds`` of each timed step, the last step's loss, and the peak memory over all of them."""

    seconds: list[float]
    loss: float
    peak_mb: float

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.seconds)


def time_steps(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, dict[str, Any]], Any],
    data: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    device: torch.device,
    steps: int,
) -> StepTiming:
    """``steps`` training steps after one warm-up; each optimizer group is clipped to its ``grad_clip`` (1.0)."""
    scaler = precision.grad_scaler_for(device)

    def step() -> torch.Tensor:
        with precision.autocast_context(device):
            loss = loss_fn(model, data).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        for group in optimizer.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], group.get("grad_clip") or 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    reset_peak_memory(device)
    seconds, loss = time_repeats(step, steps, warmup=1, device=device)
    return StepTiming(seconds, float(loss), peak_memory_mb(device))


# --- medians and verdicts --------------------------------------------------------------------------
def median(values: Iterable[Any]) -> Any:
    """The median of the values present (None where none is: a figure only some runs measure); of
    dicts, the median per key."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if isinstance(present[0], Mapping):
        return {k: statistics.median(v[k] for v in present) for k in present[0]}
    return statistics.median(present)


def medians_by(runs: Iterable[T], key: Callable[[T], K], fields: Sequence[str]) -> dict[K, dict[str, Any]]:
    """The runs grouped by ``key``, in the order first seen, with each field's ``median`` over the
    group and ``runs``, the group's size."""
    groups: dict[K, list[T]] = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    return {
        k: {"runs": len(group), **{f: median(getattr(run, f) for run in group) for f in fields}}
        for k, group in groups.items()
    }


def verdict(value: float, target: float) -> str:
    """A target of the form ``value <= target``."""
    return "PASS" if value <= target else "FAIL"


# --- reporting -------------------------------------------------------------------------------------
def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str) -> str:
    """A markdown table; ``align`` has one letter a column: ``l``eft, ``r``ight (numbers), ``c``entre."""
    if len(align) != len(header):
        raise ValueError(f"align {align!r} has {len(align)} columns, the header {len(header)}")
    lines = [header, [ALIGN[a] for a in align], *rows]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines)


def environment(settings: Mapping[str, Any], device: str) -> dict[str, Any]:
    """What the numbers depend on, stored beside them: the run's settings and the machine."""
    return {
        **{k: str(v) if isinstance(v, Path) else v for k, v in settings.items()},
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "python": platform.python_version(),
        "machine": platform.platform(),
        "processor": platform.processor(),
    }


def write_report(path: Path, env: Mapping[str, Any], **sections: Sequence[Any]) -> None:
    """``env`` (see ``environment``) and each section's runs (dataclasses) as JSON. Rewritten after every
    run, so a long benchmark that stops early keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"environment": dict(env), **{name: [asdict(r) for r in rs] for name, rs in sections.items()}}
    path.write_text(json.dumps(report, indent=2) + "\n")
