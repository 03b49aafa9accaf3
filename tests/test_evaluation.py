"""The frozen feature vector of the evaluations (simpool/evaluation.py): DINO's multi-block
[CLS] features, the patch-token mean as DINO (True) and iBOT/AttMask (0/1/2) spell it,
checked against each block's output caught by hooks; the k-NN CLI with those flags, and both
evaluation CLIs with AttMask's and iBOT's comma-separated --checkpoint_key."""

import argparse
import json

import pytest
import torch

import eval_knn
import eval_linear
from checkpoint_factory import one_thread, save_training_checkpoint, tiny_backbone
from simpool import utils
from simpool.evaluation import FrozenFeatures, avgpool_mode


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a busy 2-core machine run many times faster on one thread."""
    with one_thread():
        yield


def test_avgpool_flag_takes_dinos_booleans_and_ibots_numbers():
    assert [avgpool_mode(v) for v in ("False", "0", "true", "2", "1", "off", "on")] == [0, 0, 2, 2, 1, 0, 2]
    with pytest.raises(argparse.ArgumentTypeError, match="expected False \\(0\\), 1 or True \\(2\\), got '3'"):
        avgpool_mode("3")


def block_outputs(model, x):
    """A second code path: the pooled output and each block's output, caught by hooks."""
    outputs = []
    hooks = [blk.register_forward_hook(lambda m, i, o: outputs.append(o)) for blk in model.blocks]
    with torch.no_grad():
        out = model.forward_features(x)
    for h in hooks:
        h.remove()
    return out, outputs


def test_cls_features_concatenate_last_blocks_and_the_patch_mean():
    model = tiny_backbone("official", patch_size=4, img_size=28)
    x = torch.randn(2, 3, 28, 28)
    out, outputs = block_outputs(model, x)
    last4 = [model.norm(o)[:, 0] for o in outputs[len(model.blocks) - 4 :]]
    mean = out["patch_tokens"].mean(1)
    with torch.no_grad():
        both, alone, cls = (FrozenFeatures(model, n_last_blocks=4, avgpool=a) for a in (2, 1, 0))
        f_both, f_alone, f_cls = both(x), alone(x), cls(x)
    assert f_both.shape == (2, 5 * 192) and both.dim == 5 * 192
    for i, token in enumerate(last4):  # the normed [CLS] of each of the last 4 blocks, in order
        torch.testing.assert_close(f_both[:, i * 192 : (i + 1) * 192], token)
    torch.testing.assert_close(f_both[:, 3 * 192 : 4 * 192], out["pooled"])  # the last one is the pooled vector
    torch.testing.assert_close(f_both[:, 4 * 192 :], mean)
    assert alone.dim == 192 and alone.settings() == {"n_last_blocks": 4, "avgpool_patchtokens": 1}
    # iBOT's (AttMask's) 1: the mean alone, of the last block's tokens before the final norm (before: after it)
    torch.testing.assert_close(f_alone, outputs[-1][:, 1:].mean(1))
    assert not torch.allclose(f_alone, mean)
    torch.testing.assert_close(f_cls, torch.cat(last4, 1))
    assert FrozenFeatures(model, n_last_blocks=4, avgpool=True).avgpool == 2  # DINO's True


def test_simpool_features_are_the_pooled_vector_and_the_patch_mean():
    model = tiny_backbone("simpool", patch_size=7, img_size=28)
    x = torch.randn(2, 3, 28, 28)
    out, outputs = block_outputs(model, x)
    with torch.no_grad():
        for avgpool, expected in (
            (0, out["pooled"]),
            (1, outputs[-1].mean(1)),
            (2, torch.cat([out["pooled"], out["patch_tokens"].mean(1)], 1)),
        ):
            features = FrozenFeatures(model, n_last_blocks=4, avgpool=avgpool)  # n_last_blocks: [CLS] models only
            assert features.n_last_blocks == 1 and features.dim == expected.shape[1]
            torch.testing.assert_close(features(x), expected)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("features") / "checkpoint.pth"
    save_training_checkpoint(path, tiny_backbone("official", patch_size=7, img_size=28))
    return path


