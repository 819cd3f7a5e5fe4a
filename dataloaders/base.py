"""In-memory data sets and the batch loader the trainer iterates over.

The trainer's only contract with data: an iterable of batch dicts (``{"x1": data, ...}``)
with ``len()`` and ``set_epoch(epoch)``, plus a held-out ``eval_set`` for evaluation.

Multi-process runs (torch.distributed initialised, as under torchrun): ``batch_size`` is the
global batch, and each rank's loader yields its own slice of every global batch (disjoint, their
union the global batch), so N processes see the batches one process sees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

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


class TensorLoader:
    """Shuffled mini-batches of in-memory tensors (data, and labels as ``cond``), one gather each.

    A torch DataLoader over a TensorDataset fetches and collates row by row, which costs
    more than a whole training step of a small MLP; this loader does not.
    The order of epoch ``e`` depends only on ``(seed, e)``, so a resumed run sees the same batches.
    ``batch_size`` is the global batch: under torch.distributed each rank yields its slice of it.
    """

    def __init__(self, data: Tensor | dict[str, Tensor], batch_size: int, seed: int, drop_last: bool = True):
        tensors = data if isinstance(data, dict) else {"x1": data}
        n = len(tensors["x1"])
        if batch_size > n:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {n} training samples; lower batch_size or raise num_train"
            )
        self.tensors = tensors
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.shard = rank_slice(batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n, b = self.n, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).to(self.tensors["x1"].device)
        for i in range(len(self)):
            idx = perm[i * self.batch_size : (i + 1) * self.batch_size][self.shard]
            yield {key: value.index_select(0, idx) for key, value in self.tensors.items()}


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
