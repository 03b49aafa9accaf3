"""SimPool-SSL building blocks: pooling, masking, losses, augmentation, data, k-NN, optimisers,
and the backbone factory (``simpool.build_backbone``, from ``simpool.backbones``)."""
from simpool.pooling import SimPool

__all__ = ["SimPool", "build_backbone"]


def __getattr__(name):
    # Imported on first use: the factory pulls in timm and the top-level model files, which
    # light users of the package (k-NN, losses) do not need.
    if name == "build_backbone":
        from simpool.backbones import build_backbone
        return build_backbone
    raise AttributeError(f"module 'simpool' has no attribute {name!r}")
