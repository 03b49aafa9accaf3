"""Weighted k-NN evaluation time, ours (simpool/knn.py) against DINO's knn_classifier.

    python bench/knn.py --n_train 100000 --n_query 10000 --dim 384 --classes 1000 [--k 20] [--rounds 3]

Both classify the same random, class-clustered, L2-normalised features (a Gaussian cloud
around one random centre per class), with DINO's vote: the k nearest training features
by cosine similarity, each weighting its class by exp(sim / T), T = 0.07. The reference is
``bench/reference.py:knn_classifier`` (torch matmul of 100 query chunks against the bank,
topk, one-hot vote); ours is ``simpool.knn.knn_classify``. The two alternate, ``--rounds``
times each; the figures are medians of wall and CPU time, and the run asserts that both
give the identical top-1.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.machine import describe  # noqa: E402
from bench.reference import knn_classifier  # noqa: E402
from simpool.knn import knn_classify  # noqa: E402
from simpool.utils import number  # noqa: E402


def clustered_features(n_train, n_query, dim, classes, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=g), dim=1)
    train_y = torch.arange(n_train) % classes
    query_y = torch.randint(0, classes, (n_query,), generator=g)
    train = F.normalize(centres[train_y] + noise * torch.randn(n_train, dim, generator=g) / dim**0.5, dim=1)
    query = F.normalize(centres[query_y] + noise * torch.randn(n_query, dim, generator=g) / dim**0.5, dim=1)
    return train, train_y, query, query_y


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n_train", type=number(int, low=1), default=100000, help="bank (train) vectors")
    p.add_argument("--n_query", type=number(int, low=1), default=10000, help="query vectors")
    p.add_argument("--dim", type=number(int, low=1), default=384, help="feature width")
    p.add_argument("--classes", type=number(int, low=1), default=1000, help="classes (one centre each)")
    p.add_argument("--k", type=number(int, low=1), default=20, help="neighbours that vote")
    p.add_argument("--temperature", type=number(float, above=0), default=0.07, help="vote weight exp(similarity / T)")
    p.add_argument(
        "--noise", type=number(float, low=0), default=3.0, help="per-sample noise norm relative to the centre's"
    )
    p.add_argument(
        "--rounds", type=number(int, low=1), default=3, help="alternating timed runs of each; medians are reported"
    )
    args = p.parse_args()
    train, train_y, query, query_y = clustered_features(args.n_train, args.n_query, args.dim, args.classes, args.noise)
    runs = {
        "reference": lambda: knn_classifier(
            train, train_y, query, query_y, args.k, args.temperature, num_classes=args.classes
        )[0],
        "ours": lambda: knn_classify(
            train, train_y, query, query_y, ks=(args.k,), temperature=args.temperature, num_classes=args.classes
        )[args.k]["top1"],
    }
    times = {name: [] for name in runs}
    top1 = {}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            w, c = time.perf_counter(), time.process_time()
            top1[name] = fn()
            times[name].append((time.perf_counter() - w, time.process_time() - c))
    print(describe())
    print(
        f"data: {args.n_train} train x {args.n_query} queries x {args.dim}-d, {args.classes} classes, "
        f"k={args.k}, T={args.temperature}; median of {args.rounds} alternating runs"
    )
    med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()}
    for name in runs:
        print(f"{name:9s}: {med[name][0]:7.2f} s wall  {med[name][1]:7.2f} s CPU   top-1 {top1[name]:.2f}%")
    print(
        f"ratio reference/ours: {med['reference'][0] / med['ours'][0]:.2f}x (wall), "
        f"{med['reference'][1] / med['ours'][1]:.2f}x (CPU time)"
    )
    assert top1["ours"] == top1["reference"], f"top-1 differs: ours {top1['ours']} vs reference {top1['reference']}"
    print("top-1 identical")


if __name__ == "__main__":
    main()
