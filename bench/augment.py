"""Multi-crop augmentation throughput, ours against the official DINO pipeline, one core.

    python bench/augment.py [--data_path DIR] [--rounds 5] [--batch_size 32]

DIR is searched recursively for JPEG/PNG files (default: 640x480 JPEGs made from
scikit-image's bundled photos in a temporary folder). Both pipelines make the same crops
(2 x 224 + 6 x 96, DINO's scales and probabilities) from every file, starting from the
file on disk:

* reference (``bench/reference.py``): torchvision ImageFolder's loader (full PIL decode,
  RGB) + DINO's ``DataAugmentationDINO`` (per-crop PIL pipelines, ToTensor, Normalize) +
  the DataLoader's default collate;
* ours: ``SafeImageFolder.__getitem__`` with ``MultiCropAugmentation.crop_image`` (decode,
  reduced-scale JPEG decoding where every crop allows it, one PIL resize per crop, uint8),
  ``MultiCropAugmentation.collate`` and the batched photometric stage
  (``photometric``: colour jitter, grayscale, blur, solarize, normalise) on the CPU, as
  main_dino.py runs them for an ImageFolder.

Everything runs in this process on one thread; the two pipelines alternate, one pass over
all files each per round, and the figures are medians over rounds of images per second of
wall time and of this process's CPU time (the fairer figure when other jobs share the cores).
The output check asserts equal shapes, dtype float32 and values within the normalised
[0, 1] range for both, and prints their per-channel statistics.
"""

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.machine import describe  # noqa: E402
from bench.reference import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO, pil_loader  # noqa: E402
from simpool.augment import MultiCropAugmentation  # noqa: E402
from simpool.data import SafeImageFolder  # noqa: E402
from simpool.utils import number  # noqa: E402

GLOBAL_SCALE, LOCAL_SCALE, N_LOCAL, G, L = (0.4, 1.0), (0.05, 0.4), 6, 224, 96


