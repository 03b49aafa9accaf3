"""Datasets: the built-in Fashion-MNIST (in memory) and ImageFolder trees that skip bad files.

Every dataset yields uint8 images; normalisation happens in batches on the device.
``--data_path fashion-mnist`` reads the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``) when present, else downloads it with
torchvision. Any other ``--data_path DIR`` must hold ``DIR/train/<class>/<image>``
(and ``DIR/val/...`` for evaluation).

Example:
    >>> train = build_dataset("fashion-mnist", "train", subset=10)
    >>> len(train), train.classes[:2]
    (100, ['T-shirt/top', 'Trouser'])
"""

from __future__ import annotations

import gzip
import itertools
import logging
import os
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from simpool.augment import IMAGENET_MEAN, IMAGENET_STD, eight_bit
from simpool.utils import UserError

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterable, Iterator, Sequence, Sized

    from simpool.augment import MultiCropAugmentation

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN = (0.2860,) * 3
FASHION_MNIST_STD = (0.3530,) * 3
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_BAD_IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
logger = logging.getLogger("simpool")

__all__ = [
    "ResumableSampler",
    "training_loader",
    "is_in_memory",
    "check_enough_images",
    "DataError",
    "build_dataset",
    "load_fashion_mnist",
    "InMemoryImages",
    "SafeImageFolder",
    "skip_bad_collate",
    "normalize_batch",
]


class DataError(UserError, ValueError):
    """A user-facing problem with the data path; its message is one line."""


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str, root: str = FASHION_MNIST_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 1, 28, 28), labels int64 (N,)) for ``split`` 'train' or 'test'."""
    prefix = {"train": "train", "test": "t10k", "val": "t10k"}[split]
    images_gz = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
    labels_gz = os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")
    if os.path.exists(images_gz) and os.path.exists(labels_gz):
        images = torch.from_numpy(_read_idx(images_gz).copy()).unsqueeze(1)
        labels = torch.from_numpy(_read_idx(labels_gz).astype(np.int64))
        return images, labels
    from torchvision.datasets import FashionMNIST

    cache = os.path.join(os.path.expanduser("~"), ".cache", "simpool")
    try:
        ds = FashionMNIST(cache, train=split == "train", download=True)
    except Exception as e:  # no network and no Debian package: say what to install
        raise DataError(
            f"Fashion-MNIST not found in {root} and could not be downloaded ({e}); "
            "install it with: apt-get install -y dataset-fashion-mnist"
        ) from None
    return ds.data.unsqueeze(1).clone(), ds.targets.clone()


class InMemoryImages(Dataset):
    """Equal-size uint8 images held in one tensor; ``__getitems__`` serves a whole
    batch with one index, so a DataLoader with ``collate_fn=tuple`` costs nothing
    per sample."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.images, self.labels, self.classes = images, labels, classes
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        indices = torch.as_tensor(indices)
        return self.images[indices], self.labels[indices]

    def subset(self, indices: Sequence[int] | torch.Tensor) -> InMemoryImages:
        return InMemoryImages(self.images[indices], self.labels[indices], self.classes, self.mean, self.std)


class SafeImageFolder(ImageFolder):
    """ImageFolder that returns ``None`` for unreadable, truncated or non-image files
    instead of raising; ``skip_bad_collate`` drops them and reports their paths.

    An item may be asked for as ``(index, seed)``: the transform then draws its random
    numbers from a generator seeded with ``seed`` (and leaves the process's stream as it was),
    so the result depends on the pair alone, not on the loader worker or what it served before.
    """

    def __init__(self, root: str, transform: Callable[[Any], Any] | None = None) -> None:
        super().__init__(
            root, transform=transform, is_valid_file=lambda p: not os.path.basename(p).startswith("."), allow_empty=True
        )
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Any, int] | _BadSample:
        if isinstance(index, tuple):
            index, seed = index
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self[index]
        path, target = self.samples[index]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with open(path, "rb") as f:
                    image = Image.open(f)
                    if getattr(self.transform, "decodes", False):
                        # the transform decodes (e.g. MultiCropAugmentation.crop_image: a JPEG at a
                        # reduced DCT scale when every crop allows it); errors still land below
                        return self.transform(image), target
                    image.load()
                    image = eight_bit(image).convert("RGB")
            if self.transform is not None:
                image = self.transform(image)
        except _BAD_IMAGE_ERRORS + (Image.DecompressionBombWarning,):
            return _BadSample(path)
        return image, target

    def subset(self, indices: Iterable[int]) -> SafeImageFolder:
        out = SafeImageFolder.__new__(SafeImageFolder)
        out.__dict__.update(self.__dict__)
        out.samples = [self.samples[i] for i in indices]
        out.targets = [s[1] for s in out.samples]
        out.imgs = out.samples
        return out

    @property
    def labels(self) -> torch.Tensor:
        return torch.as_tensor(self.targets)


