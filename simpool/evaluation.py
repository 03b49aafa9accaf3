"""Shared plumbing of the evaluation CLIs (eval_knn, eval_linear): the train/val splits,
a collate that survives unreadable files, precision, and the one-line error exit.

Example:
    >>> train, val = build_eval_splits("fashion-mnist", image_size=28, subset=10, val_subset=5)
    >>> len(train), len(val), train.classes[0]
    (100, 50, 'T-shirt/top')
"""
import logging

import torch
from torch.utils.data import default_collate

import utils
from utils import number, subset_size
from simpool.data import FASHION_MNIST, DataError, build_dataset, check_same_classes, eval_transform

logger = logging.getLogger("simpool")
__all__ = ["EvalError", "build_eval_splits", "tolerant_collate", "drop_unreadable", "amp_dtype", "run_main",
           "is_in_memory"]


class EvalError(ValueError):
    """A user-facing problem with the evaluation's inputs; its message is one line."""


def is_in_memory(dataset):
    """True for the built-in Fashion-MNIST (uint8 tensors held in memory), False for ImageFolder trees."""
    return not hasattr(dataset, "samples")


def build_eval_splits(data_path, image_size, subset=-1, val_subset=-1, train_transform=None, seed=0):
    """(train, val) datasets: Fashion-MNIST's train/test splits, or ``DATA/train`` and
    ``DATA/val`` ImageFolders (val resized and centre-cropped to ``image_size``; train
    with ``train_transform``, default the same as val). ``subset``/``val_subset`` > 0
    keep that many images per class."""
    val_tf = eval_transform(image_size)
    train = build_dataset(data_path, "train", subset, transform=train_transform or val_tf, seed=seed)
    val = build_dataset(data_path, "test" if data_path == FASHION_MNIST else "val", val_subset,
                        transform=val_tf, seed=seed)
    check_same_classes(train, val, data_path)
    return train, val


def tolerant_collate(image_size):
    """Collate for SafeImageFolder samples: an unreadable file becomes a black image with
    label -1 (so every rank keeps its exact shard size), logged as a warning; drop those
    rows afterwards with ``drop_unreadable``."""
    def collate(samples):
        out = []
        for s in samples:
            if isinstance(s, str):  # data._BadSample: the path of a file that could not be read
                logger.warning(f"skipped unreadable image {s}")
                out.append((torch.zeros(3, image_size, image_size, dtype=torch.uint8), -1))
            else:
                out.append((torch.as_tensor(s[0]).as_subclass(torch.Tensor), s[1]))
        return default_collate(out)
    return collate


def drop_unreadable(feats, labels):
    keep = labels >= 0
    if not bool(keep.all()):
        logger.warning(f"{int((~keep).sum())} unreadable images left out.")
    return feats[keep], labels[keep]


def amp_dtype(precision):
    """bf16 autocast dtype, or None for fp32."""
    return torch.bfloat16 if precision == "bf16" else None


def run_main(fn, args):
    """Run ``fn(args)``; user-facing errors print ``error: ...`` and exit with code 2
    (utils.USER_ERROR_EXIT), never a traceback."""
    return utils.run_command(fn, args, user_errors=(DataError, EvalError))


def add_data_args(parser):
    """The data flags shared by eval_knn and eval_linear; returns their argument group."""
    g = parser.add_argument_group("data")
    g.add_argument("--data_path", default="fashion-mnist", type=str, help="ImageFolder root holding train/ and "
                   "val/ (<class>/<image> each), or 'fashion-mnist' (its train and test splits).")
    g.add_argument("--image_size", default=None, type=number(int, low=1), help="Side of the images the backbone sees; "
                   "default: the checkpoint's training size (global_crops_size), else 224. A ViT's pos_embed is "
                   "resized to fit; convnets see at least 32 px (a smaller size is raised to 32, logged).")
    g.add_argument("--subset", default=-1, type=subset_size, help="Keep this many training images per class "
                   "(-1: all).")
    g.add_argument("--val_subset", default=-1, type=subset_size, help="Keep this many evaluation images per "
                   "class (-1: all).")
    return g
