"""In-memory data sets and the batch loader the trainer iterates over.

The trainer's only contract with data: an iterable of batch dicts (``{"x1": data, ...}``)
with ``len()`` and ``set_epoch(epoch)``, plus a held-out ``eval_set`` for evaluation.

Multi-process runs (torch.distributed initialised, as under torchrun): ``batch_size`` is the
global batch, and each rank's loader yields its own slice of every global batch (disjoint, their
union the global batch), so N processes see the batches one process sees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

Sampler = Callable[..., Tensor]  # sampler(n, generator=...) -> (n, *shape)


class DataError(ValueError):
    """The data ran out or went bad during training (no batch in an epoch, too many corrupt samples):
    the launcher reports it as one line that names the data set and the fix."""


@dataclass(frozen=True)
class HeldOut:
    """What a data set offers its evaluator (``data.eval_inputs()``): the held-out ``reference`` set, the
    number of classes (0: unconditional), the held-out captions of captioned data, and ``decode``
    (latents -> pixels in [-1, 1]) for latent data."""

    reference: Tensor
    num_classes: int = 0
    captions: list[str] | None = None
    decode: Callable[[Tensor], Tensor] | None = None


def process_shard() -> tuple[int, int]:
    """``(rank, world_size)`` of this process in torch.distributed's group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_slice(global_batch: int) -> slice:
    """The rows of a global batch that this process trains on."""
    rank, world = process_shard()
    if global_batch % world:
        raise ValueError(f"dataloaders.batch_size={global_batch} does not split over {world} processes")
    share = global_batch // world
    return slice(rank * share, (rank + 1) * share)


def check(ok: bool, message: str) -> None:
    """A data set's config check: ``message`` (one line naming the ``dataloaders.*`` key and the fix) unless ``ok``."""
    if not ok:
        raise ValueError(message)


def rank_batches(perm: Tensor, batch_size: int, count: int, shard: slice) -> list[Tensor]:
    """This rank's rows (``shard``) of each of the first ``count`` global batches of the order ``perm``."""
    return [perm[i * batch_size : (i + 1) * batch_size][shard] for i in range(count)]


@dataclass(eq=False)
class ShuffledBatches:
    """What the shuffling loaders share: ``n`` samples in global batches of ``batch_size``, of which this
    rank takes the rows ``shard`` (under torch.distributed; all of them otherwise), and an ``epoch`` set by
    ``set_epoch``. The order of epoch ``e`` depends only on ``(seed, e)``, so a resumed run sees the same
    batches. ``len``: batches an epoch, a last partial one included unless ``drop_last``.
    """

    n: int
    batch_size: int
    seed: int
    drop_last: bool = True
    epoch: int = field(default=0, init=False)
    shard: slice = field(init=False)

    def __post_init__(self) -> None:
        self.shard = rank_slice(self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n, b = self.n, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    @property
    def epoch_seed(self) -> int:
        return self.seed * 1_000_003 + self.epoch

    def epoch_batches(self, device: torch.device | None = None) -> list[Tensor]:
        """This rank's sample indices of each batch of the epoch (on ``device``)."""
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch_seed)).to(device)
        return rank_batches(perm, self.batch_size, len(self), self.shard)


class TensorLoader(ShuffledBatches):
    """Shuffled mini-batches of in-memory tensors (data, and labels as ``cond``), one gather each.

    A torch DataLoader over a TensorDataset fetches and collates row by row, which costs
    more than a whole training step of a small MLP; this loader does not.
    ``batch_size`` is the global batch: under torch.distributed each rank yields its slice of it.
    """

    def __init__(self, data: Tensor | dict[str, Tensor], batch_size: int, seed: int, drop_last: bool = True):
        self.tensors = data if isinstance(data, dict) else {"x1": data}
        n = len(self.tensors["x1"])
        if batch_size > n:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {n} training samples; lower batch_size or raise num_train"
            )
        super().__init__(n, batch_size, seed, drop_last)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for idx in self.epoch_batches(self.tensors["x1"].device):
            yield {key: value.index_select(0, idx) for key, value in self.tensors.items()}


class HostTensorLoader(TensorLoader):
    """``TensorLoader`` over host-resident tensors (a set larger than the device's memory): each batch moves
    to ``device`` on its own, and ``on_device`` makes it the data set's batch (casts, nesting)."""

    def __init__(self, tensors: dict[str, Tensor], batch_size: int, seed: int, device: torch.device):
        super().__init__(tensors, batch_size, seed)
        self.device = device

    def on_device(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in super().__iter__():
            yield self.on_device({key: value.to(self.device, non_blocking=True) for key, value in batch.items()})


class SampledData:
    """A fixed training set and a held-out evaluation set drawn from one sampler.

    ``data_seed`` is fixed by default so every run (whatever its training seed) is trained
    and scored against the same samples, which keeps energy distances comparable.
    """

    kind = "dense"  # what it serves (training/compat.py checks models, losses and evaluators against it)

    def __init__(
        self,
        sampler: Sampler,
        dim: int,
        num_train: int,
        num_eval: int,
        batch_size: int,
        data_seed: int = 0,
    ):
        g = torch.Generator().manual_seed(data_seed)
        self.train_set = sampler(num_train, generator=g).float()
        self.eval_set = sampler(num_eval, generator=g).float()
        if self.train_set.shape[1:] != (dim,):
            raise ValueError(f"sampler returned shape {tuple(self.train_set.shape[1:])}, expected ({dim},)")
        self.shape: tuple[int, ...] = (dim,)
        self.batch_size = batch_size
        self.num_classes = 0

    def train_loader(self, device: torch.device, seed: int) -> TensorLoader:
        return TensorLoader(self.train_set.to(device), self.batch_size, seed)

    def eval_inputs(self) -> HeldOut:
        return HeldOut(self.eval_set, self.num_classes)