def make_jpegs(folder, size=(640, 480), quality=90):
    """640x480 JPEGs from scikit-image's bundled colour photos: 4 views of each."""
    import numpy as np
    import skimage.data
    from PIL import Image, ImageOps

    paths = []
    for name in (
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "hubble_deep_field",
        "immunohistochemistry",
        "retina",
        "stereo_motorcycle",
    ):
        a = getattr(skimage.data, name)()
        a = a[0] if isinstance(a, tuple) else a
        img = Image.fromarray(np.ascontiguousarray(a[..., :3]))
        w, h = img.size
        views = [img, ImageOps.mirror(img), img.crop((0, 0, w * 3 // 4, h * 3 // 4)), img.crop((w // 4, h // 4, w, h))]
        for i, v in enumerate(views):
            path = os.path.join(folder, f"{name}_{i}.jpg")
            ImageOps.fit(v, size, Image.LANCZOS).save(path, quality=quality)
            paths.append(path)
    return paths


def find_images(root):
    exts = (".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG")
    return sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True) if p.endswith(exts))


def reference_pass(paths, aug):
    out = [aug(pil_loader(p)) for p in paths]
    return [torch.stack([crops[v] for crops in out]) for v in range(len(out[0]))]  # default_collate


def our_pass(paths, aug, batch_size):
    ds = SafeImageFolder.__new__(SafeImageFolder)  # the training loader's __getitem__, on a flat file list
    ds.samples = [(p, 0) for p in paths]
    ds.transform = aug.crop_image
    ds.loader = None
    out_g, out_l = [], []
    for start in range(0, len(paths), batch_size):
        samples = [ds[i][0] for i in range(start, min(start + batch_size, len(paths)))]
        g, l = aug.photometric(*aug.collate(samples))
        out_g.append(g)
        out_l.append(l)
    return out_g, out_l


def timed(fn, *args):
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - w, time.process_time() - c


def check_outputs(ref, ours, n):
    """Same crops, same tensors: shapes, dtype and normalisation of both pipelines."""
    ref_g, ref_l = torch.cat(ref[:2]), torch.cat(ref[2:])
    g, l = (
        torch.cat([x.view(2, -1, 3, G, G) for x in ours[0]], 1).flatten(0, 1),
        torch.cat([x.view(N_LOCAL, -1, 3, L, L) for x in ours[1]], 1).flatten(0, 1),
    )
    assert ref_g.shape == g.shape == (2 * n, 3, G, G), (ref_g.shape, g.shape)
    assert ref_l.shape == l.shape == (N_LOCAL * n, 3, L, L), (ref_l.shape, l.shape)
    assert ref_g.dtype == g.dtype == ref_l.dtype == l.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    lines = []
    for name, x in (("reference", ref_g), ("ours", g), ("reference locals", ref_l), ("ours locals", l)):
        lo, hi = ((0 - mean) / std - 1e-4), ((1 - mean) / std + 1e-4)
        assert ((x >= lo) & (x <= hi)).all(), f"{name}: values outside the normalised [0, 1] range"
        pix = x * std + mean  # back to [0, 1]
        lines.append(
            f"  {name:17s} {tuple(x.shape[1:])} {x.dtype}: pixel mean per channel "
            f"{[round(v, 3) for v in pix.mean((0, 2, 3)).tolist()]}, std "
            f"{[round(v, 3) for v in pix.std((0, 2, 3)).tolist()]}"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_path", default=None, help="folder of images (default: generated 640x480 JPEGs)")
    p.add_argument("--rounds", type=number(int, low=1), default=5, help="alternating passes of each pipeline")
    p.add_argument("--batch_size", type=number(int, low=1), default=32, help="images per photometric batch (ours)")
    p.add_argument("--limit", type=number(int, low=0), default=0, help="use at most this many files (0: all)")
    args = p.parse_args()
    torch.set_num_threads(1)
    tmp = None
    if args.data_path is None:
        tmp = tempfile.TemporaryDirectory()
        paths = make_jpegs(tmp.name)
        source = f"{len(paths)} generated 640x480 JPEGs (scikit-image photos, quality 90)"
    else:
        paths = find_images(args.data_path)
        if not paths:
            sys.exit(f"error: no JPEG/PNG files under {args.data_path}")
        source = f"{len(paths)} files under {args.data_path}"
    if args.limit:
        paths = paths[: args.limit]
    ref_aug = DataAugmentationDINO(GLOBAL_SCALE, LOCAL_SCALE, N_LOCAL, G, L)
    our_aug = MultiCropAugmentation(GLOBAL_SCALE, LOCAL_SCALE, N_LOCAL, G, L)
    torch.manual_seed(0)
    ref_out = reference_pass(paths, ref_aug)  # warm-up, and the outputs for the check
    our_out = our_pass(paths, our_aug, args.batch_size)
    report = check_outputs(ref_out, our_out, len(paths))
    times = {"reference": [], "ours": []}
    for _ in range(args.rounds):
        for name, fn, a in (
            ("reference", reference_pass, (paths, ref_aug)),
            ("ours", our_pass, (paths, our_aug, args.batch_size)),
        ):
            _, wall, cpu = timed(fn, *a)
            times[name].append((len(paths) / wall, len(paths) / cpu))
    n = len(paths)
    print(describe(threads=1))
    print(f"data: {source}; crops 2x{G} + {N_LOCAL}x{L}; {args.rounds} alternating rounds of {n} images")
    print("outputs (same shapes/dtype/normalisation):\n" + report)
    res = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in times.items()}
    for k, (wall, cpu) in res.items():
        print(f"{k:9s}: {wall:6.1f} images/s/core (wall)   {cpu:6.1f} images per CPU-second")
    print(
        f"ratio ours/reference: {res['ours'][0] / res['reference'][0]:.2f}x (wall), "
        f"{res['ours'][1] / res['reference'][1]:.2f}x (CPU time)"
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
