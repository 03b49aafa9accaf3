"""The machine line every benchmark prints: CPU model and its bf16 matrix instructions (AMX,
AVX512-BF16 or neither, which set how much bf16 autocast gains on a CPU), cores, GPU, torch
version and threads, and the load average (other jobs on the cores skew the figures).

    >>> from bench.machine import describe
    >>> describe(threads=1).startswith("machine: ")
    True
"""

import os
import platform
import time

import torch


def cpu_info():
    """(model name, set of CPU flags) from /proc/cpuinfo; the platform's name and no flags elsewhere."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model is None:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "?", flags


def bf16_instructions(flags):
    """'AMX' (tile matrix units), 'AVX512-BF16, no AMX' (bf16 dot products only) or 'no bf16
    instructions', from a set of /proc/cpuinfo flags."""
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16, no AMX"
    return "no bf16 instructions"


def describe(threads=None):
    model, flags = cpu_info()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    threads = torch.get_num_threads() if threads is None else threads
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: {model} ({bf16_instructions(flags)}), {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, "
        f"{threads} thread{'s' if threads != 1 else ''}; load average {load} (other jobs share the cores)"
    )


def gemm_gflops(dtype=None, device="cpu", shape=(3136, 1536, 384), seconds=1.0):
    """This machine's matrix-product throughput (GFLOP/s) in ``dtype`` (None: fp32) on the current
    torch threads: a (m x k) @ (k x n) product, the size of a ViT-S/16 MLP layer on 16 images,
    repeated for about ``seconds`` after a warm-up; the ceiling a training step's FLOPs are measured
    against."""
    m, k, n = shape
    device = torch.device(device)
    a = torch.randn(m, k, device=device, dtype=dtype or torch.float32)
    b = torch.randn(k, n, device=device, dtype=dtype or torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and reps >= 3:
            return 2 * m * k * n * reps / elapsed / 1e9
