"""Self-supervised pretraining of a [CLS]-free SimPool ViT by DINO/iBOT self-distillation
with SimPool-guided AttMask masking.

    python main_dino.py                       # CPU demo: Fashion-MNIST, ~10 min, k-NN before/after
    torchrun --nproc_per_node 8 main_dino.py --arch vit_small --data_path /imagenet --output_dir out

One training step: multi-crop (2 global + N local crops) -> teacher on the global
crops gives pooled logits, patch tokens and SimPool's attention map -> that map picks
the patches to mask (AttMask) -> student on masked globals + unmasked locals -> DINO
loss (cross-view) + iBOT loss (masked tokens) -> backward, clip, step -> teacher EMA.
"""
import argparse
import datetime
import itertools
import json
import logging
import math
import os
import random
import shutil
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler

import utils
import vision_transformer as vits
from simpool import backbones
from simpool.augment import MultiCropAugmentation
from simpool.checkpoints import TRAINING_KEYS, gamma_arg
from simpool.data import FASHION_MNIST, DataError, build_dataset, skip_bad_collate
from simpool.evaluation import (FrozenFeatures, add_feature_args, build_eval_splits, drop_unreadable,
                                log_feature_choice, tolerant_collate)
from simpool.knn import extract_features, knn_classify
from simpool.losses import DINOLoss, PatchLoss
from simpool.masking import PRED_SHAPES, make_masks, pred_ratio_pairs
from simpool.optim import (build_optimizer, cancel_last_layer_gradients, clip_gradients, ema_update,
                           param_groups)

logger = logging.getLogger("simpool")

# Zero-config demo (no --data_path): a 6-block ViT on 28x28 Fashion-MNIST, 2 epochs on a 2-core CPU in
# about 10 minutes. Short runs need strong early targets: a sharp teacher (temperature 0.02), BatchNorm in
# the head, no frozen last layer, a fast teacher (momentum 0.99), lr 2e-3, and many cheap 14-px local crops;
# with DINO's own defaults the same 2 epochs move k-NN by under 1 point (see README). Flags given on the
# command line override these.
DEMO_RECIPE = dict(
    data_path=FASHION_MNIST, arch="vit_nano", patch_size=7, global_crops_size=28, local_crops_size=14,
    global_crops_scale=(0.4, 1.0), local_crops_scale=(0.1, 0.4), local_crops_number=8, blur_sigma=(0.1, 1.0),
    out_dim=1024, patch_out_dim=1024, shared_head=True, use_bn_in_head=True, batch_size_per_gpu=256, epochs=2,
    lr=2e-3, warmup_epochs=0.5, min_lr=1e-5, weight_decay=0.04, weight_decay_end=0.1, momentum_teacher=0.99,
    warmup_teacher_temp=0.02, teacher_temp=0.02, warmup_teacher_temp_epochs=0, freeze_last_layer=0,
    drop_path_rate=0.0, gamma=None, eval_every=2, num_workers=0, output_dir="output/demo",
)


