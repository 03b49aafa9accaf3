"""k-NN top-1 of raw pixels on Fashion-MNIST (the baseline the demo is compared with).

    python bench/raw_pixel_knn.py

Same protocol as the online k-NN: cosine similarity of mean/std-normalised pixels,
weighted vote exp(sim / 0.07), train split as memory, test split as queries.
"""

import argparse
import os
import sys

import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from simpool.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist  # noqa: E402
from simpool.knn import knn_classify  # noqa: E402


def features(images):
    x = (images.float() / 255 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    return F.normalize(x.flatten(1), dim=1)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    results = knn_classify(features(train_x), train_y, features(test_x), test_y, ks=(10, 20, 100, 200))
    for k, r in results.items():
        print(f"raw-pixel k-NN k={k}: top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%")
