"""Weighted k-NN classification of frozen features (DINO protocol), on faiss.

Cosine similarity between L2-normalised features; each of the k nearest training
samples votes for its class with weight exp(similarity / T). Queries go to an exact
inner-product faiss index in chunks (bounded memory), and the vote is a
scatter-add into (chunk, classes), never a one-hot of size k x classes.

Example:
    >>> train = F.normalize(torch.randn(100, 16), dim=1); labels = torch.arange(100) % 4
    >>> knn_classify(train, labels, train[:10], labels[:10], ks=(1,))[1]["top1"]
    100.0
"""
import math

import faiss
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["knn_classify", "extract_features"]


def _index(dim, use_gpu):
    index = faiss.IndexFlatIP(dim)
    if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


def knn_classify(train_features, train_labels, test_features, test_labels, ks=(10, 20, 100, 200),
                 temperature=0.07, num_classes=None, chunk_size=4096, use_gpu=True):
    """Top-1/top-5 accuracy (percent) of the weighted k-NN vote for each k in ``ks``.

    Features must be L2-normalised (N, d). Returns ``{k: {"top1": .., "top5": ..}}``.
    """
    train = np.ascontiguousarray(train_features.float().cpu().numpy())
    test = np.ascontiguousarray(test_features.float().cpu().numpy())
    train_labels = torch.as_tensor(train_labels).long().cpu()
    test_labels = torch.as_tensor(test_labels).long().cpu()
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    ks = sorted(set(min(k, len(train)) for k in ks))
    index = _index(train.shape[1], use_gpu)
    index.add(train)
    hits = {k: [0, 0] for k in ks}
    for start in range(0, len(test), chunk_size):
        sims, idx = index.search(test[start:start + chunk_size], ks[-1])
        sims, idx = torch.from_numpy(sims), torch.from_numpy(idx)
        neighbours = train_labels[idx]  # (n, kmax)
        weights = (sims / temperature).exp()
        target = test_labels[start:start + chunk_size, None]
        for k in ks:
            votes = torch.zeros(len(idx), num_classes).scatter_add_(1, neighbours[:, :k], weights[:, :k])
            top = votes.topk(min(5, num_classes), dim=1).indices
            correct = top == target
            hits[k][0] += int(correct[:, 0].sum())
            hits[k][1] += int(correct.any(1).sum())
    n = len(test)
    return {k: {"top1": 100.0 * t1 / n, "top5": 100.0 * t5 / n} for k, (t1, t5) in hits.items()}


@torch.no_grad()
def extract_features(model, dataset, batch_size=256, device="cpu", image_size=None, amp_dtype=None,
                     num_workers=0, collate=None, header="features", normalize=True):
    """L2-normalised features (N, d) of every sample in ``dataset`` (uint8 images), in
    dataset order, and the labels (``normalize=False``: the raw ``model(x)`` outputs,
    as the linear probe wants them). Under torch.distributed each rank embeds every
    world_size-th sample and the shards are gathered on all ranks."""
    from simpool.data import normalize_batch  # data imports augment; keep knn importable alone
    from utils import MetricLogger
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    indices = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices) if world > 1 else dataset,
        batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=collate or (lambda batch: batch if isinstance(batch, tuple) else torch.utils.data.default_collate(batch)))
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for images, target in MetricLogger().log_every(loader, max(1, len(loader) // 5), header):
        x = normalize_batch(images.to(device, non_blocking=True), dataset.mean, dataset.std, image_size)
        with torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype or torch.bfloat16,
                            enabled=amp_dtype is not None):
            f = model(x)
        f = f.float()
        feats.append((F.normalize(f, dim=1) if normalize else f).cpu())
        labels.append(torch.as_tensor(target).cpu())
    model.train(was_training)
    feats, labels = torch.cat(feats), torch.cat(labels)
    if world > 1:
        feats, labels = _gather_shards(feats, labels, len(dataset), world, device)
    return feats, labels


def _gather_shards(feats, labels, total, world, device):
    """Reassemble rank-strided shards (rank r holds samples r, r+world, ...)."""
    per_rank = math.ceil(total / world)
    pad = per_rank - len(feats)
    feats = F.pad(feats, (0, 0, 0, pad)).to(device)
    labels = F.pad(labels, (0, pad), value=-1).to(device)
    all_feats = [torch.empty_like(feats) for _ in range(world)]
    all_labels = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(all_feats, feats)
    dist.all_gather(all_labels, labels)
    # Interleave: sample i lives on rank i % world at position i // world.
    feats = torch.stack(all_feats, 1).reshape(per_rank * world, -1)[:total].cpu()
    labels = torch.stack(all_labels, 1).reshape(-1)[:total].cpu()
    return feats, labels