def get_args_parser():
    p = argparse.ArgumentParser(
        prog="main_dino.py", description="SimPool-SSL pretraining (DINO/iBOT with SimPool and AttMask)", add_help=True,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b, n = utils.bool_flag, utils.number
    zero_to_one = n(float, low=0, high=1)  # probabilities, fractions, momenta
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="vit_small", type=backbones.arch_arg, choices=list(backbones.ARCHS),
                   help="Backbone: a ViT (masking-capable; DINO's deit_tiny/deit_small mean vit_tiny/vit_small), "
                   "resnet50, convnext_* or fcvit_* (SimPool on the last feature map).")
    g.add_argument("--patch_size", default=16, type=n(int, low=1), help="Side of the square patches, in pixels. "
                   "Smaller patches give more tokens: better features, quadratically more attention cost.")
    g.add_argument("--mode", default="simpool", choices=backbones.MODES, help="'simpool': no [CLS] token, the image "
                   "vector is SimPool over patch tokens and SimPool's map guides masking; 'official': the DINO "
                   "[CLS] baseline, masking guided by the last block's [CLS] attention.")
    g.add_argument("--gamma", default="auto", type=gamma_arg, help="SimPool's generalised-mean exponent; 'None' "
                   "pools with the plain attention average (1.25 in the SimPool ViT-S recipe); 'auto': None for "
                   "ViTs, 2.0 for convnets.")
    g.add_argument("--use_beta", default=False, type=b, help="Learned scalar offset added to SimPool's output.")
    g.add_argument("--out_dim", default=65536, type=n(int, low=1), help="Output width of the DINO head (number of "
                   "prototypes). Large values need a long run to fill; small data wants small values.")
    g.add_argument("--patch_out_dim", default=8192, type=n(int, low=1), help="Output width of the iBOT patch head "
                   "(ignored with --shared_head True, which uses --out_dim).")
    g.add_argument("--shared_head", default=False, type=b, help="Project patch tokens with the same last "
                   "layer as the pooled vector (AttMask/iBOT option) instead of a separate one.")
    g.add_argument("--norm_last_layer", default=True, type=b, help="Keep the head's last layer "
                   "weight-normalised with fixed unit norm: more stable; False trains better small models.")
    g.add_argument("--use_bn_in_head", default=False, type=b, help="A BatchNorm of its own after each hidden layer "
                   "of the projection head MLP (DINO's flag and head).")
    g.add_argument("--norm_in_head", default=None, type=head_norm_arg, help="One normalisation layer placed after "
                   "every hidden layer of the projection head, its weights shared between them, as iBOT's and "
                   "AttMask's head builds it: None; bn, BatchNorm; syncbn, the same (every BatchNorm becomes "
                   "SyncBatchNorm under DDP on GPUs); ln, LayerNorm.")
    g.add_argument("--act_in_head", default="gelu", choices=list(vits.HEAD_ACTS), help="Activation of the "
                   "projection head's hidden layers (iBOT's flag).")
    g.add_argument("--shared_head_teacher", default=False, type=b, help="With --shared_head False: True makes the "
                   "teacher project patch tokens with its pooled-vector layer, as iBOT and AttMask do by default "
                   "(needs --patch_out_dim equal to --out_dim); False with its own patch layer, the EMA of the "
                   "student's. No effect with --shared_head True.")
    g.add_argument("--momentum_teacher", default=0.996, type=zero_to_one, help="Base EMA momentum of the "
                   "teacher, raised to 1 by a cosine over training. Use 0.99-0.996; higher for small batches.")
    g.add_argument("--drop_path_rate", "--drop_path", default=0.1, type=n(float, low=0, below=1), help="Stochastic "
                   "depth rate of the student (--drop_path is iBOT's and AttMask's name).")
    g.add_argument("--grad_checkpointing", default=False, type=b, help="Recompute the student backbone's "
                   "activations block by block in the backward instead of keeping them: much less memory "
                   "for large ViTs and batches, at about one more student forward per step.")
    g.add_argument("--compile", default=False, type=b, help="torch.compile the student's and teacher's "
                   "backbones and heads: fused kernels, a faster step once compiled; the first steps take "
                   "minutes while it compiles (needs a C++ compiler on CPU). See the README's Performance.")

    g = p.add_argument_group("temperatures and losses")
    g.add_argument("--warmup_teacher_temp", default=0.04, type=n(float, above=0), help="Teacher temperature at the "
                   "start of its linear warm-up. Lower it if training is unstable.")
    g.add_argument("--teacher_temp", default=0.04, type=n(float, above=0), help="Teacher temperature after warm-up; "
                   "above 0.07 tends to be unstable.")
    g.add_argument("--warmup_teacher_temp_epochs", default=0, type=n(int, low=0), help="Epochs of the linear "
                   "teacher-temperature warm-up (of both temperatures); as in DINO the value changes once per epoch, "
                   "reaching --teacher_temp in the last warm-up epoch.")
    g.add_argument("--warmup_teacher_patch_temp", default=0.04, type=n(float, above=0), help="Patch-head teacher "
                   "temperature at the start of warm-up.")
    g.add_argument("--teacher_patch_temp", default=0.07, type=n(float, above=0), help="Patch-head teacher temperature "
                   "after warm-up.")
    g.add_argument("--lambda1", default=1.0, type=n(float, low=0), help="Weight of the DINO loss on pooled vectors.")
    g.add_argument("--lambda2", default=1.0, type=n(float, low=0), help="Weight of the iBOT loss on masked patches; "
                   "0 keeps the masking (the student sees masked global crops) without that loss.")

    g = p.add_argument_group("masking (iBOT / AttMask)")
    g.add_argument("--pred_shape", default="attmask_high", choices=PRED_SHAPES, help="How to choose masked "
                   "patches: by the teacher's SimPool attention (attmask_high/low/hint), at random, or in blocks.")
    g.add_argument("--pred_ratio", default=[0.3], nargs="+", type=n(float, low=0, below=1), help="Fraction of "
                   "patches masked; 0 turns masking and the iBOT loss off (plain DINO). Several values (iBOT's "
                   "'0 0.3'): each draw picks one of them at random. The attmask_* modes draw one ratio per batch "
                   "(AttMask), rand and block one per crop (iBOT).")
    g.add_argument("--pred_ratio_var", default=[0.0], nargs="+", type=n(float, low=0, below=1), help="A drawn "
                   "ratio is uniform in pred_ratio +- pred_ratio_var (one value, or one per --pred_ratio value; "
                   "at most the ratio itself).")
    g.add_argument("--masking_prob", default=0.5, type=zero_to_one, help="attmask_* modes: probability that a "
                   "global crop is masked at all (rand and block mask every crop, as in AttMask).")
    g.add_argument("--use_masked_im_modeling", default=True, type=b, help="iBOT's switch: False shows the student "
                   "the global crops unmasked, while the masks still choose the tokens on which the iBOT loss "
                   "compares student and teacher (a patch-level DINO loss).")
    g.add_argument("--pred_start_epoch", default=0, type=n(int, low=0), help="Epoch from which masking and the "
                   "iBOT loss start; the patch temperature's warm-up starts there too, as in iBOT.")
    g.add_argument("--show_max", default=0.1, type=zero_to_one, help="attmask_hint: fraction of "
                   "most-attended patches among which hints are revealed.")
    g.add_argument("--show_ratio", default=None, type=zero_to_one, help="attmask_hint: fraction of all patches "
                   "revealed as hints (taken at random among the top --show_max); default, as AttMask: --show_max "
                   "times a second draw of the masking ratio (0.1 x 0.3: 5 of the top 19 of 196 patches).")

    g = p.add_argument_group("optimisation")
    g.add_argument("--use_fp16", default=False, type=b, help="On CUDA: fp16 autocast with a gradient scaler "
                   "(DINO's flag). Ignored on CPU, where --precision applies.")
    g.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="Autocast precision for "
                   "forward passes on CPU and CUDA; losses and softmaxes stay fp32.")
    g.add_argument("--weight_decay", default=0.04, type=n(float, low=0), help="Initial weight decay (biases and norms "
                   "excluded).")
    g.add_argument("--weight_decay_end", default=0.4, type=n(float, low=0), help="Final weight decay (cosine "
                   "schedule).")
    g.add_argument("--clip_grad", default=3.0, type=n(float, low=0), help="Per-parameter gradient norm clip; 0 "
                   "disables.")
    g.add_argument("--batch_size_per_gpu", default=64, type=n(int, low=1), help="Images per process per step.")
    g.add_argument("--epochs", default=100, type=n(int, low=0), help="Training epochs.")
    g.add_argument("--freeze_last_layer", default=1, type=n(int, low=0), help="Epochs during which the head's last "
                   "layer is not updated.")
    g.add_argument("--lr", default=0.0005, type=n(float, low=0), help="Peak learning rate for a global batch of 256; "
                   "scaled linearly by (batch_size_per_gpu * world_size) / 256.")
    g.add_argument("--warmup_epochs", default=10, type=n(float, low=0), help="Epochs of linear learning-rate warm-up.")
    g.add_argument("--min_lr", default=1e-6, type=n(float, low=0), help="Learning rate at the end of the cosine.")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "lars"], help="adamw for ViTs; "
                   "lars for convnets.")

    g = p.add_argument_group("multi-crop augmentation")
    g.add_argument("--global_crops_number", default=2, type=n(int, low=1), help="Global crops per image (iBOT's "
                   "flag; DINO: 2). The teacher sees these; the first takes --blur_prob's first value, every later "
                   "one DINO's second global crop's blur and solarization.")
    g.add_argument("--global_crops_scale", default=(0.4, 1.0), type=n(float, above=0, high=1), nargs=2, help="Area "
                   "range of the global crops, as fractions of the image.")
    g.add_argument("--local_crops_number", default=8, type=n(int, low=0), help="Number of local crops; 0 disables "
                   "them.")
    g.add_argument("--local_crops_scale", default=(0.05, 0.4), type=n(float, above=0, high=1), nargs=2, help="Area "
                   "range of the local crops.")
    g.add_argument("--global_crops_size", default=224, type=n(int, low=1), help="Side of global crops in pixels (also "
                   "the evaluation image size).")
    g.add_argument("--local_crops_size", default=96, type=n(int, low=1), help="Side of local crops in pixels.")
    g.add_argument("--blur_sigma", default=(0.1, 2.0), type=n(float, above=0), nargs=2, help="Range of the Gaussian "
                   "blur sigma, in output pixels.")
    g.add_argument("--blur_prob", default=(1.0, 0.1, 0.5), type=zero_to_one, nargs=3, help="Blur "
                   "probability of global crop 1, global crop 2 and the local crops.")
    g.add_argument("--color_jitter_prob", default=0.8, type=zero_to_one, help="Probability of colour "
                   "jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) per crop.")
    g.add_argument("--grayscale_prob", default=0.2, type=zero_to_one, help="Probability of turning a crop "
                   "gray.")
    g.add_argument("--solarization_prob", default=0.2, type=zero_to_one, help="Probability of solarizing "
                   "global crop 2.")

    g = p.add_argument_group("data, evaluation and run")
    g.add_argument("--data_path", default=None, type=str, help="ImageFolder root holding train/<class>/* (and "
                   "val/ for k-NN), the train folder itself (DINO's /imagenet/train: no online k-NN), or "
                   "'fashion-mnist'. Omitted: the CPU demo recipe.")
    g.add_argument("--subset", default=-1, type=utils.subset_size, help="Keep this many images per class (-1: all): "
                   "the first ones of each class in folder order (sorted file names), as AttMask picks them (--subset "
                   "260: its 20%% ImageNet split).")
    g.add_argument("--output_dir", default="output", type=str, help="Where checkpoint.pth, log.txt and "
                   "TensorBoard events go; a run there resumes from its checkpoint.")
    g.add_argument("--saveckp_freq", default=20, type=n(int, low=0), help="Also keep checkpoint{epoch:04}.pth every "
                   "this many epochs (0: never).")
    g.add_argument("--saveckp_iters", default=0, type=n(int, low=0), help="Also write checkpoint.pth every this many "
                   "iterations inside an epoch (with the sampler position), so a crash loses at most that many "
                   "steps (0: end of epoch only).")
    g.add_argument("--load_from", default=None, type=str, help="Start from this checkpoint of main_dino.py (a "
                   "path relative to --output_dir, as in iBOT, or absolute) when --output_dir has none of its own; "
                   "once it has, the newest there is resumed, so relaunching after a crash goes on from there. "
                   "iBOT's 'checkpoint.pth' is that own checkpoint: resumed when it exists.")
    g.add_argument("--keep_checkpoints", default=2, type=n(int, low=1), help="Keep this many newest checkpoints "
                   "(checkpoint.pth, checkpoint.pth.1, ...); resume falls back to an older one if the newest "
                   "is unreadable.")
    g.add_argument("--seed", default=0, type=n(int, low=0, high=utils.MAX_SEED), help="Random seed.")
    g.add_argument("--num_workers", default=10, type=n(int, low=0), help="Data-loading processes per rank "
                   "(ImageFolder).")
    utils.add_backend_arg(g)
    g.add_argument("--dist_url", default="env://", type=str, help="Process-group rendezvous URL.")
    g.add_argument("--local_rank", "--local-rank", default=0, type=int, help="Set by torch.distributed.launch; "
                   "ignored (LOCAL_RANK is read from the environment).")
    g.add_argument("--eval_every", default=0, type=n(int, low=0), help="Online k-NN of the teacher every this many "
                   "epochs and before training (0: never).")
    g.add_argument("--nb_knn", default=[20], type=n(int, low=1), nargs="+", help="k values for the online k-NN; the "
                   "first is logged as knn_top1/knn_top5.")
    g.add_argument("--temperature", default=0.07, type=n(float, above=0), help="k-NN vote temperature.")
    g.add_argument("--use_cuda", default=True, type=b, help="Online k-NN: search with the features on the GPU "
                   "when there is one (AttMask's flag); False keeps them in host memory. No effect on CPU.")
    g.add_argument("--cpu", action="store_true", help="Run on CPU even when CUDA is available.")
    add_feature_args(p, n_last_blocks=1).description = "Features of the online k-NN (AttMask's flags)."
    return p


