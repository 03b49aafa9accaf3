"""SimPool-SSL: self-supervised pretraining of [CLS]-free Vision Transformers pooled by SimPool, with
SimPool-guided AttMask masking. The package's modules are the library; ``simpool.SimPool`` and
``simpool.build_backbone`` are the two entry points most code needs."""

from simpool.backbones import build_backbone
from simpool.pooling import SimPool

__all__ = ["SimPool", "build_backbone"]
