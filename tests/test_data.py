"""Tests for simpool/data.py: Fashion-MNIST loading, per-class subsets, bad-file-tolerant ImageFolder, normalisation."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from simpool.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    DataError,
    InMemoryImages,
    SafeImageFolder,
    build_dataset,
    eval_transform,
    load_fashion_mnist,
    normalize_batch,
    skip_bad_collate,
    subset_per_class,
)

HAS_FMNIST = os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
needs_fmnist = pytest.mark.skipif(not HAS_FMNIST, reason="Debian package dataset-fashion-mnist not installed")


# ---------------------------------------------------------------- Fashion-MNIST
@pytest.fixture(scope="module")
def fmnist_train():
    return load_fashion_mnist("train")


@needs_fmnist
def test_load_fashion_mnist_train(fmnist_train):
    images, labels = fmnist_train
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert labels.min() == 0 and labels.max() == 9
    assert torch.bincount(labels).tolist() == [6000] * 10
    # real pictures: exact-zero background and bright objects
    assert images.max() == 255 and (images == 0).float().mean() > 0.3
    assert images.float().mean().div(255).item() == pytest.approx(0.2860, abs=0.002)


@needs_fmnist
def test_load_fashion_mnist_test_split():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 1, 28, 28) and torch.bincount(labels).tolist() == [1000] * 10


@needs_fmnist
def test_build_dataset_fashion_mnist_subset(fmnist_train):
    ds = build_dataset("fashion-mnist", "train", subset=3, subset_start=2)
    assert isinstance(ds, InMemoryImages) and len(ds) == 30
    assert ds.classes == FASHION_MNIST_CLASSES
    assert torch.bincount(ds.labels).tolist() == [3] * 10
    # the subset's images are the source images at the chosen indices
    idx = subset_per_class(fmnist_train[1], 3, start=2)
    assert torch.equal(ds.images, fmnist_train[0][idx])
    images, labels = ds.__getitems__([0, 5, 7])
    assert images.shape == (3, 1, 28, 28) and torch.equal(labels, ds.labels[[0, 5, 7]])


def first_per_class(labels, per_class, start):
    """AttMask's (OBoW's) subset, written as its loop: each class's indices in order, sliced."""
    by_class = {}
    for i, c in enumerate(labels):
        by_class.setdefault(c, []).append(i)
    return sorted(i for indices in by_class.values() for i in indices[start : start + per_class])


@pytest.mark.parametrize("per_class,start", [(4, 0), (1, 0), (3, 2), (4, 8), (100, 0)])
def test_subset_per_class_is_attmasks_first_images_of_each_class(per_class, start):
    # before: a seeded random draw, so AttMask's --subset 260 (its 20% ImageNet split) and its
    # low-shot --subset_starts sets were other images here
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7 + [5] * 1)
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))].tolist()
    idx = subset_per_class(labels, per_class, start)
    assert idx.tolist() == first_per_class(labels, per_class, start)
    counts = torch.bincount(torch.tensor(labels)[idx], minlength=6).tolist()
    assert counts == [max(0, min(per_class, n - start)) for n in (10, 3, 7, 0, 0, 1)]


def test_subset_starts_step_through_disjoint_sets():
    labels = torch.arange(1000) % 7
    sets = [set(subset_per_class(labels, 5, start).tolist()) for start in (0, 5, 10, 15, 20)]
    assert all(len(s) == 35 for s in sets) and len(set.union(*sets)) == 5 * 35


