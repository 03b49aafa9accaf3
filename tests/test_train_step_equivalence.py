"""The optimised training step computes what the plain one does.

Optimised: main_dino.py's step as it runs (fused scaled-dot-product attention, patch embedding
as one matrix product, stochastic depth that skips dropped samples, vectorised DINO loss,
gathered iBOT loss, fused AdamW, foreach clip and EMA). Plain: the same weights through the
strided convolution, timm's Block with its multiply-by-zero DropPath, explicit softmax(q k^T) v
attention, the DINO loss as the double loop over (teacher crop,
student crop) pairs (``bench/reference.py``'s RefDINOLoss), the iBOT loss per (view, sample),
a per-parameter clip, for-loop AdamW and a per-parameter EMA loop. fp32, a fixed seed, three
steps: the losses agree to float32 tolerance, and the final weights to well under one
optimizer step.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

import main_dino
from bench.reference import RefDINOLoss
from checkpoint_factory import one_thread
from simpool import vision_transformer
from simpool.losses import DINOLoss, PatchLoss
from simpool.optim import build_optimizer, param_groups

# 56-px global crops: 64 tokens, where the optimised ViT takes the fused attention kernel (fp32)
ARGS = [
    "--data_path",
    "synthetic",
    "--arch",
    "vit_nano",
    "--patch_size",
    "7",
    "--global_crops_size",
    "56",
    "--local_crops_size",
    "28",
    "--local_crops_number",
    "2",
    "--out_dim",
    "64",
    "--patch_out_dim",
    "32",
    "--batch_size_per_gpu",
    "3",
    "--precision",
    "fp32",
    "--pred_shape",
    "rand",
    "--masking_prob",
    "1.0",
    "--clip_grad",
    "0.05",
    "--freeze_last_layer",
    "0",
]
STEPS = 3


def explicit_attention(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0):
    assert attn_mask is None and not is_causal and dropout_p == 0.0
    weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return weights @ v


def plain_patch_loss(loss_fn, s, t, sample_index, num_samples, temp):
    """iBOT per (view, sample): mean over its masked tokens, then the mean over all samples."""
    total = s.new_zeros(())
    for i in range(num_samples):
        sel = sample_index == i
        if sel.any():
            q = F.softmax((t[sel] - loss_fn.center) / temp, dim=-1)
            total = total + (-(q * F.log_softmax(s[sel] / loss_fn.student_temp, dim=-1)).sum(-1)).mean()
    with torch.no_grad():
        loss_fn.center.mul_(loss_fn.center_momentum).add_(t.mean(0, keepdim=True), alpha=1 - loss_fn.center_momentum)
    return total / num_samples


class PlainDINO(RefDINOLoss):
    """The official double loop, with the teacher-entropy monitors main_dino.py logs."""

    def forward(self, student_output, teacher_output, teacher_temp):
        self.teacher_entropy = self.teacher_batch_entropy = torch.zeros(())
        return super().forward(student_output, teacher_output, teacher_temp)


def _setup(args, seed=0):
    torch.manual_seed(seed)
    student = main_dino.build_network(args, args.drop_path_rate)
    teacher = main_dino.build_network(args, 0.0, teacher=True)
    main_dino.init_teacher(teacher, student)
    return student, teacher


def _crops(args, seed=1):
    g = torch.Generator().manual_seed(seed)
    B, G, L, n = args.batch_size_per_gpu, args.global_crops_size, args.local_crops_size, args.local_crops_number
    return [(torch.randn(2 * B, 3, G, G, generator=g), torch.randn(n * B, 3, L, L, generator=g)) for _ in range(STEPS)]


def optimised_run(args, crops, masking, monkeypatch):
    fused_calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        vision_transformer.F, "scaled_dot_product_attention", lambda *a, **kw: fused_calls.append(1) or sdpa(*a, **kw)
    )
    student, teacher = _setup(args)
    optimizer = build_optimizer("adamw", param_groups(student))
    assert optimizer.defaults["fused"] or any(gr.get("fused") for gr in optimizer.param_groups)
    dino = DINOLoss(args.out_dim, 2 + args.local_crops_number)
    patch = PatchLoss(args.patch_out_dim)
    losses = []
    for step, (g, l) in enumerate(crops):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3
        torch.manual_seed(100 + step)  # the masks
        loss, parts = main_dino.distillation_loss(student, teacher, dino, patch, g, l, masking, 0.04, 0.07, None, args)
        main_dino.optimizer_step(loss, student, teacher, optimizer, None, 1, 0.9, args)
        losses.append({k: v.item() for k, v in parts.items()})
    assert fused_calls  # the global crops went through the fused kernel
    monkeypatch.undo()
    return losses, student, teacher


def conv_patch_embed(proj, x):
    return proj(x).flatten(2).transpose(1, 2)


def plain_run(args, crops, masking, monkeypatch):
    monkeypatch.setattr(vision_transformer.F, "scaled_dot_product_attention", explicit_attention)
    monkeypatch.setattr(vision_transformer, "embed_patches", conv_patch_embed)
    monkeypatch.setattr(vision_transformer.SkippingBlock, "forward", Block.forward)
    student, teacher = _setup(args)
    optimizer = torch.optim.AdamW(param_groups(student), foreach=False, fused=False)
    dino = PlainDINO(args.out_dim, 2 + args.local_crops_number)
    patch = PatchLoss(args.patch_out_dim)
    monkeypatch.setattr(patch, "forward", lambda s, t, idx, num, temp: plain_patch_loss(patch, s, t, idx, num, temp))
    losses = []
    for step, (g, l) in enumerate(crops):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3
        torch.manual_seed(100 + step)
        loss, parts = main_dino.distillation_loss(student, teacher, dino, patch, g, l, masking, 0.04, 0.07, None, args)
        optimizer.zero_grad()
        loss.backward()
        for p in student.parameters():  # DINO's per-parameter clip
            if p.grad is not None:
                norm = p.grad.norm()
                coef = args.clip_grad / (norm + 1e-6)
                if coef < 1:
                    p.grad.mul_(coef)
        optimizer.step()
        with torch.no_grad():
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(0.9).add_((1 - 0.9) * ps.detach())
        losses.append({k: v.item() for k, v in parts.items()})
    return losses, student, teacher


@pytest.mark.parametrize(
    "masking,drop_path", [(False, 0.0), (True, 0.0), (True, 0.5)], ids=["dino", "dino+ibot", "dino+ibot+drop-path"]
)
def test_optimised_step_equals_plain_step(masking, drop_path, monkeypatch):
    args = main_dino.parse_args(ARGS + ["--pred_ratio", "0.4" if masking else "0", "--drop_path_rate", str(drop_path)])
    crops = _crops(args)
    with one_thread():
        fast, fs, ft = optimised_run(args, crops, masking, monkeypatch)
        plain, ps, pt = plain_run(args, crops, masking, monkeypatch)
    assert len(fast) == len(plain) == STEPS
    for a, b in zip(fast, plain):
        assert set(a) == set(b) == ({"dino_loss", "patch_loss"} if masking else {"dino_loss"})
        for key in a:
            # abs 1e-5: by the third step the DINO loss is down to ~0.15 (from 4.0), where Adam has
            # turned rounding differences of near-zero gradients into ~5e-6 of loss
            assert math.isfinite(a[key]) and a[key] == pytest.approx(b[key], rel=2e-5, abs=1e-5), (key, a, b)
    assert fast[0] != fast[-1]  # it trained
    # Adam turns float-rounding differences in near-zero gradients into steps of up to lr (1e-3)
    # per element, here and there (one element of 36 864 off by 1.7e-4 in one run); a real
    # difference in the step would move weights by ~lr everywhere
    for which, fast_net, plain_net in (("student", fs, ps), ("teacher", ft, pt)):
        for (name, a), b in zip(fast_net.state_dict().items(), plain_net.state_dict().values()):
            off = (a - b).abs() > 1e-4 + 1e-4 * b.abs()
            assert (a - b).abs().max() < 3e-3 and off.float().mean() < 1e-3, (which, name, int(off.sum()), a.numel())


def test_lambda2_zero_masks_the_student_without_the_patch_loss():
    # As in iBOT: --lambda2 0 drops the patch loss, not the masking the student's DINO loss sees.
    args = main_dino.parse_args(ARGS + ["--pred_ratio", "0.4", "--lambda2", "0"])
    student, teacher = _setup(args)
    assert main_dino.uses_masking(args, student.backbone)
    assert not main_dino.uses_masking(main_dino.parse_args(ARGS + ["--pred_ratio", "0"]), student.backbone)
    g, l = _crops(args)[0]
    seen = []
    forward = student.forward
    student.forward = lambda *a, **kw: seen.append((a, kw)) or forward(*a, **kw)
    dino = DINOLoss(args.out_dim, 2 + args.local_crops_number)
    patch = PatchLoss(args.patch_out_dim)
    with torch.no_grad():
        torch.manual_seed(100)
        loss, parts = main_dino.distillation_loss(student, teacher, dino, patch, g, l, True, 0.04, 0.07, None, args)
        unmasked, _ = main_dino.distillation_loss(student, teacher, dino, patch, g, l, False, 0.04, 0.07, None, args)
    masks = seen[0][0][2]
    assert masks is not None and masks.sum() == 2 * args.batch_size_per_gpu * int(0.4 * 64)
    assert seen[0][1] == {"predict_patches": False, "hide": True} and set(parts) == {"dino_loss"}
    assert torch.equal(patch.center, torch.zeros_like(patch.center))  # no patch loss, no centre update
    assert loss.item() == pytest.approx(args.lambda1 * parts["dino_loss"].item())
    assert abs(loss.item() - unmasked.item()) > 1e-4  # the student did see the masked crops


@pytest.mark.parametrize("mode", ["official", "simpool"])
def test_attmask_hides_the_tokens_the_teacher_attends_to_most(mode):
    """The student's masks are the top --pred_ratio of the teacher's map on the same crop: the
    last block's [CLS] row averaged over heads (official), SimPool's map (simpool), each
    recomputed here from the layers' weights in float64."""
    args = main_dino.parse_args(
        ARGS + ["--mode", mode, "--pred_shape", "attmask_high", "--pred_ratio", "0.4", "--pred_ratio_var", "0"]
    )
    student, teacher = _setup(args)
    g, l = _crops(args)[0]
    seen, inputs = [], {}
    forward = student.forward
    student.forward = lambda *a, **kw: seen.append(a[2]) or forward(*a, **kw)
    bb = teacher.backbone
    last = bb.blocks[-1] if mode == "official" else bb.simpool
    hook = last.register_forward_pre_hook(lambda m, a: inputs.update(x=a[0].detach().double()))  # returns None
    with torch.no_grad():
        main_dino.distillation_loss(
            student,
            teacher,
            DINOLoss(args.out_dim, 4),
            PatchLoss(args.patch_out_dim),
            g,
            l,
            True,
            0.04,
            0.07,
            None,
            args,
        )
    hook.remove()
    x = inputs["x"]
    with torch.no_grad():
        if mode == "official":  # explicit softmax(q k^T / sqrt(d)) of the last block, the [CLS] query row
            B, T, C = x.shape
            h = last.attn.num_heads
            qkv = F.linear(
                F.layer_norm(x, (C,), last.norm1.weight.double(), last.norm1.bias.double(), last.norm1.eps),
                last.attn.qkv.weight.double(),
                last.attn.qkv.bias.double(),
            )
            q, k, _ = qkv.reshape(B, T, 3, h, C // h).permute(2, 0, 3, 1, 4)
            attn = (q @ k.transpose(-2, -1) * (C // h) ** -0.5).softmax(-1)[:, :, 0, 1:].mean(1)
        else:  # SimPool: query from the mean token, keys from the layer-normalised tokens
            sp = last
            tokens = F.layer_norm(
                x, (x.shape[-1],), sp.norm_patches.weight.double(), sp.norm_patches.bias.double(), sp.norm_patches.eps
            )
            q = x.mean(1) @ sp.wq.weight.double().T
            k = tokens @ sp.wk.weight.double().T
            attn = (torch.einsum("bd,bnd->bn", q, k) * sp.scale).softmax(-1)
    masks = seen[0]
    count = int(0.4 * attn.shape[1])
    assert masks.shape == attn.shape and (masks.sum(1) == count).all()
    spread = attn.max() - attn.min()
    for a, m in zip(attn, masks):  # every hidden token is attended at least as much as every shown one
        assert a[m].min() >= a[~m].max() - 1e-6 * spread


def test_masking_prob_gates_only_the_attention_guided_modes():
    # AttMask: --masking_prob "works only for --pred_shape attmask_high, attmask_hint, attmask_low";
    # iBOT's rand and block masks cover every crop
    for shape, masked in (("attmask_high", False), ("attmask_hint", False), ("rand", True), ("block", True)):
        args = main_dino.parse_args(ARGS + ["--pred_shape", shape, "--masking_prob", "0"])
        assert main_dino.uses_masking(args, _setup(args)[0].backbone) is masked, shape
    args = main_dino.parse_args(ARGS + ["--pred_ratio", "0", "0", "--pred_ratio_var", "0"])  # iBOT's list form
    assert args.pred_ratio == [0.0, 0.0] and not main_dino.uses_masking(args, _setup(args)[0].backbone)
