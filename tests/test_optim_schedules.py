"""Tests for simpool/optim.py and utils.py: optimisers, gradient rules, EMA, schedules, checkpoint I/O."""

import argparse
import errno
import math
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from simpool.optim import LARS, build_optimizer, cancel_last_layer_gradients, clip_gradients, ema_update, param_groups
from simpool.utils import (
    CheckpointError,
    bool_flag,
    cosine_scheduler,
    linear_warmup_constant,
    load_checkpoint,
    load_latest_checkpoint,
    number,
    save_checkpoint,
)


# ---------------------------------------------------------------- schedules
def test_cosine_scheduler_with_warmup():
    # DINO's schedule: linspace(start, base, warm-up iterations) with both ends, then
    # final + (base - final) / 2 * (1 + cos(pi * i / n)) over the remaining n iterations
    s = cosine_scheduler(1.0, 0.1, epochs=10, niter_per_ep=5, warmup_epochs=2, start_warmup_value=0.2)
    assert len(s) == 50
    w = s[:10]
    assert w[0] == pytest.approx(0.2) and w[-1] == pytest.approx(1.0)  # the warm-up reaches the base value
    np.testing.assert_allclose(np.diff(w), np.full(9, 0.8 / 9), rtol=0, atol=1e-12)
    assert s[10] == pytest.approx(1.0)  # the cosine starts at the base value too
    cos = s[10:]
    assert (np.diff(cos) < 0).all()
    assert cos[20] == pytest.approx(0.55)  # i = n/2 of n = 40: the midpoint
    assert s[-1] == pytest.approx(0.1 + 0.45 * (1 + np.cos(np.pi * 39 / 40)))  # one step short of 0.1
    assert s[-1] > 0.1


def test_cosine_scheduler_without_warmup_and_increasing():
    s = cosine_scheduler(0.996, 1.0, epochs=3, niter_per_ep=7)
    assert len(s) == 21
    assert s[0] == pytest.approx(0.996) and 0.99997 < s[-1] < 1.0
    assert (np.diff(s) > 0).all()
    assert s[10] == pytest.approx(0.998 - 0.002 * np.cos(np.pi * 10 / 21))


def test_cosine_scheduler_constant_and_tiny():
    np.testing.assert_allclose(cosine_scheduler(0.5, 0.5, 2, 3), np.full(6, 0.5))
    one = cosine_scheduler(0.3, 0.0, 1, 1)
    assert len(one) == 1 and one[0] == pytest.approx(0.3)
    # warm-up longer than training: cut off at the training length
    s = cosine_scheduler(1.0, 0.0, epochs=1, niter_per_ep=4, warmup_epochs=2)
    assert len(s) == 4
    np.testing.assert_allclose(s, [0.0, 1 / 7, 2 / 7, 3 / 7])
    # a per-epoch cosine (niter 1) is torch's CosineAnnealingLR with eta_min 0 (DINO's linear probe)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 6, eta_min=0)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        annealing.step()
    np.testing.assert_allclose(cosine_scheduler(1.0, 0.0, 6, 1), lrs, rtol=0, atol=1e-12)


def test_linear_warmup_constant():
    # DINO's teacher temperature: one value per epoch, np.linspace(start, final, warm-up epochs)
    # then final; each held for the epoch's iterations
    s = linear_warmup_constant(0.04, 0.07, epochs=5, niter_per_ep=4, warmup_epochs=3)
    assert len(s) == 20
    np.testing.assert_allclose(s, np.repeat([0.04, 0.055, 0.07, 0.07, 0.07], 4), rtol=0, atol=1e-12)
    # no warm-up, and warm-up longer than training
    np.testing.assert_allclose(linear_warmup_constant(0.04, 0.07, 2, 3, 0), np.full(6, 0.07))
    long = linear_warmup_constant(0.0, 1.0, epochs=2, niter_per_ep=3, warmup_epochs=5)
    np.testing.assert_allclose(long, np.repeat([0.0, 0.25], 3), rtol=0, atol=1e-12)
    # iBOT's patch temperature with masking from epoch 2: held at the start value until then
    late = linear_warmup_constant(0.04, 0.07, epochs=6, niter_per_ep=1, warmup_epochs=3, start_epoch=2)
    np.testing.assert_allclose(late, [0.04, 0.04, 0.04, 0.055, 0.07, 0.07], rtol=0, atol=1e-12)


# ---------------------------------------------------------------- EMA / gradient rules
def _pair(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).double(), nn.Sequential(
        nn.Linear(4, 3), nn.LayerNorm(3)
    ).double()


