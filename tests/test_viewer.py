"""The attention viewer (simpool/viewer.py): what its page shows is what the library computes.
The maps and overlays are ``simpool.attention``'s, the kept tokens and Jaccard ``--evaluate``'s,
the masks ``simpool.masking.make_masks``'s on the attention training ranks by, the neighbours
``simpool.knn``'s over ``extract_features``; plus bad uploads, the feature cache, the page's
handlers, serving and the CLI. The real-browser test is tests/test_viewer_browser.py."""

import glob
import os
import random
import socket
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint_factory import one_thread, save_training_checkpoint, tiny_backbone
from simpool import attention as att
from simpool import viewer
from simpool.data import InMemoryImages, build_dataset
from simpool.evaluation import FrozenFeatures
from simpool.knn import extract_features, knn_search
from simpool.masking import PRED_SHAPES, make_masks

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a busy 2-core machine run many times faster on one thread."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("viewer")
    paths = {}
    for mode in ("simpool", "official"):
        paths[mode] = str(folder / f"{mode}.pth")
        save_training_checkpoint(paths[mode], tiny_backbone(mode, patch_size=7, img_size=28))
    return paths


def load(path, **kw):
    return viewer.load_backbone(path, precision="fp32", **kw)


def model_pixels(image, size=28, patch=7):
    """The uint8 model input, as simpool.attention.draw_images makes it."""
    resized = att.resize_for_model(Image.fromarray(image), size, patch)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)[None]


# ---------------------------------------------------------------- maps, kept tokens, Jaccard
@pytest.mark.parametrize("mode", ["simpool", "official"])
def test_maps_and_overlays_are_simpool_attentions(checkpoints, mode):
    bb = load(checkpoints[mode])
    image = skimage_data.chelsea()  # 300 x 451: a non-square photo
    an = viewer.analyse(bb, image)
    pixels = model_pixels(image)
    assert torch.equal(an.pixels, pixels)
    maps = att.attention_maps(bb.model, att._normalize(pixels, *att.norm_stats("auto", bb.info)))[0]
    assert torch.equal(an.maps, maps)
    views = viewer.attention_views(bb, image, an)
    expected = [att.overlay(image, maps.mean(0))] + ([att.overlay(image, m) for m in maps] if len(maps) > 1 else [])
    assert len(views) == (4 if mode == "official" else 1)  # the mean [CLS] map and each of the 3 heads
    for (got, _), want in zip(views, expected):
        assert got.shape == image.shape and np.array_equal(got, want)  # drawn at the image's own size
    assert views[0][1] == ("[CLS] attention, mean of heads" if mode == "official" else "SimPool map")


@pytest.mark.parametrize("mode", ["simpool", "official"])
@pytest.mark.parametrize("threshold", [0.6, 0.3])
def test_kept_tokens_and_jaccard_are_what_evaluate_scores(checkpoints, mode, threshold):
    bb = load(checkpoints[mode])
    images, masks = att.synthetic_set(viewer.COMPOSITES, 28, seed=0)  # --evaluate's set at 28 px
    for i in range(3):
        image, mask, _ = viewer.load_example(f"composite {i} (with mask)", 28)
        assert np.array_equal(image, images[i].permute(1, 2, 0).numpy()) and np.array_equal(mask, masks[i].numpy())
        an = viewer.analyse(bb, image)
        kept, caption, score, keep = viewer.threshold_view(bb, image, mask, an, threshold)
        maps = att.attention_maps(bb.model, att._normalize(images[i : i + 1], bb.mean, bb.std))[0]
        ref = att.score_map(maps.mean(0), masks[i], 7, threshold)
        assert torch.equal(keep, att.mass_mask(maps.mean(0).flatten(), threshold).view(4, 4))
        assert torch.equal(att.token_mask_to_pixels(keep, 7, (28, 28)), ref["kept"])
        assert score == ref["jaccard"]
        evaluated = att.evaluate_maps(bb.model, [("x", images[i], masks[i])], bb.mean, bb.std, 7, threshold)
        assert 100 * score == pytest.approx(evaluated["jaccard"])
        assert f"hold {threshold:.0%} of the attention mass; Jaccard with the object mask {score:.3f}" in caption
        # the kept pixels show the image, the others are dimmed
        shown = ref["kept"].numpy()
        assert (
            np.array_equal(kept[shown], image[shown]) and (kept[~shown].astype(int) <= image[~shown] * 0.25 + 49).all()
        )


