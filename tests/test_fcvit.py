"""FCViT (simpool/fcvit.py) as its authors released it: its state-dict names and shapes, parameter
counts, outputs equal to those of the released code (the fixture), its checkpoints through
load_pretrained / export / validate, and files of this project's earlier FCViT refused.

The released facts: tests/data/fcvit_state_dicts.json (every key and shape of the four sizes,
their parameter counts). The fixture (the released fcvit_tiny with seeded random weights and
its outputs, 20 MB) is read from $FCVIT_REFERENCE (default: shared/reference/fcvit beside the
repository, where the project's shared folder sits); the tests that need it are skipped, with the
reason, where it is absent."""

import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from timm.layers import DropPath
from torchvision.transforms import v2

from checkpoint_factory import one_thread
from simpool import export, fcvit, validate
from simpool.augment import IMAGENET_MEAN, IMAGENET_STD
from simpool.backbones import build_backbone
from simpool.checkpoints import (
    CheckpointError,
    backbone_to_released_fcvit,
    init_backbone_from,
    load_pretrained,
    released_fcvit_to_backbone,
)
from simpool.fcvit import FCVIT_CONFIGS, RELEASED_PARAMS, build_fcvit

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "data", "fcvit_state_dicts.json")) as f:
    RELEASED = json.load(f)
SHARED_REFERENCE = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "reference", "fcvit")
FIXTURE_PATH = os.path.join(os.environ.get("FCVIT_REFERENCE", SHARED_REFERENCE), "fcvit_tiny_fixture.pt")
needs_fixture = pytest.mark.skipif(not os.path.exists(FIXTURE_PATH), reason=f"no FCViT fixture at {FIXTURE_PATH}")
TOLERANCE = 1e-5  # max abs difference to the released code's fp32 outputs


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on 2 shared cores two waiting OpenMP threads are many times slower."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE_PATH, weights_only=True)


@pytest.fixture(scope="module")
def released(fixture):
    """fcvit_tiny with the fixture's weights, its 1000-class classifier included."""
    model = fcvit.fcvit_tiny()
    model.load_state_dict(fixture["state_dict"], strict=True)
    return model.eval()


def max_abs(a, b):
    return (a - b).abs().max().item()


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def shapes(state):
    return {k: list(v.shape) for k, v in state.items()}


# ---------------------------------------------------------------- the network
@needs_fixture
def test_the_released_network_reproduces_the_fixture(fixture, released):
    with torch.no_grad():
        fmap = released.forward_features(fixture["input"])
        assert max_abs(fmap, fixture["final_feature_map"]) <= 2 * TOLERANCE  # a 320 x 7 x 7 map
        assert max_abs(released.forward_head(fmap, pre_logits=True), fixture["pooled"]) <= TOLERANCE
        assert max_abs(released.forward_head(fmap), fixture["logits"]) <= TOLERANCE
        assert max_abs(released(fixture["input_96"]), fixture["logits_96"]) <= TOLERANCE


@pytest.mark.parametrize("arch", list(FCVIT_CONFIGS))
def test_every_released_key_with_its_shape_and_the_parameter_count(arch):
    with torch.device("meta"):  # shapes only: no time spent initialising weights
        model = build_fcvit(arch, num_classes=1000)
    assert shapes(model.state_dict()) == RELEASED[arch]["state_dict"]
    assert num_params(model) == RELEASED[arch]["parameters_with_1000_class_head"] == RELEASED_PARAMS[arch]


@pytest.mark.parametrize("arch", list(FCVIT_CONFIGS))
def test_the_backbone_is_the_released_trunk_under_trunk_names(arch):
    """GAP mode: the released names under trunk., without the classifier; SimPool mode adds simpool.*."""
    trunk = {f"trunk.{k}": v for k, v in RELEASED[arch]["state_dict"].items() if not k.startswith("head.")}
    head = sum(np.prod(v) for k, v in RELEASED[arch]["state_dict"].items() if k.startswith("head."))
    with torch.device("meta"):
        official, pooled = build_backbone(arch, mode="official"), build_backbone(arch, mode="simpool")
    assert shapes(official.state_dict()) == trunk
    assert num_params(official) == RELEASED_PARAMS[arch] - head
    assert (
        {k for k in pooled.state_dict() if k not in trunk}
        == {k for k in pooled.state_dict() if k.startswith("simpool.")}
        != set()
    )
    assert shapes(backbone_to_released_fcvit(official.state_dict())) == {
        k: v for k, v in RELEASED[arch]["state_dict"].items() if not k.startswith("head.")
    }