# ---------------------------------------------------------------- ImageFolder with bad files
def _png_bytes(colour, size=(6, 5)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(size=(32, 32)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    (root / "train" / "cat").mkdir(parents=True)
    (root / "train" / "dog").mkdir(parents=True)
    (root / "train" / "cat" / "a.png").write_bytes(_png_bytes((255, 0, 0)))
    (root / "train" / "cat" / "b.png").write_bytes(_png_bytes((0, 255, 0)))
    jpeg = _jpeg_bytes()
    (root / "train" / "cat" / "corrupt.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # truncated
    (root / "train" / "dog" / "c.png").write_bytes(_png_bytes((0, 0, 255)))
    (root / "train" / "dog" / "notes.png").write_text("this is not an image\n")
    (root / "train" / "dog" / "garbage.jpg").write_bytes(os.urandom(300))
    (root / "train" / "dog" / ".hidden.png").write_text("editor backup")  # dot files are not samples
    return root


def _to_tensor(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def test_safe_image_folder_returns_bad_samples(folder):
    ds = build_dataset(str(folder), "train", transform=_to_tensor)
    assert isinstance(ds, SafeImageFolder)
    assert ds.classes == ["cat", "dog"]
    names = [os.path.basename(p) for p, _ in ds.samples]
    assert ".hidden.png" not in names and len(ds) == 6
    bad = {"corrupt.jpg", "notes.png", "garbage.jpg"}
    for i, (path, target) in enumerate(ds.samples):
        item = ds[i]
        if os.path.basename(path) in bad:
            assert isinstance(item, str) and item == path
        else:
            image, label = item
            assert label == target and image.shape == (3, 5, 6) and image.dtype == torch.uint8
    torch.testing.assert_close(ds.labels, torch.tensor([0, 0, 0, 1, 1, 1]))


def test_skip_bad_collate_drops_and_reports(folder):
    ds = build_dataset(str(folder), "train", transform=_to_tensor)
    loader = DataLoader(ds, batch_size=6, shuffle=False, collate_fn=skip_bad_collate())
    (images, labels), bad = next(iter(loader))
    assert images.shape == (3, 3, 5, 6)
    assert labels.tolist() == [0, 0, 1]
    # colours of the good images, in order: red, green (cat), blue (dog)
    assert images[:, :, 0, 0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    assert sorted(os.path.basename(p) for p in bad) == ["corrupt.jpg", "garbage.jpg", "notes.png"]
    assert all(os.path.isabs(p) or os.path.exists(p) for p in bad)
    # a batch of only bad samples gives no batch, just the paths
    collate = skip_bad_collate()
    batch, bad_only = collate([ds[2], ds[4]])
    assert batch is None and len(bad_only) == 2


def test_safe_image_folder_subset(folder):
    ds = build_dataset(str(folder), "train", subset=1, transform=_to_tensor)
    assert len(ds) == 2 and sorted(ds.labels.tolist()) == [0, 1]
    assert ds.classes == ["cat", "dog"]
    # the first file of each class by name, as AttMask's ImageFolder subsets
    assert [os.path.basename(p) for p, _ in ds.samples] == ["a.png", "c.png"]
    ds = build_dataset(str(folder), "train", subset=2, subset_start=1, transform=_to_tensor)
    assert [os.path.basename(p) for p, _ in ds.samples] == ["b.png", "corrupt.jpg", "garbage.jpg", "notes.png"]


def _one_line_data_error(path, split="train"):
    with pytest.raises(DataError) as info:
        build_dataset(path, split)
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


def test_missing_data_path(tmp_path):
    msg = _one_line_data_error(str(tmp_path / "nowhere"))
    assert "nowhere" in msg


def test_missing_split_folder(tmp_path):
    (tmp_path / "val" / "cat").mkdir(parents=True)
    msg = _one_line_data_error(str(tmp_path))
    assert "train" in msg


def test_empty_train_folder(tmp_path):
    (tmp_path / "train").mkdir()
    assert "train" in _one_line_data_error(str(tmp_path))


def test_train_folder_with_empty_classes(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / ".DS_Store").write_text("x")
    assert "no images" in _one_line_data_error(str(tmp_path))


# ---------------------------------------------------------------- normalisation
def test_normalize_batch_gray_expands_and_normalises():
    images = torch.tensor([[[[0, 51], [255, 102]]]], dtype=torch.uint8)  # (1, 1, 2, 2)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    out = normalize_batch(images, mean, std)
    assert out.shape == (1, 3, 2, 2) and out.dtype == torch.float32
    pix = torch.tensor([[0.0, 0.2], [1.0, 0.4]])
    for c in range(3):
        torch.testing.assert_close(out[0, c], (pix - mean[c]) / std[c])


def test_normalize_batch_rgb_and_resize():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = normalize_batch(images, mean, std, image_size=4)  # same size: no resampling
    expected = (images.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    const = torch.full((2, 1, 28, 28), 128, dtype=torch.uint8)
    big = normalize_batch(const, (0.5,) * 3, (0.25,) * 3, image_size=32)
    assert big.shape == (2, 3, 32, 32)
    torch.testing.assert_close(big, torch.full_like(big, (128 / 255 - 0.5) / 0.25), rtol=0, atol=1e-5)


def test_eval_transform_is_dinos_bicubic_resize_and_centre_crop():
    # DINO evaluates on Resize(256, bicubic) + CenterCrop(224); PIL's resize is the reference.
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    got = eval_transform(224)(image)
    assert got.shape == (3, 224, 224) and got.dtype == torch.uint8

    def pil(resample):
        resized = np.asarray(image.resize((341, 256), resample), dtype=np.float64)  # short side 256
        top, left = (256 - 224) // 2, (341 - 224) // 2
        return torch.from_numpy(resized[top : top + 224, left : left + 224]).permute(2, 0, 1)

    bicubic, bilinear = ((got.double() - pil(r)).abs().mean().item() for r in (Image.BICUBIC, Image.BILINEAR))
    assert bicubic < 1.0 and bilinear > 3 * bicubic, (bicubic, bilinear)