def test_the_kept_mask_follows_the_threshold_at_any_image_size(checkpoints):
    bb = load(checkpoints["simpool"])
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    an = viewer.analyse(bb, image)
    assert an.pixels.shape[-2:] == (28, 42)  # short side 28, both sides multiples of the patch
    kept = [viewer.threshold_view(bb, image, None, an, t) for t in (0.2, 0.6, 1.0)]
    assert [k[0].shape for k in kept] == [image.shape] * 3 and all(k[2] is None for k in kept)
    counts = [int(k[3].sum()) for k in kept]
    assert counts[0] < counts[1] < counts[2] == 24
    assert np.array_equal(kept[2][0], image)  # everything kept: the image itself


# ---------------------------------------------------------------- masks
@pytest.mark.parametrize("mode", ["simpool", "official"])
def test_masks_are_what_training_draws(checkpoints, mode):
    bb = load(checkpoints[mode])
    image = skimage_data.coffee()
    an = viewer.analyse(bb, image)
    x = att._normalize(an.pixels, bb.mean, bb.std)
    with torch.no_grad():  # what main_dino's distillation_loss hands make_masks: the teacher's pooling attention
        attention = bb.model.forward_features(x, return_attention=True)["attention"]
    grid = bb.model.grid_size(*x.shape[-2:])
    random.seed(123)
    views = viewer.mask_views(bb, image, an, pred_ratio=0.4, show_max=0.3, seed=3)
    assert random.random() == random.Random(123).random()  # Python's random left as it was
    assert [v[0] for v in views] == list(PRED_SHAPES)
    N = grid[0] * grid[1]
    for shape, mask, drawn, caption in views:
        random.seed(3)
        want = make_masks(attention, grid, shape, 0.4, 0.0, 1.0, 0.3, generator=torch.Generator().manual_seed(3))[0]
        assert torch.equal(mask, want), shape
        assert drawn.shape == image.shape and caption == f"{shape} {int(want.sum())}/{N}"
    counts = {shape: int(mask.sum()) for shape, mask, _, _ in views}
    assert counts["attmask_high"] == counts["attmask_low"] == counts["rand"] == int(N * 0.4)
    assert counts["attmask_hint"] == int(N * 0.4) - int(0.3 * 0.4 * N)  # AttMask reveals show_max * ratio
    top = attention[0].argsort(descending=True)[: int(N * 0.4)]
    assert views[0][1][top].all()  # attmask_high hides the most attended patches
    again = viewer.mask_views(bb, image, an, pred_ratio=0.4, show_max=0.3, seed=3)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(views, again))  # a seed gives the same masks


# ---------------------------------------------------------------- neighbours
def test_neighbours_are_knn_search_over_the_training_features(checkpoints):
    bb = load(checkpoints["simpool"])
    bb.bank = viewer.build_bank(bb, "fashion-mnist", subset=3, cache=False)
    train = build_dataset("fashion-mnist", "train", 3)
    feats, labels = extract_features(FrozenFeatures(bb.model), train, image_size=28)
    assert torch.equal(bb.bank.features, feats) and torch.equal(bb.bank.labels, labels)
    i = 7  # a training image as the query: its own feature, found first
    query, _ = extract_features(
        FrozenFeatures(bb.model),
        InMemoryImages(train.images[i : i + 1], train.labels[i : i + 1], train.classes, train.mean, train.std),
        image_size=28,
    )
    image = np.repeat(train.images[i, 0].numpy()[..., None], 3, axis=2)
    an = viewer.analyse(bb, image)
    torch.testing.assert_close(an.feature, query[0], rtol=0, atol=1e-6)
    near = viewer.neighbour_views(bb, an, k=5)
    sims, idx = knn_search(feats, an.feature[None], 5)
    assert [n[3] for n in near] == idx[0].tolist() and [n[2] for n in near] == sims[0].tolist()
    assert near[0][3] == i and near[0][2] == pytest.approx(1.0, abs=1e-5)
    assert [n[4] for n in near] == labels[idx[0]].tolist()
    assert near[0][1] == f"{train.classes[int(labels[i])]} {near[0][2]:.3f}"
    assert np.array_equal(near[0][0], image)  # the training image itself


