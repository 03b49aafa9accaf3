"""The student and teacher networks of self-distillation: backbone + DINO head over multi-crop
batches, built from main_dino.py's flags, the teacher a gradient-free copy of the student."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from simpool import backbones
from simpool import vision_transformer as vits
from simpool.checkpoints import init_backbone_from

if TYPE_CHECKING:
    import argparse

__all__ = [
    "MultiCropNetwork",
    "patch_logit_dim",
    "build_network",
    "build_student_teacher",
    "init_teacher",
    "uses_masking",
]

logger = logging.getLogger("simpool")


class MultiCropNetwork(nn.Module):
    """Backbone + head over view-major crop batches: the global crops (optionally
    masked) and the local crops run as two backbone calls, the head sees all pooled
    vectors at once, and the patch tokens at the masks' positions go through the patch
    head (``hide=False``: the masks choose those tokens without hiding them). Returns the head's
    logits of every crop, the patch logits (None without masks or ``predict_patches``) and the
    global crops' image vectors (for KoLeo)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(
        self,
        globals_: torch.Tensor,
        locals_: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        predict_patches: bool = True,
        hide: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        out = self.backbone.forward_features(globals_, mask=masks if hide else None)
        pooled = out["pooled"]
        if locals_ is not None:
            pooled = torch.cat([pooled, self.backbone(locals_)])
        patch_logits = None
        if masks is not None and predict_patches:
            patch_logits = self.head.forward_patches(out["patch_tokens"][masks])
        return self.head(pooled), patch_logits, out["pooled"]


def patch_logit_dim(args: argparse.Namespace) -> int:
    """Width of the patch logits the iBOT loss compares: the teacher's patch projection's."""
    return args.out_dim if args.shared_head or args.shared_head_teacher else args.patch_out_dim


def build_network(
    args: argparse.Namespace, drop_path_rate: float, grad_checkpointing: bool = False, teacher: bool = False
) -> MultiCropNetwork:
    """Backbone + DINO head as ``args`` describe them; ``grad_checkpointing`` for the student
    (the teacher keeps no activations anyway). ``teacher``: with --shared_head_teacher the
    head has no patch layer of its own (patch tokens go through its pooled-vector layer)."""
    backbone = backbones.build_backbone(
        args.arch,
        patch_size=args.patch_size,
        img_size=args.global_crops_size,
        mode=args.mode,
        gamma=args.gamma,
        use_beta=args.use_beta,
        drop_path_rate=drop_path_rate,
    )
    backbone.set_grad_checkpointing(grad_checkpointing)
    head = vits.DINOHead(
        backbone.embed_dim,
        args.out_dim,
        use_bn=args.use_bn_in_head,
        norm=args.norm_in_head,
        hidden_dim=args.head_hidden_dim,
        bottleneck_dim=args.head_bottleneck_dim,
        share_norm=args.head_norm_shared,
        act=args.act_in_head,
        norm_last_layer=args.norm_last_layer,
        patch_out_dim=args.out_dim if args.shared_head else args.patch_out_dim,
        shared_head=args.shared_head or (teacher and args.shared_head_teacher),
    )
    if args.compile:
        # methods, not modules, are wrapped: the state-dict keys stay those of the plain network.
        # The backbone sees a few fixed shapes (global, local, evaluation crops): one static
        # graph each; the patch head's row count changes every step: dynamic.
        backbone.forward_features = torch.compile(backbone.forward_features, dynamic=False)
        head.forward = torch.compile(head.forward)
        head.forward_patches = torch.compile(head.forward_patches)
    return MultiCropNetwork(backbone, head)


def build_student_teacher(
    args: argparse.Namespace, device: torch.device
) -> tuple[MultiCropNetwork, nn.Module, MultiCropNetwork]:
    """(student, student as DDP trains it, teacher): with several processes the student is
    wrapped in DDP, which overwrites every rank's weights with rank 0's (each rank drew its own
    initialisation from seed + rank); the teacher is copied after that, so all ranks start from
    the same teacher."""
    student = build_network(args, args.drop_path_rate, args.grad_checkpointing)
    if args.pretrained_weights:
        init_backbone_from(student.backbone, args.pretrained_weights)
    student = student.to(device)
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
            student, device_ids=[args.gpu] if device.type == "cuda" else None, static_graph=True
        )
    init_teacher(teacher, student)
    return student, student_ddp, teacher


def init_teacher(teacher: nn.Module, student: nn.Module) -> None:
    """Copy the student's weights into the teacher (all of them but the student's patch layer
    that a --shared_head_teacher teacher lacks) and switch off the teacher's gradients."""
    student_state = student.state_dict()
    teacher.load_state_dict({k: student_state[k] for k in teacher.state_dict()})
    teacher.requires_grad_(False)


def uses_masking(args: argparse.Namespace, backbone: nn.Module) -> bool:
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