def test_ema_update_formula():
    teacher, student = _pair(0)
    with torch.no_grad():
        for p in student.parameters():
            p.normal_()
    before_t = [p.detach().clone() for p in teacher.parameters()]
    before_s = [p.detach().clone() for p in student.parameters()]
    ema_update(teacher, student, 0.9)
    for t, t0, s0, s in zip(teacher.parameters(), before_t, before_s, student.parameters()):
        torch.testing.assert_close(t.detach(), 0.9 * t0 + 0.1 * s0, rtol=0, atol=1e-12)
        assert torch.equal(s.detach(), s0)  # the student is untouched
    ema_update(teacher, student, 1.0)  # momentum 1 keeps the teacher
    for t, t0, s0 in zip(teacher.parameters(), before_t, before_s):
        torch.testing.assert_close(t.detach(), 0.9 * t0 + 0.1 * s0, rtol=0, atol=1e-12)


def test_ema_update_pairs_parameters_by_name():
    # a teacher without one of the student's layers (iBOT's --shared_head_teacher drops the patch
    # layer): pairing by position would average the teacher's last Linear with the student's LayerNorm
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 3)).double()
    teacher = nn.Sequential(nn.Linear(4, 3), nn.Identity(), nn.Linear(3, 3)).double()
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.75)
    for name, t in teacher.state_dict().items():
        torch.testing.assert_close(t, 0.75 * before_t[name] + 0.25 * student.state_dict()[name], rtol=0, atol=1e-12)


def test_clip_gradients_per_parameter():
    model = nn.Linear(3, 2, bias=True).double()
    model.weight.grad = torch.full((2, 3), 4.0, dtype=torch.float64)  # norm sqrt(6)*4 = 9.80
    model.bias.grad = torch.tensor([0.3, 0.4], dtype=torch.float64)  # norm 0.5
    g_w = model.weight.grad.clone()
    norms = clip_gradients(model, 2.0)
    assert [float(n) for n in norms] == pytest.approx([math.sqrt(6) * 4, 0.5])
    # the big one is scaled to norm 2 (DINO's clip / (norm + 1e-6)), the small one unchanged
    torch.testing.assert_close(model.weight.grad, g_w * 2.0 / (math.sqrt(6) * 4 + 1e-6), rtol=1e-12, atol=0)
    assert model.weight.grad.norm().item() == pytest.approx(2.0, rel=1e-6)
    assert torch.equal(model.bias.grad, torch.tensor([0.3, 0.4], dtype=torch.float64))


def test_clip_gradients_not_a_global_norm():
    model = nn.Linear(2, 2).double()
    model.weight.grad = torch.full((2, 2), 0.4, dtype=torch.float64)  # norm 0.8 < 1
    model.bias.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)  # norm 1.0 -> ~unchanged
    clip_gradients(model, 1.0)  # a global rule would shrink both (total norm ~1.28)
    assert torch.equal(model.weight.grad, torch.full((2, 2), 0.4, dtype=torch.float64))
    assert clip_gradients(nn.Linear(2, 2), 1.0) == []  # no grads: nothing to do


class _WithHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(3, 3)
        self.mlp = nn.Linear(3, 3)
        self.last_layer = nn.Linear(3, 2)
        self.last_layer2 = nn.Linear(3, 2)


@pytest.mark.parametrize(
    "epoch,freeze,dropped", [(0, 1, True), (2, 3, True), (3, 3, False), (5, 1, False), (0, 0, False)]
)
def test_cancel_last_layer_gradients(epoch, freeze, dropped):
    model = _WithHead()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    cancel_last_layer_gradients(model, epoch, freeze)
    for name, p in model.named_parameters():
        if name.startswith("last_layer"):
            assert (p.grad is None) == dropped, name
        else:
            assert p.grad is not None and torch.equal(p.grad, torch.ones_like(p)), name


def test_param_groups_no_decay_for_biases_and_1d():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2, bias=False))
    model.register_parameter("scale", nn.Parameter(torch.ones(3)))
    model.register_parameter("embed", nn.Parameter(torch.zeros(1, 3)))
    model.register_parameter("frozen", nn.Parameter(torch.zeros(2, 2), requires_grad=False))
    decay, no_decay = param_groups(model)

    def ids(ps):
        return {id(p) for p in ps}

    assert ids(decay["params"]) == ids([model[0].weight, model[2].weight, model.embed])
    assert ids(no_decay["params"]) == ids([model[0].bias, model[1].weight, model[1].bias, model.scale])
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"] is True
    # the decay group sets no weight_decay of its own: it takes the optimizer's, the other stays 0
    lars = LARS(param_groups(model), weight_decay=0.1)
    assert lars.param_groups[0]["weight_decay"] == 0.1 and lars.param_groups[0]["lars_exclude"] is False
    assert lars.param_groups[1]["weight_decay"] == 0.0 and lars.param_groups[1]["lars_exclude"] is True


