"""Every module's docstring examples run as written: they are the first documentation a reader
meets, so a renamed function or a wrong path in one is a bug."""

import doctest
import glob
import importlib
import os

import pytest

from checkpoint_factory import save_training_checkpoint, tiny_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def modules_with_examples():
    files = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "simpool", "*.py")))
    names = []
    for path in files:
        with open(path) as f:
            if ">>>" in f.read():
                names.append(os.path.relpath(path, ROOT)[:-3].replace(os.sep, "."))
    return names


def test_the_modules_with_examples_are_found():
    assert {
        "simpool.pooling",
        "simpool.checkpoints",
        "simpool.vision_transformer",
        "simpool.precision",
        "eval_linear",
    } <= set(modules_with_examples())


@pytest.mark.parametrize("name", modules_with_examples())
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    # the loading examples read the demo's checkpoint (output/demo/checkpoint.pth) and write beside it
    monkeypatch.chdir(tmp_path)
    os.makedirs("output/demo")
    save_training_checkpoint("output/demo/checkpoint.pth", tiny_backbone("simpool", patch_size=7, img_size=28))
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