def test_features_are_cached_beside_the_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_training_checkpoint(path, tiny_backbone("simpool", patch_size=7, img_size=28))
    bb = load(str(path))
    first = viewer.build_bank(bb, "fashion-mnist", subset=2)
    cached = glob.glob(f"{path}.viewer_features.teacher.*.pt")
    assert len(cached) == 1

    def not_again(*args, **kwargs):
        raise AssertionError("features computed again")

    monkeypatch.setattr(viewer, "extract_features", not_again)
    again = viewer.build_bank(bb, "fashion-mnist", subset=2)  # reused while nothing changed
    assert torch.equal(again.features, first.features) and torch.equal(again.index, first.index)
    with pytest.raises(AssertionError, match="computed again"):
        viewer.build_bank(bb, "fashion-mnist", subset=3)  # other data: another cache entry
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the checkpoint was rewritten
    with pytest.raises(AssertionError, match="computed again"):
        viewer.build_bank(bb, "fashion-mnist", subset=2)
    monkeypatch.undo()
    # an unwritable folder: the features stay in memory, with a warning
    monkeypatch.setattr(
        viewer.utils,
        "save_checkpoint",
        lambda *a, **k: (_ for _ in ()).throw(
            viewer.utils.CheckpointError(f"could not write {a[1]} (Read-only file system)")
        ),
    )
    bank = viewer.build_bank(bb, "fashion-mnist", subset=2)
    assert torch.equal(bank.features, first.features)
    assert len(glob.glob(f"{path}.viewer_features.teacher.*.pt")) == 1


# ---------------------------------------------------------------- other backbones
def test_convnets_show_simpools_map_or_say_they_have_none(tmp_path):
    from simpool.backbones import build_backbone

    image = skimage_data.astronaut()
    for mode in ("simpool", "official"):
        path = tmp_path / f"fcvit_{mode}.pth"
        torch.manual_seed(0)
        torch.save(build_backbone("fcvit_tiny", mode=mode).state_dict(), path)
        bb = load(str(path), arch="fcvit_tiny", image_size=64)
        an = viewer.analyse(bb, image)
        masks = viewer.mask_views(bb, image, an)
        if mode == "simpool":
            x = att._normalize(model_pixels(image, 64, 32), bb.mean, bb.std)
            assert torch.equal(an.maps, att.attention_maps(bb.model, x)[0]) and an.maps.shape == (1, 2, 2)
            assert len(viewer.attention_views(bb, image, an)) == 1 and len(masks) == 5
        else:
            assert an.maps is None and viewer.attention_views(bb, image, an) == []
            assert viewer.threshold_view(bb, image, None, an)[1].startswith("no attention map")
            assert [m[0] for m in masks] == ["rand", "block"]


