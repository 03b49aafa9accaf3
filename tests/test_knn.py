"""Weighted k-NN (simpool/knn.py) against a brute-force torch vote, and eval_knn.py end to end."""

import json

import pytest
import torch
import torch.nn.functional as F

import eval_knn
from checkpoint_factory import one_thread, save_training_checkpoint, tiny_backbone
from simpool import utils
from simpool.data import InMemoryImages
from simpool.knn import extract_features, knn_classify, knn_search


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a busy 2-core machine run many times faster on one thread."""
    with one_thread():
        yield


def brute_force_knn(train, train_y, test, test_y, k, T, num_classes):
    """DINO's knn_classifier: votes exp(sim / T) per class; top-5 over the first min(5, k) classes
    by votes (DINO sorts; topk here, which orders ties among zero-vote classes the same way as ours)."""
    sims = test @ train.T
    top, idx = sims.topk(k, dim=1)
    votes = torch.zeros(len(test), num_classes)
    votes.scatter_add_(1, train_y[idx], (top / T).exp())
    hit = votes.topk(min(5, k), dim=1).indices == test_y[:, None]
    return 100.0 * int(hit[:, 0].sum()) / len(test), 100.0 * int(hit.narrow(1, 0, min(5, k)).any(1).sum()) / len(test)


@pytest.mark.parametrize("T", [0.07, 0.5])
def test_vote_matches_brute_force(T):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 32, generator=g)
    train_y = torch.randint(0, 10, (600,), generator=g)
    test_y = torch.randint(0, 10, (150,), generator=g)
    train = F.normalize(centers[train_y] + 1.5 * torch.randn(600, 32, generator=g), dim=1)
    test = F.normalize(centers[test_y] + 1.5 * torch.randn(150, 32, generator=g), dim=1)
    ks = (1, 3, 5, 20, 100)  # k < 5: top-5 over the k classes that can have votes (before: 5 classes)
    got = knn_classify(train, train_y, test, test_y, ks=ks, temperature=T, num_classes=10, chunk_size=64)
    for k in ks:
        top1, top5 = brute_force_knn(train, train_y, test, test_y, k, T, 10)
        assert got[k]["top1"] == top1 and got[k]["top5"] == top5, k
    assert got[1]["top5"] == got[1]["top1"]  # one neighbour, one class voted for (before: 4 more, unvoted)
    assert 20 < got[20]["top1"] < 100  # a non-trivial problem


def test_k_above_train_size_is_clipped():
    train = F.normalize(torch.randn(8, 4), dim=1)
    labels = torch.arange(8) % 2
    out = knn_classify(train, labels, train, labels, ks=(3, 50), temperature=0.07, num_classes=2)
    assert sorted(out) == [3, 8]


def test_extract_features_normalises_on_request():
    model = tiny_backbone("simpool", patch_size=7, img_size=28)
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    ds = InMemoryImages(images, torch.arange(6), ["a"] * 6, (0.5,) * 3, (0.25,) * 3)
    unit, labels = extract_features(model, ds, batch_size=4)
    raw, _ = extract_features(model, ds, batch_size=4, normalize=False)
    assert torch.equal(labels, torch.arange(6))
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(6))
    x = (images.expand(-1, 3, -1, -1).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        torch.testing.assert_close(raw, model(x))
    torch.testing.assert_close(unit, F.normalize(raw, dim=1))


def _features_on_rank(rank, store, world, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
        images = torch.arange(2 * 16, dtype=torch.uint8).view(2, 1, 4, 4)
        ds = InMemoryImages(images, torch.tensor([7, 8]), ["a"] * 9, (0.5,) * 3, (0.25,) * 3)
        torch.save(extract_features(model, ds, batch_size=4), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_more_ranks_than_images_gather_every_feature_once(tmp_path):
    # 3 ranks, 2 images: rank 2 has no sample but must still join the gather with the right width.
    torch.multiprocessing.spawn(_features_on_rank, args=(str(tmp_path / "store"), 3, str(tmp_path / "f")), nprocs=3)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    images = torch.arange(2 * 16, dtype=torch.uint8).view(2, 1, 4, 4)
    alone = extract_features(
        model, InMemoryImages(images, torch.tensor([7, 8]), ["a"] * 9, (0.5,) * 3, (0.25,) * 3), batch_size=4
    )
    for rank in range(3):
        feats, labels = torch.load(tmp_path / f"f.{rank}", weights_only=True)
        assert torch.equal(labels, torch.tensor([7, 8]))
        torch.testing.assert_close(feats, alone[0])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("knn") / "checkpoint.pth"
    save_training_checkpoint(path, tiny_backbone("simpool", patch_size=7, img_size=28))
    return path


def test_eval_knn_cli_end_to_end_and_feature_reuse(checkpoint, tmp_path, capsys):
    common = [
        "--data_path",
        "fashion-mnist",
        "--subset",
        "6",
        "--val_subset",
        "3",
        "--nb_knn",
        "5",
        "10",
        "20",
        "--batch_size_per_gpu",
        "64",
    ]
    first = eval_knn.main(
        [
            "--pretrained_weights",
            str(checkpoint),
            "--output_dir",
            str(tmp_path / "a"),
            "--dump_features",
            str(tmp_path / "feats"),
        ]
        + common
    )
    out = capsys.readouterr().out
    assert "    k   top-1   top-5" in out and "   20  " in out
    record = json.loads((tmp_path / "a" / "knn.json").read_text())
    assert record["n_train"] == 60 and record["n_test"] == 30 and set(record["results"]) == {"5", "10", "20"}
    assert record["model"]["arch"] == "vit_nano" and record["model"]["image_size"] == 28
    again = eval_knn.main(["--load_features", str(tmp_path / "feats"), "--output_dir", str(tmp_path / "b")] + common)
    assert again == first
    torch_search = eval_knn.main(
        ["--load_features", str(tmp_path / "feats"), "--knn_backend", "torch", "--output_dir", str(tmp_path / "c")]
        + common
    )
    assert torch_search == first  # both searches are exact: same neighbours, same votes


def test_use_cuda_false_keeps_the_search_off_the_gpu(checkpoint, tmp_path, monkeypatch):
    # DINO's --use_cuda: on a CUDA run (faked here: features are loaded, so no model runs) the
    # search goes to the GPU unless --use_cuda False keeps it in host memory
    eval_knn.main(
        [
            "--pretrained_weights",
            str(checkpoint),
            "--data_path",
            "fashion-mnist",
            "--subset",
            "2",
            "--val_subset",
            "1",
            "--output_dir",
            str(tmp_path / "a"),
            "--dump_features",
            str(tmp_path / "f"),
        ]
    )
    seen = []
    monkeypatch.setattr(
        eval_knn, "knn_classify", lambda *a, use_gpu, **kw: seen.append(use_gpu) or {20: {"top1": 0.0, "top5": 0.0}}
    )
    monkeypatch.setattr(
        eval_knn.utils, "init_distributed_mode", lambda args: setattr(args, "device", torch.device("cuda"))
    )
    for flag in ("True", "False"):
        eval_knn.main(["--load_features", str(tmp_path / "f"), "--use_cuda", flag, "--output_dir", str(tmp_path / "b")])
    assert seen == [True, False]


def test_eval_knn_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00garbage" * 50)
    for argv in (
        ["--pretrained_weights", str(bad)],
        ["--load_features", str(tmp_path)],
        ["--pretrained_weights", "", "--arch", "vit_nano", "--data_path", str(tmp_path / "nowhere")],
    ):
        with pytest.raises(SystemExit) as e:
            eval_knn.main(argv + ["--output_dir", str(tmp_path)])
        assert e.value.code == utils.USER_ERROR_EXIT
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err


def test_random_init_is_announced(tmp_path, capsys):
    eval_knn.main(
        [
            "--arch",
            "vit_nano",
            "--patch_size",
            "7",
            "--image_size",
            "28",
            "--subset",
            "3",
            "--val_subset",
            "2",
            "--nb_knn",
            "3",
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert "WARNING: no --pretrained_weights given: evaluating a RANDOMLY INITIALISED" in capsys.readouterr().out
    assert json.loads((tmp_path / "knn.json").read_text())["pretrained_weights"] is None


def test_imagefolder_with_an_unreadable_file(checkpoint, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c in ("cat", "dog"):
            folder = tmp_path / "data" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "data" / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    results = eval_knn.main(
        [
            "--pretrained_weights",
            str(checkpoint),
            "--data_path",
            str(tmp_path / "data"),
            "--nb_knn",
            "3",
            "--num_workers",
            "0",
            "--output_dir",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert "skipped unreadable image" in out and "broken.jpg" in out and "1 unreadable images left out" in out
    assert json.loads((tmp_path / "knn.json").read_text())["n_train"] == 8 and 3 in results


@pytest.mark.parametrize("margin", [16, 1])
def test_search_is_exact_with_near_ties_and_fallbacks(margin):
    # a bank of near-duplicates: bf16 cannot order them, so every query goes past the first
    # candidate round (and, with 100 copies > k + 16 * margin, to the fp32 scan); the result
    # must still be the exact top-k
    g = torch.Generator().manual_seed(3)
    base = F.normalize(torch.randn(20, 24, generator=g), dim=1)  # 100 near-copies of each
    bank = F.normalize(base.repeat(100, 1) + 1e-4 * torch.randn(2000, 24, generator=g), dim=1)
    queries = F.normalize(base.repeat(2, 1)[:30] + 0.05 * torch.randn(30, 24, generator=g), dim=1)
    # bf16 candidates asked for explicitly: the default picks fp32 on a CPU without AVX512-BF16/AMX
    sims, idx = knn_search(bank, queries, 25, chunk_size=7, margin=margin, prefilter_dtype=torch.bfloat16)
    exact_sims, exact_idx = (queries @ bank.T).topk(25, dim=1)
    torch.testing.assert_close(sims, exact_sims, rtol=0, atol=1e-6)
    torch.testing.assert_close(bank[idx] @ queries[:, :, None], exact_sims[:, :, None], rtol=0, atol=1e-6)
    assert all(len(set(r)) == 25 for r in idx.tolist())  # no neighbour twice
    # the same neighbours up to float-rounding ties at the k-th place
    assert (idx.sort(1).values == exact_idx.sort(1).values).float().mean() > 0.9


@pytest.mark.parametrize("n,tile_rows,k", [(1007, 64, 20), (1000, 100, 20), (17, 16, 3), (333, 48, 30), (1, 16, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_search_over_bank_tiles_is_exact(n, tile_rows, k, dtype):
    # the bank scored in tiles (group maxima per tile), the last one short and padded: every
    # row reachable, none found twice, the padding never returned
    g = torch.Generator().manual_seed(n)
    bank = F.normalize(torch.randn(n, 24, generator=g), dim=1)
    queries = F.normalize(torch.randn(50, 24, generator=g), dim=1)
    sims, idx = knn_search(bank, queries, k, chunk_size=13, tile_rows=tile_rows, prefilter_dtype=dtype)
    exact_sims, exact_idx = (queries @ bank.T).topk(min(k, n), dim=1)
    torch.testing.assert_close(sims, exact_sims, rtol=0, atol=1e-6)
    assert torch.equal(idx.sort(1).values, exact_idx.sort(1).values)
    one_tile = knn_search(bank, queries, k, chunk_size=13, prefilter_dtype=dtype)
    assert torch.equal(one_tile[1], idx)


def test_search_unnormalised_features_and_backends_agree():
    g = torch.Generator().manual_seed(4)
    bank, queries = 3 * torch.randn(500, 40, generator=g), 0.5 * torch.randn(60, 40, generator=g)
    sims, idx = knn_search(bank, queries, 10)
    exact_sims, exact_idx = (queries @ bank.T).topk(10, dim=1)
    torch.testing.assert_close(sims, exact_sims, rtol=1e-6, atol=1e-5)
    assert torch.equal(idx, exact_idx)
    labels = torch.arange(500) % 7
    test_y = torch.arange(60) % 7
    a = knn_classify(F.normalize(bank, dim=1), labels, F.normalize(queries, dim=1), test_y, ks=(5, 20), num_classes=7)
    b = knn_classify(
        F.normalize(bank, dim=1),
        labels,
        F.normalize(queries, dim=1),
        test_y,
        ks=(5, 20),
        num_classes=7,
        backend="faiss",
    )
    assert a == b


def test_cuda_search_forces_fp32_accumulation_and_restores_the_callers_settings():
    # The candidate bound assumes fp32 accumulation of the bf16 products; cuBLAS may reduce in
    # bf16 and the fp32 rescoring may run in TF32 unless told otherwise. (The settings are
    # process-wide flags, settable without a GPU.)
    from simpool.knn import _exact_cuda_matmuls

    settings = torch.backends.cuda.matmul
    saved = settings.allow_bf16_reduced_precision_reduction, settings.fp32_precision
    try:
        settings.allow_bf16_reduced_precision_reduction, settings.fp32_precision = True, "tf32"
        with _exact_cuda_matmuls(torch.device("cpu")):
            assert settings.allow_bf16_reduced_precision_reduction and settings.fp32_precision == "tf32"
        with _exact_cuda_matmuls(torch.device("cuda", 0)):
            assert not settings.allow_bf16_reduced_precision_reduction and settings.fp32_precision == "ieee"
        assert settings.allow_bf16_reduced_precision_reduction and settings.fp32_precision == "tf32"
    finally:
        settings.allow_bf16_reduced_precision_reduction, settings.fp32_precision = saved
