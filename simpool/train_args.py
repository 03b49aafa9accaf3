"""main_dino.py's command line: every flag with its help, the zero-config demo recipe that applies
when no --data_path is given, and the checks that turn a flag combination that cannot train into
a one-line error before anything starts."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from typing import TYPE_CHECKING

import torch

from simpool import backbones, utils
from simpool import vision_transformer as vits
from simpool.checkpoints import gamma_arg
from simpool.data import FASHION_MNIST
from simpool.evaluation import add_feature_args
from simpool.losses import CENTERINGS
from simpool.masking import PRED_SHAPES, pred_ratio_pairs
from simpool.precision import PRECISIONS

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "DEMO_RECIPE",
    "get_args_parser",
    "parse_args",
    "check_args",
    "head_norm_arg",
    "RAW_PIXEL_KNN",
    "print_demo_summary",
]

logger = logging.getLogger("simpool")

# Zero-config demo (no --data_path): a 6-block, 128-wide SimPool ViT on 28x28 Fashion-MNIST for one epoch, sized
# to 42 TFLOP with both k-NN passes (bench/demo_flops.py; under the 50 TFLOP that 2 AVX2 cores do in fp32 in
# about 15 minutes). A short run learns most per FLOP from many optimizer steps (batch 64) and many cheap
# 14-px local crops, with strong early targets: a sharp teacher (temperature 0.02) that follows the student
# fast (momentum 0.98), BatchNorm in a narrow head, no frozen last layer (docs/demo.md has the measurements).
# Flags given on the command line override these.
DEMO_RECIPE = dict(
    data_path=FASHION_MNIST,
    arch="vit_pico",
    patch_size=7,
    global_crops_size=28,
    local_crops_size=14,
    global_crops_scale=(0.4, 1.0),
    local_crops_scale=(0.1, 0.4),
    local_crops_number=8,
    blur_sigma=(0.1, 1.0),
    out_dim=1024,
    patch_out_dim=1024,
    shared_head=True,
    use_bn_in_head=True,
    head_hidden_dim=512,
    head_bottleneck_dim=128,
    batch_size_per_gpu=64,
    epochs=1,
    lr=4e-3,
    warmup_epochs=0.25,
    min_lr=1e-5,
    weight_decay=0.04,
    weight_decay_end=0.1,
    momentum_teacher=0.98,
    warmup_teacher_temp=0.02,
    teacher_temp=0.02,
    warmup_teacher_temp_epochs=0,
    freeze_last_layer=0,
    drop_path_rate=0.0,
    gamma=None,
    eval_every=1,
    num_workers=0,
    output_dir="output/demo",
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="main_dino.py",
        description="SimPool-SSL pretraining (DINO/iBOT with SimPool and AttMask)",
        add_help=True,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    b, n = utils.bool_flag, utils.number
    zero_to_one = n(float, low=0, high=1)  # probabilities, fractions, momenta
    g = p.add_argument_group("model")
    g.add_argument(
        "--arch",
        default="vit_small",
        type=backbones.arch_arg,
        choices=list(backbones.ARCHS),
        help="Backbone: a ViT (masking-capable; DINO's deit_tiny/deit_small mean vit_tiny/vit_small), "
        "resnet50, convnext_* or fcvit_* (SimPool on the last feature map).",
    )
    g.add_argument(
        "--patch_size",
        default=16,
        type=n(int, low=1),
        help="Side of the square patches, in pixels. "
        "Smaller patches give more tokens: better features, quadratically more attention cost.",
    )
    g.add_argument(
        "--mode",
        default="simpool",
        choices=backbones.MODES,
        help="'simpool': no [CLS] token, the image "
        "vector is SimPool over patch tokens and SimPool's map guides masking; 'official': the DINO "
        "[CLS] baseline, masking guided by the last block's [CLS] attention.",
    )
    g.add_argument(
        "--gamma",
        default="auto",
        type=gamma_arg,
        help="SimPool's generalised-mean exponent; 'None' "
        "pools with the plain attention average (1.25 in the SimPool ViT-S recipe); 'auto': None for "
        "ViTs, 2.0 for convnets.",
    )
    g.add_argument("--use_beta", default=False, type=b, help="Learned scalar offset added to SimPool's output.")
    g.add_argument(
        "--out_dim",
        default=65536,
        type=n(int, low=1),
        help="Output width of the DINO head (number of "
        "prototypes). Large values need a long run to fill; small data wants small values.",
    )
    g.add_argument(
        "--patch_out_dim",
        default=8192,
        type=n(int, low=1),
        help="Output width of the iBOT patch head (ignored with --shared_head True, which uses --out_dim).",
    )
    g.add_argument(
        "--shared_head",
        default=False,
        type=b,
        help="Project patch tokens with the same last "
        "layer as the pooled vector (AttMask/iBOT option) instead of a separate one.",
    )
    g.add_argument(
        "--norm_last_layer",
        default=True,
        type=b,
        help="Keep the head's last layer "
        "weight-normalised with fixed unit norm: more stable; False trains better small models.",
    )
    g.add_argument(
        "--use_bn_in_head",
        default=False,
        type=b,
        help="A BatchNorm of its own after each hidden layer of the projection head MLP (DINO's flag and head).",
    )
    g.add_argument(
        "--norm_in_head",
        default=None,
        type=head_norm_arg,
        help="One normalisation layer placed after "
        "every hidden layer of the projection head, its weights shared between them, as iBOT's and "
        "AttMask's head builds it: None; bn, BatchNorm; syncbn, the same (every BatchNorm becomes "
        "SyncBatchNorm under DDP on GPUs); ln, LayerNorm.",
    )
    g.add_argument(
        "--head_hidden_dim",
        default=2048,
        type=n(int, low=1),
        help="Width of the projection head's "
        "hidden layers (DINO: 2048). A small model on small data learns as well with 256-512, at a "
        "fraction of the head's cost per crop.",
    )
    g.add_argument(
        "--head_bottleneck_dim",
        default=256,
        type=n(int, low=1),
        help="Width of the head's L2-normalised bottleneck before its last layer (DINO: 256).",
    )
    g.add_argument(
        "--act_in_head",
        default="gelu",
        choices=list(vits.HEAD_ACTS),
        help="Activation of the projection head's hidden layers (iBOT's flag).",
    )
    g.add_argument(
        "--shared_head_teacher",
        default=False,
        type=b,
        help="With --shared_head False: True makes the "
        "teacher project patch tokens with its pooled-vector layer, as iBOT and AttMask do by default "
        "(needs --patch_out_dim equal to --out_dim); False with its own patch layer, the EMA of the "
        "student's. No effect with --shared_head True.",
    )
    g.add_argument(
        "--momentum_teacher",
        default=0.996,
        type=zero_to_one,
        help="Base EMA momentum of the "
        "teacher, raised to 1 by a cosine over training. Use 0.99-0.996; higher for small batches.",
    )
    g.add_argument(
        "--drop_path_rate",
        "--drop_path",
        default=0.1,
        type=n(float, low=0, below=1),
        help="Stochastic depth rate of the student (--drop_path is iBOT's and AttMask's name).",
    )
    g.add_argument(
        "--grad_checkpointing",
        default=False,
        type=b,
        help="Recompute the student backbone's "
        "activations block by block in the backward instead of keeping them: much less memory "
        "for large ViTs and batches, at about one more student forward per step.",
    )
    g.add_argument(
        "--compile",
        default=False,
        type=b,
        help="torch.compile the student's and teacher's "
        "backbones and heads: fused kernels, a faster step once compiled; the first steps take "
        "minutes while it compiles (needs a C++ compiler on CPU). See the README's Performance.",
    )

    g = p.add_argument_group("temperatures and losses")
    g.add_argument(
        "--warmup_teacher_temp",
        default=0.04,
        type=n(float, above=0),
        help="Teacher temperature at the start of its linear warm-up. Lower it if training is unstable.",
    )
    g.add_argument(
        "--teacher_temp",
        default=0.04,
        type=n(float, above=0),
        help="Teacher temperature after warm-up; above 0.07 tends to be unstable.",
    )
    g.add_argument(
        "--warmup_teacher_temp_epochs",
        default=0,
        type=n(int, low=0),
        help="Epochs of the linear "
        "teacher-temperature warm-up (of both temperatures); as in DINO the value changes once per epoch, "
        "reaching --teacher_temp in the last warm-up epoch.",
    )
    g.add_argument(
        "--warmup_teacher_patch_temp",
        default=0.04,
        type=n(float, above=0),
        help="Patch-head teacher temperature at the start of warm-up.",
    )
    g.add_argument(
        "--teacher_patch_temp",
        default=0.07,
        type=n(float, above=0),
        help="Patch-head teacher temperature after warm-up.",
    )
    g.add_argument(
        "--centering",
        default="ema",
        choices=CENTERINGS,
        help="How the teacher's targets are kept from "
        "collapsing: ema, DINO's centre (an EMA of the teacher's mean output, subtracted); sinkhorn_knopp, "
        "DINOv2's three Sinkhorn-Knopp iterations that spread each batch evenly over the prototypes, "
        "which gives useful targets from the first steps (short runs learn faster).",
    )
    g.add_argument(
        "--koleo_loss_weight",
        default=0.0,
        type=n(float, low=0),
        help="Weight of DINOv2's KoLeo "
        "regulariser on the student's pooled vectors of each global crop (0: off; DINOv2: 0.1). It "
        "spreads the images of a batch apart, which k-NN retrieval rewards.",
    )
    g.add_argument("--lambda1", default=1.0, type=n(float, low=0), help="Weight of the DINO loss on pooled vectors.")
    g.add_argument(
        "--lambda2",
        default=1.0,
        type=n(float, low=0),
        help="Weight of the iBOT loss on masked patches; "
        "0 keeps the masking (the student sees masked global crops) without that loss.",
    )

    g = p.add_argument_group("masking (iBOT / AttMask)")
    g.add_argument(
        "--pred_shape",
        default="attmask_high",
        choices=PRED_SHAPES,
        help="How to choose masked "
        "patches: by the teacher's SimPool attention (attmask_high/low/hint), at random, or in blocks.",
    )
    g.add_argument(
        "--pred_ratio",
        default=[0.3],
        nargs="+",
        type=n(float, low=0, below=1),
        help="Fraction of "
        "patches masked; 0 turns masking and the iBOT loss off (plain DINO). Several values (iBOT's "
        "'0 0.3'): each draw picks one of them at random. The attmask_* modes draw one ratio per batch "
        "(AttMask), rand and block one per crop (iBOT).",
    )
    g.add_argument(
        "--pred_ratio_var",
        default=[0.0],
        nargs="+",
        type=n(float, low=0, below=1),
        help="A drawn "
        "ratio is uniform in pred_ratio +- pred_ratio_var (one value, or one per --pred_ratio value; "
        "at most the ratio itself).",
    )
    g.add_argument(
        "--masking_prob",
        default=0.5,
        type=zero_to_one,
        help="attmask_* modes: probability that a "
        "global crop is masked at all (rand and block mask every crop, as in AttMask).",
    )
    g.add_argument(
        "--use_masked_im_modeling",
        default=True,
        type=b,
        help="iBOT's switch: False shows the student "
        "the global crops unmasked, while the masks still choose the tokens on which the iBOT loss "
        "compares student and teacher (a patch-level DINO loss).",
    )
    g.add_argument(
        "--pred_start_epoch",
        default=0,
        type=n(int, low=0),
        help="Epoch from which masking and the "
        "iBOT loss start; the patch temperature's warm-up starts there too, as in iBOT.",
    )
    g.add_argument(
        "--show_max",
        default=0.1,
        type=zero_to_one,
        help="attmask_hint: fraction of most-attended patches among which hints are revealed.",
    )
    g.add_argument(
        "--show_ratio",
        default=None,
        type=zero_to_one,
        help="attmask_hint: fraction of all patches "
        "revealed as hints (taken at random among the top --show_max); default, as AttMask: --show_max "
        "times a second draw of the masking ratio (0.1 x 0.3: 5 of the top 19 of 196 patches).",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--use_fp16",
        default=False,
        type=b,
        help="On CUDA: fp16 autocast with a gradient scaler "
        "(DINO's flag); --precision auto already picks it on GPUs without native bf16 (V100, T4). "
        "Ignored on CPU, where --precision applies.",
    )
    g.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="Autocast precision of the forward "
        "passes (losses and softmaxes stay fp32). auto: bf16 where the hardware computes it natively "
        "(CPUs with AMX or AVX512-BF16, GPUs from A100/RTX 30xx on), else fp32 on a CPU (bf16 is ~25x "
        "slower there) and fp16 with a gradient scaler on a GPU. The log names the choice and the "
        "checkpoint records it; SIMPOOL_NATIVE_BF16=0/1 overrides the hardware probe.",
    )
    g.add_argument(
        "--weight_decay", default=0.04, type=n(float, low=0), help="Initial weight decay (biases and norms excluded)."
    )
    g.add_argument(
        "--weight_decay_end", default=0.4, type=n(float, low=0), help="Final weight decay (cosine schedule)."
    )
    g.add_argument(
        "--clip_grad", default=3.0, type=n(float, low=0), help="Per-parameter gradient norm clip; 0 disables."
    )
    g.add_argument("--batch_size_per_gpu", default=64, type=n(int, low=1), help="Images per process per step.")
    g.add_argument("--epochs", default=100, type=n(int, low=0), help="Training epochs.")
    g.add_argument(
        "--freeze_last_layer",
        default=1,
        type=n(int, low=0),
        help="Epochs during which the head's last layer is not updated.",
    )
    g.add_argument(
        "--lr",
        default=0.0005,
        type=n(float, low=0),
        help="Peak learning rate for a global batch of 256; "
        "scaled linearly by (batch_size_per_gpu * world_size) / 256.",
    )
    g.add_argument("--warmup_epochs", default=10, type=n(float, low=0), help="Epochs of linear learning-rate warm-up.")
    g.add_argument("--min_lr", default=1e-6, type=n(float, low=0), help="Learning rate at the end of the cosine.")
    g.add_argument(
        "--optimizer", default="adamw", choices=["adamw", "sgd", "lars"], help="adamw for ViTs; lars for convnets."
    )

    g = p.add_argument_group("multi-crop augmentation")
    g.add_argument(
        "--global_crops_number",
        default=2,
        type=n(int, low=1),
        help="Global crops per image (iBOT's "
        "flag; DINO: 2). The teacher sees these; the first takes --blur_prob's first value, every later "
        "one DINO's second global crop's blur and solarization.",
    )
    g.add_argument(
        "--global_crops_scale",
        default=(0.4, 1.0),
        type=n(float, above=0, high=1),
        nargs=2,
        help="Area range of the global crops, as fractions of the image.",
    )
    g.add_argument(
        "--local_crops_number", default=8, type=n(int, low=0), help="Number of local crops; 0 disables them."
    )
    g.add_argument(
        "--local_crops_scale",
        default=(0.05, 0.4),
        type=n(float, above=0, high=1),
        nargs=2,
        help="Area range of the local crops.",
    )
    g.add_argument(
        "--global_crops_size",
        default=224,
        type=n(int, low=1),
        help="Side of global crops in pixels (also the evaluation image size).",
    )
    g.add_argument("--local_crops_size", default=96, type=n(int, low=1), help="Side of local crops in pixels.")
    g.add_argument(
        "--blur_sigma",
        default=(0.1, 2.0),
        type=n(float, above=0),
        nargs=2,
        help="Range of the Gaussian blur sigma, in output pixels.",
    )
    g.add_argument(
        "--blur_prob",
        default=(1.0, 0.1, 0.5),
        type=zero_to_one,
        nargs=3,
        help="Blur probability of global crop 1, global crop 2 and the local crops.",
    )
    g.add_argument(
        "--color_jitter_prob",
        default=0.8,
        type=zero_to_one,
        help="Probability of colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) per crop.",
    )
    g.add_argument("--grayscale_prob", default=0.2, type=zero_to_one, help="Probability of turning a crop gray.")
    g.add_argument(
        "--solarization_prob", default=0.2, type=zero_to_one, help="Probability of solarizing global crop 2."
    )

    g = p.add_argument_group("data, evaluation and run")
    g.add_argument(
        "--data_path",
        default=None,
        type=str,
        help="ImageFolder root holding train/<class>/* (and "
        "val/ for k-NN), the train folder itself (DINO's /imagenet/train: no online k-NN), or "
        "'fashion-mnist'. Omitted: the CPU demo recipe.",
    )
    g.add_argument(
        "--subset",
        default=-1,
        type=utils.subset_size,
        help="Keep this many images per class (-1: all): "
        "the first ones of each class in folder order (sorted file names), as AttMask picks them (--subset "
        "260: its 20%% ImageNet split).",
    )
    g.add_argument(
        "--output_dir",
        default="output",
        type=str,
        help="Where checkpoint.pth, log.txt and TensorBoard events go; a run there resumes from its checkpoint.",
    )
    g.add_argument(
        "--saveckp_freq",
        default=20,
        type=n(int, low=0),
        help="Also keep checkpoint{epoch:04}.pth every this many epochs (0: never).",
    )
    g.add_argument(
        "--saveckp_iters",
        default=0,
        type=n(int, low=0),
        help="Also write checkpoint.pth every this many "
        "iterations inside an epoch (with the sampler position), so a crash loses at most that many "
        "steps (0: end of epoch only).",
    )
    g.add_argument(
        "--pretrained_weights",
        default=None,
        type=str,
        help="Start the student and teacher backbones "
        "from the weights in this file (any checkpoint the evaluation tools read, e.g. a released FCViT "
        "or timm classifier checkpoint); a SimPool layer the file lacks starts fresh (logged). Ignored "
        "when the run resumes from a checkpoint of its own.",
    )
    g.add_argument(
        "--load_from",
        default=None,
        type=str,
        help="Start from this checkpoint of main_dino.py (a "
        "path relative to --output_dir, as in iBOT, or absolute) when --output_dir has none of its own; "
        "once it has, the newest there is resumed, so relaunching after a crash goes on from there. "
        "iBOT's 'checkpoint.pth' is that own checkpoint: resumed when it exists.",
    )
    g.add_argument(
        "--keep_checkpoints",
        default=2,
        type=n(int, low=1),
        help="Keep this many newest checkpoints "
        "(checkpoint.pth, checkpoint.pth.1, ...); resume falls back to an older one if the newest "
        "is unreadable.",
    )
    g.add_argument("--seed", default=0, type=n(int, low=0, high=utils.MAX_SEED), help="Random seed.")
    g.add_argument(
        "--num_workers", default=10, type=n(int, low=0), help="Data-loading processes per rank (ImageFolder)."
    )
    utils.add_launch_args(g)
    g.add_argument(
        "--eval_every",
        default=0,
        type=n(int, low=0),
        help="Online k-NN of the teacher every this many epochs and before training (0: never).",
    )
    g.add_argument(
        "--nb_knn",
        default=[20],
        type=n(int, low=1),
        nargs="+",
        help="k values for the online k-NN; the first is logged as knn_top1/knn_top5.",
    )
    g.add_argument("--temperature", default=0.07, type=n(float, above=0), help="k-NN vote temperature.")
    g.add_argument(
        "--use_cuda",
        default=True,
        type=b,
        help="Online k-NN: search with the features on the GPU "
        "when there is one (AttMask's flag); False keeps them in host memory. No effect on CPU.",
    )
    g.add_argument("--cpu", action="store_true", help="Run on CPU even when CUDA is available.")
    add_feature_args(p, n_last_blocks=1).description = "Features of the online k-NN (AttMask's flags)."
    return p


def head_norm_arg(text: str) -> str | None:
    """argparse type of --norm_in_head: None or one of vision_transformer.HEAD_NORMS."""
    if str(text).lower() == "none":
        return None
    if text not in vits.HEAD_NORMS:
        raise argparse.ArgumentTypeError(f"expected None, {', '.join(vits.HEAD_NORMS)}, got {text!r}")
    return text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.data_path is None:
        parser.set_defaults(**DEMO_RECIPE)
        args = parser.parse_args(argv)
        args.demo = True
    else:
        args.demo = False
    args.warnings = []  # logged once the run's log is set up
    if args.mode == "official":
        # [CLS] pooling has no SimPool. SimPool's recipes switch to the baseline by changing --mode
        # alone, so its knobs are accepted, logged as ignored, and recorded as what the model has.
        ignored = [
            f"--{k} {getattr(args, k)}" for k in ("gamma", "use_beta") if getattr(args, k) != parser.get_default(k)
        ]
        if ignored:
            args.warnings.append(
                f"{' and '.join(ignored)} ignored: --mode official pools with the [CLS] token, without SimPool"
            )
        args.gamma, args.use_beta = backbones.pooling_knobs(args.mode, args.gamma, args.use_beta)
    check_args(args)
    if args.warmup_epochs >= args.epochs:  # DINO asserts here; a short run on one's own data should still run
        args.warnings.append(
            f"warning: --warmup_epochs {args.warmup_epochs:g} >= --epochs {args.epochs}: the "
            f"learning rate only ramps up, to {args.epochs / args.warmup_epochs:.0%} of --lr at most, "
            "with no cosine decay"
        )
    return args


def check_args(args: argparse.Namespace) -> None:
    """Resolve --gamma auto into the value the backbone uses (so args and checkpoints record
    it); refuse ranges given high end first, crops smaller than one ViT patch or a convnet's
    smallest input, and --compile on CPU without a C++ compiler (inductor builds its CPU
    kernels with one), as one-line RunErrors. (Each flag's own range is checked by its type.)"""
    args.gamma = backbones.resolve_gamma(args.arch, args.gamma)
    if args.use_bn_in_head and args.norm_in_head is not None:
        raise utils.RunError(
            f"--use_bn_in_head True (DINO's head: a BatchNorm of its own after each hidden layer) "
            f"and --norm_in_head {args.norm_in_head} (iBOT's: one norm shared by the hidden layers) "
            "both choose the head's norm; pass one of them"
        )
    if args.norm_in_head == "syncbn":  # the same layer: every BatchNorm becomes a SyncBatchNorm under DDP
        args.norm_in_head = "bn"
    args.head_norm_shared = args.norm_in_head is not None  # recorded for the resume check
    if args.shared_head_teacher and not args.shared_head and args.patch_out_dim != args.out_dim:
        raise utils.RunError(
            f"--shared_head_teacher True projects the teacher's patch tokens to --out_dim "
            f"{args.out_dim} values and the student's (--shared_head False) to --patch_out_dim "
            f"{args.patch_out_dim}; make the two equal, or pass --shared_head True"
        )
    on_cpu = args.cpu or not torch.cuda.is_available()
    compiler = os.environ.get("CXX", "g++")  # the one inductor looks for
    if args.compile and on_cpu and not shutil.which(compiler):
        raise utils.RunError(
            f"--compile on CPU needs a C++ compiler to build its kernels and {compiler} is not on "
            "PATH; install g++ (or set CXX) or drop --compile"
        )
    utils.require_low_first(args, "global_crops_scale", "local_crops_scale", "blur_sigma")
    if args.global_crops_number + args.local_crops_number == 1:
        raise utils.RunError(
            "one crop per image leaves the DINO loss no pair of views; use --global_crops_number 2 or add local crops"
        )
    try:
        pred_ratio_pairs(args.pred_ratio, args.pred_ratio_var)
    except ValueError as e:
        raise utils.RunError(f"--{e}") from None
    smallest = backbones.smallest_input(args.arch, args.patch_size)
    if args.arch in backbones.VIT_ARCHS:
        for flag in ("global_crops_size",) + (("local_crops_size",) if args.local_crops_number > 0 else ()):
            if getattr(args, flag) < smallest:
                raise utils.RunError(
                    f"--{flag} {getattr(args, flag)} is smaller than one patch (--patch_size {args.patch_size})"
                )
    else:
        sizes = [("--global_crops_size", args.global_crops_size)]
        if args.local_crops_number > 0:
            sizes.append(("--local_crops_size", args.local_crops_size))
        small = [(flag, size) for flag, size in sizes if size < smallest]
        if small:
            raise utils.RunError(
                f"--arch {args.arch} needs crops of at least {smallest} pixels, got "
                f"{' and '.join(f'{flag} {size}' for flag, size in small)}; pass "
                f"{' '.join(f'{flag} {smallest}' for flag, _ in small)} or larger (docs/backbones.md)"
            )


RAW_PIXEL_KNN = 85.69  # bench/raw_pixel_knn.py: k=20 on the 60 000 training images, the 10 000 test images


def print_demo_summary(log_path: str, full_train_set: bool = True) -> None:
    with open(log_path) as f:
        records = [json.loads(line) for line in f]
    knn = [r for r in records if "knn_top1" in r]
    if len(knn) >= 2:
        before, after = knn[0]["knn_top1"], knn[-1]["knn_top1"]
        baseline = f" Raw-pixel k-NN (k=20) on the same split: {RAW_PIXEL_KNN:.2f}%." if full_train_set else ""
        logger.info(
            f"Teacher k-NN top-1 on the Fashion-MNIST test split: before training {before:.2f}%, "
            f"after {after:.2f}% ({after - before:+.2f} points).{baseline}"
        )