def head_norm_arg(text):
    """argparse type of --norm_in_head: None or one of vision_transformer.HEAD_NORMS."""
    if str(text).lower() == "none":
        return None
    if text not in vits.HEAD_NORMS:
        raise argparse.ArgumentTypeError(f"expected None, {', '.join(vits.HEAD_NORMS)}, got {text!r}")
    return text


def parse_args(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.data_path is None:
        parser.set_defaults(**DEMO_RECIPE)
        args = parser.parse_args(argv)
        args.demo = True
    else:
        args.demo = False
    args.ignored_flags = []
    if args.mode == "official":
        # [CLS] pooling has no SimPool. SimPool's recipes switch to the baseline by changing --mode
        # alone, so its knobs are accepted, logged as ignored, and recorded as what the model has.
        args.ignored_flags = [f"--{k} {getattr(args, k)}" for k in ("gamma", "use_beta")
                              if getattr(args, k) != parser.get_default(k)]
        args.gamma, args.use_beta = None, False
    check_args(args)
    return args


def check_args(args):
    """Resolve --gamma auto into the value the backbone uses (so args and checkpoints record
    it); refuse ranges given high end first, crops smaller than one ViT patch or a convnet's
    smallest input, and --compile on CPU without a C++ compiler (inductor builds its CPU
    kernels with one), as one-line RunErrors. (Each flag's own range is checked by its type.)"""
    args.gamma = backbones.resolve_gamma(args.arch, args.gamma)
    if args.use_bn_in_head and args.norm_in_head is not None:
        raise utils.RunError(f"--use_bn_in_head True (DINO's head: a BatchNorm of its own after each hidden layer) "
                             f"and --norm_in_head {args.norm_in_head} (iBOT's: one norm shared by the hidden layers) "
                             "both choose the head's norm; pass one of them")
    if args.norm_in_head == "syncbn":  # the same layer: every BatchNorm becomes a SyncBatchNorm under DDP
        args.norm_in_head = "bn"
    args.head_norm_shared = args.norm_in_head is not None  # recorded for the resume check
    if args.shared_head_teacher and not args.shared_head and args.patch_out_dim != args.out_dim:
        raise utils.RunError(f"--shared_head_teacher True projects the teacher's patch tokens to --out_dim "
                             f"{args.out_dim} values and the student's (--shared_head False) to --patch_out_dim "
                             f"{args.patch_out_dim}; make the two equal, or pass --shared_head True")
    on_cpu = args.cpu or not torch.cuda.is_available()
    compiler = os.environ.get("CXX", "g++")  # the one inductor looks for
    if args.compile and on_cpu and not shutil.which(compiler):
        raise utils.RunError(f"--compile on CPU needs a C++ compiler to build its kernels and {compiler} is not on "
                             "PATH; install g++ (or set CXX) or drop --compile")
    utils.require_low_first(args, "global_crops_scale", "local_crops_scale", "blur_sigma")
    if args.global_crops_number + args.local_crops_number == 1:
        raise utils.RunError("one crop per image leaves the DINO loss no pair of views; use --global_crops_number 2 "
                             "or add local crops")
    try:
        pred_ratio_pairs(args.pred_ratio, args.pred_ratio_var)
    except ValueError as e:
        raise utils.RunError(f"--{e}") from None
    if args.arch in backbones.VIT_ARCHS:
        for flag in ("global_crops_size",) + (("local_crops_size",) if args.local_crops_number > 0 else ()):
            if getattr(args, flag) < args.patch_size:
                raise utils.RunError(f"--{flag} {getattr(args, flag)} is smaller than one patch (--patch_size "
                                     f"{args.patch_size})")
    else:
        smallest = backbones.ConvNetBackbone.min_input_size
        sizes = [("--global_crops_size", args.global_crops_size)]
        if args.local_crops_number > 0:
            sizes.append(("--local_crops_size", args.local_crops_size))
        small = [(flag, size) for flag, size in sizes if size < smallest]
        if small:
            raise utils.RunError(f"--arch {args.arch} needs crops of at least {smallest} pixels, got "
                                 f"{' and '.join(f'{flag} {size}' for flag, size in small)}; pass "
                                 f"{' '.join(f'{flag} {smallest}' for flag, _ in small)} or larger (docs/backbones.md)")


class MultiCropNetwork(nn.Module):
    """Backbone + head over view-major crop batches: the global crops (optionally
    masked) and the local crops run as two backbone calls, the head sees all pooled
    vectors at once, and the patch tokens at the masks' positions go through the patch
    head (``hide=False``: the masks choose those tokens without hiding them)."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, globals_, locals_=None, masks=None, predict_patches=True, hide=True):
        out = self.backbone.forward_features(globals_, mask=masks if hide else None)
        pooled = out["pooled"]
        if locals_ is not None:
            pooled = torch.cat([pooled, self.backbone(locals_)])
        patch_logits = None
        if masks is not None and predict_patches:
            patch_logits = self.head.forward_patches(out["patch_tokens"][masks])
        return self.head(pooled), patch_logits


def patch_logit_dim(args):
    """Width of the patch logits the iBOT loss compares: the teacher's patch projection's."""
    return args.out_dim if args.shared_head or args.shared_head_teacher else args.patch_out_dim


def build_network(args, drop_path_rate, grad_checkpointing=False, teacher=False):
    """Backbone + DINO head as ``args`` describe them; ``grad_checkpointing`` for the student
    (the teacher keeps no activations anyway). ``teacher``: with --shared_head_teacher the
    head has no patch layer of its own (patch tokens go through its pooled-vector layer)."""
    backbone = backbones.build_backbone(args.arch, patch_size=args.patch_size, img_size=args.global_crops_size,
                                        mode=args.mode, gamma=args.gamma, use_beta=args.use_beta,
                                        drop_path_rate=drop_path_rate)
    backbone.set_grad_checkpointing(grad_checkpointing)
    head = vits.DINOHead(backbone.embed_dim, args.out_dim, use_bn=args.use_bn_in_head, norm=args.norm_in_head,
                         share_norm=args.head_norm_shared, act=args.act_in_head,
                         norm_last_layer=args.norm_last_layer,
                         patch_out_dim=args.out_dim if args.shared_head else args.patch_out_dim,
                         shared_head=args.shared_head or (teacher and args.shared_head_teacher))
    if args.compile:
        # methods, not modules, are wrapped: the state-dict keys stay those of the plain network.
        # The backbone sees a few fixed shapes (global, local, evaluation crops): one static
        # graph each; the patch head's row count changes every step: dynamic.
        backbone.forward_features = torch.compile(backbone.forward_features, dynamic=False)
        head.forward = torch.compile(head.forward)
        head.forward_patches = torch.compile(head.forward_patches)
    return MultiCropNetwork(backbone, head)


def build_student_teacher(args, device):
    """(student, student as DDP trains it, teacher): with several processes the student is
    wrapped in DDP, which overwrites every rank's weights with rank 0's (each rank drew its own
    initialisation from seed + rank); the teacher is copied after that, so all ranks start from
    the same teacher."""
    student = build_network(args, args.drop_path_rate, args.grad_checkpointing).to(device)
    teacher = build_network(args, 0.0, teacher=True).to(device)
    if args.world_size > 1 and backbones.uses_batchnorm(student):
        if backbones.sync_batchnorm_supported(device):
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        else:  # torch's SyncBatchNorm has no CPU kernel
            logger.warning("BatchNorm statistics stay per process on CPU (SyncBatchNorm needs a GPU).")
    student_ddp = student
    if args.world_size > 1:
        # static graph: the flags fix which parameters the loss reaches (without masking or the
        # iBOT loss, masked_embed and the patch head's last layer get no gradient), and DDP finds
        # them in the first step instead of searching the autograd graph every step
        student_ddp = nn.parallel.DistributedDataParallel(
            student, device_ids=[args.gpu] if device.type == "cuda" else None, static_graph=True)
    init_teacher(teacher, student)
    return student, student_ddp, teacher


def init_teacher(teacher, student):
    """Copy the student's weights into the teacher (all of them but the student's patch layer
    that a --shared_head_teacher teacher lacks) and switch off the teacher's gradients."""
    student_state = student.state_dict()
    teacher.load_state_dict({k: student_state[k] for k in teacher.state_dict()})
    teacher.requires_grad_(False)


