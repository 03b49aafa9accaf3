"""Linear-probe evaluation of a frozen backbone, sweeping many learning rates in one run.

    python eval_linear.py --pretrained_weights output/checkpoint.pth --data_path fashion-mnist --epochs 10
    torchrun --nproc_per_node 8 eval_linear.py --pretrained_weights ckpt.pth --data_path /imagenet --epochs 100

Features are frozen: SimPool's pooled vector (simpool mode), or in official [CLS] mode
the concatenated [CLS] tokens of the --n_last_blocks last blocks (each through the final
norm), optionally with the average of the last block's patch tokens (DINO's protocol;
--avgpool_patchtokens also takes iBOT's 0/1/2, 1 being that average alone).
Convnets (resnet50, convnext_*, fcvit_*) give their pooled vector (SimPool, or their own
global average pooling in official mode); --n_last_blocks and --avgpool_patchtokens do not
apply to them and are ignored (logged once). Convnets see images of at least 32 px.
One linear head per (lr, wd) pair is trained on the same features: one backbone forward
per batch, all heads updated by one batched einsum (SGD, momentum 0.9, a cosine schedule stepped
once per epoch, as DINO's CosineAnnealingLR).
The head with the best top-1 on the evaluation split wins; linear.json holds every
head's result, linear_head.pth the best head's weights. A run resumes from
linear_checkpoint.pth in --output_dir; --evaluate only scores a saved head. Each key of
``--checkpoint_key teacher,student`` gets its own sweep in --output_dir/KEY.

With ``--train_augment False`` the training features are extracted once and cached
(the fast CPU setting); otherwise each epoch sees RandomResizedCrop + flip augmentation.
"""

import argparse
import logging
import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.ops import roi_align
from torchvision.transforms import v2

from simpool import utils
from simpool.augment import random_resized_crop_boxes
from simpool.checkpoints import add_model_args, load_pretrained
from simpool.data import normalize_batch
from simpool.evaluation import (
    EvalError,
    FrozenFeatures,
    add_data_args,
    add_feature_args,
    add_precision_arg,
    add_window_size_arg,
    build_eval_splits,
    drop_unreadable,
    evaluate_each_key,
    is_in_memory,
    load_saved_head,
    log_feature_choice,
    resolve_eval_precision,
    run_main,
    tolerant_collate,
    weights_fingerprint,
)
from simpool.knn import extract_features
from simpool.precision import autocast, autocast_dtype
from simpool.utils import number

logger = logging.getLogger("simpool")
# DINO-style sweep, extended upwards: short runs (a few epochs on CPU) often want larger rates.
DEFAULT_LRS = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1, 2e-1, 5e-1, 1.0]