def test_eval_knn_takes_attmasks_feature_flags(checkpoint, tmp_path):
    # AttMask's k-NN command passes --avgpool_patchtokens 0 (before: "unrecognized arguments")
    common = [
        "--pretrained_weights",
        str(checkpoint),
        "--data_path",
        "fashion-mnist",
        "--subset",
        "4",
        "--val_subset",
        "2",
        "--nb_knn",
        "5",
    ]
    default = eval_knn.main(common + ["--output_dir", str(tmp_path / "a")])
    assert eval_knn.main(common + ["--avgpool_patchtokens", "0", "--output_dir", str(tmp_path / "b")]) == default
    eval_knn.main(common + ["--avgpool_patchtokens", "2", "--n_last_blocks", "2", "--output_dir", str(tmp_path / "c")])
    record = json.loads((tmp_path / "c" / "knn.json").read_text())
    assert record["features"] == {"dim": 3 * 192, "n_last_blocks": 2, "avgpool_patchtokens": 2}
    assert json.loads((tmp_path / "a" / "knn.json").read_text())["features"]["dim"] == 192


@pytest.fixture(scope="module")
def teacher_and_student(tmp_path_factory):
    """A training checkpoint whose student has other weights than its teacher."""
    path = tmp_path_factory.mktemp("two_networks") / "checkpoint.pth"
    save_training_checkpoint(path, tiny_backbone("simpool", patch_size=7, img_size=28))
    other = path.with_name("other.pth")
    save_training_checkpoint(other, tiny_backbone("simpool", patch_size=7, img_size=28, seed=1))
    state = torch.load(path, weights_only=True)
    torch.save(dict(state, student=torch.load(other, weights_only=True)["student"]), path)
    return path


