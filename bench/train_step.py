"""Time one full pretraining step (teacher forward, AttMask masks, student forward, DINO + iBOT
losses, backward, clip, optimizer step, EMA) on random images, and print the machine.

    python bench/train_step.py --arch vit_small --patch_size 16 --batch_size_per_gpu 8 \\
        --local_crops_number 6 --out_dim 65536 --precision bf16

Any main_dino.py flag is accepted. Prints the median of --steps timed steps after --warmup.
"""
import argparse
import os
import platform
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main_dino  # noqa: E402
from simpool.augment import MultiCropAugmentation  # noqa: E402
from simpool.losses import DINOLoss, PatchLoss  # noqa: E402
from simpool.optim import build_optimizer, param_groups  # noqa: E402


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main():
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--steps", type=int, default=5, help="Timed steps.")
    extra.add_argument("--warmup", type=int, default=2, help="Untimed steps first.")
    bench_args, rest = extra.parse_known_args()
    args = main_dino.parse_args(rest + ([] if "--data_path" in rest else ["--data_path", "synthetic"]))
    args.device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    device = args.device
    student = main_dino.build_network(args, args.drop_path_rate).to(device)
    teacher = main_dino.build_network(args, 0.0).to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    optimizer = build_optimizer(args.optimizer, param_groups(student))
    for group in optimizer.param_groups:
        group["lr"] = 1e-4
    dino_loss = DINOLoss(args.out_dim, 2 + args.local_crops_number).to(device)
    patch_loss = PatchLoss(args.out_dim if args.shared_head else args.patch_out_dim).to(device)
    augment = MultiCropAugmentation(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                    args.global_crops_size, args.local_crops_size)
    fp16 = args.use_fp16 and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if fp16 else None
    amp_dtype = torch.float16 if fp16 else (torch.bfloat16 if args.precision == "bf16" else None)
    masking = args.pred_ratio > 0 and args.masking_prob > 0 and args.lambda2 > 0
    B, size = args.batch_size_per_gpu, args.global_crops_size
    images = torch.randint(0, 256, (B, 3, size, size), dtype=torch.uint8, device=device)
    times = []
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for step in range(bench_args.warmup + bench_args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        globals_, locals_ = augment(images)
        loss, _ = main_dino.distillation_loss(student, teacher, dino_loss, patch_loss, globals_, locals_, masking,
                                              0.04, 0.04, amp_dtype, args)
        main_dino.optimizer_step(loss, student, teacher, optimizer, scaler, 1, 0.996, args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= bench_args.warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU (max allocated)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB process peak RSS " \
               f"(+{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 2**20:.2f} during steps)"
    print(f"machine: {machine()}")
    print(f"config: {args.arch}/{args.patch_size} {args.mode} batch {B}, 2x{size} + "
          f"{args.local_crops_number}x{args.local_crops_size} crops, out_dim {args.out_dim}, "
          f"precision {'fp16' if fp16 else args.precision}, masking {'on' if masking else 'off'}")
    print(f"step: {median:.3f} s median of {len(times)} ({1 / median:.2f} steps/s, {B / median:.1f} images/s); "
          f"peak memory: {peak}")


if __name__ == "__main__":
    main()