def get_args_parser():
    b = utils.bool_flag
    p = argparse.ArgumentParser(
        prog="eval_linear.py",
        description="Linear probe on frozen features, many learning rates at once",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_window_size_arg(add_model_args(p, several_keys=True))
    add_feature_args(p, n_last_blocks=4)
    g = add_data_args(p)
    g.add_argument(
        "--train_augment",
        default=True,
        type=b,
        help="RandomResizedCrop + flip on training images, "
        "a backbone pass per epoch (DINO protocol). False: extract training features once and train "
        "on the cache (much faster on CPU).",
    )
    g.add_argument(
        "--crop_scale",
        default=(0.08, 1.0),
        type=number(float, above=0, high=1),
        nargs=2,
        help="Area range of the training RandomResizedCrop.",
    )
    g.add_argument("--batch_size_per_gpu", default=128, type=number(int, low=1), help="Images per process per step.")
    g.add_argument(
        "--num_workers", default=4, type=number(int, low=0), help="Data-loading processes per rank (ImageFolder)."
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", default=100, type=number(int, low=1), help="Training epochs.")
    g.add_argument(
        "--lrs",
        "--lr",
        default=DEFAULT_LRS,
        type=number(float, above=0),
        nargs="+",
        help="Learning "
        "rates swept, one head each, for a global batch of 256 (scaled linearly by the actual global "
        "batch size); --lr is DINO's name (one value: one head).",
    )
    g.add_argument(
        "--wds",
        default=[0.0],
        type=number(float, low=0),
        nargs="+",
        help="Weight decays swept; one head per (lr, wd) pair.",
    )
    g.add_argument("--momentum", default=0.9, type=number(float, low=0, high=1), help="SGD momentum.")
    g.add_argument(
        "--num_labels",
        default=None,
        type=number(int, low=1),
        help="Classifier outputs; default: the number of classes in the training split.",
    )
    g.add_argument(
        "--val_freq",
        default=1,
        type=number(int, low=1),
        help="Score every head on the evaluation split "
        "every this many epochs, from the first (as DINO: epochs 1, 1 + f, ...), and after the last.",
    )
    g = p.add_argument_group("run")
    g.add_argument(
        "--output_dir",
        default=".",
        type=str,
        help="Where linear.json, linear_head.pth and the resumable linear_checkpoint.pth go.",
    )
    g.add_argument(
        "--load_from",
        default=None,
        type=str,
        help="Start from this linear_checkpoint.pth (a path "
        "relative to --output_dir, as in iBOT/AttMask, or absolute) while --output_dir has none of its "
        "own; once it has, that one is resumed.",
    )
    g.add_argument(
        "--evaluate",
        action="store_true",
        help="Only score the saved head (--pretrained_linear) on the evaluation split.",
    )
    g.add_argument(
        "--pretrained_linear", default=None, type=str, help="Head for --evaluate; default: OUTPUT_DIR/linear_head.pth."
    )
    add_precision_arg(g)
    g.add_argument("--seed", default=0, type=number(int, low=0, high=utils.MAX_SEED), help="Random seed.")
    g.add_argument("--cpu", action="store_true", help="Run on CPU even when CUDA is available.")
    utils.add_launch_args(g)
    return p


# ---------------------------------------------------------------- the heads
class LinearSweep(nn.Module):
    """``len(lrs) * len(wds)`` linear heads trained together by SGD with momentum; each
    head has its own learning rate and weight decay (on weights, not biases).

    Example:
        >>> sweep = LinearSweep(16, 3, lrs=[0.01, 0.1], wds=[0.0])
        >>> sweep(torch.randn(5, 16)).shape          # (heads, batch, classes)
        torch.Size([2, 5, 3])
    """

    def __init__(self, dim, num_classes, lrs, wds=(0.0,), momentum=0.9):
        super().__init__()
        pairs = [(lr, wd) for lr in lrs for wd in wds]
        self.pairs = pairs
        self.momentum = momentum
        self.weight = nn.Parameter(torch.randn(len(pairs), dim, num_classes) * 0.01)  # DINO: normal(0, 0.01)
        self.bias = nn.Parameter(torch.zeros(len(pairs), num_classes))
        self.register_buffer("lrs", torch.tensor([p[0] for p in pairs], dtype=torch.float32))
        self.register_buffer("wds", torch.tensor([p[1] for p in pairs], dtype=torch.float32))
        self.register_buffer("momentum_weight", torch.zeros_like(self.weight))
        self.register_buffer("momentum_bias", torch.zeros_like(self.bias))

    @property
    def num_heads(self):
        return len(self.pairs)

    def forward(self, feats):
        return torch.einsum("bf,hfc->hbc", feats, self.weight) + self.bias[:, None]

    def loss(self, feats, labels):
        """Sum over heads of each head's mean cross-entropy: every head gets its own gradient."""
        logits = self(feats)
        H, B, C = logits.shape
        return F.cross_entropy(logits.reshape(H * B, C), labels.repeat(H)) * H

    def empty_loss(self):
        """Zero, with a (zero) gradient for every parameter: the loss of a rank that has no
        sample in this step, which must still join the gradient all-reduce and the step."""
        return (self.weight.sum() + self.bias.sum()) * 0.0

    @torch.no_grad()
    def step(self, lr_factor=1.0):
        """One SGD-momentum update of every head, at lr_h * lr_factor."""
        lr = self.lrs * lr_factor
        g_w = self.weight.grad + self.wds[:, None, None] * self.weight
        self.momentum_weight.mul_(self.momentum).add_(g_w)
        self.momentum_bias.mul_(self.momentum).add_(self.bias.grad)
        self.weight.sub_(lr[:, None, None] * self.momentum_weight)
        self.bias.sub_(lr[:, None] * self.momentum_bias)

    def all_reduce_grads(self):
        world = utils.get_world_size()
        if world > 1:
            for p in (self.weight, self.bias):
                dist.all_reduce(p.grad)
                p.grad.div_(world)

    @torch.no_grad()
    def accuracy(self, feats, labels, chunk=2048):
        """Top-1 and top-5 accuracy (percent) of every head: two (H,) tensors."""
        top1 = torch.zeros(self.num_heads)
        top5 = torch.zeros(self.num_heads)
        k = min(5, self.weight.shape[-1])
        for s in range(0, len(feats), chunk):
            f = feats[s : s + chunk].to(self.weight.device)
            y = labels[s : s + chunk].to(self.weight.device)
            top = self(f).topk(k, dim=-1).indices  # (H, b, k)
            hit = top == y[None, :, None]
            top1 += hit[..., 0].sum(1).float().cpu()
            top5 += hit.any(-1).sum(1).float().cpu()
        n = max(len(feats), 1)
        return 100.0 * top1 / n, 100.0 * top5 / n

    def head_state(self, h):
        """Head ``h`` as an nn.Linear-style state: weight (C, F), bias (C,)."""
        return {"weight": self.weight[h].detach().t().contiguous().cpu(), "bias": self.bias[h].detach().clone().cpu()}


def train_cached_epoch(sweep, feats, labels, global_batch, lr_factors, generator, metrics=None, header=""):
    """One epoch over cached features: a seeded shuffle shared by all ranks, each rank
    taking its share of every global batch; gradients all-reduced. ``lr_factors`` holds
    one factor per step (len = number of steps)."""
    rank, world = utils.get_rank(), utils.get_world_size()
    order = torch.randperm(len(feats), generator=generator)
    steps = range(len(lr_factors))
    it = metrics.log_every(steps, max(1, len(steps) // 4), header) if metrics is not None else steps
    for i in it:
        idx = order[i * global_batch : (i + 1) * global_batch][rank::world]
        loss = (
            sweep.loss(feats[idx].to(sweep.weight.device), labels[idx].to(sweep.weight.device))
            if len(idx)
            else sweep.empty_loss()
        )
        sweep.zero_grad(set_to_none=True)
        loss.backward()
        sweep.all_reduce_grads()
        sweep.step(float(lr_factors[i]))
        if metrics is not None:
            metrics.update(loss=loss.item() / sweep.num_heads)


# ---------------------------------------------------------------- augmentation
def crop_flip_batch(images, size, scale):
    """Batched RandomResizedCrop + horizontal flip of equal-size uint8 images (B, C, H, W):
    float (B, 3, size, size) in [0, 1]."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    x = images.float().div_(255)
    B, _, H, W = x.shape
    boxes = random_resized_crop_boxes(B, H, W, scale, device=x.device)
    index = torch.arange(B, device=x.device, dtype=x.dtype)
    crops = roi_align(
        x,
        torch.cat([index[:, None], boxes.to(x.dtype)], dim=1),
        size,
        spatial_scale=1.0,
        sampling_ratio=-1,
        aligned=True,
    )
    flip = torch.rand(B, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(-1), crops)


def _normalize(x, mean, std):
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / torch.tensor(std, device=x.device).view(1, 3, 1, 1)


def train_augmented_epoch(sweep, features, dataset, args, epoch, lr_factors, metrics):
    """One epoch with fresh augmentation: one frozen-backbone forward per batch, all heads stepped."""
    device = args.device
    sampler = DistributedSampler(
        dataset, num_replicas=utils.get_world_size(), rank=utils.get_rank(), shuffle=True, seed=args.seed
    )
    sampler.set_epoch(epoch)
    in_memory = is_in_memory(dataset)
    loader = DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size_per_gpu,
        num_workers=0 if in_memory else args.num_workers,
        collate_fn=(lambda b: b) if in_memory else tolerant_collate(args.image_size_used),
        pin_memory=device.type == "cuda",
    )
    header = f"Epoch [{epoch + 1}/{args.epochs}]"
    for i, (images, labels) in enumerate(metrics.log_every(loader, max(1, len(loader) // 4), header)):
        images, labels = images.to(device, non_blocking=True), torch.as_tensor(labels).to(device)
        if in_memory:
            x = _normalize(
                crop_flip_batch(images, args.image_size_used, tuple(args.crop_scale)), dataset.mean, dataset.std
            )
        else:
            x = normalize_batch(images, dataset.mean, dataset.std, args.image_size_used)
        with torch.no_grad(), autocast(device.type, autocast_dtype(args.precision)):
            f = features(x).float()
        keep = labels >= 0
        loss = sweep.loss(f[keep], labels[keep]) if bool(keep.any()) else sweep.empty_loss()
        sweep.zero_grad(set_to_none=True)
        loss.backward()
        sweep.all_reduce_grads()
        sweep.step(float(lr_factors[min(i, len(lr_factors) - 1)]))
        metrics.update(loss=loss.item() / sweep.num_heads)


def train_transform(image_size, crop_scale):
    """Per-image RandomResizedCrop + flip for ImageFolder training images (uint8 out); the
    built-in Fashion-MNIST is augmented in batches by ``crop_flip_batch`` instead."""
    return v2.Compose(
        [v2.ToImage(), v2.RandomResizedCrop(image_size, tuple(crop_scale), antialias=True), v2.RandomHorizontalFlip()]
    )


# ---------------------------------------------------------------- main
def format_table(rows, best):
    lines = ["       lr   scaled lr        wd   top-1   top-5", "---------  ----------  --------  ------  ------"]
    for r in rows:
        mark = "  <- best" if r is best else ""
        lines.append(
            f"{r['lr']:9.1e}  {r['scaled_lr']:10.2e}  {r['wd']:8.1e}  {r['top1']:6.2f}  {r['top5']:6.2f}{mark}"
        )
    return "\n".join(lines)


def eval_linear(args):
    utils.ensure_writable_dir(args.output_dir)  # before any feature is computed
    utils.require_low_first(args, "crop_scale")
    utils.init_distributed_mode(args)
    utils.fix_random_seeds(args.seed)
    device = args.device
    backbone, info = load_pretrained(
        args.pretrained_weights,
        args.checkpoint_key,
        args.arch,
        args.patch_size,
        args.mode,
        args.gamma,
        image_size=args.image_size,
        resample_native_pos=args.resample_native_pos,
    )
    backbone.requires_grad_(False)
    info["weights_fingerprint"] = weights_fingerprint(backbone)
    args.image_size_used = image_size = info["image_size"]
    features = FrozenFeatures(backbone, args.n_last_blocks, args.avgpool_patchtokens).to(device).eval()
    log_feature_choice(features, info, args)
    resolve_eval_precision(args, device)  # args.precision: the resolved name, as the sweep's config records it
    train_tf = train_transform(image_size, args.crop_scale) if args.train_augment else None
    train, val = build_eval_splits(
        args.data_path,
        image_size,
        args.subset,
        args.val_subset,
        train_transform=train_tf,
        subset_start=args.subset_starts,
    )
    num_labels = args.num_labels or len(train.classes)
    if num_labels < len(train.classes):
        raise EvalError(f"--num_labels {num_labels} is below the {len(train.classes)} classes of {args.data_path}")
    logger.info(
        f"Data: {len(train)} training and {len(val)} evaluation images, {len(train.classes)} classes, "
        f"{image_size}px; features of dimension {features.dim}."
    )

    kw = dict(
        batch_size=max(args.batch_size_per_gpu, 256),
        device=device,
        image_size=image_size,
        amp_dtype=autocast_dtype(args.precision),
        normalize=False,
    )
    if not is_in_memory(val):
        kw.update(num_workers=args.num_workers, collate=tolerant_collate(image_size))
    if args.evaluate:
        head, path = load_saved_head(args, features, info)  # checked before any feature is computed
        val_f, val_y = drop_unreadable(*extract_features(features, val, header="Evaluation features", **kw))
        return score_saved_head(head, path, val_f, val_y)

    global_batch = args.batch_size_per_gpu * utils.get_world_size()
    sweep = LinearSweep(
        features.dim, num_labels, [lr * global_batch / 256 for lr in args.lrs], args.wds, args.momentum
    ).to(device)
    # what shapes the heads (but --epochs, which a resume may extend): any of it changed is another sweep
    config = {
        "lrs": list(args.lrs),
        "wds": list(args.wds),
        "dim": features.dim,
        "num_labels": num_labels,
        "global_batch": global_batch,
        "momentum": args.momentum,
        "pretrained_weights": os.path.abspath(args.pretrained_weights) if args.pretrained_weights else None,
        "checkpoint_key": args.checkpoint_key,
        "data_path": args.data_path,
        "subset": args.subset,
        "subset_starts": args.subset_starts,
        "image_size": image_size,
        "precision": args.precision,
        "train_augment": args.train_augment,
        "crop_scale": list(args.crop_scale),
        **features.settings(),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    ckpt_path = os.path.join(args.output_dir, "linear_checkpoint.pth")
    start_epoch, best = 0, {"per_head": [None] * sweep.num_heads, "best": None, "best_head": None}
    resume_path = ckpt_path if os.path.exists(ckpt_path) else None
    start_file = utils.load_from_path(args.output_dir, args.load_from, ckpt_path)
    if start_file and resume_path:
        logger.info(f"--load_from {args.load_from} not used: {args.output_dir} has a checkpoint of its own.")
    resume_path = resume_path or start_file  # iBOT's start point while this run has no checkpoint yet
    if resume_path:
        ckpt = utils.load_checkpoint(resume_path)
        if not isinstance(ckpt, dict) or "sweep" not in ckpt:
            raise EvalError(
                f"{resume_path} is not a linear_checkpoint.pth of eval_linear.py, so there is nothing to resume"
            )
        if ckpt.get("config") != config:
            diff = ", ".join(
                f"{k} {ckpt.get('config', {}).get(k)} (now {v})"
                for k, v in config.items()
                if (ckpt.get("config") or {}).get(k) != v
            )
            raise EvalError(
                f"{resume_path} belongs to another sweep: {diff}; use another --output_dir or the same flags"
            )
        sweep.load_state_dict(ckpt["sweep"])
        start_epoch, best = ckpt["epoch"], ckpt["best"]
        logger.info(f"Resumed from {resume_path} at epoch {start_epoch}.")
    val_f, val_y = drop_unreadable(*extract_features(features, val, header="Evaluation features", **kw))

    cached = None
    if not args.train_augment:
        kw_train = dict(kw)
        if not is_in_memory(train):
            kw_train.update(num_workers=args.num_workers, collate=tolerant_collate(image_size))
        cached = drop_unreadable(*extract_features(features, train, header="Training features", **kw_train))
        niter = math.ceil(len(cached[0]) / global_batch)
    else:
        niter = math.ceil(len(train) / global_batch)
    # DINO's CosineAnnealingLR: the cosine steps once per epoch
    lr_factors = np.repeat(utils.cosine_scheduler(1.0, 0.0, args.epochs, 1), niter)
    logger.info(
        f"Training {sweep.num_heads} heads (lrs {args.lrs} x wds {args.wds}, scaled by {global_batch}/256) "
        f"for {args.epochs - start_epoch} epochs of {niter} steps"
        + (" on cached features." if cached else " with augmentation.")
    )
    for epoch in range(start_epoch, args.epochs):
        metrics = utils.MetricLogger()
        factors = lr_factors[epoch * niter : (epoch + 1) * niter]
        if cached is not None:
            g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
            train_cached_epoch(
                sweep, cached[0], cached[1], global_batch, factors, g, metrics, f"Epoch [{epoch + 1}/{args.epochs}]"
            )
        else:
            train_augmented_epoch(sweep, features, train, args, epoch, factors, metrics)
        if epoch % args.val_freq == 0 or epoch + 1 == args.epochs:  # DINO's epochs: 1, 1 + f, ..., last
            score_heads(sweep, val_f, val_y, epoch, best, [(lr, wd) for lr in args.lrs for wd in args.wds])
            if utils.is_main_process():
                r = best["best"]
                logger.info(
                    f"Epoch {epoch + 1}: best head so far lr {r['lr']:.1e} wd {r['wd']:.1e}: "
                    f"top-1 {r['top1']:.2f}%, top-5 {r['top5']:.2f}%."
                )
                utils.save_checkpoint(
                    best_head_file(best, args, info, features, train.classes),
                    os.path.join(args.output_dir, "linear_head.pth"),
                )
        if utils.is_main_process():
            utils.save_checkpoint(
                {"sweep": sweep.state_dict(), "epoch": epoch + 1, "best": best, "config": config}, ckpt_path
            )
    if not utils.is_main_process():
        return None
    rows = [r for r in best["per_head"] if r is not None]
    best_row = next(r for r in rows if r["head"] == best["best"]["head"])
    print(f"Linear probe, {len(val_f)} evaluation images (best epoch per head):")
    print(format_table(rows, best_row))
    record = {
        "best": best["best"],
        "per_head": rows,
        "epochs": args.epochs,
        "n_train": len(train),
        "n_val": len(val_f),
        "global_batch": global_batch,
        "train_augment": args.train_augment,
        "features": {"dim": features.dim, **features.settings()},
        "data_path": args.data_path,
        "pretrained_weights": args.pretrained_weights or None,
        "model": {k: info.get(k) for k in ("arch", "patch_size", "mode", "gamma", "image_size", "epoch")},
    }
    utils.write_json(os.path.join(args.output_dir, "linear.json"), record)
    lrs = sorted(set(args.lrs))
    if len(lrs) > 1 and best["best"]["lr"] in (lrs[0], lrs[-1]):
        logger.warning(
            f"warning: the best lr {best['best']['lr']:g} is at the edge of the sweep; extend --lrs "
            "beyond it to be sure of the optimum."
        )
    logger.info(
        f"Best: lr {best['best']['lr']:.1e} (scaled {best['best']['scaled_lr']:.2e}), wd "
        f"{best['best']['wd']:.1e}: top-1 {best['best']['top1']:.2f}%, top-5 {best['best']['top5']:.2f}%. "
        f"Wrote {args.output_dir}/linear.json and linear_head.pth."
    )
    return record


def score_heads(sweep, val_f, val_y, epoch, best, base_pairs):
    """Score all heads; keep (in ``best``) each head's best epoch and the overall best head's
    weights. ``base_pairs`` are the (lr, wd) as given, before the batch-size scaling."""
    top1, top5 = sweep.accuracy(val_f, val_y)
    for h, ((lr, wd), (scaled_lr, _)) in enumerate(zip(base_pairs, sweep.pairs)):
        row = {
            "head": h,
            "lr": lr,
            "scaled_lr": scaled_lr,
            "wd": wd,
            "top1": float(top1[h]),
            "top5": float(top5[h]),
            "epoch": epoch + 1,
        }
        if best["per_head"][h] is None or row["top1"] > best["per_head"][h]["top1"]:
            best["per_head"][h] = row
            if best["best"] is None or row["top1"] > best["best"]["top1"]:
                best["best"] = row
                best["best_head"] = sweep.head_state(h)
    return best["per_head"]


def best_head_file(best, args, info, features, classes):
    return {
        **best["best_head"],
        "result": best["best"],
        "classes": list(classes),
        "features": {"dim": features.dim, **features.settings()},
        "model": {k: info.get(k) for k in ("arch", "patch_size", "mode", "gamma", "image_size")},
        "pretrained_weights": args.pretrained_weights or None,
        "checkpoint_key": args.checkpoint_key,
        "weights_fingerprint": info["weights_fingerprint"],
    }


def score_saved_head(head, path, val_f, val_y):
    if not utils.is_main_process():
        return None
    logits = F.linear(val_f, head["weight"].float(), head["bias"].float())
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == val_y[:, None]
    top1, top5 = 100.0 * hit[:, 0].float().mean().item(), 100.0 * hit.any(1).float().mean().item()
    print(f"Linear head {path} on {len(val_f)} evaluation images: top-1 {top1:.2f}%  top-5 {top5:.2f}%")
    return {"top1": top1, "top5": top5}


def best_result(result):
    """One line of a run's result: the sweep's best head, or the --evaluate score."""
    r = result.get("best", result)
    return f"top-1 {r['top1']:.2f}%" + (f" (lr {r['lr']:g}, wd {r['wd']:g})" if "lr" in r else "")


def eval_linear_each_key(args):
    return evaluate_each_key(eval_linear, args, one_key_flags=("load_from", "pretrained_linear"), summary=best_result)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    return run_main(eval_linear_each_key, args)


if __name__ == "__main__":
    main()
