"""--precision auto: the one decision (simpool.precision) for every device kind, both branches on
any machine (SIMPOOL_NATIVE_BF16 and monkeypatched probes stand in for the hardware), and the
tools that use it: main_dino.py records the resolved precision, fp16 trains with a gradient
scaler, bad requests are one-line errors."""

import subprocess
import sys

import pytest
import torch

import main_dino
from simpool import knn, precision
from simpool.precision import ENV_NATIVE_BF16, Precision, PrecisionError, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device whose native-bf16 answer the test sets: ``fake_gpu(has_bf16, name)``."""

    def make(has_bf16, name="Tesla V100-SXM2-16GB"):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0) if has_bf16 else (7, 0))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    monkeypatch.delenv(ENV_NATIVE_BF16, raising=False)
    return make


@pytest.mark.parametrize("probe, expected", [(None, "fp32"), ("AMX", "bf16"), ("AVX512-BF16", "bf16")])
def test_auto_on_a_cpu_follows_its_bf16_instructions(monkeypatch, probe, expected):
    monkeypatch.delenv(ENV_NATIVE_BF16, raising=False)
    monkeypatch.setattr(precision, "_cpu_bf16_instructions", lambda: probe)
    choice = resolve_precision("auto", CPU)
    assert choice.name == expected and not choice.scaler and choice.slow is None
    if probe is None:
        assert choice.dtype is None
        assert choice.log_line() == (
            "precision: fp32 (this CPU has no bf16 matrix instructions; bf16 would be ~25x slower)"
        )
    else:
        assert choice.dtype is torch.bfloat16
        assert choice.log_line() == f"precision: bf16 (this CPU has {probe} bf16 matrix instructions)"


@pytest.mark.parametrize("forced, expected", [("0", "fp32"), ("1", "bf16")])
def test_the_environment_variable_overrides_the_cpu_probe(monkeypatch, forced, expected):
    monkeypatch.setattr(precision, "_cpu_bf16_instructions", lambda: "AMX" if forced == "0" else None)
    monkeypatch.setenv(ENV_NATIVE_BF16, forced)
    choice = resolve_precision("auto", CPU)
    assert choice.name == expected and f"{ENV_NATIVE_BF16}={forced}" in choice.reason


def test_a_malformed_environment_variable_is_an_error(monkeypatch):
    monkeypatch.setenv(ENV_NATIVE_BF16, "yes")
    with pytest.raises(PrecisionError, match="expected 0 .* or 1"):
        resolve_precision("auto", CPU)


def test_the_probe_agrees_with_proc_cpuinfo(monkeypatch):
    # torch's own probe against the kernel's flags: they must tell the same story on this machine
    monkeypatch.delenv(ENV_NATIVE_BF16, raising=False)
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    has, _ = precision.native_bf16(CPU)
    assert has == bool({"amx_bf16", "avx512_bf16"} & flags)


def test_auto_on_gpus_with_and_without_native_bf16(fake_gpu):
    fake_gpu(True, "NVIDIA A100-SXM4-80GB")
    a100 = resolve_precision("auto", CUDA)
    assert (a100.name, a100.scaler) == ("bf16", False)
    assert a100.log_line() == "precision: bf16 (NVIDIA A100-SXM4-80GB computes bf16 natively)"
    fake_gpu(False, "Tesla T4")
    train, infer = resolve_precision("auto", CUDA), resolve_precision("auto", CUDA, training=False)
    assert (train.name, train.dtype, train.scaler) == ("fp16", torch.float16, True)
    assert train.log_line() == "precision: fp16 with a gradient scaler (Tesla T4 has no native bf16)"
    assert (infer.name, infer.scaler) == ("fp16", False)


def test_the_environment_variable_overrides_the_gpu_probe(fake_gpu, monkeypatch):
    fake_gpu(True)
    monkeypatch.setenv(ENV_NATIVE_BF16, "0")
    assert resolve_precision("auto", CUDA).name == "fp16"


def test_explicit_bf16_where_it_is_emulated_runs_with_a_warning(monkeypatch, fake_gpu):
    monkeypatch.setenv(ENV_NATIVE_BF16, "0")
    cpu = resolve_precision("bf16", CPU)
    assert cpu.name == "bf16" and "about 25x slower than fp32" in cpu.slow and "\n" not in cpu.slow
    monkeypatch.delenv(ENV_NATIVE_BF16)
    fake_gpu(False)
    assert "emulated" in resolve_precision("bf16", CUDA).slow
    fake_gpu(True)
    assert resolve_precision("bf16", CUDA).slow is None


def test_use_fp16_keeps_its_dino_meaning(fake_gpu):
    fake_gpu(True)
    choice = resolve_precision("auto", CUDA, use_fp16=True)
    assert (choice.name, choice.scaler) == ("fp16", True)
    with pytest.raises(PrecisionError, match="--use_fp16 True asks for fp16 and --precision bf16"):
        resolve_precision("bf16", CUDA, use_fp16=True)
    # ignored on a CPU, where --precision decides
    assert resolve_precision("fp32", CPU, use_fp16=True).name == "fp32"


def test_requests_a_device_cannot_run_are_errors():
    with pytest.raises(PrecisionError, match="fp16 runs on CUDA GPUs only"):
        resolve_precision("fp16", CPU)
    with pytest.raises(PrecisionError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", CPU)


def test_the_knn_prefilter_asks_the_same_function(monkeypatch):
    asked = []

    def probe(device):
        asked.append(device.type)
        return False, "stand-in"

    monkeypatch.setattr(knn, "native_bf16", probe)
    bank, queries = torch.randn(64, 8), torch.randn(5, 8)
    sims, idx = knn.knn_search(bank, queries, 3)
    assert asked == ["cpu"]
    exact = (queries @ bank.T).topk(3)
    torch.testing.assert_close(sims, exact.values)
    assert torch.equal(idx, exact.indices)


TINY = [
    "--data_path",
    "fashion-mnist",
    "--subset",
    "4",
    "--arch",
    "vit_pico",
    "--patch_size",
    "7",
    "--global_crops_size",
    "28",
    "--local_crops_size",
    "14",
    "--local_crops_number",
    "2",
    "--out_dim",
    "32",
    "--patch_out_dim",
    "16",
    "--head_hidden_dim",
    "32",
    "--head_bottleneck_dim",
    "16",
    "--batch_size_per_gpu",
    "20",
    "--epochs",
    "1",
    "--warmup_epochs",
    "0",
    "--masking_prob",
    "1.0",
    "--num_workers",
    "0",
    "--eval_every",
    "0",
]


@pytest.mark.parametrize("forced, expected", [("0", "fp32"), ("1", "bf16")])
def test_main_dino_logs_and_records_the_resolved_precision(tmp_path, monkeypatch, capfd, forced, expected):
    monkeypatch.setenv(ENV_NATIVE_BF16, forced)
    main_dino.main(TINY + ["--output_dir", str(tmp_path)])
    out = capfd.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if "precision: " in line and "(" in line]
    assert len(lines) == 1 and f"precision: {expected} (" in lines[0]
    ckpt = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["args"]["precision"] == expected and ckpt["scaler"] is None


def test_fp16_trains_with_a_gradient_scaler(tmp_path, monkeypatch):
    # the V100/T4 branch by construction: the scaler's scale/unscale/step path of main_dino.py,
    # run here on CPU autocast fp16 (what auto resolves to on such a GPU, forced)
    monkeypatch.setattr(
        main_dino,
        "resolve_precision",
        lambda *a, **k: Precision("fp16", "stand-in for a GPU without bf16", scaler=True),
    )
    main_dino.main(TINY + ["--output_dir", str(tmp_path)])
    ckpt = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["args"]["precision"] == "fp16"
    assert ckpt["scaler"] is not None and ckpt["scaler"]["scale"] > 0
    assert all(torch.isfinite(t).all() for t in ckpt["teacher"].values() if t.is_floating_point())


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--precision", "fp16", "--cpu"],
            "error: --precision fp16 runs on CUDA GPUs only; on a CPU use auto, bf16 or fp32",
        ),
        (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    ],
)
def test_bad_precision_is_a_one_line_error(tmp_path, argv, message):
    out = subprocess.run(
        [sys.executable, "main_dino.py", *TINY, *argv, "--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=main_dino.__file__.rsplit("/", 1)[0],
    )
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert message in out.stderr.strip().splitlines()[-1]
