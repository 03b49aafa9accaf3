"""Backbones of ``simpool.build_backbone``: parameters, pooled width, and the time of one
DINO training step on this machine.

    .venv/bin/python bench/backbones.py                                  # every backbone
    .venv/bin/python bench/backbones.py --archs resnet50 fcvit_tiny --batch 2 --threads 1

One step is the pretraining step of main_dino.py without masking: the teacher (EMA copy,
no gradients) embeds the 2 global crops of each image, the student embeds the 2 global
and the local crops, both through a DINOHead (default out_dim 65536); the DINO loss,
backward, AdamW step and EMA update follow; forward passes under --precision (auto: bf16 autocast
where this CPU has bf16 matrix instructions, else fp32). Random
tensors stand in for the crops. The figures are the fastest of ``--steps`` timed steps
after one warm-up step: wall-clock seconds, and CPU seconds of this process (summed over
its threads), which a shared machine's other jobs inflate much less than wall time.
"""

import argparse
import copy
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import torch  # noqa: E402

from bench.machine import describe  # noqa: E402
from simpool import fcvit  # noqa: E402
from simpool import vision_transformer as vits  # noqa: E402
from simpool.backbones import ARCHS, FCVIT_ARCHS, build_backbone  # noqa: E402
from simpool.losses import DINOLoss  # noqa: E402
from simpool.optim import build_optimizer, ema_update, param_groups  # noqa: E402
from simpool.precision import autocast, autocast_dtype, resolve_precision  # noqa: E402
from simpool.utils import number  # noqa: E402

DEFAULT_ARCHS = [
    "vit_small",
    "resnet50",
    "convnext_tiny",
    "convnext_small",
    "convnext_base",
    "fcvit_tiny",
    "fcvit_b12",
    "fcvit_b24",
    "fcvit_b48",
]


def count(module):
    return sum(p.numel() for p in module.parameters())


def build_shapes_only(arch, **kwargs):
    """The backbone on the meta device (no weights initialised) where its constructor allows."""
    try:
        with torch.device("meta"):
            return build_backbone(arch, **kwargs)
    except NotImplementedError:  # the ViT's initialisation reads values
        return build_backbone(arch, **kwargs)


def step_time(arch, args):
    torch.manual_seed(0)
    backbone = build_backbone(
        arch, patch_size=args.patch_size, img_size=args.global_size, mode=args.mode, drop_path_rate=0.1
    )
    head = vits.DINOHead(backbone.embed_dim, args.out_dim)
    student = torch.nn.ModuleDict({"backbone": backbone, "head": head})
    teacher = copy.deepcopy(student).requires_grad_(False)
    loss_fn = DINOLoss(args.out_dim, ncrops=2 + args.local_crops)
    optimizer = build_optimizer("adamw", param_groups(student))
    for group in optimizer.param_groups:
        group["lr"] = 1e-4
    globals_ = torch.randn(2 * args.batch, 3, args.global_size, args.global_size)
    locals_ = torch.randn(args.local_crops * args.batch, 3, args.local_size, args.local_size)
    if args.channels_last:
        fmt = torch.channels_last
        student.to(memory_format=fmt), teacher.to(memory_format=fmt)
        globals_, locals_ = globals_.contiguous(memory_format=fmt), locals_.contiguous(memory_format=fmt)
    dtype = autocast_dtype(args.precision)
    times, cpu_times = [], []
    for i in range(1 + args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        with autocast("cpu", dtype):
            with torch.no_grad():
                target = teacher["head"](teacher["backbone"](globals_))
            pooled = torch.cat([backbone(globals_), backbone(locals_)]) if args.local_crops else backbone(globals_)
            loss = loss_fn(head(pooled), target, teacher_temp=0.04)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema_update(teacher, student, 0.996)
        if i:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return min(times), min(cpu_times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--archs",
        nargs="+",
        default=DEFAULT_ARCHS,
        choices=ARCHS,
        help="backbones to measure (default: vit_small and every convnet and FCViT)",
    )
    p.add_argument(
        "--mode", default="simpool", choices=["simpool", "official"], help="ViTs: SimPool pooling or the [CLS] token"
    )
    p.add_argument(
        "--batch", type=number(int, low=1), default=8, help="images per step (each gives 2 global + local crops)"
    )
    p.add_argument("--global_size", type=number(int, low=1), default=224, help="global crop side (px)")
    p.add_argument("--local_size", type=number(int, low=1), default=96, help="local crop side (px)")
    p.add_argument("--local_crops", type=number(int, low=0), default=6, help="local crops per image")
    p.add_argument("--patch_size", type=number(int, low=1), default=16, help="ViT/FCViT patch size")
    p.add_argument("--out_dim", type=number(int, low=1), default=65536, help="DINO head output width")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp32"],
        help="bf16 autocast or fp32; auto: bf16 on CPUs with bf16 matrix instructions, else fp32",
    )
    p.add_argument("--steps", type=number(int, low=1), default=2, help="timed steps (after one warm-up step)")
    p.add_argument("--threads", type=number(int, low=1), default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--channels_last", action="store_true", help="models and crops in channels-last memory format")
    p.add_argument("--no_time", action="store_true", help="parameters only")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    choice = resolve_precision(args.precision, torch.device("cpu"))
    args.precision = choice.name
    print(describe())
    print(choice.log_line())
    print(f"python {platform.python_version()}, timm {timm.__version__}")
    print(
        f"step: batch {args.batch} = {2 * args.batch}x{args.global_size}^2 global + "
        f"{args.local_crops * args.batch}x{args.local_size}^2 local crops, {args.precision} autocast, "
        f"DINOHead out_dim {args.out_dim}, mode {args.mode}{', channels-last' if args.channels_last else ''}; "
        f"fastest of {args.steps} after 1 warm-up\n"
    )

    print(
        "| backbone | params, simpool mode (M) | params, official mode (M) | pooled dim | step, wall (s) "
        "| step, CPU (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for arch in args.archs:
        official = count(build_shapes_only(arch, mode="official", patch_size=args.patch_size))
        model = build_shapes_only(arch, mode="simpool", patch_size=args.patch_size)
        simpool_mode, dim = count(model), model.embed_dim
        seconds = " | " if args.no_time else " | ".join(f"{t:.1f}" for t in step_time(arch, args))
        print(f"| {arch} | {simpool_mode / 1e6:.2f} | {official / 1e6:.2f} | {dim} | {seconds} |", flush=True)

    print(
        "\nFCViT with its 1000-class classifier (GroupNorm, spatial mean, linear), against the released code's "
        "count and the authors' README table (which the released code does not match):\n"
    )
    print("| model | measured (M) | released code (M) | their README (M) |")
    print("|---|---:|---:|---:|")
    for arch in FCVIT_ARCHS:
        with torch.device("meta"):
            n = count(fcvit.build_fcvit(arch, num_classes=1000))
        print(
            f"| {arch} | {n / 1e6:.3f} | {fcvit.RELEASED_PARAMS[arch] / 1e6:.3f} | "
            f"{fcvit.README_PARAMS[arch] / 1e6:.1f} |"
        )
    print(f"\nload average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
