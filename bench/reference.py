"""Reference implementations of the official DINO code's algorithms, for side-by-side timing.

The official repository (facebookresearch/dino) is not available offline, so this module
re-implements, from its published structure, the three pieces the benchmarks compare against.
Each keeps the official code's *algorithm and cost structure* (what is computed, in which
order, with which library calls); none of it is used by training.

* ``DataAugmentationDINO``: per-crop PIL pipelines (torchvision v1 transforms):
  full decode of the JPEG with PIL, RandomResizedCrop (bicubic), horizontal flip, ColorJitter
  (0.4, 0.4, 0.2, 0.1) with p=0.8, grayscale p=0.2, PIL GaussianBlur (radius U(0.1, 2)) with
  p=1.0 / 0.1 / 0.5 (global 1 / global 2 / locals), PIL solarize p=0.2 on global 2, then
  ToTensor + Normalize, one crop at a time.
* ``knn_classifier``: a torch matmul of 100 query chunks against the whole train bank, topk,
  a one-hot of size (chunk * k, classes) and the exp(sim / T)-weighted vote.
* ``ReferenceStep``: a DINO training step: a timm-style ViT with an explicit attention
  matrix (softmax(q k^T) v) and a [CLS] token, DINO's projection head with
  ``nn.utils.weight_norm``, a multi-crop wrapper that runs one backbone call per crop
  resolution, the DINO loss as a Python double loop over (teacher crop, student crop)
  pairs, per-parameter gradient clipping, last-layer cancelling, AdamW and a per-parameter
  EMA loop; optional autocast (the official ``--use_fp16``; here bf16 on CPU).
"""

import math
import random
import warnings
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