class Diverged(RuntimeError):
    pass


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can begin an epoch part-way, after ``start`` of this
    rank's samples, so a mid-epoch resume neither repeats nor skips a sample.

    With ``draw_seeds`` it yields (index, seed) pairs, the seed a function of --seed, the
    epoch and the index only, for data sets that crop in loader workers (SafeImageFolder):
    an image's crops then do not depend on which worker serves it, on --num_workers, or on
    where a resumed epoch began."""

    def __init__(self, *args, draw_seeds=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = 0
        self.draw_seeds = draw_seeds

    def __iter__(self):
        indices = itertools.islice(super().__iter__(), self.start, None)
        if not self.draw_seeds:
            return indices
        epoch_key = (self.seed * 1_000_003 + self.epoch) << 32
        return ((i, (epoch_key | i) % 2 ** 63) for i in indices)

    def __len__(self):
        return self.num_samples - self.start


def train_dino(args):
    # ---- data first: a bad --data_path is a one-line error before any process group starts
    augment = MultiCropAugmentation(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                    args.global_crops_size, args.local_crops_size, blur_sigma=args.blur_sigma,
                                    color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob,
                                    blur_prob=args.blur_prob, solarization_prob=args.solarization_prob,
                                    global_crops_number=args.global_crops_number)
    dataset = build_dataset(args.data_path, "train", args.subset, transform=augment.crop_image, split_folder_ok=True)
    augment.set_normalization(dataset.mean, dataset.std)
    world_size = utils.launch_environment()[1]  # the sampler drops each epoch's last incomplete global batch
    if len(dataset) < args.batch_size_per_gpu * world_size:
        raise DataError(f"{len(dataset)} training images in {args.data_path} are fewer than one global batch of "
                        f"{args.batch_size_per_gpu * world_size} (--batch_size_per_gpu {args.batch_size_per_gpu} x "
                        f"{world_size} process(es)); lower --batch_size_per_gpu or use fewer processes")
    utils.ensure_writable_dir(args.output_dir)

    utils.init_distributed_mode(args)
    utils.fix_random_seeds(args.seed, args.rank)
    device = args.device
    if args.demo:
        logger.info("No --data_path given: running the CPU demo recipe on Fashion-MNIST "
                    f"(output in {args.output_dir}; flags you pass override the recipe).")
    logger.info("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    if args.ignored_flags:
        logger.warning(f"{' and '.join(args.ignored_flags)} ignored: --mode official pools with the [CLS] token, "
                       "without SimPool")

    # uint8 images in; multi-crop views out, with the photometric part on the device
    in_memory = not hasattr(dataset, "samples")
    sampler = ResumableSampler(dataset, num_replicas=args.world_size, rank=args.rank, shuffle=True,
                               seed=args.seed, drop_last=True, draw_seeds=not in_memory)
    loader = DataLoader(dataset, sampler=sampler, batch_size=args.batch_size_per_gpu, drop_last=True,
                        num_workers=0 if in_memory else args.num_workers, pin_memory=device.type == "cuda",
                        collate_fn=(lambda b: (b, [])) if in_memory else skip_bad_collate(  # ((globals, locals), labels)
                            lambda s: (augment.collate([x for x, _ in s]), torch.tensor([y for _, y in s]))),
                        generator=torch.Generator())  # own RNG: iter(loader) must not draw from the training
    # stream, or a mid-epoch resume (RNG restored, then a new iterator) would shift every later draw
    niter = sampler.num_samples // args.batch_size_per_gpu  # steps per epoch (>= 1: checked before init)
    if os.path.normpath(getattr(dataset, "root", "")) == os.path.normpath(args.data_path):
        logger.info(f"--data_path {args.data_path} has class folders and no 'train/' folder: it is the train split "
                    "itself (DINO's form; SimPool's and AttMask's give the folder that holds train/).")
    logger.info(f"Data: {len(dataset)} training images from {args.data_path}, {niter} steps per epoch.")

    # ---- student, teacher (EMA of the student, no gradients), losses, optimizer
    student, student_ddp, teacher = build_student_teacher(args, device)
    name = f"{args.arch}/{args.patch_size}" if args.arch in backbones.VIT_ARCHS else args.arch
    logger.info(f"Student and teacher: {name} ({args.mode}), "
                f"{sum(p.numel() for p in student.backbone.parameters()) / 1e6:.2f}M backbone parameters.")

    ncrops = args.global_crops_number + args.local_crops_number
    dino_loss = DINOLoss(args.out_dim, ncrops, global_crops=args.global_crops_number).to(device)
    patch_loss = PatchLoss(patch_logit_dim(args)).to(device)
    masking = uses_masking(args, student.backbone)
    optimizer = build_optimizer(args.optimizer, param_groups(student))
    fp16 = args.use_fp16 and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if fp16 else None
    amp_dtype = torch.float16 if fp16 else (torch.bfloat16 if args.precision == "bf16" else None)

    # ---- per-iteration schedules
    global_batch = args.batch_size_per_gpu * args.world_size
    if args.warmup_epochs >= args.epochs:  # DINO asserts here; a short run on one's own data should still run
        logger.warning(f"warning: --warmup_epochs {args.warmup_epochs:g} >= --epochs {args.epochs}: the learning "
                       f"rate only ramps up, to {args.epochs / args.warmup_epochs:.0%} of --lr at most, with no "
                       "cosine decay")
    schedules = {
        "lr": utils.cosine_scheduler(args.lr * global_batch / 256, args.min_lr, args.epochs, niter,
                                     warmup_epochs=args.warmup_epochs),
        "wd": utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter),
        "momentum": utils.cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, niter),
        "teacher_temp": utils.linear_warmup_constant(args.warmup_teacher_temp, args.teacher_temp, args.epochs,
                                                     niter, args.warmup_teacher_temp_epochs),
        "patch_temp": utils.linear_warmup_constant(args.warmup_teacher_patch_temp, args.teacher_patch_temp,
                                                   args.epochs, niter, args.warmup_teacher_temp_epochs,
                                                   start_epoch=args.pred_start_epoch),
    }

    # ---- resume from the newest readable checkpoint in output_dir
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    start_epoch, start_step = 0, 0
    if utils.is_main_process():  # no writer of this run is alive yet: a temp file here is a killed write's
        utils.remove_stale_temporaries(args.output_dir)
    ckpt, ckpt_file = utils.load_latest_checkpoint(ckpt_path, args.keep_checkpoints)
    start_file = utils.load_from_path(args.output_dir, args.load_from, ckpt_path)
    if ckpt is None and start_file:  # iBOT's start point: only while this run has no checkpoint of its own
        ckpt, ckpt_file = utils.load_checkpoint(start_file), start_file
    elif start_file:
        logger.info(f"--load_from {args.load_from} not used: {args.output_dir} has a checkpoint of its own.")
    if ckpt is not None:
        check_resumable(ckpt, ckpt_file, "pass --load_from a checkpoint.pth of main_dino.py"
                        if ckpt_file == start_file else None)
        check_compatible(ckpt.get("args", {}), args, ckpt_file)
        try:
            utils.restore_modules(ckpt, student=student, teacher=teacher, optimizer=optimizer, scaler=scaler,
                                  dino_loss=dino_loss, patch_loss=patch_loss)
        except RuntimeError as e:  # a flag the check above does not list, e.g. a crop size that sizes pos_embed
            mismatch = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line),
                            str(e).splitlines()[0])
            raise utils.RunError(f"{ckpt_file} does not fit the model these flags build ({mismatch}); use the "
                                 "flags it was trained with (its 'args' entry) or another --output_dir") from None
        start_epoch, start_step = ckpt["epoch"], ckpt.get("epoch_step", 0)
        restore_rng(ckpt.get("rng"), args.rank, device)
        logger.info(f"Resumed from {ckpt_file} at epoch {start_epoch}, step {start_step} "
                    f"(iteration {ckpt['iteration']}).")

    def save(epoch, epoch_step):
        """Checkpoint after ``epoch_step`` steps of ``epoch`` (every rank joins the RNG gather)."""
        if epoch_step == niter:
            epoch, epoch_step = epoch + 1, 0
        state = {"student": student.state_dict(), "teacher": teacher.state_dict(),
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                 "dino_loss": dino_loss.state_dict(), "patch_loss": patch_loss.state_dict(),
                 "epoch": epoch, "epoch_step": epoch_step, "iteration": epoch * niter + epoch_step,
                 "sampler_position": epoch_step * args.batch_size_per_gpu, "args": serializable_args(args),
                 "rng": rng_state(device)}
        if utils.is_main_process():
            utils.save_checkpoint(state, ckpt_path, keep=args.keep_checkpoints)
            if epoch_step == 0 and args.saveckp_freq and epoch % args.saveckp_freq == 0:
                utils.save_checkpoint(state, os.path.join(args.output_dir, f"checkpoint{epoch:04}.pth"))

    writer = None
    if utils.is_main_process():
        writer = utils.TensorboardScalars(args.output_dir)
    log_path = os.path.join(args.output_dir, "log.txt")
    knn_data = build_knn_data(args) if args.eval_every > 0 else None
    if knn_data is not None:
        log_feature_choice(FrozenFeatures(teacher.backbone, args.n_last_blocks, args.avgpool_patchtokens),
                           {"arch": args.arch, "mode": args.mode}, args)
    if knn_data is not None and start_epoch == 0 and start_step == 0:
        log_epoch({"epoch": -1, **online_knn(teacher.backbone, knn_data, args, amp_dtype)}, log_path, writer)

    logger.info(f"Training for {args.epochs - start_epoch} epochs.")
    start_time = time.time()
    bad_files = set()
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        loader.generator.manual_seed(args.seed + 1_000_003 * epoch + args.rank)  # loader workers' seeds
        first_step = start_step if epoch == start_epoch else 0
        sampler.start = first_step * args.batch_size_per_gpu
        stats = train_one_epoch(student, student_ddp, teacher, dino_loss, patch_loss, loader, augment, optimizer,
                                scaler, amp_dtype, epoch, first_step, niter,
                                masking and epoch >= args.pred_start_epoch, schedules, save, bad_files, writer, args)
        save(epoch, niter)
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}}
        if knn_data is not None and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            record.update(online_knn(teacher.backbone, knn_data, args, amp_dtype))
        log_epoch(record, log_path, writer)
    total = datetime.timedelta(seconds=int(time.time() - start_time))
    logger.info(f"Training time {total}.")
    if writer is not None:
        writer.close()
    if args.demo and utils.is_main_process():  # rank 0 writes log.txt; the others may read it half-written
        print_demo_summary(log_path, full_train_set=args.subset <= 0)


def train_one_epoch(student, student_ddp, teacher, dino_loss, patch_loss, loader, augment, optimizer, scaler,
                    amp_dtype, epoch, first_step, niter, masking, schedules, save, bad_files, writer, args):
    device = args.device
    metrics = utils.MetricLogger()
    header = f"Epoch [{epoch + 1}/{args.epochs}]"
    skipped = 0
    for i, (batch, bad) in enumerate(metrics.log_every(loader, 10, header, start=first_step, total=niter),
                                     start=first_step):
        it = niter * epoch + i  # global iteration
        skipped += len(bad)
        for path in set(bad) - bad_files:  # name each unreadable file once per run
            logger.warning(f"skipped unreadable image {path}")
            bad_files.add(path)
        # a rank whose whole batch was unreadable has nothing to train on; every rank skips the
        # step with it, or its collectives would pair with the next step's on the others
        no_batch = utils.all_reduce_sum(batch is None, device) if args.world_size > 1 else batch is None
        if no_batch:
            continue
        images = batch[0]
        for j, group in enumerate(optimizer.param_groups):
            group["lr"] = float(schedules["lr"][it])
            if j == 0:  # the decayed group; biases and norms stay at 0
                group["weight_decay"] = float(schedules["wd"][it])

        # multi-crop views, view-major: globals (2B, 3, g, g), locals (nB, 3, l, l)
        images = images.to(device, non_blocking=True) if torch.is_tensor(images) else \
            tuple(x.to(device, non_blocking=True) if x is not None else None for x in images)
        globals_, locals_ = augment(images)
        loss, parts = distillation_loss(student_ddp, teacher, dino_loss, patch_loss, globals_, locals_, masking,
                                        schedules["teacher_temp"][it], schedules["patch_temp"][it], amp_dtype, args)

        # a non-finite loss on any rank stops every rank; the last checkpoint stays as it was
        n_bad = utils.all_reduce_sum(not math.isfinite(loss.item()), device)
        if n_bad > 0:  # a rank whose own loss is finite names the others, not its own value
            what = f"loss is {loss.item()}" if not math.isfinite(loss.item()) else \
                f"loss is not finite on {int(n_bad)} other rank(s)"
            raise Diverged(f"{what} at iteration {it} (epoch {epoch}); stopping. "
                           f"The last checkpoint in {args.output_dir} is intact.")
        optimizer_step(loss, student, teacher, optimizer, scaler, epoch, schedules["momentum"][it], args)

        values = {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}, "lr": schedules["lr"][it],
                  "wd": schedules["wd"][it], "teacher_entropy": dino_loss.teacher_entropy.item(),
                  "teacher_batch_entropy": dino_loss.teacher_batch_entropy.item()}
        metrics.update(**values)
        if writer is not None and it % 10 == 0:
            for k, v in values.items():
                writer.add_scalar(f"iter/{k}", v, it)
        if args.saveckp_iters and (i + 1) % args.saveckp_iters == 0 and i + 1 < niter:
            save(epoch, i + 1)
    stats = metrics.averages()
    stats["skipped_images"] = int(utils.all_reduce_sum(skipped, device))
    if "loss" not in stats and stats["skipped_images"] and first_step < niter:  # every step skipped, on all ranks
        raise DataError(f"no training image of epoch {epoch} could be read ({stats['skipped_images']} "
                        f"unreadable files in {args.data_path}; the log names them)")
    warn_if_collapsed(stats, args.out_dim)
    return stats


def warn_if_collapsed(stats, out_dim):
    """DINO's two failure modes, seen in the teacher's output distribution over an epoch:
    uniform for every image (entropy ~ log K) or one prototype for all (batch entropy ~ 0)."""
    if "teacher_entropy" not in stats:
        return
    log_k = math.log(out_dim)
    if stats["teacher_entropy"] > 0.95 * log_k:
        logger.warning(f"warning: possible collapse: the teacher's outputs are nearly uniform (entropy "
                       f"{stats['teacher_entropy']:.2f} of {log_k:.2f}); try a lower --teacher_temp or --lr, or "
                       "a longer --warmup_epochs")
    elif stats["teacher_batch_entropy"] < 0.1 * log_k:
        logger.warning(f"warning: possible collapse: the teacher maps the whole batch onto a few prototypes "
                       f"(batch entropy {stats['teacher_batch_entropy']:.2f} of {log_k:.2f}); try a lower --lr "
                       "or a higher --teacher_temp")


def uses_masking(args, backbone):
    """Whether masks are drawn for the global crops: a --pred_ratio above 0, a --masking_prob
    above 0 for the attmask_* modes, and a backbone with a mask token (a warning otherwise).
    --lambda2 0 keeps the masking and drops only the iBOT loss, as in iBOT; masks that neither
    hide tokens (--use_masked_im_modeling False) nor feed that loss are not drawn."""
    if max(args.pred_ratio) == 0 or (args.masking_prob == 0 and args.pred_shape.startswith("attmask")):
        return False
    if not args.use_masked_im_modeling and args.lambda2 == 0:
        return False
    if not backbones.supports_masking(backbone):
        logger.warning(backbones.masking_off_message(args.arch))
        return False
    return True


def distillation_loss(student, teacher, dino_loss, patch_loss, globals_, locals_, masking, teacher_temp,
                      patch_temp, amp_dtype, args):
    """The self-distillation objective of one batch of crops: returns the weighted total
    and its parts {"dino_loss", "patch_loss"} ("patch_loss" only with masking and --lambda2 > 0)."""
    predict_patches = masking and args.lambda2 > 0
    with torch.autocast(globals_.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        # teacher: pooled logits and the pooling attention on the unmasked global crops
        with torch.no_grad():
            t_out = teacher.backbone.forward_features(globals_, return_attention=masking)
            t_logits = teacher.head(t_out["pooled"])
            masks = None
            if masking:  # AttMask: the teacher's map on this very crop picks the patches to hide
                grid = teacher.backbone.grid_size(*globals_.shape[-2:])
                masks = make_masks(t_out["attention"], grid, args.pred_shape, args.pred_ratio,
                                   args.pred_ratio_var, args.masking_prob, args.show_max, args.show_ratio)
                if predict_patches:
                    t_patch = teacher.head.forward_patches(t_out["patch_tokens"][masks])
        # student: masked globals (unmasked with --use_masked_im_modeling False) and unmasked locals
        s_logits, s_patch = student(globals_, locals_, masks, predict_patches=predict_patches,
                                    hide=args.use_masked_im_modeling)
    parts = {"dino_loss": dino_loss(s_logits, t_logits, teacher_temp)}
    loss = args.lambda1 * parts["dino_loss"]
    if predict_patches:  # iBOT: the student predicts the teacher's tokens where it saw the mask token
        parts["patch_loss"] = patch_loss(s_patch, t_patch, masks.nonzero()[:, 0], masks.shape[0], patch_temp)
        loss = loss + args.lambda2 * parts["patch_loss"]
    return loss, parts


def optimizer_step(loss, student, teacher, optimizer, scaler, epoch, momentum, args):
    """Backward, per-parameter clip, early last-layer freeze, step, then the teacher EMA."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if args.clip_grad:
        clip_gradients(student, args.clip_grad)
    cancel_last_layer_gradients(student, epoch, args.freeze_last_layer)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    ema_update(teacher, student, momentum)


