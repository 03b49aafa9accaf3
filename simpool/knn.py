"""Weighted k-NN classification of frozen features (DINO protocol).

Cosine similarity between L2-normalised features; each of the k nearest training
samples votes for its class with weight exp(similarity / T); the vote is a scatter-add
into (chunk, classes), never a one-hot of size k x classes.

The neighbour search is exact but does most of its work in bf16 where that is fast (CUDA,
or CPUs with AMX / AVX512-BF16): for a chunk of queries,
  1. bf16 similarities to the whole bank (one matmul per tile of 4096 bank rows), each
     within a bound computed from the actual bf16 rounding residuals of the query and of
     the bank (Cauchy-Schwarz);
  2. the best ``m`` (= kmax + 16) candidates by bf16 score, found through the maxima of
     groups of 16 bank entries, taken per tile while its scores are in cache (the top-m
     entries lie in the top-m groups), so the full-width top-k runs on 16x fewer values;
  3. the candidates' similarities recomputed in fp32, the top-kmax of those kept.
A query's result is exact when its m-th bf16 score plus its rigorous error bound is below
its kmax-th exact score (then nothing outside the candidates can be in the true top-kmax);
queries where that fails get 16x more candidates, and the rest an fp32 scan. ``backend="faiss"`` uses faiss's
exact inner-product index instead (fp32 throughout).

Example:
    >>> train = F.normalize(torch.randn(100, 16), dim=1); labels = torch.arange(100) % 4
    >>> knn_classify(train, labels, train[:10], labels[:10], ks=(1,))[1]["top1"]
    100.0
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from simpool.data import normalize_batch
from simpool.precision import autocast, native_bf16
from simpool.utils import MetricLogger

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from torch.utils.data import Dataset

__all__ = ["knn_classify", "knn_search", "extract_features"]

_GROUP = 16  # bank entries per group in the candidate search


def _faiss_search(
    train: torch.Tensor, test: torch.Tensor, k: int, chunk_size: int, use_gpu: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    import faiss

    index = faiss.IndexFlatIP(train.shape[1])
    if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(train.float().cpu().contiguous().numpy())
    sims, idx = [], []
    for start in range(0, len(test), chunk_size):
        s, i = index.search(test[start : start + chunk_size].float().cpu().contiguous().numpy(), k)
        sims.append(torch.from_numpy(s))
        idx.append(torch.from_numpy(i))
    return torch.cat(sims), torch.cat(idx)


@contextlib.contextmanager
def _exact_cuda_matmuls(device: torch.device) -> Iterator[None]:
    """On CUDA, whatever the caller set: bf16 products accumulated in fp32 (the error bound
    below assumes it; cuBLAS may otherwise reduce in bf16) and fp32 products without TF32."""
    settings = torch.backends.cuda.matmul
    wanted = {"allow_bf16_reduced_precision_reduction": False, "fp32_precision": "ieee"}
    saved = {}
    if device.type == "cuda":
        for name, value in wanted.items():
            try:
                saved[name] = getattr(settings, name)
                setattr(settings, name, value)
            except (AttributeError, RuntimeError):  # a torch without this setting
                saved.pop(name, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(settings, name, value)


@torch.no_grad()
def knn_search(
    train: torch.Tensor,
    test: torch.Tensor,
    k: int,
    chunk_size: int = 2048,
    margin: int = 16,
    prefilter_dtype: torch.dtype | None = None,
    tile_rows: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` inner products: (similarities (Q, k) fp32, descending; indices
    (Q, k)) of each row of ``test`` against the rows of ``train``, on their device.
    ``prefilter_dtype`` (default bf16 where fast, else fp32) is the candidate search's
    precision; ``margin``: extra candidates per query in the first round (a query that
    needs more gets 16x as many, then an fp32 scan); ``tile_rows``: bank rows scored at a time
    (rounded to a multiple of 16)."""
    with _exact_cuda_matmuls(train.device):
        return _knn_search(train, test, k, chunk_size, margin, prefilter_dtype, tile_rows)


