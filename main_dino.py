"""Self-supervised pretraining of a [CLS]-free SimPool ViT by DINO/iBOT self-distillation
with SimPool-guided AttMask masking.

    python main_dino.py                       # CPU demo: Fashion-MNIST, k-NN before and after
    torchrun --nproc_per_node 8 main_dino.py --arch vit_small --data_path /imagenet --output_dir out

One training step: multi-crop (2 global + N local crops) -> teacher on the global
crops gives pooled logits, patch tokens and SimPool's attention map -> that map picks
the patches to mask (AttMask) -> student on masked globals + unmasked locals -> DINO
loss (cross-view) + iBOT loss (masked tokens) -> backward, clip, step -> teacher EMA.
"""

import datetime
import logging
import math
import os
import time

import torch

from simpool import utils
from simpool.augment import MultiCropAugmentation
from simpool.data import DataError, build_dataset, check_enough_images, is_in_memory, training_loader
from simpool.evaluation import FrozenFeatures, drop_unreadable, log_feature_choice, online_knn_splits, tolerant_collate
from simpool.knn import extract_features, knn_classify
from simpool.losses import DINOLoss, PatchLoss, collapse_warning, koleo_loss
from simpool.masking import make_masks
from simpool.network import build_network, build_student_teacher, init_teacher, patch_logit_dim, uses_masking  # noqa: F401
from simpool.optim import (
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients,
    ema_update,
    param_groups,
    training_schedules,
)
from simpool.precision import autocast, log_precision, resolve_precision
from simpool.resume import TrainingCheckpoint, resume_training
from simpool.train_args import DEMO_RECIPE, get_args_parser, parse_args, print_demo_summary  # noqa: F401

logger = logging.getLogger("simpool")


def train_dino(args):
    # ---- data first: a bad --data_path is a one-line error before any process group starts
    augment = MultiCropAugmentation.from_args(args)
    dataset = build_dataset(args.data_path, "train", args.subset, transform=augment.crop_image, split_folder_ok=True)
    augment.set_normalization(dataset.mean, dataset.std)
    check_enough_images(dataset, args.data_path, args.batch_size_per_gpu, utils.launch_environment()[1])
    utils.ensure_writable_dir(args.output_dir)

    utils.init_distributed_mode(args)
    utils.fix_random_seeds(args.seed, args.rank)
    device = args.device
    precision = resolve_precision(args.precision, device, args.use_fp16)
    args.precision = precision.name  # the logged args and the checkpoint's record what runs
    if args.demo:
        logger.info(
            "No --data_path given: running the CPU demo recipe on Fashion-MNIST "
            f"(output in {args.output_dir}; flags you pass override the recipe)."
        )
    logger.info("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    log_precision(precision)
    for warning in args.warnings:
        logger.warning(warning)
    sampler, loader, niter = training_loader(dataset, augment, args, device)
    logger.info(f"Data: {len(dataset)} training images from {args.data_path}, {niter} steps per epoch.")

    # ---- student, teacher (EMA of the student, no gradients), losses, optimizer, schedules
    student, student_ddp, teacher = build_student_teacher(args, device)
    ncrops = args.global_crops_number + args.local_crops_number
    dino_loss = DINOLoss(args.out_dim, ncrops, global_crops=args.global_crops_number, centering=args.centering).to(
        device
    )
    patch_loss = PatchLoss(patch_logit_dim(args), centering=args.centering).to(device)
    masking = uses_masking(args, student.backbone)
    optimizer = build_optimizer(args.optimizer, param_groups(student))
    scaler = torch.amp.GradScaler(device.type) if precision.scaler else None
    schedules = training_schedules(args, niter, args.world_size)

    # ---- resume from the newest readable checkpoint in output_dir
    modules = dict(
        student=student, teacher=teacher, optimizer=optimizer, scaler=scaler, dino_loss=dino_loss, patch_loss=patch_loss
    )
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    start_epoch, start_step = resume_training(args, ckpt_path, device, **modules)
    checkpoint = TrainingCheckpoint(args, ckpt_path, niter, device, **modules)

    writer = utils.TensorboardScalars(args.output_dir) if utils.is_main_process() else None
    log_path = os.path.join(args.output_dir, "log.txt")
    knn_data = online_knn_splits(args.data_path, args.global_crops_size, args.subset) if args.eval_every else None
    if knn_data is not None:
        log_feature_choice(
            FrozenFeatures(teacher.backbone, args.n_last_blocks, args.avgpool_patchtokens),
            {"arch": args.arch, "mode": args.mode},
            args,
        )
        if start_epoch == 0 and start_step == 0:
            utils.log_epoch(
                {"epoch": -1, **online_knn(teacher.backbone, knn_data, args, precision.dtype)}, log_path, writer
            )

    logger.info(f"Training for {args.epochs - start_epoch} epochs.")
    start_time = time.time()
    bad_files = set()
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        loader.generator.manual_seed(args.seed + 1_000_003 * epoch + args.rank)  # loader workers' seeds
        first_step = start_step if epoch == start_epoch else 0
        sampler.start = first_step * args.batch_size_per_gpu
        stats = train_one_epoch(
            student,
            student_ddp,
            teacher,
            dino_loss,
            patch_loss,
            loader,
            augment,
            optimizer,
            scaler,
            precision.dtype,
            epoch,
            first_step,
            niter,
            masking and epoch >= args.pred_start_epoch,
            schedules,
            checkpoint.save,
            bad_files,
            writer,
            args,
        )
        checkpoint.save(epoch, niter)
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}}
        if knn_data is not None and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            record.update(online_knn(teacher.backbone, knn_data, args, precision.dtype))
        utils.log_epoch(record, log_path, writer)
    logger.info(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}.")
    if writer is not None:
        writer.close()
    if args.demo and utils.is_main_process():  # rank 0 writes log.txt; the others may read it half-written
        print_demo_summary(log_path, full_train_set=args.subset <= 0)