class _BadSample(str):
    """Path of a sample that could not be read (a str, so it crosses worker queues)."""


def skip_bad_collate(inner: Callable[[list], Any] = default_collate) -> Callable[[list], tuple[Any, list[str]]]:
    """Wrap a collate function: drop unreadable samples; return (batch, bad_paths)."""

    def collate(samples: list) -> tuple[Any, list[str]]:
        good = [s for s in samples if not isinstance(s, _BadSample)]
        bad = [str(s) for s in samples if isinstance(s, _BadSample)]
        return (inner(good) if good else None), bad

    return collate


def subset_per_class(labels: Sequence[int] | torch.Tensor, per_class: int, start: int = 0) -> torch.Tensor:
    """Sorted indices of the images ``start`` to ``start + per_class - 1`` of each class, counted
    in dataset order (an ImageFolder's sorted paths), as AttMask (after OBoW) picks its ImageNet
    subsets: ``--subset 260`` is the same 20% split in every run and every tool, and
    ``--subset_starts`` steps through disjoint low-shot sets. A class with fewer images keeps
    what it has from ``start`` on.

    Example:
        >>> subset_per_class([0, 1, 0, 0, 1, 2], per_class=2).tolist()
        [0, 1, 2, 4, 5]
        >>> subset_per_class([0, 1, 0, 0, 1, 2], per_class=2, start=1).tolist()
        [2, 3, 4]
    """
    labels = torch.as_tensor(labels)
    order = torch.argsort(labels, stable=True)  # each class's images together, in dataset order
    grouped = labels[order]
    rank = torch.arange(len(labels)) - torch.searchsorted(grouped, grouped)  # position within its class
    return order[(rank >= start) & (rank < start + per_class)].sort().values


