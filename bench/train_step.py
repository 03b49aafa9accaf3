"""Time one full pretraining step, ours against a reference of the official DINO step, and
print the machine.

    python bench/train_step.py --arch vit_small --patch_size 16 --batch_size_per_gpu 8 \\
        --local_crops_number 6 --out_dim 65536 [--precision auto] [--compare | --reference]

Ours (default): main_dino.py's step on random uint8 crops (made once, as the ImageFolder
loader's workers hand them over): photometric augmentation, teacher forward, AttMask masks,
student forward, DINO + iBOT losses, backward, clip, optimizer step, EMA. Any main_dino.py flag
is accepted (``--pred_ratio 0`` is plain DINO, the official objective).
``--reference``: ``bench/reference.py``'s DINO step (explicit-attention [CLS] ViT, DINO head
with weight_norm, double-loop loss, per-parameter clip and EMA loops, default AdamW) on
crops of the same shapes, in the same precision (``--precision``; auto, the default, picks this
machine's fastest: bf16 with AMX or AVX512-BF16, else fp32; see simpool/precision.py).
``--compare``: both, alternating step by step in this process (so both see the same load),
then the ratio; ``--reference_precision`` sets the reference's precision separately (e.g. the
official default fp32 against our default bf16).
``--against "FLAGS"``: ours as given against ours with FLAGS added, alternating (e.g.
``--against "--compile True"`` or ``--against "--grad_checkpointing True"``).
``--profile N``: after the timing, N more steps of each under torch.profiler; prints the time per
step in the matmul and attention kernels (the FLOPs ours and the reference share) against the rest.

Beside the times, ours prints its step's FLOPs (``torch.utils.flop_counter``, see bench/demo_flops.py)
and the fraction of this machine's own matrix-product throughput, in the step's precision and
measured in the same run, that the step reaches: how close the step is to this machine's limit.

Figures are medians of ``--steps`` timed steps after ``--warmup``, in wall time and in this
process's CPU time. Memory: the persistent training state (parameters, gradients, optimizer
state, teacher) and the process's peak resident memory (state + the step's
transient peak + the interpreter; Linux VmHWM). With ``--compare`` the two share a process, so their
peaks are measured by running each alone in a child process (``--steps 1 --warmup 1``).
"""

import argparse
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main_dino  # noqa: E402
from bench.flops import count  # noqa: E402
from bench.machine import describe, gemm_gflops  # noqa: E402
from bench.reference import ReferenceStep  # noqa: E402
from simpool.augment import MultiCropAugmentation  # noqa: E402
from simpool.losses import DINOLoss, PatchLoss  # noqa: E402
from simpool.optim import build_optimizer, param_groups  # noqa: E402
from simpool.precision import resolve_precision  # noqa: E402
from simpool.utils import number  # noqa: E402


