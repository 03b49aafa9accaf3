"""The zero-config demo must fit slow machines: its FLOPs (training plus both k-NN passes),
counted by bench/demo_flops.py, stay within the budget of 15 minutes on 2 AVX2 cores in fp32."""

import torch
import torch.nn.functional as F

import main_dino
from bench.demo_flops import DEMO_BUDGET_TFLOP, count, main, run_flops


def test_the_counter_counts_matrix_products_and_cpu_attention():
    a, b = torch.randn(6, 5), torch.randn(5, 7)
    assert count(lambda: a @ b) == 2 * 6 * 5 * 7
    q, k, v = (torch.randn(2, 3, 10, 4) for _ in range(3))  # (B, heads, N, d)
    # QK^T and attention x V: 2 products of 2 B H N^2 d FLOPs each
    assert count(lambda: F.scaled_dot_product_attention(q, k, v)) == 2 * 2 * 2 * 3 * 10 * 10 * 4
    q.requires_grad_(True)
    assert count(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()) == 3 * 2 * 2 * 2 * 3 * 10 * 10 * 4


def test_the_demo_recipe_fits_its_flop_budget(capsys):
    flops = run_flops(main_dino.parse_args([]))
    assert flops["knn_passes"] == 2  # random init, then after training
    assert 0 < flops["total"] <= DEMO_BUDGET_TFLOP * 1e12, f"{flops['total'] / 1e12:.1f} TFLOP"
    assert main([]) == 0 and "within the budget of 50 TFLOP" in capsys.readouterr().out


def test_a_recipe_over_the_budget_fails(capsys):
    assert main(["--epochs", "10"]) == 1
    assert "OVER the budget" in capsys.readouterr().out


def test_the_training_count_scales_with_epochs_and_crops():
    one = run_flops(main_dino.parse_args(["--epochs", "1", "--eval_every", "0"]))
    two = run_flops(main_dino.parse_args(["--epochs", "2", "--eval_every", "0"]))
    assert two["knn_passes"] == one["knn_passes"] == 0
    assert two["train"] == 2 * one["train"] and one["total"] == one["train"]
    fewer = run_flops(main_dino.parse_args(["--epochs", "1", "--local_crops_number", "2", "--eval_every", "0"]))
    assert fewer["step"] < one["step"]