# ---------------------------------------------------------------- LARS
def _lars_reference_step(w, g, mu, lr, wd, momentum, eta):
    """One LARS step on plain Python lists of floats."""
    u = [gi + wd * wi for gi, wi in zip(g, w)]
    wn = math.sqrt(sum(x * x for x in w))
    un = math.sqrt(sum(x * x for x in u))
    trust = eta * wn / un if wn > 0 and un > 0 else 1.0
    mu = [momentum * m + trust * ui for m, ui in zip(mu, u)]
    return [wi - lr * m for wi, m in zip(w, mu)], mu


def test_lars_step_hand_computed():
    # w = [3, 4] (|w| = 5), g = [1, 0], wd = 0.5: u = g + wd*w = [2.5, 2], |u| = sqrt(10.25)
    # trust = 0.001 * 5 / sqrt(10.25); mu = trust*u; w <- w - 0.1*mu
    w = torch.tensor([[3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    opt = LARS([{"params": [w]}], lr=0.1, weight_decay=0.5, momentum=0.9, eta=0.001)
    w.grad = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    opt.step()
    trust = 0.001 * 5 / math.sqrt(10.25)
    expected1 = [3.0 - 0.1 * trust * 2.5, 4.0 - 0.1 * trust * 2.0]
    assert w.detach()[0].tolist() == pytest.approx(expected1, rel=1e-12)
    # second step: the momentum buffer carries over
    exp_w, exp_mu = _lars_reference_step([3.0, 4.0], [1.0, 0.0], [0.0, 0.0], 0.1, 0.5, 0.9, 0.001)
    assert exp_w == pytest.approx(expected1, rel=1e-12)
    w.grad = torch.tensor([[-0.5, 2.0]], dtype=torch.float64)
    opt.step()
    exp_w, exp_mu = _lars_reference_step(exp_w, [-0.5, 2.0], exp_mu, 0.1, 0.5, 0.9, 0.001)
    assert w.detach()[0].tolist() == pytest.approx(exp_w, rel=1e-12)
    assert opt.state[w]["mu"][0].tolist() == pytest.approx(exp_mu, rel=1e-12)


def test_lars_excluded_group_is_plain_momentum_sgd():
    b = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    z = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)  # zero weight: trust ratio 1
    opt = LARS(
        [{"params": [b], "weight_decay": 0.3, "lars_exclude": True}, {"params": [z]}],
        lr=0.5,
        weight_decay=0.3,
        momentum=0.9,
    )
    for step in range(2):
        b.grad = torch.tensor([0.2, 0.4], dtype=torch.float64)
        z.grad = torch.ones(2, 2, dtype=torch.float64)
        opt.step()
    # mu after 2 steps = g * (1 + 0.9); b <- b - lr*(g) - lr*(1.9 g) (no decay, no trust ratio)
    torch.testing.assert_close(
        b.detach(),
        torch.tensor([1.0, -2.0], dtype=torch.float64) - 0.5 * torch.tensor([0.2, 0.4], dtype=torch.float64) * 2.9,
        rtol=1e-12,
        atol=1e-12,
    )
    # z: step 1 at |w| = 0 takes trust 1, u = g = 1: mu = 1, z = -0.5. Step 2: u = 1 + 0.3*(-0.5) = 0.85,
    # |z| = 1, |u| = 1.7, trust = 0.001/1.7: mu = 0.9 + 0.85*0.001/1.7 = 0.9005, z = -0.5 - 0.5*0.9005
    torch.testing.assert_close(z.detach(), torch.full((2, 2), -0.95025, dtype=torch.float64), rtol=0, atol=1e-12)


def test_build_optimizer():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    assert isinstance(build_optimizer("adamw", param_groups(model)), torch.optim.AdamW)
    sgd = build_optimizer("sgd", param_groups(model))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    assert isinstance(build_optimizer("lars", param_groups(model)), LARS)
    with pytest.raises(ValueError):
        build_optimizer("adam", param_groups(model))
    # the trainer sets lr / wd per iteration; a step with them set moves the weights
    opt = build_optimizer("adamw", param_groups(model))
    for g in opt.param_groups:
        g["lr"] = 0.1
    before = model[0].weight.detach().clone()
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    assert not torch.equal(before, model[0].weight.detach())


# ---------------------------------------------------------------- checkpoints
def _state():
    model = nn.Linear(3, 2)
    opt = LARS(param_groups(model), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {
        "student": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 3,
        "iteration": 30,
        "args": {"arch": "vit_nano", "lr": 5e-4, "crops": (0.4, 1.0)},
        "scaler": None,
    }


def test_checkpoint_round_trip_and_no_temp_left(tmp_path):
    state = _state()
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(state, str(path))
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    loaded = load_checkpoint(str(path))
    assert loaded["epoch"] == 3 and loaded["args"] == state["args"] and loaded["scaler"] is None
    for k, v in state["student"].items():
        assert torch.equal(loaded["student"][k], v)
    mu = next(iter(state["optimizer"]["state"].values()))["mu"]
    assert torch.equal(next(iter(loaded["optimizer"]["state"].values()))["mu"], mu)


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_save_checkpoint_failure_keeps_old_file(tmp_path, monkeypatch, exc):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"epoch": 1, "w": torch.arange(4)}, str(path))
    old_bytes = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial checkpoint")
        raise exc

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(type(exc)):
        save_checkpoint({"epoch": 2, "w": torch.arange(8)}, str(path))
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # temp file removed
    assert load_checkpoint(str(path))["epoch"] == 1


def test_save_checkpoint_disk_full_is_one_line_checkpoint_error(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"epoch": 1}, str(path))

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint({"epoch": 2}, str(path))
    monkeypatch.undo()
    assert "\n" not in str(info.value) and "No space left" in str(info.value)
    assert os.listdir(tmp_path) == ["checkpoint.pth"] and load_checkpoint(str(path))["epoch"] == 1


