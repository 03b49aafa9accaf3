"""SimPool-SSL building blocks: pooling, masking, losses, augmentation, data, k-NN, optimisers."""
from simpool.pooling import SimPool

__all__ = ["SimPool"]