def build_knn_data(args):
    """Train (memory) and evaluation splits for the online k-NN; None if there is no
    evaluation split."""
    if args.data_path != FASHION_MNIST and not os.path.isdir(os.path.join(args.data_path, "val")):
        logger.warning(f"No val/ folder in {args.data_path}: online k-NN is off.")
        return None
    return build_eval_splits(args.data_path, args.global_crops_size, args.subset)


def online_knn(backbone, knn_data, args, amp_dtype):
    train, test = knn_data
    features = FrozenFeatures(backbone, args.n_last_blocks, args.avgpool_patchtokens)
    kw = dict(batch_size=max(args.batch_size_per_gpu, 256), device=args.device, image_size=args.global_crops_size,
              amp_dtype=amp_dtype)
    if hasattr(train, "samples"):  # an image folder: unreadable files become rows that are dropped
        kw.update(num_workers=args.num_workers, collate=tolerant_collate(args.global_crops_size))
    train_f, train_y = drop_unreadable(*extract_features(features, train, header="k-NN train features", **kw))
    test_f, test_y = drop_unreadable(*extract_features(features, test, header="k-NN test features", **kw))
    results = knn_classify(train_f, train_y, test_f, test_y, ks=args.nb_knn, temperature=args.temperature,
                           num_classes=len(train.classes), use_gpu=args.device.type == "cuda" and args.use_cuda)
    for k, r in results.items():
        logger.info(f"k-NN (k={k}): top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%")
    first = results[min(results, key=lambda k: abs(k - args.nb_knn[0]))]
    return {"knn_top1": first["top1"], "knn_top5": first["top5"]}