# ---------------------------------------------------------------- uploads
def _save(tmp_path, name, image, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return str(path)


def test_uploads_that_are_not_images_are_one_line(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("hello\n")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    full = _save(tmp_path, "full.jpg", Image.fromarray(skimage_data.chelsea()), quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(full, "rb").read()[:4000])
    for path in (text, empty, truncated):
        with pytest.raises(viewer.ViewerError) as e:
            viewer.read_image(str(path))
        message = str(e.value)
        assert message.startswith(f"{path.name} is not a readable image (") and "\n" not in message
    assert "truncated" in str(pytest.raises(viewer.ViewerError, viewer.read_image, str(truncated)).value)


def test_huge_images_are_downscaled_or_refused(tmp_path):
    jpeg = _save(tmp_path, "huge.jpg", Image.new("L", (10000, 10000), 90), quality=50)
    image, note = viewer.read_image(jpeg)  # over PIL's bomb limit: decoded at 1/8 scale, then downscaled
    assert image.shape == (1024, 1024, 3) and (image == 90).all()
    assert note.startswith("10000x10000 JPEG decoded at 1250x1250") and "downscaled from 1250x1250 to 1024x1024" in note
    png = _save(tmp_path, "huge.png", Image.new("1", (10000, 10000)))
    with pytest.raises(
        viewer.ViewerError,
        match=r"^huge.png is 10000x10000 pixels \(100 Mpx\), more than the 89 Mpx "
        "the viewer decodes; downscale it first$",
    ):
        viewer.read_image(png)
    bomb = _save(tmp_path, "bomb.png", Image.new("1", (14000, 14000)))
    with pytest.raises(viewer.ViewerError, match="^bomb.png is larger than the 179 Mpx PIL opens at all"):
        viewer.read_image(bomb)
    big, note = viewer.read_image(_save(tmp_path, "big.png", Image.new("RGB", (3000, 1500), (1, 2, 3))))
    assert big.shape == (512, 1024, 3) and note == "downscaled from 3000x1500 to 1024x512"


def test_grayscale_rgba_and_16_bit_uploads_become_rgb(tmp_path):
    gray, note = viewer.read_image(_save(tmp_path, "g.png", Image.new("L", (30, 20), 77)))
    assert gray.shape == (20, 30, 3) and (gray == 77).all() and note == "grayscale (L) image, used as RGB"
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    image, note = viewer.read_image(_save(tmp_path, "a.png", rgba))
    assert tuple(image[0, 0]) == (255, 255, 255) and tuple(image[5, 5]) == (255, 0, 0)
    assert note == "RGBA image with transparency, composited on white"
    deep = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    image, _ = viewer.read_image(_save(tmp_path, "d.png", deep))
    assert (image == 255).all()  # 16-bit white stays white (eight_bit), not clipped
    plain, note = viewer.read_image(_save(tmp_path, "p.jpg", Image.fromarray(skimage_data.chelsea())))
    assert plain.shape == (300, 451, 3) and note == ""


def test_examples(checkpoints):
    names = viewer.example_names("fashion-mnist")
    assert names[:3] == ["photo: astronaut", "photo: chelsea", "photo: coffee"] and len(names) == 3 + 8 + 6
    assert viewer.example_names("/some/folder") == names[:3]  # only the data the viewer was given
    image, mask, what = viewer.load_example("Fashion-MNIST test item 0")
    assert image.shape == (28, 28, 3) and mask.shape == (28, 28) and "Ankle boot" in what
    image, mask, _ = viewer.load_example("photo: astronaut")
    assert image.shape == (512, 512, 3) and mask is None
    with pytest.raises(viewer.ViewerError, match="unknown example"):
        viewer.load_example("nothing")


def test_compute_views_bundles_every_view(checkpoints):
    bb = load(checkpoints["official"])
    bb.bank = viewer.build_bank(bb, "fashion-mnist", subset=2, cache=False)
    image, mask, _ = viewer.load_example("composite 1 (with mask)", 28)
    an, views = viewer.compute_views(bb, image, mask, k=4)
    assert len(views.attention) == 4 and views.kept.shape == image.shape and views.jaccard is not None
    assert len(views.masks) == 5 and len(views.neighbours) == 4


# ---------------------------------------------------------------- the page
@pytest.fixture(scope="module")
def page(checkpoints):
    pytest.importorskip("gradio")
    backbones = [load(checkpoints["simpool"], tag="A"), load(checkpoints["official"], tag="B")]
    for bb in backbones:
        bb.bank = viewer.build_bank(bb, "fashion-mnist", subset=2, cache=False)
    return viewer.Page(backbones, "fashion-mnist")


def test_page_handlers_show_bad_input_in_one_line_and_keep_working(page, tmp_path):
    import gradio as gr

    settings = (0.6, 0.3, 0.1, 0, 8)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really")
    out = page.open("upload", str(bad), *settings)
    assert len(out) == 3 + 5 * 2 and out[1].startswith("⚠ bad.jpg is not a readable image") and "\n" not in out[1]
    assert all(isinstance(o, dict) and o.get("__type__") == "update" for o in out[:1] + out[2:])  # left as they were
    good = _save(tmp_path, "cat.png", Image.fromarray(skimage_data.chelsea()))
    session, status, shown, *views = page.open("upload", good, *settings)
    assert status.startswith("cat.png: 451x300; views in ") and shown.shape == (300, 451, 3)
    a_attention, a_kept, a_text, a_masks, a_near, b_attention, b_kept, b_text, b_masks, b_near = views
    assert len(a_attention) == 1 and len(b_attention) == 4 and len(a_masks) == len(b_masks) == 5
    assert len(a_near) == len(b_near) == 8 and a_kept.shape == (300, 451, 3)
    lower = page.threshold(session, 0.3)
    assert len(lower) == 4 and "hold 30%" in lower[1] and not np.array_equal(lower[0], a_kept)
    assert len(page.masks(session, 0.5, 0.1, 1)) == 2 and [len(n) for n in page.neighbours(session, 3)] == [3, 3]
    _, status, *_ = page.open("example", "composite 0 (with mask)", *settings)
    assert status.startswith("composite 0 of --evaluate's synthetic set")
    assert isinstance(page.threshold(None, 0.5)[0], dict)  # a slider moved before any image: nothing to do
    small = page.open("example", "Fashion-MNIST test item 3", *settings)
    assert small[2].shape == (252, 252, 3)  # 28 px enlarged 9x (nearest) for the page
    assert gr.update()["__type__"] == "update"


def test_the_app_serves_on_loopback_and_reports_a_busy_port(page):
    demo = viewer.build_app(page.backbones)
    url = viewer.serve(demo, "127.0.0.1", 0)
    try:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200 and b"SimPool viewer" in r.read()
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        with pytest.raises(viewer.ViewerError, match=f"^port {port} on 127.0.0.1 is in use"):
            viewer.serve(viewer.build_app(page.backbones), "127.0.0.1", port)
    finally:
        demo.close()


# ---------------------------------------------------------------- CLI
def test_every_flag_has_help():
    for action in viewer.get_args_parser()._actions:
        assert action.help, action.dest


def test_cli_mistakes_are_one_line(checkpoints, tmp_path, capsys):
    pytest.importorskip("gradio")
    for argv, expected in [
        ([], "error: --pretrained_weights is required: the checkpoint whose maps to show"),
        (["--pretrained_weights", str(tmp_path / "no.pth")], f"error: {tmp_path / 'no.pth'}: no such file"),
        (
            ["--pretrained_weights", checkpoints["simpool"], "--data_path", str(tmp_path / "nowhere")],
            "error: --data_path",
        ),
    ]:
        with pytest.raises(SystemExit) as e:
            viewer.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith(expected), err


def test_cli_prints_its_address_and_warns_off_loopback(checkpoints, monkeypatch, capsys):
    pytest.importorskip("gradio")

    class Demo:
        def block_thread(self):
            pass

    served = {}
    monkeypatch.setattr(viewer, "build_app", lambda backbones, data_path: Demo())
    monkeypatch.setattr(
        viewer, "serve", lambda demo, host, port: served.update(host=host, port=port) or f"http://{host}:{port}/"
    )
    viewer.main(["--pretrained_weights", checkpoints["simpool"], "--data_path", "none", "--port", "7999"])
    out, err = capsys.readouterr()
    assert served == {"host": "127.0.0.1", "port": 7999} and "warning" not in err
    assert "SimPool viewer at http://127.0.0.1:7999/ (ready " in out
    viewer.main(["--pretrained_weights", checkpoints["simpool"], "--data_path", "none", "--host", "0.0.0.0"])
    out, err = capsys.readouterr()
    assert "warning: --host 0.0.0.0 serves the viewer to the network: anyone who can reach this machine" in err
    assert "SimPool viewer at http://0.0.0.0:7860/" in out


def test_free_port_is_free():
    port = viewer.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_page_images_are_written_as_files_gradio_copies(tmp_path):
    files = viewer.ImageFiles(keep=3)
    image = skimage_data.chelsea()
    path = files.convert(image)
    assert path.startswith(files.folder) and path.endswith(".jpg") and files.path(image) == path  # one file per image
    back = np.asarray(Image.open(path))
    assert back.shape == image.shape and np.abs(back.astype(int) - image).mean() < 3  # quality 92, full colour
    gallery = files.convert([(image[:10], "a"), (image[:20], "b")])
    assert [c for _, c in gallery] == ["a", "b"] and all(os.path.exists(p) for p, _ in gallery)
    assert files.convert("status line") == "status line" and files.convert([]) == []
    files.convert(image[:30])  # a fourth file: the oldest goes
    assert not os.path.exists(path) and len(os.listdir(files.folder)) == 3


def test_neighbours_from_an_image_folder_leave_unreadable_files_out(checkpoints, tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        os.makedirs(tmp_path / "data" / "train" / cls)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
                tmp_path / f"data/train/{cls}/{i}.png"
            )
    (tmp_path / "data/train/cat/3.png").write_text("not an image")
    bb = load(checkpoints["simpool"])
    bb.bank = viewer.build_bank(bb, str(tmp_path / "data"), num_workers=0, cache=False)
    assert bb.bank.classes == ["cat", "dog"] and bb.bank.index.tolist() == [0, 1, 2, 4, 5, 6]  # 3.png left out
    image = np.asarray(Image.open(tmp_path / "data/train/dog/1.png"))
    near = viewer.neighbour_views(bb, viewer.analyse(bb, image), k=10)
    assert len(near) == 6 and all(n[0].shape == (28, 28, 3) for n in near)  # as the model saw them
    assert {n[1].split()[0] for n in near} <= {"cat", "dog"}
