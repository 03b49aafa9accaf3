"""simpool.build_backbone: one interface over ViTs, ResNet-50, ConvNeXt and FCViT."""

import copy

import pytest
import timm
import torch
import torch.nn as nn

import simpool
from checkpoint_factory import nudge_off_init, one_thread
from simpool import fcvit
from simpool import vision_transformer as vits
from simpool.backbones import (
    ARCHS,
    CONVNET_GAMMA,
    FCVIT_ARCHS,
    TIMM_ARCHS,
    VIT_ARCHS,
    ConvNetBackbone,
    build_backbone,
    feature_grid,
    masking_off_message,
    supports_masking,
    sync_batchnorm_supported,
    upsample_attention,
    uses_batchnorm,
)
from simpool.evaluation import FrozenFeatures
from simpool.losses import DINOLoss

CONVNETS = ["resnet50", "convnext_tiny", "fcvit_tiny"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on 2 shared cores, two OpenMP threads that wait for each other
    made these tests many times slower."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return build_backbone("resnet50", mode="simpool")


@pytest.fixture(scope="module")
def convnext():
    torch.manual_seed(0)
    return build_backbone("convnext_tiny", mode="simpool")


def test_arch_names():
    assert set(VIT_ARCHS) == set(vits.ARCHS)
    assert set(ARCHS) == set(VIT_ARCHS) | set(TIMM_ARCHS) | set(FCVIT_ARCHS)
    assert {
        "resnet50",
        "convnext_tiny",
        "convnext_small",
        "convnext_base",
        "fcvit_tiny",
        "fcvit_b12",
        "fcvit_b24",
        "fcvit_b48",
    } <= set(ARCHS)
    assert simpool.build_backbone is build_backbone
    with pytest.raises(ValueError, match="resnet50"):
        build_backbone("resnet18")
    with pytest.raises(ValueError, match="mode"):
        build_backbone("fcvit_tiny", mode="gap")


@pytest.mark.parametrize("size", [224, 96])
def test_pooled_vector_and_simpool_map(resnet, convnext, size):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        for backbone, dim in ((resnet, 2048), (convnext, 768)):
            assert backbone(x).shape == (2, dim)
            out = backbone.forward_features(x, return_attention=True)
            h, w = backbone.grid_size(size, size)
            assert (h, w) == (size // 32, size // 32)
            assert out["pooled"].shape == (2, dim) and backbone.embed_dim == dim
            assert out["patch_tokens"] is None
            assert out["attention"].shape == (2, h * w)
            assert torch.allclose(out["attention"].sum(-1), torch.ones(2))
            assert backbone.forward_features(x)["attention"] is None  # only on request


def test_fcvit_backbone_interface():
    torch.manual_seed(0)
    backbone = build_backbone("fcvit_tiny")
    out = backbone.forward_features(torch.randn(3, 3, 96, 64), return_attention=True)
    assert backbone.embed_dim == 320 and out["pooled"].shape == (3, 320)
    assert out["attention"].shape == (3, 3 * 2) and backbone.grid_size(96, 64) == (3, 2)
    assert out["patch_tokens"] is None and backbone.trunk.num_classes == 0


@pytest.mark.parametrize("arch", CONVNETS)
def test_grid_size_follows_the_feature_map(arch):
    torch.manual_seed(0)
    backbone = build_backbone(arch, mode="official")
    with torch.no_grad():
        for h, w in ((64, 64), (100, 72), (33, 47)):
            fmap = backbone.trunk.forward_features(torch.randn(1, 3, h, w))
            assert backbone.grid_size(h, w) == tuple(fmap.shape[-2:]), (h, w)


@pytest.mark.parametrize("arch", CONVNETS)
def test_inputs_below_one_stride_32_cell_are_refused(arch):
    """ConvNeXt cannot run them; ResNet's / FCViT's last 3x3/2 conv would see a 1x1 map, whose
    bf16 CPU backward gives NaN gradients at random (docs/backbones.md)."""
    with torch.device("meta"):
        backbone = build_backbone(arch)
        assert backbone.min_input_size == 32
        with pytest.raises(ValueError, match=f"{arch} needs inputs of at least 32x32 pixels, got 32x16"):
            backbone(torch.empty(2, 3, 32, 16))


@pytest.mark.parametrize("arch", CONVNETS)
def test_official_mode_is_the_architectures_own_pooling(arch):
    """'official' gives exactly what timm's model (GAP, then ConvNeXt/FCViT's head norm) gives."""
    torch.manual_seed(0)
    backbone = build_backbone(arch, mode="official").eval()
    reference = (
        fcvit.build_fcvit(arch, num_classes=0)
        if arch in FCVIT_ARCHS
        else timm.create_model(arch, pretrained=False, num_classes=0)
    ).eval()
    reference.load_state_dict(backbone.trunk.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = backbone.forward_features(x, return_attention=True)
        assert out["attention"] is None
        assert torch.allclose(out["pooled"], reference(x), atol=1e-5)
    assert not any(k.startswith("simpool.") for k in backbone.state_dict())


def test_simpool_mode_replaces_the_global_pool(convnext):
    """SimPool's vector goes through ConvNeXt's head LayerNorm; ResNet has no head norm."""
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = convnext.trunk.forward_features(x)
        expected = convnext.trunk.head.norm(convnext.simpool(fmap)[:, :, None, None]).flatten(1)
        assert torch.allclose(convnext(x), expected, atol=1e-5)
    assert build_backbone("resnet50", mode="official").head_norm is None


def test_gamma_defaults():
    with torch.device("meta"):  # construction only
        assert build_backbone("fcvit_tiny").simpool.gamma == CONVNET_GAMMA == 2.0
        assert build_backbone("fcvit_tiny", gamma=None).simpool.gamma is None
        assert build_backbone("fcvit_tiny", gamma=1.25).simpool.gamma == 1.25
    assert build_backbone("vit_nano").simpool.gamma is None  # the ViT CLI default
    assert build_backbone("vit_nano", gamma=1.25).simpool.gamma == 1.25


def test_larger_convnexts_construct():
    for arch, dim in (("convnext_small", 768), ("convnext_base", 1024)):
        with torch.device("meta"):
            backbone = build_backbone(arch, mode="official")
        assert backbone.embed_dim == dim and backbone.grid_size(224, 224) == (7, 7)
        assert 49e6 < sum(p.numel() for p in backbone.parameters()) < 89e6


def test_masking_support(resnet):
    vit = build_backbone("vit_nano", patch_size=8, img_size=64)
    assert supports_masking(vit) and vit.supports_masking and vit.arch == "vit_nano"
    assert not supports_masking(resnet) and resnet.arch == "resnet50"
    with pytest.raises(ValueError, match="no patch tokens"):
        resnet.forward_features(torch.randn(1, 3, 64, 64), mask=torch.zeros(1, 2, 2, dtype=torch.bool))
    assert masking_off_message("resnet50") == (
        "--arch resnet50 has no patch tokens: masking (--pred_ratio) is turned off, the run is plain DINO"
    )


def test_attention_upsampling(resnet):
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        attention = resnet.forward_features(x, return_attention=True)["attention"]
    grid = feature_grid(resnet, 96, 128)
    assert grid == (3, 4)
    image_map = upsample_attention(attention, grid, (96, 128))
    assert image_map.shape == (1, 96, 128)
    assert torch.allclose(upsample_attention(torch.full((2, 12), 0.5), (3, 4), (9, 8)), torch.full((2, 9, 8), 0.5))
    # row-major layout: token r*w + c lands on cell (r, c), each cell 2x2 pixels at twice the size
    cells = torch.arange(12.0).view(3, 4)
    expected = cells.repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(upsample_attention(torch.arange(12.0)[None], (3, 4), (6, 8), mode="nearest")[0], expected)
    with pytest.raises(ValueError, match="3x3"):
        upsample_attention(attention, (3, 3), (96, 96))
    vit = build_backbone("vit_nano", patch_size=8, img_size=64)
    assert feature_grid(vit, 64, 48) == (8, 6)


def test_batchnorm_and_sync_batchnorm(resnet):
    assert uses_batchnorm(resnet)
    assert uses_batchnorm(build_backbone("fcvit_tiny"))  # the released FCViT's stem and downsampling embeddings
    assert not any(uses_batchnorm(build_backbone(a)) for a in ("convnext_tiny", "vit_nano"))
    assert sync_batchnorm_supported("cuda") and not sync_batchnorm_supported("cpu")
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(resnet))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    assert synced.state_dict().keys() == resnet.state_dict().keys()  # checkpoints stay interchangeable


def _dino_loss_before_and_after_one_step(backbone, size=64, batch=4, seed=0, lr=1e-4):
    """DINO loss on one batch before and after one AdamW step: student = backbone + a small
    head, teacher = a frozen copy, two views (the images and their mirror), cross-view loss.
    Both losses use the same centre (each call of the loss moves it). lr 1e-4, a warm-up-sized
    step: at 1e-3 the head's step overshoots on FCViT's SimPool vector, which carries a large
    offset common to all images (SimPool's v - min v on a normed map)."""
    torch.manual_seed(seed)
    head = vits.DINOHead(backbone.embed_dim, 64, hidden_dim=64, bottleneck_dim=32, norm_last_layer=False)
    student = nn.Sequential(backbone, head)
    teacher = copy.deepcopy(student).requires_grad_(False)
    loss_fn = DINOLoss(64, ncrops=2)
    loss_after = copy.deepcopy(loss_fn)
    images = torch.randn(batch, 3, size, size)
    views = torch.cat([images, images.flip(-1)])
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    with torch.no_grad():
        target = teacher(views)
    loss = loss_fn(student(views), target, teacher_temp=0.04)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss_after(student(views), target, teacher_temp=0.04)
    return loss.item(), after.item()


@pytest.mark.parametrize("arch", ["resnet50", "convnext_tiny", "fcvit_tiny", "vit_nano"])
def test_one_training_step_lowers_a_dino_loss(arch):
    torch.manual_seed(0)
    backbone = build_backbone(arch, patch_size=16, img_size=64, drop_path_rate=0.1)
    before, after = _dino_loss_before_and_after_one_step(backbone)
    assert torch.isfinite(torch.tensor([before, after])).all()
    assert after < before, (before, after)
    untrained = [name for name, p in backbone.named_parameters() if p.grad is None]
    assert untrained in ([], ["masked_embed"])  # every weight trains (the ViT's mask token needs masks)


@pytest.mark.parametrize("arch", ["resnet50", "fcvit_tiny", "vit_nano"])
def test_state_dict_round_trip(tmp_path, arch):
    torch.manual_seed(0)
    backbone = build_backbone(arch, patch_size=16, img_size=64)
    with torch.no_grad():  # move BatchNorm statistics and SimPool off their initial values
        for p in backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
        backbone(torch.randn(4, 3, 64, 64))
    backbone.eval()
    path = tmp_path / "backbone.pth"
    torch.save(backbone.state_dict(), path)
    torch.manual_seed(1)
    restored = build_backbone(arch, patch_size=16, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(restored(x), backbone(x))
        restored.load_state_dict(torch.load(path, weights_only=True), strict=True)
        expected = backbone.forward_features(x, return_attention=True)
        actual = restored.forward_features(x, return_attention=True)
    assert torch.equal(actual["pooled"], expected["pooled"])
    assert torch.equal(actual["attention"], expected["attention"])


def test_convnet_backbone_docstring_example():
    trunk = timm.create_model("resnet50", pretrained=False, num_classes=0, global_pool="")
    net = ConvNetBackbone(trunk, [trunk.conv1, trunk.maxpool], mode="official")
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 2048)
    assert net.grid_size(64, 64) == (16, 16)  # only the layers given are followed
    with pytest.raises(AttributeError):
        ConvNetBackbone(trunk, [], head_norm="head.missing")


# ---------------------------------------------------------------- the evaluation tools on convnets
def _perturbed_convnet(arch, mode="simpool", seed=0):
    """A convnet with non-default weights everywhere, so that a silent non-load would show."""
    torch.manual_seed(seed)
    return nudge_off_init(build_backbone(arch, mode=mode), seed)


def _save_convnet_checkpoint(path, backbone, arch, crops=32, **args):
    """main_dino.py's layout: student/teacher with backbone./head. keys and the parsed args."""
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({"head.last_layer.weight": torch.zeros(8, 4)})
    stored = {
        "arch": arch,
        "patch_size": 16,
        "mode": backbone.mode,
        "use_beta": False,
        "out_dim": 8,
        "gamma": backbone.simpool.gamma if backbone.simpool is not None else None,
        "global_crops_size": crops,
        "data_path": "somewhere",
        **args,
    }
    torch.save({"student": state, "teacher": state, "epoch": 2, "args": stored}, path)


@pytest.mark.parametrize(
    "arch,suffix", [("resnet50", ".safetensors"), ("convnext_tiny", ".pth"), ("fcvit_tiny", ".pth")]
)
def test_convnet_export_round_trip_gives_identical_features(tmp_path, arch, suffix):
    from simpool import export
    from simpool.checkpoints import read_checkpoint

    backbone = _perturbed_convnet(arch)
    _save_convnet_checkpoint(tmp_path / "checkpoint.pth", backbone, arch, crops=64)
    meta = export.export_backbone(str(tmp_path / "checkpoint.pth"), str(tmp_path / f"b{suffix}"))
    assert (meta["arch"], meta["mode"], meta["gamma"], meta["embed_dim"]) == (arch, "simpool", 2.0, backbone.embed_dim)
    assert meta["img_size"] == 64 and not {"patch_size", "depth", "num_heads"} & set(meta)  # no ViT geometry
    assert not any(k.startswith("head.") for k in read_checkpoint(str(tmp_path / f"b{suffix}"))["state_dict"])
    loaded = export.load_backbone(str(tmp_path / f"b{suffix}"))
    assert loaded.pretrained_info["arch"] == arch and loaded.pretrained_info["patch_size"] is None
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = backbone.forward_features(x, return_attention=True)
        b = loaded.forward_features(x, return_attention=True)
    assert torch.equal(a["pooled"], b["pooled"]) and torch.equal(a["attention"], b["attention"])
    with pytest.raises(ValueError, match="ViTs only"):  # the timm route is for ViTs
        export.build_timm_vit(meta)


def test_convnet_loads_infer_the_arch_and_refuse_mismatches(tmp_path):
    from checkpoint_factory import save_training_checkpoint, tiny_backbone
    from simpool.checkpoints import CheckpointError, load_pretrained

    backbone = _perturbed_convnet("fcvit_tiny", seed=1)
    torch.save(backbone.state_dict(), tmp_path / "flat.pth")  # no args: the weights alone tell
    model, info = load_pretrained(str(tmp_path / "flat.pth"))
    assert (info["arch"], info["mode"], info["gamma"], info["embed_dim"]) == ("fcvit_tiny", "simpool", 2.0, 320)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), backbone(x))
    _save_convnet_checkpoint(tmp_path / "c.pth", backbone, "fcvit_tiny")
    cases = {
        ("c.pth", "convnext_tiny", None): r"does not fit convnext_tiny \(simpool\): missing keys: "
        r"trunk\.stem\.0\.weight.*\(the weights are a fcvit_tiny: check --arch\)$",
        ("c.pth", None, "official"): r"unexpected keys: simpool\..*\(a SimPool checkpoint: try --mode simpool\)$",
        ("vit.pth", "fcvit_tiny", None): r"\(the weights are a vit_nano: check --arch\)$",
    }
    save_training_checkpoint(tmp_path / "vit.pth", tiny_backbone("simpool", patch_size=7, img_size=28))
    for (name, arch, mode), pattern in cases.items():
        with pytest.raises(CheckpointError, match=pattern) as e:
            load_pretrained(str(tmp_path / name), arch=arch, mode=mode)
        assert "\n" not in str(e.value)


