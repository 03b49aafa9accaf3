"""Count the FLOPs of a main_dino.py run, the zero-config demo by default, and check them
against a budget: training steps plus the online k-NN passes, counted with
``torch.utils.flop_counter`` on one real step (no timing, so the figure is the same on every
machine).

    python bench/demo_flops.py                       # the demo recipe, against the 50 TFLOP budget
    python bench/demo_flops.py --epochs 3 --local_crops_number 6   # the demo with flags changed

The budget is what 2 AVX2-only cores (no bf16 instructions: the demo runs in fp32 there) do in
about 15 minutes at the ~76 GFLOP/s of fp32 matrix products on 2 Zen 3 cores; exits 1 above it, so
``tests/test_demo_budget.py`` fails when the demo outgrows slow machines.
"""

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main_dino  # noqa: E402
from bench.flops import count  # noqa: E402, F401  (tests count with it too)
from bench.train_step import Ours  # noqa: E402
from simpool.evaluation import FrozenFeatures  # noqa: E402

DEMO_BUDGET_TFLOP = 50.0
FASHION_MNIST_SPLITS = (60_000, 10_000)  # the demo's k-NN memory bank and queries


def step_flops(args, batch=32):
    """FLOPs of one training step of ``args`` per image, as ``bench/train_step.py`` runs it (teacher
    forward, masks, student forward and backward, losses; the optimizer update and EMA are
    element-wise, not counted), on ``batch`` random images in fp32 (FLOPs do not depend on the
    precision)."""
    args = copy.copy(args)
    args.batch_size_per_gpu, args.precision, args.use_fp16, args.device = batch, "fp32", False, torch.device("cpu")
    torch.manual_seed(args.seed)
    return count(Ours(args).step) / batch


def feature_flops(args, batch=32):
    """FLOPs of the k-NN feature of one evaluation image (the teacher backbone at --global_crops_size)."""
    backbone = main_dino.build_network(args, 0.0, teacher=True).backbone.eval()
    features = FrozenFeatures(backbone, args.n_last_blocks, args.avgpool_patchtokens)
    x = torch.randn(batch, 3, args.global_crops_size, args.global_crops_size)
    with torch.no_grad():
        return count(lambda: features(x)) / batch, features.dim


def run_flops(args, train_images=FASHION_MNIST_SPLITS[0], test_images=FASHION_MNIST_SPLITS[1]):
    """{'step', 'train', 'knn_pass', 'knn_passes', 'total'} FLOPs of ``args``' run on a data set of
    ``train_images`` (one process: steps of --batch_size_per_gpu, the last incomplete batch dropped)."""
    per_image = step_flops(args)
    steps = train_images // args.batch_size_per_gpu * args.epochs
    image_flops, dim = feature_flops(args)
    # features of both splits, then the similarity of every query with every bank row
    knn_pass = image_flops * (train_images + test_images) + 2 * train_images * test_images * dim
    passes = 0
    if args.eval_every > 0:  # before training, every eval_every epochs, and after the last
        passes = 1 + len({e for e in range(1, args.epochs + 1) if e % args.eval_every == 0 or e == args.epochs})
    step = per_image * args.batch_size_per_gpu
    train = step * steps
    return {
        "step": step,
        "steps": steps,
        "train": train,
        "knn_pass": knn_pass,
        "knn_passes": passes,
        "total": train + passes * knn_pass,
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="bench/demo_flops.py",
        description=__doc__.split("\n\n")[0],
        epilog="Every other flag is a main_dino.py flag and changes the recipe.",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=DEMO_BUDGET_TFLOP,
        help="TFLOP the run may cost (default "
        "%(default)s: 15 minutes of the demo on 2 AVX2 cores in fp32); exit 1 above it.",
    )
    own, rest = p.parse_known_args(argv)
    args = main_dino.parse_args(rest)
    f = run_flops(args)
    print(
        f"recipe: {args.arch}/{args.patch_size}, batch {args.batch_size_per_gpu}, {args.global_crops_number}x"
        f"{args.global_crops_size}^2 + {args.local_crops_number}x{args.local_crops_size}^2 crops, out_dim "
        f"{args.out_dim}, head {args.head_hidden_dim}/{args.head_bottleneck_dim}, {args.epochs} epochs"
    )
    print(f"  step: {f['step'] / 1e9:.1f} GFLOP x {f['steps']} steps = {f['train'] / 1e12:.2f} TFLOP of training")
    print(f"  k-NN: {f['knn_pass'] / 1e12:.2f} TFLOP a pass x {f['knn_passes']} passes")
    verdict = "within" if f["total"] <= own.budget * 1e12 else "OVER"
    print(f"total: {f['total'] / 1e12:.2f} TFLOP, {verdict} the budget of {own.budget:g} TFLOP")
    return 0 if verdict == "within" else 1


if __name__ == "__main__":
    sys.exit(main())