def log_epoch(record, log_path, writer):
    if not utils.is_main_process():
        return
    utils.append_json_line(log_path, record)
    for k, v in record.items():
        if k != "epoch" and isinstance(v, (int, float)):
            writer.add_scalar(f"epoch/{k}", v, record["epoch"])
    writer.flush()


def serializable_args(args):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
            if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


PYTHON_RNG_BYTES = 625 * 8  # random.getstate()[1]: 625 int64 words


def rng_state(device):
    """This rank's torch CPU, Python and (on CUDA) GPU generator states as one uint8 tensor,
    gathered from all ranks so that a resume continues every rank's random stream where it
    stopped (masks draw on the CPU; on CUDA the photometric augmentation and drop-path draw on
    the GPU)."""
    parts = [torch.get_rng_state(), torch.tensor(random.getstate()[1], dtype=torch.int64).view(torch.uint8)]
    if device.type == "cuda":
        parts.append(torch.cuda.get_rng_state(device))
    state = torch.cat(parts)
    if utils.get_world_size() > 1:
        states = [torch.empty_like(state) for _ in range(utils.get_world_size())]
        dist.all_gather_object(states, state)
        return states
    return [state]


def restore_rng(states, rank, device):
    if not states or rank >= len(states):
        return  # a run resumed with more ranks: new ranks keep their fresh seeds
    n_torch = torch.get_rng_state().numel()
    state = states[rank]
    torch.set_rng_state(state[:n_torch].clone())
    python = state[n_torch:n_torch + PYTHON_RNG_BYTES].clone()
    random.setstate((3, tuple(python.view(torch.int64).tolist()), None))
    gpu = state[n_torch + PYTHON_RNG_BYTES:]
    if device.type == "cuda" and gpu.numel():  # absent in a checkpoint written on CPU
        torch.cuda.set_rng_state(gpu.clone(), device)