def test_dino_resnet50_layout_loads_in_official_mode(tmp_path):
    """DINO's ResNet-50 release: torchvision names (conv1.*, layer1.*), no SimPool; a flat
    classifier (fc.*) is dropped."""
    from simpool.checkpoints import load_pretrained

    backbone = _perturbed_convnet("resnet50", mode="official", seed=2)
    state = {k[len("trunk.") :]: v for k, v in backbone.state_dict().items()}
    torch.save({**state, "fc.weight": torch.zeros(10, 2048), "fc.bias": torch.zeros(10)}, tmp_path / "r50.pth")
    model, info = load_pretrained(str(tmp_path / "r50.pth"), image_size=28)
    assert (info["arch"], info["mode"], info["image_size"]) == ("resnet50", "official", 32)  # raised to 32 px
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), backbone(x))


def test_simpool_resnet50_release_layout_loads_in_simpool_mode(tmp_path):
    """SimPool's ResNet-50 release: torchvision names with the ``simpool.*`` pooling beside
    them (not under the layers), under a "teacher" key."""
    from simpool.checkpoints import load_pretrained

    backbone = _perturbed_convnet("resnet50", mode="simpool", seed=3)
    state = {k[len("trunk.") :] if k.startswith("trunk.") else k: v for k, v in backbone.state_dict().items()}
    assert any(k.startswith("simpool.") for k in state) and not any(k.startswith("trunk.") for k in state)
    torch.save({"teacher": state}, tmp_path / "sp_r50.pth")
    model, info = load_pretrained(str(tmp_path / "sp_r50.pth"), image_size=32)
    assert (info["arch"], info["mode"]) == ("resnet50", "simpool")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), backbone(x))


