"""Backbone export / import (simpool/export.py, simpool/checkpoints.py): exact round trips,
timm compatibility, strict loading with named keys, official checkpoint layouts, and
files that are not checkpoints (nothing in them runs)."""

import logging
import os
import pickle

import pytest
import torch
from full_disk import FullDisk

from checkpoint_factory import (
    one_thread,
    save_flat_backbone,
    save_official_checkpoint,
    save_training_checkpoint,
    tiny_backbone,
)
from simpool import export, utils
from simpool import vision_transformer as vits
from simpool.checkpoints import CheckpointError, load_backbone_weights, load_pretrained, read_checkpoint


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a busy 2-core machine run many times faster on one thread."""
    with one_thread():
        yield


def features(model, x):
    with torch.no_grad():
        out = model.forward_features(x)
    return out["pooled"], out["patch_tokens"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    backbone = tiny_backbone("simpool", patch_size=7, img_size=28, gamma=1.25)
    save_training_checkpoint(folder / "checkpoint.pth", backbone)
    return backbone, folder / "checkpoint.pth"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_export_round_trip_gives_identical_features(trained, tmp_path, suffix):
    backbone, ckpt = trained
    out = tmp_path / f"backbone{suffix}"
    meta = export.export_backbone(str(ckpt), str(out), "teacher")
    assert meta["arch"] == "vit_nano" and meta["patch_size"] == 7 and meta["mode"] == "simpool"
    assert meta["gamma"] == 1.25 and meta["img_size"] == 28 and meta["embed_dim"] == 192 and meta["format_version"] == 1
    stored = read_checkpoint(str(out))
    assert not any(k.startswith("head.") for k in stored["state_dict"])  # backbone only
    loaded = export.load_backbone(str(out))
    assert loaded.pretrained_info["gamma"] == 1.25
    x = torch.randn(3, 3, 28, 28)
    for a, b in zip(features(backbone, x), features(loaded, x)):
        assert torch.equal(a, b)


def test_pos_embed_is_resized_and_logged(trained, tmp_path, caplog):
    backbone, ckpt = trained
    out = tmp_path / "b.pth"
    export.export_backbone(str(ckpt), str(out))
    with caplog.at_level(logging.INFO, logger="simpool"):
        big = export.load_backbone(str(out), image_size=56)
    assert big.pos_embed.shape == (1, 64, 192)
    assert "resized pos_embed from a 4x4 to a 8x8" in caplog.text
    x = torch.randn(2, 3, 56, 56)  # the original model resizes on the fly the same way
    torch.testing.assert_close(features(big, x)[0], features(backbone, x)[0])


def test_evaluation_models_interpolate_positions_once(trained):
    # the evaluation tools keep the trained 4x4 grid (load_pretrained's default) and interpolate per
    # input, as DINO does; a model resized to a square 8x8 grid at load time would interpolate a
    # non-square input a second time, from the resized grid
    backbone, ckpt = trained
    kept, info = load_pretrained(str(ckpt), image_size=56)
    resized, _ = load_pretrained(str(ckpt), image_size=56, resize_pos_embed=True)
    assert info["image_size"] == 56 and info["img_size"] == 28
    assert kept.pos_embed.shape == (1, 16, 192) and resized.pos_embed.shape == (1, 64, 192)
    square, wide = torch.randn(2, 3, 56, 56), torch.randn(2, 3, 56, 84)
    assert torch.equal(features(kept, wide)[0], features(backbone, wide)[0])
    torch.testing.assert_close(features(kept, square)[0], features(resized, square)[0])  # one interpolation each
    assert not torch.allclose(features(resized, wide)[0], features(backbone, wide)[0], atol=1e-3)


def test_export_cli_and_bad_input_is_one_line_error(trained, tmp_path, capsys):
    _, ckpt = trained
    export.main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "b.safetensors")])
    # re-exporting an export: the weights' source is the file itself, whatever --checkpoint_key says
    # (before: "b.safetensors [student]", a key such a file does not have)
    export.main(
        [
            "--checkpoint",
            str(tmp_path / "b.safetensors"),
            "--checkpoint_key",
            "student",
            "--output",
            str(tmp_path / "c.pth"),
        ]
    )
    log = capsys.readouterr().out
    assert f"from {ckpt} [teacher] to {tmp_path / 'b.safetensors'}" in log, log
    assert f"from {tmp_path / 'b.safetensors'} [exported backbone] to" in log, log
    assert export.load_backbone(str(tmp_path / "c.pth")).pretrained_info["source"].endswith("[exported backbone]")
    assert utils.load_checkpoint(str(tmp_path / "c.pth"))["meta"]["source"] == "b.safetensors [exported backbone]"
    bad = tmp_path / "bad.pth"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(SystemExit) as e:
        export.main(["--checkpoint", str(bad), "--output", str(tmp_path / "x.pth")])
    assert e.value.code == utils.USER_ERROR_EXIT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "not a readable checkpoint" in err
    assert not (tmp_path / "x.pth").exists()


def test_unreadable_checkpoint_reasons_say_what_the_file_is(trained, tmp_path):
    # before: "(101)" for a text file (torch's KeyError on the opcode 'e') and a cut-off miniz message
    _, ckpt = trained
    text, truncated = tmp_path / "text.pth", tmp_path / "truncated.pth"
    text.write_text("epoch 3 done\n")
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    for path, reason in ((text, "(not a PyTorch checkpoint file)"), (truncated, "(truncated or damaged: ")):
        with pytest.raises(CheckpointError) as e:
            utils.load_checkpoint(str(path))
        assert str(e.value).startswith(f"{path} is not a readable checkpoint {reason}"), str(e.value)
    with pytest.raises(CheckpointError, match="Is a directory"):  # still one line, torch's reason
        utils.load_checkpoint(str(tmp_path))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_export_to_a_full_disk_is_one_line_error_and_leaves_nothing(trained, tmp_path, monkeypatch, capsys, suffix):
    monkeypatch.setattr(utils, "open", lambda file, mode="r": FullDisk(file, mode, budget=4096), raising=False)
    _, ckpt = trained
    with pytest.raises(SystemExit) as e:
        export.main(["--checkpoint", str(ckpt), "--output", str(tmp_path / f"b{suffix}")])
    assert e.value.code == utils.USER_ERROR_EXIT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not write ") and "\n" not in err and "No space left on device" in err
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temp file


def test_timm_vit_small_gives_equal_patch_tokens():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    with one_thread():
        ours = vits.build_vit("vit_small", patch_size=16, img_size=224, mode="simpool").eval()
        theirs = timm.create_model(
            "vit_small_patch16_224", class_token=False, global_pool="", num_classes=0, pretrained=False
        ).eval()
    theirs.load_state_dict(export.to_timm_state_dict(ours), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        # the same blocks (LayerNorm eps 1e-6 in both): equal to float rounding
        torch.testing.assert_close(
            theirs.forward_features(x), ours.forward_features(x)["patch_tokens"], rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("mode,patch", [("simpool", 7), ("official", 4)])
def test_build_timm_vit_is_exact(tmp_path, mode, patch):
    backbone = tiny_backbone(mode, patch_size=patch, img_size=28)
    save_training_checkpoint(tmp_path / "c.pth", backbone)
    meta = export.export_backbone(str(tmp_path / "c.pth"), str(tmp_path / "b.pth"))
    with one_thread():
        model = export.build_timm_vit(meta)
    model.load_state_dict(export.to_timm_state_dict(export.load_backbone(str(tmp_path / "b.pth"))), strict=True)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        tokens = model.forward_features(x)
    pooled, patches = features(backbone, x)
    # the same computation up to float32 rounding: timm embeds patches by convolution, we by one
    # matrix product (different summation order: ~2e-6 on tokens of magnitude ~1)
    torch.testing.assert_close(tokens[:, model.num_prefix_tokens :], patches, rtol=1e-5, atol=1e-5)
    if mode == "official":  # timm's normed [CLS] token is our pooled vector
        torch.testing.assert_close(tokens[:, 0], pooled, rtol=1e-5, atol=1e-5)


def test_strict_load_names_missing_unexpected_and_mismatched_keys():
    model = vits.build_vit("vit_nano", patch_size=7, img_size=28)
    state = dict(model.state_dict())
    del state["blocks.0.norm1.weight"]
    state["blocks.0.extra"] = torch.zeros(3)
    state["norm.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError) as e:
        load_backbone_weights(model, state, "ckpt.pth", "vit_nano/7 (simpool)")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("ckpt.pth does not fit vit_nano/7 (simpool)")
    assert "missing keys: blocks.0.norm1.weight" in msg and "unexpected keys: blocks.0.extra" in msg
    assert "norm.bias (checkpoint [7], model [192])" in msg


def test_wrong_mode_or_patch_size_is_a_clear_error(trained):
    _, ckpt = trained
    with pytest.raises(CheckpointError, match=r"missing keys: cls_token.*unexpected keys: simpool\..*--mode simpool"):
        load_pretrained(str(ckpt), mode="official")
    with pytest.raises(
        CheckpointError,
        match=r"patch_embed.proj.weight \(checkpoint \[192, 3, 7, 7\], model "
        r"\[192, 3, 4, 4\]\).*--patch_size",
    ):
        load_pretrained(str(ckpt), patch_size=4)


@pytest.mark.parametrize("layout", ["teacher", "student", "flat"])
def test_official_dino_cls_checkpoints_load_with_identical_features(tmp_path, layout):
    teacher = tiny_backbone("official", patch_size=4, img_size=28, seed=3)
    student = tiny_backbone("official", patch_size=4, img_size=28, seed=5)  # so the key must pick the right one
    path = tmp_path / "dino.pth"
    if layout == "flat":
        save_flat_backbone(path, teacher)
    else:
        save_official_checkpoint(path, teacher, student_backbone=student)
    model, info = load_pretrained(str(path), checkpoint_key=layout)
    assert (info["arch"], info["patch_size"], info["mode"], info["img_size"]) == ("vit_nano", 4, "official", 28)
    x = torch.randn(2, 3, 28, 28)
    chosen, other = (student, teacher) if layout == "student" else (teacher, student)
    for a, b, c in zip(features(chosen, x), features(model, x), features(other, x)):
        assert torch.equal(a, b) and not torch.allclose(b, c)


def test_official_mode_records_no_simpool_knobs(tmp_path):
    # SimPool's README runs its evaluation commands on the [CLS] baseline by changing --mode alone
    path = tmp_path / "dino.pth"
    save_official_checkpoint(path, tiny_backbone("official", patch_size=7, img_size=28), gamma=1.25)
    _, info = load_pretrained(str(path), mode="official", gamma=1.25, use_beta=True)
    assert info["mode"] == "official" and info["gamma"] is None and info["use_beta"] is False
    _, info = load_pretrained("", arch="vit_nano", patch_size=7, mode="official", gamma=1.25, image_size=28)
    assert info["gamma"] is None and info["use_beta"] is False


def test_official_simpool_checkpoint_reads_gamma_from_its_args(tmp_path):
    backbone = tiny_backbone("simpool", patch_size=7, img_size=28, gamma=1.25, seed=4)
    save_official_checkpoint(tmp_path / "simpool.pth", backbone, gamma=1.25)
    model, info = load_pretrained(str(tmp_path / "simpool.pth"))
    assert info["mode"] == "simpool" and info["gamma"] == 1.25 and "cls_token" not in model.state_dict()
    # the official code's positions are resampled at every size (tests/test_official_simpool_positions.py)
    assert info["resample_native_pos"] and model.resample_native_pos
    backbone.resample_native_pos = True
    try:
        x = torch.randn(2, 3, 28, 28)
        assert torch.equal(features(backbone, x)[0], features(model, x)[0])
    finally:
        backbone.resample_native_pos = False  # the factory's backbone is cached and shared


class _Payload:
    """Pickles to a call that would create a folder: proof if it ever runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_non_checkpoints_fail_cleanly_and_never_run_code(trained, tmp_path):
    _, ckpt = trained
    marker = str(tmp_path / "PWNED")
    cases = {
        "random.pth": os.urandom(2048),
        "random.safetensors": os.urandom(2048),
        "truncated.pth": ckpt.read_bytes()[:5000],
        "empty.pth": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with open(tmp_path / "code.pkl", "wb") as f:
        pickle.dump({"teacher": _Payload(marker)}, f)
    torch.save({"teacher": _Payload(marker)}, tmp_path / "code.pth")  # torch's zip format, same payload
    for name in list(cases) + ["code.pkl", "code.pth"]:
        with pytest.raises(CheckpointError) as e:
            load_pretrained(str(tmp_path / name))
        assert "\n" not in str(e.value) and name in str(e.value)
    assert not os.path.exists(marker)
    with pytest.raises(CheckpointError, match="no such file"):
        load_pretrained(str(tmp_path / "missing.pth"))


def test_random_init_warns_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="simpool"):
        model, info = load_pretrained("", arch="vit_nano", patch_size=7, image_size=28)
    assert "RANDOMLY INITIALISED" in caplog.text and info["source"] == "random init"
    assert model(torch.randn(1, 3, 28, 28)).shape == (1, 192)


def test_gamma_auto_in_stored_args_means_none_for_vits(tmp_path):
    backbone = tiny_backbone("simpool", patch_size=7, img_size=28)
    save_training_checkpoint(tmp_path / "auto.pth", backbone, stored_gamma="auto")  # main_dino's default
    model, info = load_pretrained(str(tmp_path / "auto.pth"))
    assert info["gamma"] is None and model.simpool.gamma is None
    assert load_pretrained(str(tmp_path / "auto.pth"), gamma=1.5)[1]["gamma"] == 1.5  # the flag wins


def test_a_misspelt_checkpoint_key_is_an_error_not_the_teacher(tmp_path):
    # before: "no 'studnet' entry; using 'teacher'" and the teacher evaluated (and exported as [studnet])
    backbone = tiny_backbone("official", patch_size=4, img_size=28, seed=3)
    save_official_checkpoint(tmp_path / "dino.pth", backbone)
    with pytest.raises(
        CheckpointError,
        match=r"has no 'studnet' entry \(it holds: .*student.*teacher.*\); choose "
        r"one with --checkpoint_key",
    ):
        load_pretrained(str(tmp_path / "dino.pth"), checkpoint_key="studnet")
