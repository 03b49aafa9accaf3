"""The package layout users rely on: DINO's module names at the top level, a library that never
imports a top-level script, and no top-level ``utils`` installed into site-packages."""

import ast
import os

import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"main_dino", "eval_knn", "eval_linear", "vision_transformer", "utils", "fcvit"}


def test_dino_names_keep_working():
    import utils
    import vision_transformer as vits

    assert vits.vit_small(patch_size=16).embed_dim == 384 and vits.__dict__["vit_tiny"] is vits.vit_tiny
    assert vits.DINOHead(8, 4, hidden_dim=8, bottleneck_dim=4)(__import__("torch").randn(2, 8)).shape == (2, 4)
    assert [round(float(v), 6) for v in utils.cosine_scheduler(1.0, 0.0, 1, 3)] == [1.0, 0.75, 0.25]
    assert utils.bool_flag("True") is True


def test_the_library_never_imports_a_top_level_script():
    for name in sorted(os.listdir(os.path.join(ROOT, "simpool"))):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(ROOT, "simpool", name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported = {node.module.split(".")[0]}
            else:
                continue
            assert not imported & SCRIPTS, f"simpool/{name}:{node.lineno} imports {imported & SCRIPTS}"


def test_no_module_named_utils_is_installed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    installed = set(project["tool"]["setuptools"].get("py-modules", []))
    assert not installed & {"utils", "vision_transformer", "fcvit"}, installed