def test_sizes_and_stage_settings_as_released():
    assert [sum(FCVIT_CONFIGS[a]["depths"]) for a in FCVIT_CONFIGS] == [13, 12, 24, 48]
    assert fcvit.MLP_RATIOS == (8, 8, 4, 4)
    with pytest.raises(ValueError, match="fcvit_tiny"):
        build_fcvit("fcvit_huge")


def test_drop_path_rises_linearly_over_all_blocks_and_layer_scale_starts_at_1e_5():
    model = fcvit.fcvit_tiny(drop_path_rate=0.2)
    blocks = [b for part in model.network if isinstance(part, torch.nn.Sequential) for b in part]
    rates = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.2, 13).tolist())
    for b in blocks:
        assert torch.equal(b.layer_scale_1, torch.full_like(b.layer_scale_1, 1e-5))
        assert torch.equal(b.layer_scale_2, torch.full_like(b.layer_scale_2, 1e-5))


def test_the_global_context_reaches_beyond_the_convolutions():
    """One changed position moves the output at the far corner of a 24x24 map, out of reach of
    the 11x11 and 3x3 convolutions: the global context links every position to every other."""
    torch.manual_seed(0)
    mixer = fcvit.GlobalContextMixer(32)
    x = torch.randn(1, 32, 24, 24)
    y = x.clone()
    y[:, :, 0, 0] += 5.0
    with torch.no_grad():
        assert (mixer(x) - mixer(y))[:, :, 23, 23].abs().max() > 1e-4
        assert (mixer.dw1(x) - mixer.dw1(y))[:, :, 23, 23].abs().max() == 0