def train_one_epoch(
    student,
    student_ddp,
    teacher,
    dino_loss,
    patch_loss,
    loader,
    augment,
    optimizer,
    scaler,
    amp_dtype,
    epoch,
    first_step,
    niter,
    masking,
    schedules,
    save,
    bad_files,
    writer,
    args,
):
    device = args.device
    metrics = utils.MetricLogger()
    header = f"Epoch [{epoch + 1}/{args.epochs}]"
    skipped = 0
    for i, (batch, bad) in enumerate(
        metrics.log_every(loader, 10, header, start=first_step, total=niter), start=first_step
    ):
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
        images = (
            images.to(device, non_blocking=True)
            if torch.is_tensor(images)
            else tuple(x.to(device, non_blocking=True) if x is not None else None for x in images)
        )
        globals_, locals_ = augment(images)
        loss, parts = distillation_loss(
            student_ddp,
            teacher,
            dino_loss,
            patch_loss,
            globals_,
            locals_,
            masking,
            schedules["teacher_temp"][it],
            schedules["patch_temp"][it],
            amp_dtype,
            args,
        )

        # a non-finite loss on any rank stops every rank; the last checkpoint stays as it was
        n_bad = utils.all_reduce_sum(not math.isfinite(loss.item()), device)
        if n_bad > 0:  # a rank whose own loss is finite names the others, not its own value
            what = (
                f"loss is {loss.item()}"
                if not math.isfinite(loss.item())
                else f"loss is not finite on {int(n_bad)} other rank(s)"
            )
            raise utils.Diverged(
                f"{what} at iteration {it} (epoch {epoch}); stopping. "
                f"The last checkpoint in {args.output_dir} is intact."
            )
        optimizer_step(loss, student, teacher, optimizer, scaler, epoch, schedules["momentum"][it], args)

        values = {
            "loss": loss.item(),
            **{k: v.item() for k, v in parts.items()},
            "lr": schedules["lr"][it],
            "wd": schedules["wd"][it],
            "teacher_entropy": dino_loss.teacher_entropy.item(),
            "teacher_batch_entropy": dino_loss.teacher_batch_entropy.item(),
        }
        metrics.update(**values)
        if writer is not None and it % 10 == 0:
            for k, v in values.items():
                writer.add_scalar(f"iter/{k}", v, it)
        if args.saveckp_iters and (i + 1) % args.saveckp_iters == 0 and i + 1 < niter:
            save(epoch, i + 1)
    stats = metrics.averages()
    stats["skipped_images"] = int(utils.all_reduce_sum(skipped, device))
    if "loss" not in stats and stats["skipped_images"] and first_step < niter:  # every step skipped, on all ranks
        raise DataError(
            f"no training image of epoch {epoch} could be read ({stats['skipped_images']} "
            f"unreadable files in {args.data_path}; the log names them)"
        )
    warning = collapse_warning(stats, args.out_dim)
    if warning:
        logger.warning(warning)
    return stats


