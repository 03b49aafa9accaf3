"""Tiny checkpoints in the layouts the evaluation tools read, for the tests:
ours (MultiCropNetwork 'student'/'teacher' with backbone./head. keys and an 'args' dict)
and the official DINO / iBOT / SimPool ones ('module.' prefixes, argparse.Namespace args,
no masked_embed, [CLS] ViTs with cls_token)."""

import argparse
import contextlib
import functools

import torch

from simpool import vision_transformer as vits


@contextlib.contextmanager
def one_thread():
    """Random initialisation is many small element-wise ops: on a busy 2-core machine it
    runs ~15x faster on one thread than on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def nudge_off_init(model, seed=0):
    """``model`` with its norms, biases and BatchNorm statistics moved off their initial values (so
    that a silent non-load shows), in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.add_(0.1 * torch.randn_like(b))
    return model.eval()


@functools.lru_cache(maxsize=None)
def tiny_backbone(mode="simpool", patch_size=7, img_size=28, arch="vit_nano", gamma=None, seed=0):
    """A small ViT with non-default weights everywhere (so a silent non-load shows);
    cached, so callers must not modify it."""
    torch.manual_seed(seed)
    with one_thread():
        model = vits.build_vit(arch, patch_size=patch_size, img_size=img_size, mode=mode, gamma=gamma)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms and biases: move them off their 1 / 0 init
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _head_state(dim, seed=1):
    torch.manual_seed(seed)
    head = vits.DINOHead(dim, 32, hidden_dim=48, bottleneck_dim=16)
    return head.state_dict()


def save_training_checkpoint(path, backbone, data_path="fashion-mnist", stored_gamma="model"):
    """Our main_dino.py layout (``stored_gamma``: the value its args record; by default the model's)."""
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"head.{k}": v for k, v in _head_state(backbone.embed_dim).items()})
    args = {
        "arch": _arch_of(backbone),
        "patch_size": backbone.patch_size,
        "mode": backbone.mode,
        "gamma": backbone.simpool.gamma if backbone.simpool is not None else None,
        "use_beta": False,
        "global_crops_size": backbone.img_size,
        "data_path": data_path,
        "out_dim": 32,
    }
    if stored_gamma != "model":
        args["gamma"] = stored_gamma
    torch.save({"student": state, "teacher": state, "epoch": 3, "args": args, "optimizer": None}, path)


def save_official_checkpoint(path, backbone, gamma=None, student_backbone=None):
    """The official DINO / iBOT / SimPool training checkpoint layout: 'teacher' with
    backbone./head. keys, 'student' with module.backbone./module.head. keys (the student's
    backbone is ``student_backbone`` when given, else the teacher's), args as an
    argparse.Namespace; no masked_embed (DINO's ViT has none)."""
    head = _head_state(backbone.embed_dim)

    def network(bb):
        bb = {k: v for k, v in bb.state_dict().items() if k != "masked_embed"}
        return {**{f"backbone.{k}": v for k, v in bb.items()}, **{f"head.{k}": v for k, v in head.items()}}

    teacher = network(backbone)
    student = {f"module.{k}": v for k, v in network(student_backbone or backbone).items()}
    ns = argparse.Namespace(
        arch=_arch_of(backbone),
        patch_size=backbone.patch_size,
        out_dim=32,
        lr=0.0005,
        global_crops_scale=(0.4, 1.0),
        data_path="/path/to/imagenet/train",
    )
    if gamma is not None:
        ns.mode, ns.gamma = "simpool", gamma
    torch.save({"teacher": teacher, "student": student, "epoch": 100, "args": ns}, path)


def save_flat_backbone(path, backbone):
    """The official released backbone-only file (e.g. dino_deitsmall16_pretrain.pth)."""
    torch.save({k: v for k, v in backbone.state_dict().items() if k != "masked_embed"}, path)


def _arch_of(backbone):
    for name, (d, depth, heads) in vits.ARCHS.items():
        if d == backbone.embed_dim and depth == len(backbone.blocks):
            return name
    raise ValueError("unknown size")
