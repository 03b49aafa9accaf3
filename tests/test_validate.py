"""simpool.validate: a checkpoint's own classifier scored on an ImageFolder. timm-style ResNet-50,
ConvNeXt and ViT classifiers give timm's own logits; an eval_linear.py head is scored on the
features of its backbone; the user's mistakes are one line. (The released FCViT: test_fcvit.py.)"""

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torchvision.transforms import v2

import eval_linear
from checkpoint_factory import nudge_off_init, one_thread, save_training_checkpoint, tiny_backbone
from simpool import validate
from simpool.checkpoints import load_pretrained
from simpool.evaluation import EvalError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models on a busy 2-core machine run many times faster on one thread."""
    with one_thread():
        yield


def _perturbed(model):
    """Norms, biases and BatchNorm statistics off their initial values, so a silent non-load shows."""
    return nudge_off_init(model, seed=1)


def _timm_classifier(family):
    torch.manual_seed(0)
    if family == "vit":  # vit_nano/7 at 28 px, a [CLS] classifier under timm's names
        return VisionTransformer(img_size=28, patch_size=7, embed_dim=192, depth=6, num_heads=3, num_classes=5), 28
    return timm.create_model(family, pretrained=False, num_classes=5), 64


@pytest.mark.parametrize(
    "family,arch", [("resnet50", "resnet50"), ("convnext_tiny", "convnext_tiny"), ("vit", "vit_nano")]
)
def test_timm_style_classifiers_give_timms_logits(tmp_path, family, arch):
    model, size = _timm_classifier(family)
    model = _perturbed(model)
    path = tmp_path / "classifier.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 1}, path)
    classifier, info = validate.load_classifier(str(path))
    assert (info["arch"], info["mode"], info["num_outputs"], info["class_names"]) == (arch, "official", 5, None)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(classifier(x), model(x), rtol=1e-4, atol=1e-4)


def test_an_average_pooled_vit_classifier_is_refused():
    state = VisionTransformer(
        img_size=28,
        patch_size=7,
        embed_dim=192,
        depth=1,
        num_heads=3,
        num_classes=5,
        global_pool="avg",
        class_token=False,
    ).state_dict()
    with pytest.raises(EvalError, match=r"averaged patch tokens \(fc_norm\.\*\)"):
        validate.split_classifier(state, "vit.pth")


def test_class_index_map():
    index, rule = validate.class_index_map(["b", "c"], 3, ["a", "b", "c"])
    assert index.tolist() == [1, 2] and rule == "by name"
    index, rule = validate.class_index_map(["x", "y"], 1000)
    assert index.tolist() == [0, 1] and rule == "by index"
    with pytest.raises(EvalError, match="3 class folders but the classifier has 2 outputs"):
        validate.class_index_map(["x", "y", "z"], 2)
    with pytest.raises(EvalError, match="not trained on: d"):
        validate.class_index_map(["a", "d"], 3, ["a", "b", "c"])


def _image_folder(root, splits=(("train", 3), ("val", 2)), size=(30, 34)):
    rng = np.random.default_rng(0)
    for split, n in splits:
        for c, level in (("dark", 50), ("bright", 200)):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(level + rng.normal(0, 40, (*size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def test_a_linear_head_of_eval_linear_is_scored_on_its_backbones_features(tmp_path, capsys):
    ckpt = tmp_path / "checkpoint.pth"
    save_training_checkpoint(ckpt, tiny_backbone("simpool", patch_size=7, img_size=28))
    data = _image_folder(tmp_path / "data")
    eval_linear.main(
        [
            "--pretrained_weights",
            str(ckpt),
            "--data_path",
            str(data),
            "--epochs",
            "1",
            "--lrs",
            "0.1",
            "--train_augment",
            "False",
            "--num_workers",
            "0",
            "--output_dir",
            str(tmp_path / "linear"),
        ]
    )
    head = torch.load(tmp_path / "linear" / "linear_head.pth", weights_only=True)
    # by hand: eval_linear's backbone, DINO's transform at its 28 px (resize 32, crop 28), the head
    backbone, _ = load_pretrained(str(ckpt))
    transform = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(32, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(28),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    labels, images = [], []
    for label, c in enumerate(("bright", "dark")):
        for i in range(2):
            images.append(transform(Image.open(data / "val" / c / f"{i}.png").convert("RGB")))
            labels.append(label)
    with torch.no_grad():
        predicted = F.linear(backbone(torch.stack(images)), head["weight"], head["bias"]).argmax(dim=1)
    expected = 100.0 * (predicted == torch.tensor(labels)).float().mean().item()
    capsys.readouterr()
    record = validate.main(
        [
            "--checkpoint",
            str(tmp_path / "linear" / "linear_head.pth"),
            "--data_path",
            str(data),
            "--precision",
            "fp32",
            "--num_workers",
            "0",
            "--output_dir",
            str(tmp_path / "v"),
        ]
    )
    assert record["top1"] == pytest.approx(expected) and record["n_images"] == 4
    assert (record["family"], record["class_map"], record["image_size"]) == ("linear probe", "by name", 28)
    assert record["model"]["arch"] == "vit_nano" and record["model"]["mode"] == "simpool"
    assert json.loads((tmp_path / "v" / "validate.json").read_text()) == record
    assert f"vit_nano classifier on 4 images: top-1 {expected:.2f}%" in capsys.readouterr().out


def test_user_errors_are_one_line(tmp_path, capsys):
    ckpt = tmp_path / "checkpoint.pth"
    save_training_checkpoint(ckpt, tiny_backbone("simpool", patch_size=7, img_size=28))
    data = _image_folder(tmp_path / "data", splits=(("val", 1),))
    model, _ = _timm_classifier("vit")
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    cases = {
        (str(ckpt), str(data)): "holds no classifier weights at the top level or in state_dict, model, "
        "state_dict_ema (it holds: args, epoch, optimizer, student, teacher) (a "
        "pretraining checkpoint: train a linear probe with eval_linear.py",
        (str(tmp_path / "vit.pth"), str(tmp_path / "nowhere")): "--data_path",
        (str(tmp_path / "missing.pth"), str(data)): "no such file",
        (str(tmp_path / "vit.pth"), str(data), "5"): "--image_size 5 is below the smallest input of vit_nano (7 px)",
    }
    for (checkpoint, data_path, *size), message in cases.items():
        with pytest.raises(SystemExit) as e:
            validate.main(
                ["--checkpoint", checkpoint, "--data_path", data_path, "--output_dir", str(tmp_path / "o")]
                + (["--image_size", *size] if size else [])
            )
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err


def test_every_flag_has_help():
    for action in validate.get_args_parser()._actions:
        assert action.help, action.dest
