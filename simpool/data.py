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
import gzip
import logging
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from simpool.augment import IMAGENET_MEAN, IMAGENET_STD, eight_bit

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN = (0.2860,) * 3
FASHION_MNIST_STD = (0.3530,) * 3
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
_BAD_IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
logger = logging.getLogger("simpool")

__all__ = ["DataError", "build_dataset", "load_fashion_mnist", "InMemoryImages", "SafeImageFolder",
           "skip_bad_collate", "normalize_batch"]


class DataError(ValueError):
    """A user-facing problem with the data path; its message is one line."""


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split, root=FASHION_MNIST_DIR):
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
        raise DataError(f"Fashion-MNIST not found in {root} and could not be downloaded ({e}); "
                        "install it with: apt-get install -y dataset-fashion-mnist") from None
    return ds.data.unsqueeze(1).clone(), ds.targets.clone()


class InMemoryImages(Dataset):
    """Equal-size uint8 images held in one tensor; ``__getitems__`` serves a whole
    batch with one index, so a DataLoader with ``collate_fn=tuple`` costs nothing
    per sample."""

    def __init__(self, images, labels, classes, mean, std):
        self.images, self.labels, self.classes = images, labels, classes
        self.mean, self.std = mean, std

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def __getitems__(self, indices):
        indices = torch.as_tensor(indices)
        return self.images[indices], self.labels[indices]

    def subset(self, indices):
        return InMemoryImages(self.images[indices], self.labels[indices], self.classes, self.mean, self.std)


class SafeImageFolder(ImageFolder):
    """ImageFolder that returns ``None`` for unreadable, truncated or non-image files
    instead of raising; ``skip_bad_collate`` drops them and reports their paths.

    An item may be asked for as ``(index, seed)``: the transform then draws its random
    numbers from a generator seeded with ``seed`` (and leaves the process's stream as it was),
    so the result depends on the pair alone, not on the loader worker or what it served before.
    """

    def __init__(self, root, transform=None):
        super().__init__(root, transform=transform, is_valid_file=lambda p: not os.path.basename(p).startswith("."),
                         allow_empty=True)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    def __getitem__(self, index):
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

    def subset(self, indices):
        out = SafeImageFolder.__new__(SafeImageFolder)
        out.__dict__.update(self.__dict__)
        out.samples = [self.samples[i] for i in indices]
        out.targets = [s[1] for s in out.samples]
        out.imgs = out.samples
        return out

    @property
    def labels(self):
        return torch.as_tensor(self.targets)


class _BadSample(str):
    """Path of a sample that could not be read (a str, so it crosses worker queues)."""


def skip_bad_collate(inner=default_collate):
    """Wrap a collate function: drop unreadable samples; return (batch, bad_paths)."""
    def collate(samples):
        good = [s for s in samples if not isinstance(s, _BadSample)]
        bad = [str(s) for s in samples if isinstance(s, _BadSample)]
        return (inner(good) if good else None), bad
    return collate


def subset_per_class(labels, per_class, start=0):
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


def build_dataset(data_path, split, subset=-1, transform=None, subset_start=0, split_folder_ok=False):
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
            raise DataError(f"--data_path {data_path!r} {what} (expected a folder with {split}/<class>/<images>, "
                            f"or '{FASHION_MNIST}')")
        if not os.path.isdir(root) and split_folder_ok and _is_split_folder(data_path):
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


def _is_split_folder(path):
    """Whether ``path`` looks like one ImageFolder split: subfolders, none of them a split's name."""
    names = [e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")]
    return bool(names) and not {"train", "val", "test"} & set(names)


def check_same_classes(train, val, data_path):
    """Labels are class indices in sorted folder order: an evaluation split with other class
    folders than train/ would be scored against the wrong labels."""
    if list(train.classes) != list(val.classes):
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"{data_path}: the training and evaluation splits have different class folders (only in "
                        f"train: {', '.join(only_train[:5]) or '-'}; only in the evaluation split: "
                        f"{', '.join(only_val[:5]) or '-'}); they must hold the same ones")


def eval_transform(image_size):
    """Per-image transform for ImageFolder evaluation, DINO's: resize the short side to
    image_size * 256/224 (bicubic), centre-crop image_size, keep uint8."""
    return v2.Compose([v2.ToImage(), v2.Resize(int(round(image_size * 256 / 224)),
                                               interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(image_size)])


def normalize_batch(images, mean, std, image_size=None):
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
