"""bench/train_step.py runs its comparisons end to end (figures are not asserted: speed belongs
in the benchmark's output, not in tests)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--arch",
    "vit_nano",
    "--patch_size",
    "8",
    "--global_crops_size",
    "32",
    "--local_crops_size",
    "16",
    "--batch_size_per_gpu",
    "2",
    "--local_crops_number",
    "2",
    "--out_dim",
    "256",
    "--patch_out_dim",
    "64",
    "--steps",
    "1",
    "--warmup",
    "1",
]


def bench(*flags):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "train_step.py"), *TINY, *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_against_times_our_step_with_extra_flags():
    out = bench("--against", "--grad_checkpointing True")
    assert out.count("peak memory:") == 2 and "grad checkpointing" in out
    assert "ratio ours --grad_checkpointing True/ours:" in out


@pytest.mark.slow
def test_compare_times_ours_and_the_reference_in_its_own_precision():
    out = bench("--compare", "--reference_precision", "fp32", "--profile", "1")
    assert "reference (official DINO step, bench/reference.py): vit_nano/8 [CLS], precision fp32" in out
    assert out.count("(alone, in a child process)") == 2 and "ratio reference/ours:" in out
    profiles = re.findall(r"matmul \+ attention kernels ([\d.]+) s of ([\d.]+) s \((\d+)%\); largest others: (.*)", out)
    assert len(profiles) == 2
    for matmul, total, percent, others in profiles:
        assert 0 < float(matmul) < float(total) and abs(int(percent) - 100 * float(matmul) / float(total)) < 2
        assert len(others.split(", ")) == 5 and "mm " not in others  # the matmuls are not among "others"


@pytest.mark.slow
def test_convnets_run_as_plain_dino():
    """As in main_dino.py, a backbone without patch tokens trains without masking."""
    out = bench("--arch", "fcvit_tiny", "--global_crops_size", "32", "--local_crops_size", "32")
    assert "fcvit_tiny" in out and "masking + iBOT loss off (plain DINO)" in out and "peak memory:" in out


def test_help_lists_the_benchmark_flags_and_main_dinos():
    # before: --help printed main_dino.py's usage alone, under its name, without --compare or --steps
    out = bench("--help")
    assert out.startswith("usage: bench/train_step.py") and "--compare" in out and "--profile N" in out
    assert "usage: main_dino.py" in out and "--local_crops_number" in out


def test_machine_line_names_the_bf16_instructions():
    from bench.machine import bf16_instructions, describe

    assert bf16_instructions({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}) == "AMX"
    assert bf16_instructions({"avx512f", "avx512_bf16"}) == "AVX512-BF16, no AMX"
    assert bf16_instructions({"avx2"}) == "no bf16 instructions"
    line = describe(threads=1)
    assert line.startswith("machine: ") and f"{os.cpu_count()} cores" in line and ", 1 thread;" in line


def test_the_gpu_check_says_it_skipped_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: bench/gpu_check.sh runs for real there")
    out = subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "gpu_check.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=120,
    )
    assert out.returncode == 0
    assert out.stdout.strip() == "gpu_check: skipped (no CUDA GPU visible to torch on this machine)"


def test_the_step_prints_its_flops_and_the_share_of_this_machines_matrix_product():
    for forced, precision in (("0", "fp32"), ("1", "bf16")):
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "bench", "train_step.py"), *TINY],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "SIMPOOL_NATIVE_BF16": forced},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"precision: {precision} (" in proc.stdout
        line = next(line for line in proc.stdout.splitlines() if "FLOPs:" in line)
        match = re.search(
            r"FLOPs: ([0-9.]+) GFLOP a step, ([0-9.]+) GFLOP/s achieved = ([0-9]+)% of this machine's "
            rf"{precision} matrix product \(([0-9.]+) GFLOP/s",
            line,
        )
        assert match and float(match[1]) > 0 and float(match[4]) > 0, line