@pytest.fixture(scope="module")
def tiny_folder_and_fcvit(tmp_path_factory):
    """A 2-class ImageFolder of 24x20 images (below a convnet's 32 px) and an fcvit_tiny
    training checkpoint."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("convnet_eval")
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for c, level in (("dark", 40), ("bright", 200)):
            (root / "data" / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(level + rng.normal(0, 20, (24, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / "data" / split / c / f"{i}.png")
    _save_convnet_checkpoint(root / "checkpoint.pth", _perturbed_convnet("fcvit_tiny", seed=3), "fcvit_tiny")
    return root


def test_eval_knn_on_an_image_folder_with_a_convnet(tiny_folder_and_fcvit, tmp_path, capsys):
    import json

    import eval_knn

    root = tiny_folder_and_fcvit
    results = eval_knn.main(
        [
            "--pretrained_weights",
            str(root / "checkpoint.pth"),
            "--data_path",
            str(root / "data"),
            "--image_size",
            "24",
            "--nb_knn",
            "1",
            "3",
            "--num_workers",
            "0",
            "--output_dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert "fcvit_tiny needs inputs of at least 32x32 pixels: images are resized to 32 px instead of 24 px" in out
    record = json.loads((tmp_path / "knn.json").read_text())
    assert record["model"]["arch"] == "fcvit_tiny" and record["model"]["image_size"] == 32
    assert record["model"]["patch_size"] is None and record["n_train"] == 6 and record["n_test"] == 4
    assert set(results) == {1, 3}


def test_eval_linear_on_a_convnet_uses_its_pooled_vector(tiny_folder_and_fcvit, tmp_path, capsys):
    import json

    import eval_linear

    backbone = build_backbone("fcvit_tiny", mode="official").eval()
    feats = FrozenFeatures(backbone, n_last_blocks=4, avgpool=2)  # no blocks, no patch tokens
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert feats.dim == 320 and torch.equal(feats(x), backbone(x))
    root = tiny_folder_and_fcvit
    eval_linear.main(
        [
            "--pretrained_weights",
            str(root / "checkpoint.pth"),
            "--data_path",
            str(root / "data"),
            "--avgpool_patchtokens",
            "True",
            "--train_augment",
            "False",
            "--epochs",
            "1",
            "--lrs",
            "0.1",
            "--num_workers",
            "0",
            "--output_dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert out.count("--n_last_blocks and --avgpool_patchtokens apply to ViTs only and are ignored") == 1
    record = json.loads((tmp_path / "linear.json").read_text())
    assert record["features"] == {"dim": 320, "n_last_blocks": 1, "avgpool_patchtokens": False}
    assert record["model"]["arch"] == "fcvit_tiny" and record["model"]["image_size"] == 32


@pytest.mark.parametrize("arch", ["vit_nano"] + CONVNETS)
def test_grad_checkpointing_gives_the_same_gradients_and_keeps_less(arch):
    """Recomputed blocks replay drop-path's random draws: gradients are identical, and far
    fewer bytes are saved for the backward (measured: vit_nano 26.6 -> 2.2 MiB, resnet50
    163 -> 44 MiB on these inputs)."""

    def run(model):
        saved = []
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t
        ):
            model.forward_features(x)["pooled"].square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return sum(saved), grads

    torch.manual_seed(0)
    model = build_backbone(arch, patch_size=8, img_size=64, drop_path_rate=0.3)
    x = torch.randn(4, 3, 64, 64)
    plain_bytes, plain = run(model)
    model.set_grad_checkpointing(True)
    kept_bytes, checkpointed = run(model)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)
    assert kept_bytes < plain_bytes / 3, (kept_bytes, plain_bytes)


def test_resnet_runs_channels_last_with_the_same_outputs(resnet):
    """ResNet-50's trunk is channels-last (faster oneDNN convolutions); a copy in the default
    layout computes the same vector, and the weights load either way."""
    resnet = copy.deepcopy(resnet)  # the fixture stays in training mode for the other tests
    assert resnet.channels_last and resnet.trunk.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    plain = copy.deepcopy(resnet)
    plain.channels_last = False
    plain.trunk.to(memory_format=torch.contiguous_format)
    assert plain.trunk.conv1.weight.is_contiguous()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(resnet.eval()(x), plain.eval()(x), rtol=1e-4, atol=1e-4)
    fresh = build_backbone("resnet50", mode="simpool")
    fresh.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), plain(x), rtol=1e-4, atol=1e-4)