__all__ = ["DataAugmentationDINO", "pil_loader", "knn_classifier", "ReferenceStep", "ref_vit", "RefDINOHead"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------ augmentation
def pil_loader(path):
    """torchvision's ImageFolder loader: full decode, then RGB."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


class _RandomGaussianBlur:
    def __init__(self, p, radius_min=0.1, radius_max=2.0):
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, img):
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class _RandomSolarize:
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


class DataAugmentationDINO:
    """DINO's multi-crop transform: a PIL image -> list of 2 + ``local_crops_number``
    normalised float tensors (3, s, s), each built by its own PIL pipeline."""

    def __init__(
        self,
        global_crops_scale=(0.4, 1.0),
        local_crops_scale=(0.05, 0.4),
        local_crops_number=8,
        global_crops_size=224,
        local_crops_size=96,
    ):
        from torchvision import transforms as T

        bicubic = T.InterpolationMode.BICUBIC
        flip_and_color_jitter = T.Compose(
            [
                T.RandomHorizontalFlip(p=0.5),
                T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
            ]
        )
        normalize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.global_transfo1 = T.Compose(
            [
                T.RandomResizedCrop(global_crops_size, scale=global_crops_scale, interpolation=bicubic),
                flip_and_color_jitter,
                _RandomGaussianBlur(1.0),
                normalize,
            ]
        )
        self.global_transfo2 = T.Compose(
            [
                T.RandomResizedCrop(global_crops_size, scale=global_crops_scale, interpolation=bicubic),
                flip_and_color_jitter,
                _RandomGaussianBlur(0.1),
                _RandomSolarize(0.2),
                normalize,
            ]
        )
        self.local_crops_number = local_crops_number
        self.local_transfo = T.Compose(
            [
                T.RandomResizedCrop(local_crops_size, scale=local_crops_scale, interpolation=bicubic),
                flip_and_color_jitter,
                _RandomGaussianBlur(p=0.5),
                normalize,
            ]
        )

    def __call__(self, image):
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops += [self.local_transfo(image) for _ in range(self.local_crops_number)]
        return crops


# ------------------------------------------------------------------ k-NN
@torch.no_grad()
def knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes=1000, num_chunks=100):
    """DINO's weighted k-NN vote: returns (top1, top5) in percent. Features are
    L2-normalised rows; the queries go in ``num_chunks`` chunks."""
    bank = train_features.t()
    n_test = test_labels.shape[0]
    per_chunk = max(1, n_test // num_chunks)
    one_hot = torch.zeros(k, num_classes, device=bank.device)
    top1 = top5 = 0.0
    total = 0
    for start in range(0, n_test, per_chunk):
        feats = test_features[start : start + per_chunk]
        targets = test_labels[start : start + per_chunk]
        b = targets.shape[0]
        sims = torch.mm(feats, bank)
        dist, idx = sims.topk(k, largest=True, sorted=True)
        neighbours = torch.gather(train_labels.view(1, -1).expand(b, -1), 1, idx)
        one_hot.resize_(b * k, num_classes).zero_()
        one_hot.scatter_(1, neighbours.view(-1, 1), 1)
        weights = dist.clone().div_(T).exp_()
        probs = torch.sum(one_hot.view(b, -1, num_classes) * weights.view(b, -1, 1), 1)
        _, pred = probs.sort(1, True)
        correct = pred.eq(targets.view(-1, 1))
        top1 += correct.narrow(1, 0, 1).sum().item()
        top5 += correct.narrow(1, 0, min(5, k)).sum().item()
        total += b
    return top1 * 100.0 / total, top5 * 100.0 / total


# ------------------------------------------------------------------ training step
def _drop_path(x, p, training):
    if p == 0.0 or not training:
        return x
    keep = 1 - p
    mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)).floor_()
    return x.div(keep) * mask


class _Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Attention(nn.Module):
    """Multi-head self-attention with the attention matrix made explicitly."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x), attn


class _Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, drop_path, norm_layer):
        super().__init__()
        self.norm1, self.attn = norm_layer(dim), _Attention(dim, num_heads)
        self.norm2, self.mlp = norm_layer(dim), _Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x):
        y, _ = self.attn(self.norm1(x))
        x = x + _drop_path(y, self.drop_path, self.training)
        return x + _drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def _init(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class RefVisionTransformer(nn.Module):
    """DINO's ViT: [CLS] token, learned positions interpolated (bicubic) for other crop
    sizes, pre-norm blocks with LayerNorm eps 1e-6, output the normalised [CLS] token."""

    def __init__(
        self, img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, drop_path_rate=0.0
    ):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList([_Block(embed_dim, num_heads, mlp_ratio, dpr[i], norm_layer) for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init)

    def interpolate_pos_encoding(self, x, w, h):
        npatch, n = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0, h0 = w // self.patch_size + 0.1, h // self.patch_size + 0.1
        side = int(math.sqrt(n))
        patch_pos = F.interpolate(
            patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / side, h0 / side),
            mode="bicubic",
        )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((cls_pos, patch_pos), dim=1)

    def forward(self, x):
        B, _, w, h = x.shape
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


ARCHS = {"vit_nano": (192, 6, 3), "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}


def ref_vit(arch="vit_small", patch_size=16, drop_path_rate=0.0, img_size=224):
    embed_dim, depth, heads = ARCHS[arch]
    return RefVisionTransformer(img_size, patch_size, embed_dim, depth, heads, drop_path_rate=drop_path_rate)


class RefDINOHead(nn.Module):
    """DINO's head: 3-layer MLP (GELU) -> L2 normalise -> weight-normed linear
    (``nn.utils.weight_norm``, gain fixed at 1 with ``norm_last_layer``)."""

    def __init__(self, in_dim, out_dim, norm_last_layer=True, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.apply(_init)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated in favour of parametrizations; DINO uses this one
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class RefMultiCropWrapper(nn.Module):
    """One backbone call per run of equal-resolution crops, then the head on all outputs."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops):
        sizes = torch.tensor([c.shape[-1] for c in crops])
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0)
        start, out = 0, None
        for end in ends.tolist():
            y = self.backbone(torch.cat(crops[start:end]))
            out = y if out is None else torch.cat((out, y))
            start = end
        return self.head(out)


class RefDINOLoss(nn.Module):
    """DINO loss as the official double loop over (teacher crop, student crop) pairs, one
    log-softmax per pair."""

    def __init__(self, out_dim, ncrops, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.ncrops, self.student_temp, self.center_momentum = ncrops, student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output, teacher_output, teacher_temp):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / teacher_temp, dim=-1).detach().chunk(2)
        total, n_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total += loss.mean()
                n_terms += 1
        total /= n_terms
        self.update_center(teacher_output)
        return total

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def _params_groups(model):
    regularized, not_regularized = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or len(p.shape) == 1 else regularized).append(p)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def _clip_gradients(model, clip):
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.data.norm(2)
            coef = clip / (norm + 1e-6)
            if coef < 1:
                p.grad.data.mul_(coef)


def _cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None


class ReferenceStep:
    """One DINO training step (teacher on the 2 global crops, student on all crops, DINO
    loss, backward, clip, last-layer cancel, AdamW step, teacher EMA), built the way the
    official ``main_dino.py`` builds it.

    ``step(crops)`` takes the list of crop batches [global1, global2, local1, ...] and
    returns the loss; ``amp_dtype`` None runs fp32, else autocast in that dtype.
    """

    def __init__(
        self,
        arch="vit_small",
        patch_size=16,
        out_dim=65536,
        ncrops=8,
        drop_path_rate=0.1,
        norm_last_layer=True,
        clip_grad=3.0,
        freeze_last_layer=1,
        amp_dtype=None,
        device="cpu",
        lr=1e-4,
        weight_decay=0.04,
    ):
        self.student = RefMultiCropWrapper(
            ref_vit(arch, patch_size, drop_path_rate), RefDINOHead(ARCHS[arch][0], out_dim, norm_last_layer)
        ).to(device)
        self.teacher = RefMultiCropWrapper(
            ref_vit(arch, patch_size), RefDINOHead(ARCHS[arch][0], out_dim, norm_last_layer)
        ).to(device)
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.loss = RefDINOLoss(out_dim, ncrops).to(device)
        self.optimizer = torch.optim.AdamW(_params_groups(self.student))
        for i, g in enumerate(self.optimizer.param_groups):
            g["lr"] = lr
            if i == 0:
                g["weight_decay"] = weight_decay
        self.clip_grad, self.freeze_last_layer = clip_grad, freeze_last_layer
        self.amp_dtype, self.device = amp_dtype, torch.device(device)

    def step(self, crops, teacher_temp=0.04, momentum=0.996, epoch=1):
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None
        ):
            teacher_output = self.teacher(crops[:2])
            student_output = self.student(crops)
            loss = self.loss(student_output, teacher_output, teacher_temp)
        self.optimizer.zero_grad()
        loss.backward()
        if self.clip_grad:
            _clip_gradients(self.student, self.clip_grad)
        _cancel_gradients_last_layer(epoch, self.student, self.freeze_last_layer)
        self.optimizer.step()
        with torch.no_grad():
            for param_q, param_k in zip(self.student.parameters(), self.teacher.parameters()):
                param_k.data.mul_(momentum).add_((1 - momentum) * param_q.detach().data)
        return loss
