"""User mistakes in the evaluation tools and ``launch`` end in one line (``error: ...`` or argparse's
usage error), exit code 2, before any feature is computed; never a traceback."""

import os
import re
import subprocess
import sys

import pytest

import eval_knn
import eval_linear
from checkpoint_factory import save_training_checkpoint, tiny_backbone
from simpool import attention, utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = ["--data_path", "fashion-mnist", "--subset", "2", "--val_subset", "2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "checkpoint.pth"
    save_training_checkpoint(path, tiny_backbone("simpool", patch_size=7, img_size=28))
    return str(path)


@pytest.mark.parametrize(
    "tool,args,expected",
    [
        (eval_knn, ["--output_dir", "{file}"], "cannot write to output folder {file}"),
        (eval_knn, ["--dump_features", "{file}"], "cannot write to output folder {file}"),
        (eval_linear, ["--output_dir", "{file}"], "cannot write to output folder {file}"),
        (
            eval_linear,
            ["--crop_scale", "1.0", "0.08", "--output_dir", "{dir}"],
            "--crop_scale takes the low end first (MIN MAX), got 1 0.08",
        ),
        (attention, ["--evaluate", "--output_dir", "{file}"], "cannot write to output folder {file}"),
        (
            attention,
            ["--evaluate", "--object_scale", "0.9", "0.5", "--output_dir", "{dir}"],
            "--object_scale takes the low end first (MIN MAX), got 0.9 0.5",
        ),
        (eval_knn, ["--image_size", "5", "--output_dir", "{dir}"], "--image_size 5 is smaller than one 7-pixel patch"),
        (eval_knn, ["--patch_size", "0", "--output_dir", "{dir}"], "argument --patch_size: expected an integer >= 1"),
    ],
    ids=[
        "knn-output-file",
        "knn-dump-file",
        "linear-output-file",
        "linear-crop-scale",
        "attention-output-file",
        "attention-object-scale",
        "knn-image-below-patch",
        "knn-patch-size-0",
    ],
)
def test_evaluation_tool_mistakes_are_one_line(tool, args, expected, checkpoint, tmp_path, capsys):
    file = tmp_path / "a_file"
    file.write_text("x")
    args = [a.format(file=file, dir=tmp_path / "out") for a in args]
    with pytest.raises(SystemExit) as e:
        tool.main(["--pretrained_weights", checkpoint] + DATA * (tool is not attention) + args)
    assert e.value.code == utils.USER_ERROR_EXIT
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()[-1]
    assert expected.format(file=file) in err and "Traceback" not in captured.err, err
    # stopped before any feature or map was computed (no progress line such as "Train features [ 1/4]")
    assert not re.search(r"(features|images\)) \[", captured.out + captured.err)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--nproc_per_node", "0", "main_dino.py"], "--nproc_per_node: expected a positive integer, got '0'"),
        (["--max_restarts", "-1", "main_dino.py"], "--max_restarts: expected an integer >= 0, got -1"),
        (["no_such_script.py"], "script 'no_such_script.py': no such file"),
    ],
)
def test_launch_mistakes_are_usage_errors(args, expected):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch"), "--dry_run"] + args,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == f"launch: error: {expected}", out.stderr


@pytest.mark.parametrize(
    "tool,args,expected",
    [
        ("main_dino", ["--lr", "inf"], "argument --lr: expected a finite number >= 0, got inf"),
        ("main_dino", ["--warmup_epochs", "inf"], "argument --warmup_epochs: expected a finite number >= 0, got inf"),
        ("main_dino", ["--subset", "0"], "argument --subset: expected -1 (all) or an integer >= 1, got 0"),
        ("main_dino", ["--seed", "-1"], "argument --seed: expected an integer >= 0 and <= 2147483647, got -1"),
        (
            "main_dino",
            ["--seed", "4294967296"],
            "argument --seed: expected an integer >= 0 and <= 2147483647, got 4294967296",
        ),
        ("main_dino", ["--gamma", "0"], "argument --gamma: expected 'auto', 'None' or a finite number > 0, got '0'"),
        ("main_dino", ["--gamma", "nan"], "argument --gamma: expected 'auto', 'None' or a finite number > 0"),
        ("main_dino", ["--gamma", "-1.5"], "argument --gamma: expected 'auto', 'None' or a finite number > 0"),
        ("eval_knn", ["--gamma", "inf"], "argument --gamma: expected 'auto', 'None' or a finite number > 0"),
        ("eval_knn", ["--temperature", "inf"], "argument --temperature: expected a finite number > 0, got inf"),
        ("eval_knn", ["--val_subset", "0"], "argument --val_subset: expected -1 (all) or an integer >= 1, got 0"),
        ("eval_linear", ["--lrs", "0.1", "inf"], "argument --lrs/--lr: expected a finite number > 0, got inf"),
        ("attention", ["--display_size", "100000"], "argument --display_size: expected an integer >= 1 and <= 4096"),
    ],
)
def test_values_no_run_can_use_are_usage_errors(tool, args, expected, capsys):
    # before: inf passed the range checks (an OverflowError in the lr schedule, a NaN "best" head,
    # chance-level votes), --subset 0 meant "all", --gamma 0 divided by zero at the first forward,
    # numpy rejected the seed mid-setup, and --display_size 100000 ran the machine out of memory
    import main_dino

    module = {"main_dino": main_dino, "eval_knn": eval_knn, "eval_linear": eval_linear, "attention": attention}[tool]
    with pytest.raises(SystemExit) as e:
        module.main(args)
    assert e.value.code == utils.USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert expected in err.strip().splitlines()[-1] and "Traceback" not in err, err