def state_mib(*objects):
    """MiB held by the tensors of modules / optimizers (parameters, buffers, grads, state)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                add(t)
                add(t.grad)
        elif isinstance(obj, torch.optim.Optimizer):
            for st in obj.state.values():
                for v in st.values():
                    add(v)
    return total / 2**20


class Ours:
    def __init__(self, args, name="ours"):
        self.name = name
        device = args.device
        self.args = args
        self.student = main_dino.build_network(args, args.drop_path_rate, args.grad_checkpointing).to(device)
        self.teacher = main_dino.build_network(args, 0.0, teacher=True).to(device)
        main_dino.init_teacher(self.teacher, self.student)
        self.optimizer = build_optimizer(args.optimizer, param_groups(self.student))
        for group in self.optimizer.param_groups:
            group["lr"] = 1e-4
        self.dino_loss = DINOLoss(
            args.out_dim,
            args.global_crops_number + args.local_crops_number,
            global_crops=args.global_crops_number,
            centering=args.centering,
        ).to(device)
        self.patch_loss = PatchLoss(main_dino.patch_logit_dim(args), centering=args.centering).to(device)
        self.augment = MultiCropAugmentation(
            args.global_crops_scale,
            args.local_crops_scale,
            args.local_crops_number,
            args.global_crops_size,
            args.local_crops_size,
            global_crops_number=args.global_crops_number,
        )
        choice = resolve_precision(args.precision, device, args.use_fp16)
        self.scaler = torch.amp.GradScaler(device.type) if choice.scaler else None
        self.amp_dtype = choice.dtype
        self.precision = choice.name
        self.masking = main_dino.uses_masking(args, self.student.backbone)
        B, size = args.batch_size_per_gpu, args.global_crops_size
        # uint8 crops as the ImageFolder loader's workers hand them over (crop_image + collate);
        # the step runs the photometric stage on them, as main_dino.py does
        images = torch.randint(0, 256, (B, 3, size * 5 // 4, size * 5 // 4), dtype=torch.uint8)
        self.crops = tuple(
            c.to(device) if c is not None else None
            for c in self.augment.collate([self.augment.crop_image(im) for im in images])
        )

    def step(self):
        a = self.args
        globals_, locals_ = self.augment.photometric(*self.crops)
        loss, _ = main_dino.distillation_loss(
            self.student,
            self.teacher,
            self.dino_loss,
            self.patch_loss,
            globals_,
            locals_,
            self.masking,
            0.04,
            0.04,
            self.amp_dtype,
            a,
        )
        main_dino.optimizer_step(loss, self.student, self.teacher, self.optimizer, self.scaler, 1, 0.996, a)
        return loss

    def state(self):
        return state_mib(self.student, self.teacher, self.optimizer)

    def objective(self):
        if not self.masking:
            return "masking + iBOT loss off (plain DINO)"
        return "masking + iBOT loss on" if self.args.lambda2 > 0 else "masking on, iBOT loss off"

    def describe(self):
        a = self.args
        extras = [name for name, on in (("grad checkpointing", a.grad_checkpointing), ("compiled", a.compile)) if on]
        return (
            f"ours: {a.arch}/{a.patch_size} {a.mode}, precision {self.precision}, "
            f"{self.objective()}, optimizer {a.optimizer}" + "".join(f", {e}" for e in extras)
        )


class Reference:
    name = "reference"

    def __init__(self, args, precision):
        device = args.device
        amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.precision = precision
        self.args = args
        self.impl = ReferenceStep(
            args.arch,
            args.patch_size,
            args.out_dim,
            2 + args.local_crops_number,
            drop_path_rate=args.drop_path_rate,
            norm_last_layer=args.norm_last_layer,
            clip_grad=args.clip_grad,
            freeze_last_layer=args.freeze_last_layer,
            amp_dtype=amp_dtype,
            device=device,
        )
        B, g, l_ = args.batch_size_per_gpu, args.global_crops_size, args.local_crops_size
        gen = torch.Generator().manual_seed(0)
        self.crops = [torch.randn(B, 3, g, g, generator=gen).to(device) for _ in range(2)]
        self.crops += [torch.randn(B, 3, l_, l_, generator=gen).to(device) for _ in range(args.local_crops_number)]

    def step(self):
        return self.impl.step(self.crops)

    def state(self):
        return state_mib(self.impl.student, self.impl.teacher, self.impl.optimizer)

    def describe(self):
        a = self.args
        return (
            f"reference (official DINO step, bench/reference.py): {a.arch}/{a.patch_size} [CLS], "
            f"precision {self.precision}, DINO loss only, default AdamW"
        )


def run(runners, steps, warmup, device):
    times = {r.name: [] for r in runners}
    for i in range(warmup + steps):
        for r in runners:
            if device.type == "cuda":
                torch.cuda.synchronize()
            w, c = time.perf_counter(), time.process_time()
            loss = r.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter() - w, time.process_time() - c
            if not torch.isfinite(loss):
                raise RuntimeError(f"{r.name}: non-finite loss {loss.item()}")
            if i >= warmup:
                times[r.name].append((wall, cpu))
    return times


# the kernels that do the model's FLOPs, the same in ours and the reference (in any precision)
MATMUL_KERNELS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_cudnn_attention",
}


def profile_step(runner, steps):
    """(seconds in matmul/attention kernels, seconds in all ops, [(op, seconds)] of the five
    largest others), per step, from torch.profiler's self times (CPU; on CUDA, device time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = runner.args.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            runner.step()
        if cuda:
            torch.cuda.synchronize()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    times = {e.key: getattr(e, attr) / 1e6 / steps for e in prof.key_averages()}
    matmul = sum(t for k, t in times.items() if k in MATMUL_KERNELS)
    others = sorted(
        ((k, t) for k, t in times.items() if k not in MATMUL_KERNELS and k.startswith("aten::")), key=lambda kt: -kt[1]
    )[:5]
    return matmul, sum(times.values()), others