def distillation_loss(
    student, teacher, dino_loss, patch_loss, globals_, locals_, masking, teacher_temp, patch_temp, amp_dtype, args
):
    """The self-distillation objective of one batch of crops: returns the weighted total
    and its parts {"dino_loss", "patch_loss"} ("patch_loss" only with masking and --lambda2 > 0)."""
    predict_patches = masking and args.lambda2 > 0
    with autocast(globals_.device.type, amp_dtype):
        # teacher: pooled logits and the pooling attention on the unmasked global crops
        with torch.no_grad():
            t_out = teacher.backbone.forward_features(globals_, return_attention=masking)
            t_logits = teacher.head(t_out["pooled"])
            masks = None
            if masking:  # AttMask: the teacher's map on this very crop picks the patches to hide
                grid = teacher.backbone.grid_size(*globals_.shape[-2:])
                masks = make_masks(
                    t_out["attention"],
                    grid,
                    args.pred_shape,
                    args.pred_ratio,
                    args.pred_ratio_var,
                    args.masking_prob,
                    args.show_max,
                    args.show_ratio,
                )
                if predict_patches:
                    t_patch = teacher.head.forward_patches(t_out["patch_tokens"][masks])
        # student: masked globals (unmasked with --use_masked_im_modeling False) and unmasked locals
        s_logits, s_patch, s_pooled = student(
            globals_, locals_, masks, predict_patches=predict_patches, hide=args.use_masked_im_modeling
        )
    parts = {"dino_loss": dino_loss(s_logits, t_logits, teacher_temp)}
    loss = args.lambda1 * parts["dino_loss"]
    if args.koleo_loss_weight > 0:  # DINOv2: on each global crop's batch of image vectors
        parts["koleo_loss"] = sum(koleo_loss(p) for p in s_pooled.chunk(args.global_crops_number))
        loss = loss + args.koleo_loss_weight * parts["koleo_loss"]
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


def online_knn(backbone, knn_data, args, amp_dtype):
    train, test = knn_data
    features = FrozenFeatures(backbone, args.n_last_blocks, args.avgpool_patchtokens)
    kw = dict(
        batch_size=max(args.batch_size_per_gpu, 256),
        device=args.device,
        image_size=args.global_crops_size,
        amp_dtype=amp_dtype,
    )
    if not is_in_memory(train):  # an image folder: unreadable files become rows that are dropped
        kw.update(num_workers=args.num_workers, collate=tolerant_collate(args.global_crops_size))
    train_f, train_y = drop_unreadable(*extract_features(features, train, header="k-NN train features", **kw))
    test_f, test_y = drop_unreadable(*extract_features(features, test, header="k-NN test features", **kw))
    results = knn_classify(
        train_f,
        train_y,
        test_f,
        test_y,
        ks=args.nb_knn,
        temperature=args.temperature,
        num_classes=len(train.classes),
        use_gpu=args.device.type == "cuda" and args.use_cuda,
    )
    for k, r in results.items():
        logger.info(f"k-NN (k={k}): top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%")
    first = results[min(results, key=lambda k: abs(k - args.nb_knn[0]))]
    return {"knn_top1": first["top1"], "knn_top5": first["top5"]}


def main(argv=None):
    utils.run_command(
        lambda: train_dino(parse_args(argv)),
        interrupted="interrupted: the checkpoints written so far are intact; the same command resumes from the newest",
    )


if __name__ == "__main__":
    main()
