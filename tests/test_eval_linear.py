"""Linear probe (eval_linear.py): the sweep trains independent heads and picks the right lr,
and the CLI end to end (cached and augmented, resume, --evaluate); the features themselves
are tested in test_evaluation.py."""

import json

import pytest
import torch
import torch.nn.functional as F

import eval_linear
from checkpoint_factory import one_thread, save_training_checkpoint, tiny_backbone
from eval_linear import LinearSweep, crop_flip_batch, train_cached_epoch
from simpool import utils


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a busy 2-core machine run many times faster on one thread."""
    with one_thread():
        yield


def toy_problem(n, seed):
    """10 classes in 32-D, linearly separable (class c lives along dimension c), plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, 32, generator=g) * 0.3
    x[torch.arange(n), y] += 2.0
    return x, y


def fit(sweep, x, y, epochs=5, batch=64):
    niter = -(-len(x) // batch)
    factors = utils.cosine_scheduler(1.0, 0.0, epochs, niter)
    for epoch in range(epochs):
        train_cached_epoch(
            sweep, x, y, batch, factors[epoch * niter : (epoch + 1) * niter], torch.Generator().manual_seed(epoch)
        )


def test_sweep_picks_the_learning_rate_that_learns():
    torch.manual_seed(0)
    x, y = toy_problem(1000, 0)
    vx, vy = toy_problem(500, 1)
    sweep = LinearSweep(32, 10, lrs=[1e-6, 0.5], wds=[0.0])
    fit(sweep, x, y)
    top1, top5 = sweep.accuracy(vx, vy)
    assert top1[1] > 97 and top1[0] < 40, top1  # the tiny lr cannot learn in these steps; the good one can
    assert int(top1.argmax()) == 1 and sweep.pairs[1] == (0.5, 0.0)
    assert (top5 >= top1).all()


def test_heads_are_independent():
    """Head 0 of a 3-head sweep ends exactly where the same head trained alone ends."""
    x, y = toy_problem(300, 2)
    many = LinearSweep(32, 10, lrs=[0.1, 0.01], wds=[0.0, 1e-3])
    alone = LinearSweep(32, 10, lrs=[0.1], wds=[0.0])
    with torch.no_grad():
        alone.weight.copy_(many.weight[:1])
    fit(many, x, y, epochs=2)
    fit(alone, x, y, epochs=2)
    torch.testing.assert_close(many.weight[0], alone.weight[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(many.bias[0], alone.bias[0], rtol=1e-5, atol=1e-6)
    assert many.num_heads == 4 and many.pairs[1] == (0.1, 1e-3)


def test_every_head_takes_the_sgd_momentum_step_with_its_own_weight_decay():
    """Two steps of a 2 lr x 2 wd sweep against SGD with momentum written out in float64:
    v = m v + (g + wd W), W -= lr v; the bias's momentum without decay."""
    x, y = toy_problem(64, 3)
    sweep = LinearSweep(32, 10, lrs=[0.1, 0.02], wds=[0.0, 0.05])
    W, b = sweep.weight.detach().double().clone(), sweep.bias.detach().double().clone()
    vW, vb = torch.zeros_like(W), torch.zeros_like(b)
    lrs = torch.tensor([p[0] for p in sweep.pairs], dtype=torch.float64)
    wds = torch.tensor([p[1] for p in sweep.pairs], dtype=torch.float64)
    for lr_factor in (1.0, 0.5):
        sweep.zero_grad()
        sweep.loss(x, y).backward()
        sweep.step(lr_factor)
        W.requires_grad_(True), b.requires_grad_(True)
        loss = sum(F.cross_entropy(x.double() @ W[h] + b[h], y) for h in range(4))  # W: (heads, dim, classes)
        gW, gb = torch.autograd.grad(loss, (W, b))
        with torch.no_grad():
            vW = 0.9 * vW + gW + wds[:, None, None] * W
            vb = 0.9 * vb + gb
            W = W - (lr_factor * lrs)[:, None, None] * vW
            b = b - (lr_factor * lrs)[:, None] * vb
    torch.testing.assert_close(sweep.weight.double(), W, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sweep.bias.double(), b, rtol=1e-5, atol=1e-6)


def test_crop_flip_batch_shapes():
    out = crop_flip_batch(torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8), 28, (0.08, 1.0))
    assert out.shape == (5, 3, 28, 28) and 0 <= out.min() and out.max() <= 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("linear") / "checkpoint.pth"
    save_training_checkpoint(path, tiny_backbone("simpool", patch_size=7, img_size=28))
    return path


COMMON = [
    "--data_path",
    "fashion-mnist",
    "--subset",
    "8",
    "--val_subset",
    "4",
    "--batch_size_per_gpu",
    "32",
    "--lrs",
    "0.001",
    "0.1",
    "--wds",
    "0",
    "0.0001",
]


def test_cli_cached_resume_and_evaluate(checkpoint, tmp_path, capsys):
    out = str(tmp_path)
    argv = ["--pretrained_weights", str(checkpoint), "--train_augment", "False", "--output_dir", out] + COMMON
    eval_linear.main(argv + ["--epochs", "1"])
    eval_linear.main(argv + ["--epochs", "2"])  # resumes at epoch 1
    printed = capsys.readouterr().out
    assert "Resumed from" in printed and "<- best" in printed
    record = json.loads((tmp_path / "linear.json").read_text())
    assert len(record["per_head"]) == 4 and record["n_train"] == 80 and record["n_val"] == 40
    best = record["best"]
    assert best["top1"] == max(r["top1"] for r in record["per_head"]) and best["lr"] in (0.001, 0.1)
    head = torch.load(tmp_path / "linear_head.pth", weights_only=True)
    assert head["weight"].shape == (10, 192) and head["result"]["top1"] == best["top1"]
    scored = eval_linear.main(
        ["--pretrained_weights", str(checkpoint), "--evaluate", "--output_dir", out, "--val_subset", "4"]
    )
    assert scored["top1"] == pytest.approx(best["top1"])
    # a probe's files given as backbone weights (before: "['model'] is not a state dict of tensors")
    from simpool.checkpoints import CheckpointError, load_pretrained

    for name in ("linear_head.pth", "linear_checkpoint.pth"):
        with pytest.raises(
            CheckpointError,
            match=f"linear-probe heads saved by eval_linear.py, not a backbone; "
            f"they were trained on the features of {checkpoint}",
        ):
            load_pretrained(str(tmp_path / name))
    with pytest.raises(SystemExit) as e:  # another sweep in the same folder
        eval_linear.main(argv[: -len(COMMON)] + COMMON[:-4] + ["--lrs", "0.5", "--epochs", "2"])
    assert e.value.code == utils.USER_ERROR_EXIT
    assert "belongs to another sweep" in capsys.readouterr().err


def test_official_flag_spellings_and_load_from(checkpoint, tmp_path, capsys):
    """DINO's --lr (one head), AttMask's --window_size (unused, as AttMask leaves it for ViTs) and
    --load_from: a sweep starts from another folder's linear_checkpoint.pth, which stays as it was."""
    args = eval_linear.get_args_parser().parse_args(["--lr", "0.005", "--window_size", "7"])
    assert args.lrs == [0.005]
    first, second = tmp_path / "first", tmp_path / "second"
    argv = ["--pretrained_weights", str(checkpoint), "--train_augment", "False"] + COMMON
    eval_linear.main(argv + ["--epochs", "1", "--output_dir", str(first)])
    before = (first / "linear_checkpoint.pth").read_bytes()
    start = ["--load_from", "../first/linear_checkpoint.pth"]
    eval_linear.main(argv + ["--epochs", "2", "--output_dir", str(second)] + start)
    assert f"Resumed from {second}/../first/linear_checkpoint.pth at epoch 1." in capsys.readouterr().out
    assert torch.load(second / "linear_checkpoint.pth", weights_only=True)["epoch"] == 2
    assert (first / "linear_checkpoint.pth").read_bytes() == before
    eval_linear.main(argv + ["--epochs", "3", "--output_dir", str(second)] + start)
    printed = capsys.readouterr().out
    assert f"--load_from ../first/linear_checkpoint.pth not used: {second} has a checkpoint of its own." in printed
    assert f"Resumed from {second}/linear_checkpoint.pth at epoch 2." in printed
    with pytest.raises(SystemExit):  # a training checkpoint is no linear one
        eval_linear.main(argv + ["--output_dir", str(tmp_path / "third"), "--load_from", str(checkpoint)])
    assert capsys.readouterr().err.strip() == (
        f"error: {checkpoint} is not a linear_checkpoint.pth of eval_linear.py, so there is nothing to resume"
    )


def test_resume_with_other_weights_or_evaluate_with_other_features_is_refused(checkpoint, tmp_path, capsys):
    # The sweep's folder knows which backbone and features its heads were trained on: another
    # --pretrained_weights must not be reported (or trained on) as if it were the same sweep, and
    # a saved head must not be scored on other features of the same width.
    out = str(tmp_path / "sweep")
    other = tmp_path / "other.pth"
    save_training_checkpoint(other, tiny_backbone("simpool", patch_size=7, img_size=28, seed=5))
    eval_linear.main(
        ["--pretrained_weights", str(checkpoint), "--train_augment", "False", "--output_dir", out, "--epochs", "1"]
        + COMMON
    )
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        eval_linear.main(
            ["--pretrained_weights", str(other), "--train_augment", "False", "--output_dir", out, "--epochs", "1"]
            + COMMON
        )
    assert e.value.code == utils.USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert "belongs to another sweep: pretrained_weights" in err and str(other) in err
    # --evaluate of that sweep's head on other weights, another key, random init or another size
    # (before: a top-1 printed as a result), each refused before any feature is computed
    two_keys = tmp_path / "two_keys.pth"  # the sweep's teacher, another student
    state = torch.load(checkpoint, weights_only=True)
    torch.save(dict(state, student=torch.load(other, weights_only=True)["teacher"]), two_keys)
    eval_linear.main(["--evaluate", "--output_dir", out, "--val_subset", "4", "--pretrained_weights", str(two_keys)])
    capsys.readouterr()  # the same teacher weights in another file: scored
    for extra, message in (
        (["--pretrained_weights", str(other)], f"not those of {other} [teacher]"),
        (["--pretrained_weights", str(two_keys), "--checkpoint_key", "student"], f"not those of {two_keys} [student]"),
        (["--arch", "vit_nano", "--patch_size", "7", "--image_size", "28"], "not those of a random initialisation"),
        (
            ["--pretrained_weights", str(checkpoint), "--image_size", "56"],
            "was trained on 28px features but this run computes them at 56px",
        ),
    ):
        with pytest.raises(SystemExit) as e:
            eval_linear.main(["--evaluate", "--output_dir", out, "--val_subset", "4"] + extra)
        captured = capsys.readouterr()
        assert e.value.code == utils.USER_ERROR_EXIT and message in captured.err, captured.err
        assert f"was trained on the weights of {checkpoint} [teacher]" in captured.err or "28px" in captured.err
        assert "Evaluation features" not in captured.out + captured.err
    cls_model = tmp_path / "cls.pth"
    save_training_checkpoint(cls_model, tiny_backbone("official", patch_size=7, img_size=28))
    cls_out = str(tmp_path / "cls_sweep")
    eval_linear.main(
        [
            "--pretrained_weights",
            str(cls_model),
            "--train_augment",
            "False",
            "--output_dir",
            cls_out,
            "--epochs",
            "1",
            "--n_last_blocks",
            "2",
        ]
        + COMMON
    )
    capsys.readouterr()
    eval_linear.main(
        [
            "--pretrained_weights",
            str(cls_model),
            "--train_augment",
            "False",
            "--epochs",
            "1",
            "--output_dir",
            str(tmp_path / "all_blocks"),
            "--n_last_blocks",
            "100",
        ]
        + COMMON
    )
    assert "--n_last_blocks 100: the backbone has 6 blocks; using all of them." in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # 1 block + patch average: the same 2 x 192 width
        eval_linear.main(
            [
                "--pretrained_weights",
                str(cls_model),
                "--evaluate",
                "--output_dir",
                cls_out,
                "--val_subset",
                "4",
                "--n_last_blocks",
                "1",
                "--avgpool_patchtokens",
                "True",
            ]
        )
    assert e.value.code == utils.USER_ERROR_EXIT
    assert "was trained on the features of --n_last_blocks 2 --avgpool_patchtokens 0" in capsys.readouterr().err
    # a head saved before --avgpool_patchtokens took 0/1/2 records DINO's boolean: True is 2
    eval_linear.main(
        [
            "--pretrained_weights",
            str(cls_model),
            "--train_augment",
            "False",
            "--epochs",
            "1",
            "--output_dir",
            str(tmp_path / "mean"),
            "--n_last_blocks",
            "1",
            "--avgpool_patchtokens",
            "True",
        ]
        + COMMON
    )
    head = utils.load_checkpoint(str(tmp_path / "mean" / "linear_head.pth"))
    assert head["features"]["avgpool_patchtokens"] == 2
    head["features"]["avgpool_patchtokens"] = True
    utils.save_checkpoint(head, str(tmp_path / "mean" / "linear_head.pth"))
    scored = eval_linear.main(
        [
            "--pretrained_weights",
            str(cls_model),
            "--evaluate",
            "--output_dir",
            str(tmp_path / "mean"),
            "--val_subset",
            "4",
            "--n_last_blocks",
            "1",
            "--avgpool_patchtokens",
            "2",
        ]
    )
    assert scored is not None


def test_cli_with_augmentation(checkpoint, tmp_path):
    eval_linear.main(["--pretrained_weights", str(checkpoint), "--epochs", "1", "--output_dir", str(tmp_path)] + COMMON)
    record = json.loads((tmp_path / "linear.json").read_text())
    assert record["train_augment"] is True and len(record["per_head"]) == 4


def _torchrun(script, args, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        os.path.join(root, script),
    ] + args  # --standalone: a free local port for the rendezvous
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )  # its own process group: a hang is cleaned up whole
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    return out


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(checkpoint, tmp_path):
    """torchrun with 2 CPU ranks: k-NN features are sharded and gathered, linear heads
    all-reduce their gradients; both give the single-process numbers."""
    import eval_knn

    data = [
        "--pretrained_weights",
        str(checkpoint),
        "--data_path",
        "fashion-mnist",
        "--subset",
        "8",
        "--val_subset",
        "4",
    ]
    knn = ["--nb_knn", "5", "20"]
    _torchrun("eval_knn.py", data + knn + ["--output_dir", str(tmp_path / "knn2")], tmp_path)
    eval_knn.main(data + knn + ["--output_dir", str(tmp_path / "knn1")])
    read = lambda p: json.loads(p.read_text())  # noqa: E731
    assert read(tmp_path / "knn2" / "knn.json")["results"] == read(tmp_path / "knn1" / "knn.json")["results"]
    lin = ["--train_augment", "False", "--epochs", "2", "--lrs", "0.01", "0.5"]
    # two keys: the second sweep runs in the process group the first one joined
    _torchrun(
        "eval_linear.py",
        data
        + lin
        + ["--batch_size_per_gpu", "16", "--output_dir", str(tmp_path / "lin2"), "--checkpoint_key", "student,teacher"],
        tmp_path,
    )
    eval_linear.main(data + lin + ["--batch_size_per_gpu", "32", "--output_dir", str(tmp_path / "lin1")])
    one = read(tmp_path / "lin1" / "linear.json")
    for key in ("student", "teacher"):  # the same weights under both keys in this checkpoint
        two = read(tmp_path / "lin2" / key / "linear.json")
        assert two["global_batch"] == one["global_batch"] == 32
        for a, b in zip(two["per_head"], one["per_head"]):
            assert a["top1"] == pytest.approx(b["top1"], abs=2.6)  # same steps; float sums may flip one image


def test_a_step_without_samples_still_steps_every_parameter():
    # A rank whose share of the last global batch is empty (or whose batch had no labelled
    # image) runs a zero loss: the step must still work and move the heads by momentum alone.
    x, y = toy_problem(64, 3)
    sweep = LinearSweep(32, 10, lrs=[0.1], wds=[0.0])
    train_cached_epoch(sweep, x, y, 64, [1.0], torch.Generator().manual_seed(0))
    before = sweep.weight.detach().clone(), sweep.bias.detach().clone()
    moment = sweep.momentum_weight.clone(), sweep.momentum_bias.clone()
    train_cached_epoch(sweep, x[:0], y[:0], 64, [1.0], torch.Generator().manual_seed(1))  # no sample at all
    assert sweep.weight.grad is not None and not sweep.weight.grad.any() and not sweep.bias.grad.any()
    torch.testing.assert_close(sweep.weight, before[0] - 0.1 * 0.9 * moment[0])
    torch.testing.assert_close(sweep.bias, before[1] - 0.1 * 0.9 * moment[1])


def test_heads_are_scored_on_dinos_epochs(checkpoint, tmp_path, capsys):
    # DINO: `epoch % val_freq == 0 or epoch == epochs - 1` (0-based): epochs 1, 4, 5 of 5 with
    # --val_freq 3 (before: 3 and 5)
    eval_linear.main(
        [
            "--pretrained_weights",
            str(checkpoint),
            "--train_augment",
            "False",
            "--output_dir",
            str(tmp_path),
            "--epochs",
            "5",
            "--val_freq",
            "3",
        ]
        + COMMON
    )
    scored = [
        int(line.split()[1].rstrip(":"))
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("Epoch ") and "best head so far" in line
    ]
    assert scored == [1, 4, 5]