def peak_memory(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU max allocated"
    try:  # VmHWM: this address space's peak (ru_maxrss would include a parent's peak, kept across fork+exec)
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return f"{kib / 2**20:.2f} GiB process peak RSS"


def child_peak(argv):
    """Peak memory of one configuration (``argv``) run alone in a child process."""
    cmd = [sys.executable, os.path.abspath(__file__)] + argv + ["--steps", "1", "--warmup", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return next(line.split("peak memory: ", 1)[1] for line in out.splitlines() if "peak memory: " in line)


def flops_line(runner, wall):
    """The step's FLOPs (counted on one more step of the runner) and the fraction of this machine's
    matrix-product throughput in the step's precision that the step reaches, measured now."""
    args = runner.args
    flops = count(runner.step)
    gemm = gemm_gflops(runner.amp_dtype, args.device)
    achieved = flops / wall / 1e9
    return (
        f"FLOPs: {flops / 1e9:.1f} GFLOP a step, {achieved:.1f} GFLOP/s achieved = {100 * achieved / gemm:.0f}% "
        f"of this machine's {runner.precision} matrix product ({gemm:.1f} GFLOP/s, 3136x1536 @ 1536x384, "
        f"{torch.get_num_threads()} threads)"
    )


def main():
    extra = argparse.ArgumentParser(
        prog="bench/train_step.py",
        add_help=False,
        description=__doc__.split("\n\n")[0] + " Takes these flags and every main_dino.py flag (listed after them).",
    )
    extra.add_argument(
        "--steps", type=number(int, low=1), default=5, help="Timed steps (of each, with --compare); default 5."
    )
    extra.add_argument("--warmup", type=number(int, low=0), default=2, help="Untimed steps first; default 2.")
    extra.add_argument("--reference", action="store_true", help="Time the reference DINO step only.")
    extra.add_argument("--compare", action="store_true", help="Time ours and the reference, alternating.")
    extra.add_argument(
        "--reference_precision",
        default=None,
        choices=["fp32", "bf16", "fp16"],
        help="The reference's precision (default: --precision).",
    )
    extra.add_argument(
        "--against",
        default=None,
        metavar="FLAGS",
        help="Time ours against ours with these main_dino.py flags added (one quoted string), alternating.",
    )
    extra.add_argument(
        "--demo",
        action="store_true",
        help="Time the zero-config demo's step (main_dino.py's "
        "DEMO_RECIPE; other main_dino.py flags still override it).",
    )
    extra.add_argument("--threads", type=number(int, low=0), default=0, help="torch threads (0: torch's default).")
    extra.add_argument(
        "--profile",
        type=number(int, low=0),
        default=0,
        metavar="N",
        help="After timing, profile N "
        "more steps of each (torch.profiler) and print the time in matmul/attention kernels, which ours "
        "and the reference share, against the rest.",
    )
    if {"-h", "--help"} & set(sys.argv[1:]):
        extra.print_help()
        print()
        main_dino.get_args_parser().print_help()
        return
    bench_args, rest = extra.parse_known_args()
    if bench_args.threads:
        torch.set_num_threads(bench_args.threads)
    if not bench_args.demo:  # the crops are random either way; a data path keeps the demo recipe out
        rest = rest + ([] if "--data_path" in rest else ["--data_path", "synthetic"])
    args = main_dino.parse_args(rest)
    args.device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    choice = resolve_precision(args.precision, args.device, args.use_fp16)
    print(choice.log_line())
    if choice.slow:
        print(choice.slow)
    args.precision = choice.name  # what ours and (by default) the reference run in
    torch.manual_seed(args.seed)
    runners, child_argv = [], {}
    if not bench_args.reference:
        runners.append(Ours(args))
        child_argv["ours"] = rest
    if bench_args.against:
        name = f"ours {bench_args.against}"
        other = main_dino.parse_args(rest + shlex.split(bench_args.against))
        other.device = args.device
        torch.manual_seed(args.seed)
        runners.append(Ours(other, name))
        child_argv[name] = rest + shlex.split(bench_args.against)
    elif bench_args.reference or bench_args.compare:
        if args.global_crops_number != 2:
            sys.exit("error: the reference (DINO's step) takes 2 global crops; drop --global_crops_number")
        runners.append(Reference(args, bench_args.reference_precision or args.precision))
        child_argv["reference"] = (
            rest
            + ["--reference"]
            + (["--reference_precision", bench_args.reference_precision] if bench_args.reference_precision else [])
        )
    times = run(runners, bench_args.steps, bench_args.warmup, args.device)
    profiles = {r.name: profile_step(r, bench_args.profile) for r in runners} if bench_args.profile > 0 else {}
    B = args.batch_size_per_gpu
    print(f"{describe()}, after the run")
    print(
        f"config: batch {B}, {args.global_crops_number}x{args.global_crops_size} + "
        f"{args.local_crops_number}x{args.local_crops_size} crops, "
        f"out_dim {args.out_dim}; median of {bench_args.steps} steps after {bench_args.warmup} warm-up"
        + (", alternating" if len(runners) > 1 else "")
    )
    med = {}
    for r in runners:
        wall = statistics.median(t[0] for t in times[r.name])
        cpu = statistics.median(t[1] for t in times[r.name])
        med[r.name] = (wall, cpu)
        print(f"  {r.describe()}")
        peak = (
            peak_memory(args.device)
            if len(runners) == 1
            else child_peak(child_argv[r.name] + (["--threads", str(bench_args.threads)] if bench_args.threads else []))
            + " (alone, in a child process)"
        )
        print(
            f"    step: {wall:.3f} s wall, {cpu:.3f} s CPU ({1 / wall:.2f} steps/s, {B / wall:.1f} images/s); "
            f"training state {r.state():.0f} MiB; peak memory: {peak}"
        )
        if isinstance(r, Ours):
            print(f"    {flops_line(r, wall)}")
        if r.name in profiles:
            matmul, total, others = profiles[r.name]
            print(
                f"    profile ({bench_args.profile} steps, self time per step): matmul + attention kernels "
                f"{matmul:.3f} s of {total:.3f} s ({100 * matmul / total:.0f}%); largest others: "
                + ", ".join(f"{k.removeprefix('aten::')} {t * 1e3:.0f} ms" for k, t in others)
            )
    if len(runners) == 2:
        (first, (fw, fc)), (second, (sw, sc)) = med.items()
        print(f"ratio {second}/{first}: {sw / fw:.2f}x (wall), {sc / fc:.2f}x (CPU time)")


if __name__ == "__main__":
    main()
