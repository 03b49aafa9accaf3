"""Optimizers for pretraining: AdamW, SGD and LARS, with weight decay off for biases and norms.

Example:
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = build_optimizer("lars", param_groups(model))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from simpool.utils import cosine_scheduler, linear_warmup_constant

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterable

    import numpy as np

__all__ = [
    "LARS",
    "param_groups",
    "build_optimizer",
    "clip_gradients",
    "cancel_last_layer_gradients",
    "ema_update",
    "training_schedules",
]


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Two groups: weights (decayed) and biases/norm scales/1-d params (not decayed,
    and excluded from LARS adaptation)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017):
    each parameter's update is scaled by eta * ||w|| / ||g + wd * w||. Groups with
    ``lars_exclude`` (biases, norms) take plain momentum SGD without decay."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        eta: float = 0.001,
    ) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if not group["lars_exclude"]:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(update)
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["eta"] * param_norm / update_norm,
                        torch.ones_like(param_norm),
                    )
                    update = update.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])


def build_optimizer(name: str, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """``name`` in adamw / sgd / lars; lr and weight decay are set per iteration by the trainer."""
    if name == "adamw":
        # fused: one kernel per step over each parameter instead of ~10 passes; on the CPU the
        # default for-loop AdamW over a ViT-S + 65k-prototype head costs more than its forward
        return torch.optim.AdamW(groups, fused=_fusable(groups))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0, momentum=0.9)
    if name == "lars":
        return LARS(groups)
    raise ValueError(f"unknown optimizer {name!r}; choose adamw, sgd or lars")


def _fusable(groups: list[dict[str, Any]]) -> bool:
    """torch's fused AdamW takes floating-point parameters on CPU or CUDA (torch >= 2.4)."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


@torch.no_grad()
def clip_gradients(model: torch.nn.Module, clip: float) -> list[torch.Tensor]:
    """Clip each parameter's gradient to norm ``clip`` on its own (DINO's rule, not a
    global norm); returns the per-parameter norms before clipping."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return []
    norms = torch._foreach_norm(grads)
    factors = clip / (torch.stack(norms) + 1e-6)
    over = (factors < 1).nonzero()[:, 0].tolist()  # only these are scaled: no pass over the rest
    if over:
        torch._foreach_mul_([grads[i] for i in over], list(factors[over].unbind()))
    return norms


def cancel_last_layer_gradients(model: torch.nn.Module, epoch: int, freeze_last_layer: int) -> None:
    """Drop the head's last-layer gradients during the first ``freeze_last_layer``
    epochs, which keeps early training from collapsing onto a few prototypes."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, for each teacher parameter and
    the student's of the same name (a teacher may lack a layer of the student's: iBOT's
    --shared_head_teacher has no patch layer of its own)."""
    student_params = dict(student.named_parameters())
    t = [p for p in teacher.parameters()]
    s = [student_params[name].detach() for name, _ in teacher.named_parameters()]
    # t + (1 - m)(s - t): one pass over each tensor instead of a multiply and an add
    torch._foreach_lerp_(t, s, 1 - momentum)


def training_schedules(args: argparse.Namespace, niter: int, world_size: int) -> dict[str, np.ndarray]:
    """main_dino.py's per-iteration schedules ({name: array of epochs x niter values}): learning rate
    (linear warm-up, then cosine; --lr is per 256 images of global batch), weight decay and teacher
    momentum (cosine), teacher temperatures (linear warm-up, then constant; the patch one starting at
    --pred_start_epoch, as iBOT)."""
    global_batch = args.batch_size_per_gpu * world_size
    return {
        "lr": cosine_scheduler(
            args.lr * global_batch / 256, args.min_lr, args.epochs, niter, warmup_epochs=args.warmup_epochs
        ),
        "wd": cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, niter),
        "momentum": cosine_scheduler(args.momentum_teacher, 1.0, args.epochs, niter),
        "teacher_temp": linear_warmup_constant(
            args.warmup_teacher_temp, args.teacher_temp, args.epochs, niter, args.warmup_teacher_temp_epochs
        ),
        "patch_temp": linear_warmup_constant(
            args.warmup_teacher_patch_temp,
            args.teacher_patch_temp,
            args.epochs,
            niter,
            args.warmup_teacher_temp_epochs,
            start_epoch=args.pred_start_epoch,
        ),
    }
