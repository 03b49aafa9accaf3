"""FLOPs of a piece of code, counted by ``torch.utils.flop_counter`` while it runs (matrix products,
convolutions and attention; element-wise work is not counted), the same on every machine.

    >>> import torch
    >>> count(lambda: torch.randn(6, 5) @ torch.randn(5, 7))
    420
"""

import torch
from torch.utils.flop_counter import FlopCounterMode


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """(B, H, N, d) queries against M keys: Q K^T and the weighted sum of values, 2 B H N M d each."""
    b, h, n, d = query_shape
    m, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * n * m * d + 2 * b * h * n * m * dv


def _attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """The four products of the backward (dV, dP, dQ, dK): twice the forward."""
    return 2 * _attention_flops(query_shape, key_shape, value_shape)


aten = torch.ops.aten
# torch's counter has no formula for the CPU flash-attention kernels
CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
}


def count(fn):
    """FLOPs of calling ``fn()``."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        fn()
    return counter.get_total_flops()