def build_dataset(
    data_path: str,
    split: str,
    subset: int | None = -1,
    transform: Callable[[Any], Any] | None = None,
    subset_start: int = 0,
    split_folder_ok: bool = False,
) -> InMemoryImages | SafeImageFolder:
    """The ``split`` of ``data_path`` ('fashion-mnist' or an ImageFolder root).

    ``transform`` applies per image to ImageFolder samples (ignored for in-memory
    data); ``subset`` > 0 keeps that many images per class, from each class's
    ``subset_start``-th on (``subset_per_class``). ``split_folder_ok``: a
    ``data_path`` without a ``split/`` folder but with class folders is the split itself
    (DINO's ``--data_path /imagenet/train``); one that holds ``val/`` is still an error.
    """
    if data_path == FASHION_MNIST:
        images, labels = load_fashion_mnist(split)
        ds = InMemoryImages(images, labels, FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    else:
        root = os.path.join(data_path, split)
        if not os.path.isdir(data_path):
            what = "is not a folder" if os.path.exists(data_path) else "does not exist"
            raise DataError(
                f"--data_path {data_path!r} {what} (expected a folder with {split}/<class>/<images>, "
                f"or '{FASHION_MNIST}')"
            )
        if not os.path.isdir(root) and split_folder_ok and _is_split_folder(data_path):
            logger.info(
                f"--data_path {data_path} has class folders and no '{split}/' folder: it is the {split} "
                "split itself (DINO's form; SimPool's and AttMask's give the folder that holds it)."
            )
            root = data_path
        if not os.path.isdir(root):
            raise DataError(f"--data_path {data_path!r} has no '{split}/' folder (expected {root}/<class>/<images>)")
        try:
            ds = SafeImageFolder(root, transform=transform)
        except FileNotFoundError as e:
            raise DataError(f"{root}: {e}") from None
        if len(ds) == 0:
            raise DataError(f"{root} holds no images (expected {root}/<class>/<images>)")
    if subset is not None and subset > 0:
        ds = ds.subset(subset_per_class(ds.labels, subset, subset_start))
    return ds


def check_enough_images(dataset: Sized, data_path: str, batch_size_per_gpu: int, world_size: int) -> None:
    """Every epoch drops its last incomplete global batch: a data set smaller than one trains nothing."""
    if len(dataset) < batch_size_per_gpu * world_size:
        raise DataError(
            f"{len(dataset)} training images in {data_path} are fewer than one global batch of "
            f"{batch_size_per_gpu * world_size} (--batch_size_per_gpu {batch_size_per_gpu} x "
            f"{world_size} process(es)); lower --batch_size_per_gpu or use fewer processes"
        )


def _is_split_folder(path: str) -> bool:
    """Whether ``path`` looks like one ImageFolder split: subfolders, none of them a split's name."""
    names = [e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")]
    return bool(names) and not {"train", "val", "test"} & set(names)


def check_same_classes(
    train: InMemoryImages | SafeImageFolder, val: InMemoryImages | SafeImageFolder, data_path: str
) -> None:
    """Labels are class indices in sorted folder order: an evaluation split with other class
    folders than train/ would be scored against the wrong labels."""
    if list(train.classes) != list(val.classes):
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(
            f"{data_path}: the training and evaluation splits have different class folders (only in "
            f"train: {', '.join(only_train[:5]) or '-'}; only in the evaluation split: "
            f"{', '.join(only_val[:5]) or '-'}); they must hold the same ones"
        )


def eval_transform(image_size: int) -> v2.Compose:
    """Per-image transform for ImageFolder evaluation, DINO's: resize the short side to
    image_size * 256/224 (bicubic), centre-crop image_size, keep uint8."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(int(round(image_size * 256 / 224)), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
        ]
    )


def normalize_batch(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], image_size: int | None = None
) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float normalised (B, 3, s, s); resizes in-memory images
    to ``image_size`` when it differs from theirs."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    x = images.float().div_(255)
    if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can begin an epoch part-way, after ``start`` of this
    rank's samples, so a mid-epoch resume neither repeats nor skips a sample.

    With ``draw_seeds`` it yields (index, seed) pairs, the seed a function of --seed, the
    epoch and the index only, for data sets that crop in loader workers (SafeImageFolder):
    an image's crops then do not depend on which worker serves it, on --num_workers, or on
    where a resumed epoch began."""

    def __init__(self, *args: Any, draw_seeds: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start = 0
        self.draw_seeds = draw_seeds

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        indices = itertools.islice(super().__iter__(), self.start, None)
        if not self.draw_seeds:
            return indices
        epoch_key = (self.seed * 1_000_003 + self.epoch) << 32
        return ((i, (epoch_key | i) % 2**63) for i in indices)

    def __len__(self) -> int:
        return self.num_samples - self.start


def training_loader(
    dataset: Dataset, augment: MultiCropAugmentation, args: argparse.Namespace, device: torch.device
) -> tuple[ResumableSampler, DataLoader, int]:
    """(sampler, loader, steps per epoch) of main_dino.py: uint8 images in, each batch's multi-crop
    geometry done (in loader workers for image folders, on the device for in-memory sets), the
    photometric part left to ``augment`` on the device. Each epoch drops its last incomplete batch."""
    in_memory = is_in_memory(dataset)
    sampler = ResumableSampler(
        dataset,
        num_replicas=args.world_size,
        rank=args.rank,
        shuffle=True,
        seed=args.seed,
        drop_last=True,
        draw_seeds=not in_memory,
    )
    if in_memory:
        collate = lambda b: (b, [])  # noqa: E731  ((globals, locals), no unreadable files)
    else:
        collate = skip_bad_collate(lambda s: (augment.collate([x for x, _ in s]), torch.tensor([y for _, y in s])))
    # the loader's own RNG: iter(loader) must not draw from the training stream, or a mid-epoch resume
    # (RNG restored, then a new iterator) would shift every later draw
    loader = DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size_per_gpu,
        drop_last=True,
        num_workers=0 if in_memory else args.num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate,
        generator=torch.Generator(),
    )
    return sampler, loader, sampler.num_samples // args.batch_size_per_gpu


def is_in_memory(dataset: Dataset) -> bool:
    """Whether ``dataset`` holds its images in memory (Fashion-MNIST, synthetic) rather than as files."""
    return not hasattr(dataset, "samples")
