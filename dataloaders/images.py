"""Image data sets: batches of {"x1": (B, C, H, W) in [-1, 1], "cond": class labels (B,)}.

Every data object offers what the trainer and evaluator use: ``train_loader(device, seed)``
(batches, ``len``, ``set_epoch``), ``eval_set`` (held-out images as one tensor), ``shape`` and
``num_classes`` (0 when unlabelled or ``class_conditional=false``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

from dataloaders.base import HeldOut, ShuffledBatches, TensorLoader, check

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def _to_model_range(x: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1]."""
    return x * 2 - 1


class DigitsData:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), resized: the offline image set.

    ``num_eval`` images, chosen with ``data_seed``, are held out; the rest train (with labels as
    ``cond`` when ``class_conditional``).
    """

    kind = "image"  # what it serves (training/compat.py checks models, losses and evaluators against it)

    def __init__(
        self,
        image_size: int = 16,
        channels: int = 1,
        num_classes: int = 10,
        num_eval: int = 297,
        batch_size: int = 128,
        data_seed: int = 0,
    ):
        from sklearn.datasets import load_digits

        check(channels == 1, f"digits are grey: dataloaders.channels must be 1, got {channels}")
        check(
            num_classes in (0, 10),
            f"dataloaders.num_classes must be 10 (labels) or 0 (unconditional), got {num_classes}",
        )

        digits = load_digits()
        images = torch.from_numpy(digits.images).float()[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True).clamp(0, 1)
        labels = torch.from_numpy(digits.target).long()
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(data_seed))
        images, labels = _to_model_range(images[perm]), labels[perm]
        self.train_set, self.eval_set = images[num_eval:], images[:num_eval]
        self.train_labels, self.eval_labels = labels[num_eval:], labels[:num_eval]
        self.shape: tuple[int, ...] = (1, image_size, image_size)
        self.batch_size = batch_size
        self.num_classes = num_classes

    def train_loader(self, device: torch.device, seed: int) -> TensorLoader:
        tensors = {"x1": self.train_set.to(device)}
        if self.num_classes:
            tensors["cond"] = self.train_labels.to(device)
        return TensorLoader(tensors, self.batch_size, seed)

    def eval_inputs(self) -> HeldOut:
        return HeldOut(self.eval_set, self.num_classes)


class EpochLoader(ShuffledBatches):
    """A DataLoader whose shuffling order is a function of (seed, epoch), moving batches to a device.

    Like ``TensorLoader`` it yields dict batches and resumes exactly: epoch e always visits the
    same order, so a resumed run can skip the batches it already saw. ``batch_size`` is the global
    batch: under torch.distributed each rank loads only its slice of every global batch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, device: torch.device, num_workers: int,
                 class_conditional: bool):  # fmt: skip
        super().__init__(len(dataset), batch_size, seed)  # type: ignore[arg-type]
        self.dataset = dataset
        self.device = device
        self.num_workers = num_workers
        self.class_conditional = class_conditional

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        loader = DataLoader(
            self.dataset, batch_sampler=[idx.tolist() for idx in self.epoch_batches()], num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.epoch_seed + 7919 * self.shard.start),
            pin_memory=self.device.type == "cuda", persistent_workers=False, worker_init_fn=_seed_worker,
        )  # fmt: skip
        for images, labels in loader:
            batch = {"x1": images.to(self.device, non_blocking=True)}
            if self.class_conditional:
                batch["cond"] = labels.to(self.device, non_blocking=True)
            yield batch


def _seed_worker(worker_id: int) -> None:
    """Seed python's and numpy's RNGs in a loader worker from torch's per-worker seed."""
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class FlatImageFolder(Dataset):
    """Every image below ``root`` (any depth), label 0: for unlabelled sets such as CelebA."""

    def __init__(self, root: Path, transform: transforms.Compose):
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        with Image.open(self.files[i]) as image:
            return self.transform(image.convert("RGB")), 0


def image_transform(image_size: int, center_crop: bool, hflip: bool) -> transforms.Compose:
    steps: list = [transforms.Resize(image_size)]
    steps.append(transforms.CenterCrop(image_size) if center_crop else transforms.Resize((image_size, image_size)))
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Lambda(_to_model_range)]
    return transforms.Compose(steps)