def test_save_checkpoint_keeps_rotated_copies_and_latest_falls_back(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    for epoch in range(1, 5):
        save_checkpoint({"epoch": epoch}, path, keep=3)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "checkpoint.pth.1", "checkpoint.pth.2"]
    assert [load_checkpoint(p)["epoch"] for p in (path, path + ".1", path + ".2")] == [4, 3, 2]
    state, found = load_latest_checkpoint(path, keep=3)
    assert state["epoch"] == 4 and found == path
    with open(path, "r+b") as f:  # the newest is damaged: the previous one is used
        f.truncate(10)
    state, found = load_latest_checkpoint(path, keep=3)
    assert state["epoch"] == 3 and found == path + ".1"
    assert load_latest_checkpoint(str(tmp_path / "none.pth"), keep=3) == (None, None)


def _assert_one_line_error(path):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(path))
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_load_checkpoint_random_bytes(tmp_path):
    path = tmp_path / "random.pth"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _assert_one_line_error(path)


def test_load_checkpoint_truncated(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(_state(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_one_line_error(path)


def test_load_checkpoint_missing(tmp_path):
    assert "no such file" in _assert_one_line_error(tmp_path / "nope.pth")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("use_torch_save", [False, True])
def test_load_checkpoint_does_not_run_pickled_code(tmp_path, use_torch_save):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"epoch": 1, "x": _Evil(str(marker))}
    if use_torch_save:
        torch.save(payload, str(path))
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _assert_one_line_error(path)
    assert not marker.exists()
    assert [str(w.message) for w in caught] == []  # the one-line error is all the user sees


# ---------------------------------------------------------------- number (ranged argparse types)
def test_number_bounds():
    assert number(int, low=1)("1") == 1 and number(int, low=0)("0") == 0
    assert number(float, low=0, high=1)("1") == 1.0 and number(float, above=0)("1e-9") == 1e-9
    for parse, text in [
        (number(int, low=1), "0"),
        (number(float, above=0), "0"),
        (number(float, low=0), "-0.1"),
        (number(float, low=0, high=1), "1.5"),
        (number(float, low=0, below=1), "1"),
        (number(float, low=0), "nan"),
        (number(int, low=-1), "-2"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=f"got {text}$"):
            parse(text)
    with pytest.raises(ValueError):
        number(int, low=1)("2.5")


def test_number_in_argparse_is_a_one_line_usage_error(capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=number(int, low=1))
    parser.add_argument("--scale", type=number(float, above=0, high=1), nargs=2)
    assert parser.parse_args(["--epochs", "3", "--scale", "0.5", "1"]).scale == [0.5, 1.0]
    for argv, expected in [
        (["--epochs", "0"], "argument --epochs: expected an integer >= 1, got 0"),
        (["--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
        (["--scale", "0", "1"], "argument --scale: expected a number > 0 and <= 1, got 0"),
    ]:
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert e.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith("error: " + expected)


# ---------------------------------------------------------------- bool_flag
@pytest.mark.parametrize(
    "text,value",
    [
        ("True", True),
        ("true", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("False", False),
        ("FALSE", False),
        ("0", False),
        ("no", False),
        ("off", False),
    ],
)
def test_bool_flag(text, value):
    assert bool_flag(text) is value


def test_bool_flag_rejects_other_text():
    with pytest.raises(argparse.ArgumentTypeError):
        bool_flag("maybe")
    parser = argparse.ArgumentParser()
    parser.add_argument("--norm_last_layer", type=bool_flag, default=True)
    assert parser.parse_args(["--norm_last_layer", "False"]).norm_last_layer is False
