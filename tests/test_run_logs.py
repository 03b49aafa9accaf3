"""Run logs (utils.TensorboardScalars, utils.append_json_line): TensorBoard event files that
read back with the values written, and a full disk that stops a run with one line instead of
hanging it."""

import io
import json
import os
import signal
import struct
import subprocess
import sys

import pytest

import main_dino
from simpool import utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from full_disk import FullDisk  # noqa: E402
from test_train import TINY  # noqa: E402


def read_events(path):
    """(tag, step, value) of every scalar in a TFRecord event file, parsed here: records are
    <u64 length><u32 crc><payload><u32 crc>, the payload an Event protocol buffer."""
    from tensorboardX.proto.event_pb2 import Event

    with open(path, "rb") as f:
        data, pos, out = f.read(), 0, []
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        event = Event.FromString(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
        out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    assert pos == len(data)  # no torn record at the end
    return out


def event_file(folder):
    [name] = [n for n in os.listdir(folder) if n.startswith("events.out.tfevents")]
    return os.path.join(folder, name)


def test_scalars_read_back_after_flush_and_close(tmp_path):
    tb = utils.TensorboardScalars(str(tmp_path))
    tb.add_scalar("iter/loss", 2.5, step=0)
    tb.add_scalar("iter/loss", 1.25, step=10)
    tb.flush()
    assert read_events(event_file(tmp_path)) == [("iter/loss", 0, 2.5), ("iter/loss", 10, 1.25)]
    tb.add_scalar("epoch/knn_top1", 61.5, step=0)
    tb.close()
    assert read_events(event_file(tmp_path))[-1] == ("epoch/knn_top1", 0, 61.5)


def test_training_logs_every_tenth_iteration_and_each_epoch(tmp_path):
    main_dino.main(TINY + ["--epochs", "3", "--output_dir", str(tmp_path)])  # 4 steps per epoch: 12
    scalars = read_events(event_file(tmp_path))
    assert sorted({step for tag, step, _ in scalars if tag == "iter/loss"}) == [0, 10]
    epochs = [(step, value) for tag, step, value in scalars if tag == "epoch/train_loss"]
    logged = [(r["epoch"], r["train_loss"]) for r in main_dino_log(tmp_path)]
    assert [s for s, _ in epochs] == [e for e, _ in logged] == [0, 1, 2]
    assert [v for _, v in epochs] == pytest.approx([v for _, v in logged], rel=1e-6)  # float32 in the file


def main_dino_log(folder):
    with open(os.path.join(folder, "log.txt")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("target", ["events", "log.txt"])
def test_full_disk_for_run_logs_is_one_line_error_not_a_hang(tmp_path, monkeypatch, capsys, target):
    # tensorboardX's SummaryWriter hung here: its writer thread died on ENOSPC and add_scalar
    # then waited forever on the full queue.
    import tensorboardX.record_writer

    budget = 600  # the file header and a few scalars fit
    if target == "events":
        monkeypatch.setattr(tensorboardX.record_writer, "open_file", lambda path: FullDisk(path, "wb", budget))
    else:
        real_open = open
        monkeypatch.setattr(
            utils,
            "open",
            lambda path, mode="r", *a, **k: (
                io.TextIOWrapper(FullDisk(path, mode, budget))
                if path.endswith("log.txt")
                else real_open(path, mode, *a, **k)
            ),
            raising=False,
        )

    def hung(signum, frame):
        raise TimeoutError("training hung on the full disk")

    signal.signal(signal.SIGALRM, hung)
    signal.alarm(300)  # 30 tiny epochs take a few seconds
    try:
        with pytest.raises(SystemExit) as e:
            main_dino.main(TINY + ["--epochs", "30", "--output_dir", str(tmp_path)])
    finally:
        signal.alarm(0)
    assert e.value.code == utils.USER_ERROR_EXIT
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not ") and "\n" not in err and "No space left on device" in err
    assert str(tmp_path) in err and (target == "events" or "log.txt" in err)
    assert utils.load_checkpoint(str(tmp_path / "checkpoint.pth"))["epoch"] >= 0  # the checkpoint is there


def test_write_json_is_atomic_and_a_full_disk_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "knn.json"
    utils.write_json(str(path), {"top1": 61.5})
    assert json.loads(path.read_text()) == {"top1": 61.5}
    with pytest.raises(TypeError):  # not JSON: the caller's bug, raised as is, nothing left behind
        utils.write_json(str(path), {"top1": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["knn.json"]
    budget = 8  # '{\n  "top1' fits, the rest does not
    monkeypatch.setattr(
        utils, "open", lambda p, mode="r": io.TextIOWrapper(FullDisk(p, mode.replace("w", "wb"), budget)), raising=False
    )
    with pytest.raises(utils.RunError, match=r"^could not write .*knn\.json \(No space left on device\)$"):
        utils.write_json(str(path), {"top1": 70.0, "per_k": list(range(100))})
    assert json.loads(path.read_text()) == {"top1": 61.5}  # the previous file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["knn.json"]  # no temp file left


def test_eval_knn_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    import eval_knn

    budget = 0
    monkeypatch.setattr(
        utils, "open", lambda p, mode="r": io.TextIOWrapper(FullDisk(p, mode.replace("w", "wb"), budget)), raising=False
    )
    with pytest.raises(SystemExit) as e:
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
    assert e.value.code == utils.USER_ERROR_EXIT
    err = capsys.readouterr().err.strip()
    assert err == f"error: could not write {tmp_path / 'knn.json'} (No space left on device)"


def test_a_test_run_on_a_nearly_full_disk_stops_with_one_line(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from conftest import free_disk_problem

    usage = namedtuple("usage", "total used free")
    assert free_disk_problem(str(tmp_path)) is None  # this machine has room
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**29, 2**29))
    assert free_disk_problem(str(tmp_path)) == (
        f"only 0.5 GiB free in {tmp_path}; the test run writes up to ~1 GB of checkpoints there "
        "(free some space or pass --basetemp on a disk with 1.5 GiB free)"
    )


def test_faiss_library_probing_stays_out_of_the_log():
    # faiss logs at INFO each CPU-specific build it fails to load ("Could not load library with
    # AVX512-SPR support due to: ModuleNotFoundError..."): noise that reads like an error
    code = "import utils; utils.setup_logging(0); import faiss, logging; logging.getLogger('simpool').info('ok')"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "ok\n" and "faiss" not in out.stderr, out.stdout + out.stderr