class _SplitData:
    """Shared tail of the folder-backed sets: held-out tensor, loader, shape."""

    kind = "image"  # what it serves (training/compat.py checks models, losses and evaluators against it)

    train: Dataset
    held_out: Dataset
    batch_size: int
    num_workers: int
    num_classes: int

    def _finish(self, image_size: int, num_eval: int) -> None:
        n = min(num_eval, len(self.held_out))  # type: ignore[arg-type]
        items = [self.held_out[i] for i in range(n)]
        self.eval_set = torch.stack([x for x, _ in items])
        self.eval_labels = torch.tensor([y for _, y in items])
        self.shape = tuple(self.eval_set.shape[1:])
        if len(self.train) < self.batch_size:  # type: ignore[arg-type]
            raise ValueError(f"{len(self.train)} training images but batch_size={self.batch_size}; lower batch_size")  # type: ignore[arg-type]

    def train_loader(self, device: torch.device, seed: int) -> EpochLoader:
        return EpochLoader(self.train, self.batch_size, seed, device, self.num_workers, self.num_classes > 0)

    def eval_inputs(self) -> HeldOut:
        return HeldOut(self.eval_set, self.num_classes)


class FolderData(_SplitData):
    """Any folder of images: with ``class_subfolders`` an ImageFolder layout (one folder per class,
    as ImageNet), else every image below ``root`` unlabelled (CelebA). ``num_eval`` images chosen
    with ``data_seed`` are held out (no flips)."""

    def __init__(
        self,
        root: str,
        image_size: int = 64,
        channels: int = 3,
        num_classes: int = 0,
        center_crop: bool = True,
        hflip: bool = True,
        class_subfolders: bool = False,
        num_eval: int = 1000,
        batch_size: int = 64,
        num_workers: int = 4,
        data_seed: int = 0,
    ):
        check(channels == 3, f"folder images are loaded as RGB: dataloaders.channels must be 3, got {channels}")
        path = Path(root).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"dataloaders.root={root} is not a folder; point it to the images (dataloaders.root=PATH)"
            )
        train_tf = image_transform(image_size, center_crop, hflip)
        eval_tf = image_transform(image_size, center_crop, hflip=False)
        if class_subfolders:
            full_train = datasets.ImageFolder(str(path), transform=train_tf)
            full_eval = datasets.ImageFolder(str(path), transform=eval_tf)
            found = len(full_train.classes)
            check(
                num_classes in (0, found),
                f"{root} has {found} class folders but dataloaders.num_classes={num_classes}; set it to {found} or 0",
            )
        else:
            full_train, full_eval = FlatImageFolder(path, train_tf), FlatImageFolder(path, eval_tf)
            check(num_classes == 0, "unlabelled folder (class_subfolders=false) needs dataloaders.num_classes=0")
        self.num_classes = num_classes
        if len(full_train) == 0:  # type: ignore[arg-type]
            raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under dataloaders.root={root}")
        perm = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(data_seed)).tolist()  # type: ignore[arg-type]
        check(len(perm) >= 2, f"dataloaders.root={root} holds {len(perm)} image: it takes at least 2 (one is held out)")
        n_eval = max(1, min(num_eval, len(perm) // 10))  # at least one held-out image to score against
        self.train, self.held_out = Subset(full_train, perm[n_eval:]), Subset(full_eval, perm[:n_eval])
        self.batch_size, self.num_workers = batch_size, num_workers
        self._finish(image_size, n_eval)


class CIFAR10Data(_SplitData):
    """CIFAR-10 through torchvision: trains on the 50k train split, holds out the test split's
    first ``num_eval`` images. Downloads into ``data_dir`` when online."""

    def __init__(
        self,
        data_dir: str = "data/cifar10",
        download: bool = True,
        image_size: int = 32,
        channels: int = 3,
        num_classes: int = 0,
        hflip: bool = True,
        num_eval: int = 1000,
        batch_size: int = 128,
        num_workers: int = 4,
    ):
        check((image_size, channels) == (32, 3), "CIFAR-10 is 32x32 RGB: dataloaders.image_size=32, channels=3")
        check(num_classes in (0, 10), f"dataloaders.num_classes must be 10 (labels) or 0, got {num_classes}")
        train_tf = image_transform(32, center_crop=True, hflip=hflip)
        eval_tf = image_transform(32, center_crop=True, hflip=False)
        try:
            self.train = datasets.CIFAR10(data_dir, train=True, transform=train_tf, download=download)
            self.held_out = datasets.CIFAR10(data_dir, train=False, transform=eval_tf, download=download)
        except (RuntimeError, OSError) as e:
            raise FileNotFoundError(
                f"CIFAR-10 is not in {data_dir} and could not be downloaded ({type(e).__name__}); put the extracted "
                "cifar-10-batches-py folder there (from https://www.cs.toronto.edu/~kriz/cifar.html) or set "
                "dataloaders.data_dir=PATH"
            ) from e
        self.batch_size, self.num_workers = batch_size, num_workers
        self.num_classes = num_classes
        self._finish(32, num_eval)
