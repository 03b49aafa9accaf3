"""Official SimPool checkpoints give the official code's features at every image size: that
code resamples its position embeddings even at the training size (its [CLS]-less token count
never passes the grid check it took from DINO), so the loader detects its layout and does the same."""

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from checkpoint_factory import save_flat_backbone, save_official_checkpoint, save_training_checkpoint, tiny_backbone
from simpool import vision_transformer
from simpool.checkpoints import load_pretrained
from simpool.export import export_backbone


def official_positions(pos_embed, width, height, patch_size):
    """The official SimPool rule, from its description: the patch count it compares is the token
    count minus one ([CLS] that simpool mode does not have), so it never equals the grid and the
    grid is always resized bicubically by (cells + 0.1) / side."""
    n_grid = pos_embed.shape[1]
    n_tokens_minus_cls = (width // patch_size) * (height // patch_size) - 1
    if n_tokens_minus_cls == n_grid and width == height:
        return pos_embed
    side, dim = int(math.sqrt(n_grid)), pos_embed.shape[-1]
    grid = pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid, scale_factor=((width // patch_size + 0.1) / side, (height // patch_size + 0.1) / side), mode="bicubic"
    )
    return grid.permute(0, 2, 3, 1).reshape(1, -1, dim)


@torch.no_grad()
def official_forward(model, x):
    """Patch embedding, the official positions, blocks, SimPool, final norm (no mask token)."""
    tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = tokens + official_positions(model.pos_embed, x.shape[-1], x.shape[-2], model.patch_size)
    for block in model.blocks:
        tokens = block(tokens)
    return model.norm(model.simpool(tokens))


def official_simpool(tmp_path, gamma=None):
    backbone = tiny_backbone("simpool", patch_size=16, img_size=224, gamma=gamma, seed=3)
    path = tmp_path / "official_simpool.pth"
    save_official_checkpoint(path, backbone, gamma=gamma if gamma is not None else "None")
    return backbone, path


@pytest.mark.parametrize("gamma, batch", [(None, 3), (1.25, 1)])
@pytest.mark.parametrize("size", [224, 96])
def test_official_simpool_features_equal_the_official_forward(tmp_path, gamma, batch, size):
    reference, path = official_simpool(tmp_path, gamma)
    model, info = load_pretrained(str(path), image_size=size)
    assert info["resample_native_pos"] is True and model.resample_native_pos
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))
    expected = official_forward(reference, x)
    with torch.no_grad():
        got = model(x)
    assert (got - expected).abs().max() <= 1e-5
    if size == 224:  # at the training size the official rule matters: the stored positions give other features
        with torch.no_grad():
            as_stored = load_pretrained(str(path), resample_native_pos=False)[0](x)
        assert (as_stored - expected).abs().max() > 1e-4


def test_the_choice_is_logged_forced_and_carried_by_the_export(tmp_path, caplog):
    reference, path = official_simpool(tmp_path)
    with caplog.at_level("INFO", logger="simpool"):
        load_pretrained(str(path))
    assert sum("is in the official SimPool layout" in r.getMessage() for r in caplog.records) == 1
    assert load_pretrained(str(path), resample_native_pos=False)[1]["resample_native_pos"] is False
    exported = tmp_path / "backbone.safetensors"
    assert export_backbone(str(path), str(exported))["resample_native_pos"] is True
    model, info = load_pretrained(str(exported))
    assert info["resample_native_pos"] is True
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (model(x) - official_forward(reference, x)).abs().max() <= 1e-5


def test_other_checkpoints_keep_their_positions(tmp_path):
    ours = tiny_backbone("simpool", patch_size=16, img_size=224, seed=3)
    save_training_checkpoint(tmp_path / "ours.pth", ours)
    dino = tiny_backbone("official", patch_size=16, img_size=224, seed=3)
    save_official_checkpoint(tmp_path / "dino.pth", dino)
    save_flat_backbone(tmp_path / "dino_flat.pth", dino)
    for name in ("ours.pth", "dino.pth", "dino_flat.pth"):
        model, info = load_pretrained(str(tmp_path / name))
        assert info["resample_native_pos"] is False and not model.resample_native_pos, name
    # ours at the training size: the stored positions, never resampled
    model = load_pretrained(str(tmp_path / "ours.pth"))[0]
    with mock.patch.object(vision_transformer, "interpolate_pos_embed", side_effect=AssertionError("resampled")):
        with torch.no_grad():
            model(torch.randn(1, 3, 224, 224))