def test_a_list_of_checkpoint_keys_evaluates_each_network_as_its_own_run(teacher_and_student, tmp_path, capsys):
    # AttMask's and iBOT's `--checkpoint_key teacher,student` (before: "has no 'teacher,student' entry")
    common = [
        "--pretrained_weights",
        str(teacher_and_student),
        "--data_path",
        "fashion-mnist",
        "--subset",
        "4",
        "--val_subset",
        "3",
        "--nb_knn",
        "1",
        "5",
    ]
    both = eval_knn.main(
        common
        + [
            "--checkpoint_key",
            "teacher,student",
            "--output_dir",
            str(tmp_path / "both"),
            "--dump_features",
            str(tmp_path / "features"),
        ]
    )
    out = capsys.readouterr().out
    assert list(both) == ["teacher", "student"]
    for key in both:  # each equals a run of that key alone, and writes into its own subfolder
        alone = eval_knn.main(common + ["--checkpoint_key", key, "--output_dir", str(tmp_path / key)])
        assert both[key] == alone
        assert json.loads((tmp_path / "both" / key / "knn.json").read_text())["checkpoint_key"] == key
        best_k, best = max(alone.items(), key=lambda item: item[1]["top1"])
        assert f"{key}: top-1 {best['top1']:.2f}% (k={best_k})" in out
    teacher_f, student_f = (
        torch.load(tmp_path / "features" / key / "trainfeat.pth", weights_only=True) for key in both
    )
    assert teacher_f.shape == student_f.shape and not torch.allclose(teacher_f, student_f)
    assert not (tmp_path / "both" / "knn.json").exists()

    linear = [
        "--pretrained_weights",
        str(teacher_and_student),
        "--data_path",
        "fashion-mnist",
        "--subset",
        "4",
        "--val_subset",
        "3",
        "--epochs",
        "1",
        "--train_augment",
        "False",
        "--lrs",
        "0.01",
        "0.1",
        "--output_dir",
        str(tmp_path / "linear"),
    ]
    swept = eval_linear.main(linear + ["--checkpoint_key", "teacher,student"])
    scored = eval_linear.main(linear + ["--checkpoint_key", "teacher,student", "--evaluate"])
    for key in ("teacher", "student"):  # --evaluate finds each key's own head (its weights fingerprint matches)
        assert swept[key]["best"]["top1"] == pytest.approx(scored[key]["top1"])
        assert (tmp_path / "linear" / key / "linear_head.pth").exists()
    assert swept["teacher"]["per_head"] != swept["student"]["per_head"]
    capsys.readouterr()

    for tool, extra, message in (
        (
            eval_knn,
            ["--load_features", str(tmp_path / "features" / "teacher")],
            "--load_features belongs to one network; pass one --checkpoint_key with it, not 'teacher,student'",
        ),
        (
            eval_linear,
            ["--pretrained_linear", str(tmp_path / "linear" / "teacher" / "linear_head.pth"), "--evaluate"],
            "--pretrained_linear belongs to one network",
        ),
        (eval_linear, ["--load_from", "elsewhere.pth"], "--load_from belongs to one network"),
    ):
        with pytest.raises(SystemExit) as e:
            tool.main(common[:2] + ["--checkpoint_key", "teacher,student", "--output_dir", str(tmp_path)] + extra)
        err = capsys.readouterr().err
        assert e.value.code == utils.USER_ERROR_EXIT and message in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "tool,key,expected",
    [
        (
            "eval_knn",
            "teacher,,student",
            "expected distinct, non-empty keys separated by commas, got 'teacher,,student'",
        ),
        ("eval_linear", "teacher,teacher", "expected distinct, non-empty keys separated by commas"),
        (
            "export",
            "teacher,student",
            "expected one key such as 'teacher', got 'teacher,student' (a comma-separated "
            "list is for eval_knn.py and eval_linear.py",
        ),
        ("attention", "teacher,student", "expected one key such as 'teacher'"),
    ],
)
def test_checkpoint_key_lists_are_checked_where_they_are_parsed(tool, key, expected, capsys):
    from simpool import attention, export

    module = {"eval_knn": eval_knn, "eval_linear": eval_linear, "export": export, "attention": attention}[tool]
    with pytest.raises(SystemExit) as e:
        module.get_args_parser().parse_args(["--checkpoint_key", key])
    assert e.value.code == utils.USER_ERROR_EXIT
    assert f"argument --checkpoint_key: {expected}" in capsys.readouterr().err


def test_subset_starts_picks_attmasks_low_shot_images(checkpoint, tmp_path):
    # AttMask's low-shot k-NN: --subset N --subset_starts S keeps images S .. S+N-1 of each class
    common = [
        "--pretrained_weights",
        str(checkpoint),
        "--data_path",
        "fashion-mnist",
        "--val_subset",
        "2",
        "--nb_knn",
        "1",
    ]
    eval_knn.main(
        common + ["--subset", "5", "--output_dir", str(tmp_path / "a"), "--dump_features", str(tmp_path / "a")]
    )
    eval_knn.main(
        common
        + [
            "--subset",
            "2",
            "--subset_starts",
            "3",
            "--output_dir",
            str(tmp_path / "b"),
            "--dump_features",
            str(tmp_path / "b"),
        ]
    )
    read = lambda folder, name: torch.load(tmp_path / folder / name, weights_only=True)  # noqa: E731
    five, five_y = read("a", "trainfeat.pth"), read("a", "trainlabels.pth")
    two, two_y = read("b", "trainfeat.pth"), read("b", "trainlabels.pth")
    rank = torch.stack([(five_y[:i] == five_y[i]).sum() for i in range(len(five_y))])  # position in its class
    assert torch.equal(two_y, five_y[rank >= 3]) and torch.allclose(two, five[rank >= 3])
    record = json.loads((tmp_path / "b" / "knn.json").read_text())
    assert record["n_train"] == 20 and (record["subset"], record["subset_starts"]) == (2, 3)