def check_resumable(ckpt, path, advice=None):
    """A resume from a file that is not a training checkpoint (say, a backbone exported over
    it) is a one-line error, not a KeyError or a run that goes on with fresh weights."""
    advice = advice or "move it away or use another --output_dir"
    if not isinstance(ckpt, dict):
        raise utils.RunError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint of main_dino.py; {advice}")
    missing = [k for k in TRAINING_KEYS if k not in ckpt]
    if missing:
        what = "an exported backbone" if "format" in ckpt else f"not a checkpoint of main_dino.py (no {missing[0]!r})"
        raise utils.RunError(f"{path} is {what}, so there is nothing to resume; {advice}")


def check_compatible(saved, args, path):
    """A resume whose model differs from the checkpoint's is a one-line error."""
    saved = dict(saved)
    if saved.get("mode") == "official":  # no SimPool: its recorded knobs (older runs kept the flags) fit no weights
        saved.pop("gamma", None), saved.pop("use_beta", None)
    if saved.get("gamma") == "auto":  # checkpoints written before --gamma auto was resolved at parse time
        saved["gamma"] = backbones.resolve_gamma(saved.get("arch", args.arch), "auto")
    if "norm_in_head" in saved and "head_norm_shared" not in saved:
        # written before --norm_in_head shared one norm between the hidden layers: each had its own, and
        # --use_bn_in_head True was recorded as --norm_in_head bn too
        saved["head_norm_shared"] = False
        if saved.get("use_bn_in_head"):
            saved["norm_in_head"] = None
    if saved.get("head_norm_shared", args.head_norm_shared) != args.head_norm_shared:
        raise utils.RunError(f"{path} has a head with a norm of its own after each hidden layer (written before "
                             "--norm_in_head shared one between them, as iBOT's head does) but this run's "
                             f"--norm_in_head {args.norm_in_head} shares one; use another --output_dir")
    for key in ("arch", "patch_size", "out_dim", "mode", "patch_out_dim", "shared_head", "shared_head_teacher",
                "gamma", "use_beta", "use_bn_in_head", "norm_in_head", "act_in_head", "norm_last_layer",
                "optimizer"):  # what the saved weights and optimizer state fit (and the model they belong to)
        if key in saved and saved[key] != getattr(args, key):
            raise utils.RunError(f"{path} was trained with --{key} {saved[key]} but this run asks for "
                                        f"--{key} {getattr(args, key)}; use another --output_dir or the same flags")


RAW_PIXEL_KNN = 85.69  # bench/raw_pixel_knn.py: k=20 on the 60 000 training images, the 10 000 test images


def print_demo_summary(log_path, full_train_set=True):
    with open(log_path) as f:
        records = [json.loads(line) for line in f]
    knn = [r for r in records if "knn_top1" in r]
    if len(knn) >= 2:
        before, after = knn[0]["knn_top1"], knn[-1]["knn_top1"]
        baseline = f" Raw-pixel k-NN (k=20) on the same split: {RAW_PIXEL_KNN:.2f}%." if full_train_set else ""
        logger.info(f"Teacher k-NN top-1 on the Fashion-MNIST test split: before training {before:.2f}%, "
                    f"after {after:.2f}% ({after - before:+.2f} points).{baseline}")


def main(argv=None):
    utils.run_command(lambda: train_dino(parse_args(argv)), user_errors=(DataError, Diverged),
                      interrupted="interrupted: the checkpoints written so far are intact; the same command resumes "
                                  "from the newest")


if __name__ == "__main__":
    main()