def test_the_similarity_is_standardised_per_sample():
    torch.manual_seed(0)
    gc = fcvit.GlobalContext(64)
    x = torch.randn(3, 64, 5, 7)
    with torch.no_grad():
        s = gc.similarity(x, x.mean(dim=(2, 3)))  # rescale weight 1, bias 0 at initialisation
    assert s.shape == (3, 8, 5, 7)
    assert torch.allclose(s.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(s.std(dim=(1, 2, 3)), torch.ones(3), atol=1e-3)
    with pytest.raises(ValueError, match="divisible"):
        fcvit.GlobalContext(60)


def test_simpool_mode_pools_the_normed_last_map():
    torch.manual_seed(0)
    backbone = build_backbone("fcvit_tiny", mode="simpool").eval()
    trunk = backbone.trunk
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        unnormed = trunk.patch_embed(x)
        for part in trunk.network:
            unnormed = part(unnormed)
        fmap = trunk.forward_features(x)
        assert torch.allclose(fmap, trunk.norm(unnormed), atol=1e-6)
        out = backbone.forward_features(x, return_attention=True)
        assert torch.allclose(out["pooled"], backbone.simpool(fmap), atol=1e-6)
    assert backbone.simpool.gamma == 2.0 and backbone.head_norm is None
    assert out["attention"].shape == (2, 2 * 3) and backbone.grid_size(64, 96) == (2, 3)


# ---------------------------------------------------------------- released checkpoints
def _save_layout(state, path, layout):
    """A released checkpoint: the state dict at the top level or in one entry (timm's train.py:
    state_dict and state_dict_ema, beside its epoch and args)."""
    torch.save(dict(state) if layout == "top level" else {layout: state, "epoch": 300, "arch": "fcvit"}, path)
    return str(path)


@needs_fixture
@pytest.mark.parametrize("layout", ["top level", "state_dict", "model", "state_dict_ema"])
def test_released_checkpoints_load_and_pool_as_the_released_code_in_gap_mode(fixture, released, tmp_path, layout):
    path = _save_layout(fixture["state_dict"], tmp_path / "fcvit_tiny.pth", layout)
    model, info = load_pretrained(path)
    assert (info["arch"], info["mode"], info["embed_dim"]) == ("fcvit_tiny", "official", 320)
    assert info["entry"] == ("flat state dict" if layout == "top level" else layout)
    with torch.no_grad():
        assert max_abs(model(fixture["input"]), fixture["pooled"]) <= TOLERANCE
        pooled_96 = model(fixture["input_96"])
        assert (
            max_abs(pooled_96, released.forward_head(released.forward_features(fixture["input_96"]), pre_logits=True))
            <= TOLERANCE
        )
        assert max_abs(released.head(pooled_96), fixture["logits_96"]) <= TOLERANCE


@needs_fixture
def test_released_names_map_strictly_both_ways(fixture):
    state = fixture["state_dict"]
    trunk = released_fcvit_to_backbone(state)
    assert all(k.startswith("trunk.") for k in trunk) and len(trunk) == len(state) - 2  # head.weight, head.bias
    head = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
    back = backbone_to_released_fcvit(trunk, head=head)
    assert list(back) == list(state) and all(back[k] is state[k] for k in state)
    with pytest.raises(CheckpointError, match=r"not the released FCViT's: layer1\.0\.weight$"):
        released_fcvit_to_backbone({**state, "layer1.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="masked_embed"):
        backbone_to_released_fcvit({**trunk, "masked_embed": torch.zeros(1)})


@needs_fixture
def test_export_cli_end_to_end_on_a_released_file(fixture, tmp_path, capsys):
    path = _save_layout(fixture["state_dict"], tmp_path / "released.pth", "state_dict_ema")
    out = tmp_path / "fcvit_tiny.safetensors"
    export.main(["--checkpoint", path, "--output", str(out)])
    assert "Exported fcvit_tiny (official, gamma None, 224px, embed_dim 320)" in capsys.readouterr().out
    model = export.load_backbone(str(out))
    with torch.no_grad():
        assert max_abs(model(fixture["input"]), fixture["pooled"]) <= TOLERANCE


@needs_fixture
def test_a_simpool_model_starts_from_the_released_trunk(fixture, tmp_path, caplog):
    path = _save_layout(fixture["state_dict"], tmp_path / "released.pth", "state_dict")
    torch.manual_seed(0)
    backbone = build_backbone("fcvit_tiny", mode="simpool")
    fresh = {k: v.clone() for k, v in backbone.state_dict().items() if k.startswith("simpool.")}
    with caplog.at_level(logging.INFO, logger="simpool"):
        init_backbone_from(backbone, path)
    started = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Started")]
    assert started == [
        f"Started fcvit_tiny from the trunk in {path} ['state_dict']; its SimPool layer is new "
        f"({len(fresh)} tensors, not in the checkpoint)."
    ]
    state = backbone.state_dict()
    assert all(
        torch.equal(state[f"trunk.{k}"], v) for k, v in fixture["state_dict"].items() if not k.startswith("head.")
    )
    assert all(torch.equal(state[k], v) for k, v in fresh.items())


def _old_layout_state():
    """Weights in the layout of this project's earlier fcvit.py (timm MetaFormer names with
    its own token mixer), as its training checkpoints and exports hold them."""
    return {
        "trunk.stem.conv.weight": torch.zeros(32, 3, 7, 7),
        "trunk.stages.0.blocks.0.token_mixer.sim_scale": torch.ones(8),
        "trunk.stages.0.blocks.0.token_mixer.reduce.weight": torch.zeros(32, 32, 1, 1),
        "trunk.stages.0.blocks.0.layer_scale1.scale": torch.ones(32),
        "trunk.head.norm.weight": torch.ones(320),
        "simpool.wq.weight": torch.zeros(320, 320),
    }


def test_files_of_the_earlier_fcvit_layout_are_refused_in_one_line(tmp_path, capsys):
    old = _old_layout_state()
    torch.save(
        {
            "teacher": {f"backbone.{k}": v for k, v in old.items()},
            "student": {},
            "epoch": 5,
            "args": {"arch": "fcvit_tiny", "mode": "simpool"},
        },
        tmp_path / "checkpoint.pth",
    )
    torch.save(
        {"format": "simpool-backbone", "version": 1, "meta": {"arch": "fcvit_tiny"}, "state_dict": old},
        tmp_path / "exported.pth",
    )
    refusal = (
        r"earlier layout \(trunk\.stages\.0\.blocks\.0\.token_mixer\.sim_scale\)"
        r".* not the released FCViT.* retrain it"
    )
    for name in ("checkpoint.pth", "exported.pth"):
        with pytest.raises(CheckpointError, match=refusal) as e:
            load_pretrained(str(tmp_path / name))
        assert "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        export.main(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--output", str(tmp_path / "b.pth")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "not the released FCViT" in err and "\n" not in err


# ---------------------------------------------------------------- validation with its own classifier
def _image_folder(root, classes=("ant", "bee", "cat"), per_class=2, seed=0):
    """``root/val/<class>/<i>.png``: non-square noisy images around one colour per class."""
    rng = np.random.default_rng(seed)
    for c, colour in zip(classes, ((200, 40, 40), (40, 200, 40), (40, 40, 200))):
        (root / "val" / c).mkdir(parents=True)
        for i in range(per_class):
            size = (40 + 7 * i, 52, 3)  # the resize and centre crop matter
            pixels = np.clip(np.array(colour) + rng.normal(0, 60, size), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "val" / c / f"{i}.png")
    return root


def _eval_batch(root):
    """(folder labels, images) of ``root/val`` with DINO's evaluation transform written out here."""
    transform = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(224),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    labels, images = [], []
    for label, c in enumerate(sorted(os.listdir(root / "val"))):
        for name in sorted(os.listdir(root / "val" / c)):
            images.append(transform(Image.open(root / "val" / c / name).convert("RGB")))
            labels.append(label)
    return torch.tensor(labels), torch.stack(images)


@needs_fixture
def test_validate_gives_the_top1_of_a_hand_computed_argmax(fixture, released, tmp_path, capsys):
    """A 3-class head whose rows are the centred features of the first image of classes 0, 2 and 1
    (so the predictions vary, and some are wrong), then the fixture's 1000-class head, for which
    folder i is scored as class i."""
    root = _image_folder(tmp_path / "data")
    labels, images = _eval_batch(root)
    with torch.no_grad():
        feats = released.forward_head(released.forward_features(images), pre_logits=True)
    three = {**fixture["state_dict"], "head.weight": feats[[0, 4, 2]] - feats.mean(dim=0), "head.bias": torch.zeros(3)}
    for state, outputs in ((three, 3), (fixture["state_dict"], 1000)):
        model = fcvit.fcvit_tiny(num_classes=outputs)
        model.load_state_dict(state)
        with torch.no_grad():
            predicted = model.eval()(images).argmax(dim=1)
        if outputs == 3:
            assert len(set(predicted.tolist())) > 1, predicted  # not one class for all
        path = _save_layout(state, tmp_path / f"fcvit_{outputs}.pth", "state_dict_ema")
        out = tmp_path / f"out_{outputs}"
        record = validate.main(
            [
                "--checkpoint",
                path,
                "--data_path",
                str(root),
                "--output_dir",
                str(out),
                "--precision",
                "fp32",
                "--batch_size",
                "4",
                "--num_workers",
                "0",
            ]
        )
        expected = 100.0 * (predicted == labels).float().mean().item()
        assert record["top1"] == pytest.approx(expected) and record["n_images"] == 6
        assert record["top5"] >= record["top1"] and (record["top5"] == 100.0) == (outputs == 3)
        assert (record["num_outputs"], record["classes"], record["class_map"]) == (outputs, 3, "by index")
        assert json.loads((out / "validate.json").read_text()) == record
        assert f"fcvit_tiny classifier on 6 images: top-1 {expected:.2f}%" in capsys.readouterr().out


@needs_fixture
def test_main_dino_pretrained_weights_starts_student_and_teacher_from_the_released_trunk(fixture, tmp_path):
    import main_dino
    from simpool.network import build_student_teacher

    path = _save_layout(fixture["state_dict"], tmp_path / "released.pth", "state_dict_ema")
    args = main_dino.parse_args(
        [
            "--data_path",
            "fashion-mnist",
            "--arch",
            "fcvit_tiny",
            "--mode",
            "simpool",
            "--global_crops_size",
            "32",
            "--local_crops_size",
            "32",
            "--out_dim",
            "16",
            "--pretrained_weights",
            path,
        ]
    )
    args.world_size, args.gpu = 1, None
    student, _, teacher = build_student_teacher(args, torch.device("cpu"))
    for network in (student, teacher):
        state = network.backbone.state_dict()
        assert all(
            torch.equal(state[f"trunk.{k}"], v) for k, v in fixture["state_dict"].items() if not k.startswith("head.")
        )