def _knn_search(
    train: torch.Tensor,
    test: torch.Tensor,
    k: int,
    chunk_size: int,
    margin: int,
    prefilter_dtype: torch.dtype | None,
    tile_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    train, test = train.float(), test.float()
    n, d = train.shape
    device = train.device
    k = min(k, n)
    if prefilter_dtype is None:
        prefilter_dtype = torch.bfloat16 if native_bf16(device)[0] else torch.float32
    bank = train.to(prefilter_dtype)
    # Rigorous error of a prefilter score b ~ q.x (Cauchy-Schwarz on the rounding residuals r):
    # |q.x - q~.x~| <= |q~| max|r_x| + |r_q| max|x|; the output's own rounding, <= u |b| / (1 - u);
    # and the fp32 accumulation, <= d 2^-24 |q~| max|x~|. (1% of slack on each for their own rounding.)
    max_res = max(float((x - b.float()).norm(dim=1).max()) for x, b in zip(train.split(4096), bank.split(4096)))
    max_norm = float(train.norm(dim=1).max())
    u = 2.0**-8 if prefilter_dtype == torch.bfloat16 else 2.0**-11 if prefilter_dtype == torch.float16 else 2.0**-24
    # The bank in tiles of tile_rows rows (a multiple of 16; the last tile shorter, padded with
    # zero rows to a multiple of 16): each tile's scores are reduced to group maxima while they
    # are still in cache, instead of writing out each query's whole score row and reading it back.
    # In a tile of 16 G rows, group j holds rows
    # j, j + G, ..., j + 15 G: a strided max over 16 rows.
    tile_rows = _GROUP * max(1, tile_rows // _GROUP)
    starts = list(range(0, n, tile_rows))
    widths = [min(tile_rows, _GROUP * math.ceil((n - s) / _GROUP)) for s in starts]
    pad = starts[-1] + widths[-1] - n
    if pad:
        bank = torch.cat([bank, bank.new_zeros(pad, d)])
    chunk_size = max(1, min(chunk_size, 2**27 // bank.shape[0]))  # at most 2^27 scores (256 MB bf16) at once
    sims_out = torch.empty(len(test), k, device=device)
    idx_out = torch.empty(len(test), k, dtype=torch.long, device=device)
    # Reused buffers: a fresh multi-100-MB tensor per chunk costs as much in page faults as the matmul.
    # The scores of the tile at bank row s, w rows wide, are the (rows_buf, w) block at rows_buf * s.
    rows_buf = min(chunk_size, len(test))
    score_buf = torch.empty(rows_buf * bank.shape[0], dtype=prefilter_dtype, device=device)
    max_dtype = torch.int16 if prefilter_dtype == torch.bfloat16 else prefilter_dtype
    group_max_buf = torch.empty(rows_buf, bank.shape[0] // _GROUP, dtype=max_dtype, device=device)
    gather_buf = torch.empty(rows_buf * (k + margin) * d, device=device)
    # per group: its first bank row, the step to its next row (its tile's G; the tile is 16 G
    # wide), where its first row's score lies in score_buf (the query c adds c * 16 G)
    n_groups = bank.shape[0] // _GROUP
    step, first_row, first_at = (torch.empty(n_groups, dtype=torch.long, device=device) for _ in range(3))
    for start, w in zip(starts, widths):
        g = slice(start // _GROUP, (start + w) // _GROUP)
        step[g] = w // _GROUP
        first_row[g] = start + torch.arange(w // _GROUP, device=device)
        first_at[g] = rows_buf * start + torch.arange(w // _GROUP, device=device)
    member = torch.arange(_GROUP, device=device)
    for start in range(0, len(test), chunk_size):
        q = test[start : start + chunk_size]
        qp = q.to(prefilter_dtype)
        for start_row, w in zip(starts, widths):
            block = score_buf[rows_buf * start_row : rows_buf * start_row + len(q) * w].view(len(q), w)
            scores = torch.mm(qp, bank[start_row : start_row + w].T, out=block)
            if start_row + w > n:
                scores[:, n - start_row :] = float("-inf")
            # Group maxima on the bits: bf16 values >= 0 order like their int16 patterns (an integer
            # max is cheaper than a bf16 one); a group whose maximum is negative is then misranked, so a query
            # whose chosen groups reach a negative maximum is not "sure" below.
            as_int = scores.view(torch.int16) if prefilter_dtype == torch.bfloat16 else scores
            group_max_buf[: len(q), start_row // _GROUP : (start_row + w) // _GROUP] = as_int.view(
                len(q), _GROUP, w // _GROUP
            ).amax(1)
        group_max = group_max_buf[: len(q)]
        qp_norm = qp.float().norm(dim=1)
        slack = (
            qp_norm * max_res + (q - qp.float()).norm(dim=1) * max_norm + d * 2.0**-24 * qp_norm * (max_norm + max_res)
        ) * 1.01 + 1e-7
        rows = torch.arange(len(q), device=device)
        for m in (k + margin, k + 16 * margin):
            if m >= n or len(rows) == 0:
                break
            g = min(m, n_groups)  # the top-m scores lie in the m groups with the largest maxima
            top_groups, groups = group_max[rows].topk(g, dim=1)
            offsets = step[groups][:, :, None] * member
            cand = (first_row[groups][:, :, None] + offsets).flatten(1)
            at = first_at[groups][:, :, None] + offsets + rows[:, None, None] * _GROUP * step[groups][:, :, None]
            at = at.flatten(1)
            approx, pos = score_buf[at].float().topk(m, dim=1)
            cand = cand.gather(1, pos)
            out = gather_buf[: len(rows) * m * d].view(len(rows) * m, d) if m == k + margin else None
            gathered = torch.index_select(train, 0, cand.flatten(), out=out).view(len(rows), m, d)
            exact = torch.bmm(gathered, q[rows, :, None])[:, :, 0]  # fp32 rescoring
            top, order = exact.topk(k, dim=1)
            # nothing outside the candidates can beat the k-th: its score <= b_m (1 + u) + slack
            bound = approx[:, -1] + 1.01 * u * approx[:, -1].abs() + slack[rows]
            sure = (bound < top[:, -1]) & (top_groups[:, -1] >= 0)
            sims_out[start + rows[sure]] = top[sure]
            idx_out[start + rows[sure]] = cand.gather(1, order)[sure]
            rows = rows[~sure]
        if len(rows):  # exact fp32 scan for the rest (or all, when k is close to n)
            top, idx = (q[rows] @ train.T).topk(k, dim=1)
            sims_out[start + rows], idx_out[start + rows] = top, idx
    return sims_out, idx_out


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor | Sequence[int],
    test_features: torch.Tensor,
    test_labels: torch.Tensor | Sequence[int],
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 2048,
    use_gpu: bool = True,
    backend: str = "torch",
) -> dict[int, dict[str, float]]:
    """Top-1/top-5 accuracy (percent) of the weighted k-NN vote for each k in ``ks``.

    Features must be L2-normalised (N, d). Returns ``{k: {"top1": .., "top5": ..}}``.
    ``backend``: "torch" (exact, bf16-prefiltered search above; on CUDA when ``use_gpu`` and
    one is available) or "faiss" (exact fp32 index).
    """
    train_labels = torch.as_tensor(train_labels).long().cpu()
    test_labels = torch.as_tensor(test_labels).long().cpu()
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    ks = sorted(set(min(k, len(train_features)) for k in ks))
    if backend == "faiss":
        sims, idx = _faiss_search(train_features, test_features, ks[-1], chunk_size, use_gpu)
    elif backend == "torch":
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        sims, idx = knn_search(train_features.to(device), test_features.to(device), ks[-1], chunk_size)
        sims, idx = sims.cpu(), idx.cpu()
    else:
        raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}")
    neighbours = train_labels[idx]  # (n, kmax)
    weights = (sims / temperature).exp()
    results, n = {}, len(test_labels)
    for k in ks:
        votes = torch.zeros(len(idx), num_classes).scatter_add_(1, neighbours[:, :k], weights[:, :k])
        # DINO's top-5 looks at the first min(5, k) classes: with k < 5, at most k got any vote
        correct = votes.topk(min(5, k, num_classes), dim=1).indices == test_labels[:, None]
        results[k] = {"top1": 100.0 * int(correct[:, 0].sum()) / n, "top5": 100.0 * int(correct.any(1).sum()) / n}
    return results


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    image_size: int | None = None,
    amp_dtype: torch.dtype | None = None,
    num_workers: int = 0,
    collate: Callable[[Any], Any] | None = None,
    header: str = "features",
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features (N, d) of every sample in ``dataset`` (uint8 images), in
    dataset order, and the labels (``normalize=False``: the raw ``model(x)`` outputs,
    as the linear probe wants them). Under torch.distributed each rank embeds every
    world_size-th sample and the shards are gathered on all ranks."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    indices = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices) if world > 1 else dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate
        or (lambda batch: batch if isinstance(batch, tuple) else torch.utils.data.default_collate(batch)),
    )
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for images, target in MetricLogger().log_every(loader, max(1, len(loader) // 5), header):
        x = normalize_batch(images.to(device, non_blocking=True), dataset.mean, dataset.std, image_size)
        with autocast(torch.device(device).type, amp_dtype):
            f = model(x)
        f = f.float()
        feats.append((F.normalize(f, dim=1) if normalize else f).cpu())
        labels.append(torch.as_tensor(target).cpu())
    model.train(was_training)
    if world > 1:  # a rank without a sample (fewer images than ranks) takes the width from the others
        width = torch.tensor(feats[0].shape[1] if feats else 0, device=device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX)
        feats = torch.cat(feats) if feats else torch.zeros(0, int(width))
        labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
        return _gather_shards(feats, labels, len(dataset), world, device)
    return torch.cat(feats), torch.cat(labels)


def _gather_shards(
    feats: torch.Tensor, labels: torch.Tensor, total: int, world: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
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
